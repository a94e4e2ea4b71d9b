"""What a client shares: pure functions from (victim, params, private batch) to gradients.

  * ``per_example_grads``: one gradient per example, leaf shape (B, *param); computed by
    ``gitjax.per_example`` (one forward + one backward pass, weight gradients contracted
    from layer inputs and output errors) or by ``jax.vmap(jax.grad(loss))``.
  * ``batch_grad``: the gradient of the batch-mean loss (what FedSGD shares).
  * ``fedavg_update``: the model difference after K local SGD steps (what FedAvg shares).
  * ``sharded_per_example_grads``: per-example gradients with the batch sharded over devices.

Labels are passed as integer class ids (B,) or as probability vectors (B, K); the
latter lets DLG optimise soft labels through the same loss.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from gitjax import per_example as _pe
from gitjax.types import Array, GitjaxError, Grads, InputShapeError, ModelState, Params
from gitjax.victims import Victim

LossFn = Callable[[Params, ModelState, Array, Array], Array]
METHODS = ("auto", "vmap", "patches")


def as_probs(y: Array, num_classes: int) -> Array:
    """Integer labels (B,) -> one-hot (B, K) float32; probability inputs (B, K) pass through."""
    y = jnp.asarray(y)
    if y.ndim == 1:
        return jax.nn.one_hot(y, num_classes, dtype=jnp.float32)
    return y.astype(jnp.float32)


def check_batch(victim: Victim, x_BxHxWxC: Array, y: Array) -> None:
    """Raises InputShapeError for images/labels that do not fit the victim."""
    victim.check_images(x_BxHxWxC)
    y_shape = tuple(np.shape(y))
    b = x_BxHxWxC.shape[0]
    if y_shape not in ((b,), (b, victim.num_classes)):
        raise InputShapeError(
            f"labels must have shape ({b},) or ({b}, {victim.num_classes}) for {b} images; got {y_shape}"
        )
    check_labels(victim, y)


def check_labels(victim: Victim, y: Array) -> None:
    """Raises GitjaxError for concrete integer labels outside [0, K) (one_hot would zero them).

    Traced labels (inside jit/vmap) cannot be checked and pass through.
    """
    if isinstance(y, jax.core.Tracer) or np.ndim(y) != 1:
        return
    y_np = np.asarray(y)
    if not np.issubdtype(y_np.dtype, np.integer) or y_np.size == 0:
        return
    lo, hi = int(y_np.min()), int(y_np.max())
    if lo < 0 or hi >= victim.num_classes:
        bad = lo if lo < 0 else hi
        raise GitjaxError(
            f"label {bad} is outside [0, {victim.num_classes}) for victim {victim.name!r}: its one-hot "
            f"would be all zero and so would the gradient; pass class ids 0..{victim.num_classes - 1}"
        )


def _resolve_method(victim: Victim, params: Params, state: ModelState, method: str, train: bool) -> str:
    """'vmap' or 'patches' for this call; see ``per_example_grads``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if train and "batch_stats" in (state or {}):
        return "vmap"  # train-mode BatchNorm mixes the examples of a batch: no per-example taps
    if method != "auto":
        return method
    # Measured on XLA:CPU (benchmarks/per_example_grads.py): patches beats vmap wherever the tap
    # rules cover every parameter; a ViT's pos-embedding/CLS need an extra vmap(grad) pass, so
    # there vmap alone is faster. Other backends: not measured yet, same rule.
    return "patches" if _pe.covered_fraction(victim, params, state) == 1.0 else "vmap"


def make_loss(victim: Victim, train: bool = False) -> LossFn:
    """Mean softmax cross-entropy of the victim: loss(params, state, x_BxHxWxC, y) -> scalar."""

    def loss(params: Params, state: ModelState, x_BxHxWxC: Array, y: Array) -> Array:
        logits_BxK = victim.apply(params, state, x_BxHxWxC, train=train)
        return jnp.mean(optax.softmax_cross_entropy(logits_BxK, as_probs(y, victim.num_classes)))

    return loss


def batch_grad(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array, y: Array,
               train: bool = False) -> Grads:
    """Gradient of the batch-mean loss, shaped like ``params`` (FedSGD's shared update)."""
    check_batch(victim, x_BxHxWxC, y)
    return jax.grad(make_loss(victim, train))(params, state, x_BxHxWxC, y)


def per_example_grads(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array, y: Array,
                      train: bool = False, method: str = "auto") -> Grads:
    """Per-example gradients; every leaf gets a leading B axis.

    Each example is its own batch of one, so with ``train=True`` BatchNorm would
    normalise a single example; use eval mode (the default) for per-example work.
    Their mean over B equals ``batch_grad`` in eval mode.

    method: "vmap" is ``vmap(grad)``; "patches" is ``gitjax.per_example.group_grads``
    (one forward + one batched backward pass, weight gradients contracted from layer
    inputs and output errors; equal to vmap within float tolerance); "auto" picks the
    faster one for this victim (train-mode BatchNorm always uses vmap).
    """
    check_batch(victim, x_BxHxWxC, y)
    if _resolve_method(victim, params, state, method, train) == "patches":
        y_arr = jnp.asarray(y)
        return _pe.group_grads(victim, params, state, x_BxHxWxC[:, None], y_arr[:, None])
    loss = make_loss(victim, train)

    def one(x_HxWxC: Array, y_i: Array) -> Grads:
        return jax.grad(loss)(params, state, x_HxWxC[None], y_i[None])

    return jax.vmap(one)(x_BxHxWxC, jnp.asarray(y))


def fedavg_update(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array, y: Array,
                  local_steps: int = 1, lr: float = 0.1, local_batch: int | None = None,
                  train: bool = False) -> Grads:
    """FedAvg client update ``(params - params_after_K_steps) / (K * lr)``.

    The client runs ``local_steps`` SGD steps, cycling through its data in
    consecutive mini-batches of ``local_batch`` (all of it when None). Dividing by
    K * lr puts the update on the scale of a gradient, so K=1 with a full batch
    returns exactly ``batch_grad``.
    """
    check_batch(victim, x_BxHxWxC, y)
    if local_steps < 1:
        raise ValueError(f"local_steps must be >= 1, got {local_steps}")
    b = x_BxHxWxC.shape[0]
    mb = b if local_batch is None else local_batch
    if mb < 1 or b % mb:
        raise ValueError(f"local_batch={mb} must divide the client's {b} examples")
    grad_fn = jax.grad(make_loss(victim, train))
    n_chunks = b // mb
    x_chunks = x_BxHxWxC.reshape((n_chunks, mb) + x_BxHxWxC.shape[1:])
    y_arr = jnp.asarray(y)
    y_chunks = y_arr.reshape((n_chunks, mb) + y_arr.shape[1:])

    def step(p: Params, k: Array) -> tuple[Params, None]:
        i = k % n_chunks
        g = grad_fn(p, state, x_chunks[i], y_chunks[i])
        return jax.tree_util.tree_map(lambda a, d: a - lr * d, p, g), None

    final, _ = jax.lax.scan(step, params, jnp.arange(local_steps))
    return jax.tree_util.tree_map(lambda a, f: (a - f) / (local_steps * lr), params, final)


# ----------------------------------------------------------------------------- sharding


def data_mesh(devices: list | None = None) -> jax.sharding.Mesh:
    """A 1-D mesh over ``devices`` (all of them by default) with axis name "data"."""
    devices = jax.devices() if devices is None else devices
    return jax.sharding.Mesh(np.asarray(devices), ("data",))


def _to_varying(tree, axis: str):
    """Marks replicated values as device-varying inside shard_map (see _sharded_pe_fn)."""
    if hasattr(jax.lax, "pcast"):
        return jax.tree_util.tree_map(lambda a: jax.lax.pcast(a, axis, to="varying"), tree)
    return jax.tree_util.tree_map(lambda a: jax.lax.pvary(a, axis), tree)  # jax < 0.8


@functools.lru_cache(maxsize=None)
def _sharded_pe_fn(victim: Victim, mesh: jax.sharding.Mesh, train: bool, method: str):
    batch = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())

    # Each device runs vmap(grad) on its own slice of the batch (no communication needed).
    # Why shard_map and not jit with in/out shardings: XLA's SPMD partitioner split vmap's
    # batched weight-gradient convolutions wrongly, silently returning wrong conv gradients on
    # every device but the first (jax 0.10.2, XLA CPU). Inside shard_map the params must be
    # cast to device-varying: the gradient w.r.t. a replicated input is otherwise psum-med
    # over the mesh (the transpose of the implicit broadcast).
    def local(params: Params, state: ModelState, x_bxHxWxC: Array, y: Array) -> Grads:
        return per_example_grads(victim, _to_varying(params, "data"), state, x_bxHxWxC, y, train=train,
                                 method=method)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P("data"))
    return jax.jit(fn, in_shardings=(repl, repl, batch, batch), out_shardings=batch)


def sharded_per_example_grads(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array,
                              y: Array, mesh: jax.sharding.Mesh | None = None, train: bool = False,
                              method: str = "auto") -> Grads:
    """``per_example_grads`` with the batch axis sharded over a 1-D "data" mesh.

    Params are replicated; B must be divisible by the number of devices. The
    result's leaves are sharded along their leading B axis.
    """
    check_batch(victim, x_BxHxWxC, y)
    mesh = data_mesh() if mesh is None else mesh
    n = mesh.devices.size
    if x_BxHxWxC.shape[0] % n:
        raise ValueError(f"batch of {x_BxHxWxC.shape[0]} is not divisible by the {n} devices of the mesh")
    method = _resolve_method(victim, params, state, method, train)
    return _sharded_pe_fn(victim, mesh, train, method)(params, state, x_BxHxWxC, jnp.asarray(y))


def leaked_group_grads(victim: Victim, params: Params, state: ModelState, x_NxBxHxWxC: Array, y_NxB: Array,
                       mesh: jax.sharding.Mesh | None = None, method: str = "auto") -> Grads:
    """N FedSGD gradients, each the batch-mean over its B images; leaves (N, *param).

    With a mesh of more than one device the N axis is split with ``shard_map`` (each device
    runs vmap(batch_grad) on its slice) for the same reason as ``_sharded_pe_fn``: jit's SPMD
    partitioning of vmapped conv weight gradients returned wrong values (jax 0.10.2, XLA CPU).
    Call it inside jit; N must be divisible by the mesh size. ``method`` as in
    ``per_example_grads`` ("patches": one pass over all N*B images, contracted per group).
    """
    use = _resolve_method(victim, params, state, method, train=False)

    def local(p: Params, x: Array, y: Array) -> Grads:
        if use == "patches":
            return _pe.group_grads(victim, p, state, x, y)
        return jax.vmap(lambda xi, yi: batch_grad(victim, p, state, xi, yi))(x, y)

    if mesh is None or mesh.devices.size == 1:
        return local(params, x_NxBxHxWxC, y_NxB)
    fn = jax.shard_map(lambda p, x, y: local(_to_varying(p, "data"), x, y), mesh=mesh,
                       in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
    return fn(params, x_NxBxHxWxC, y_NxB)
