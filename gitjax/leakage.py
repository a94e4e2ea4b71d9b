"""What a client shares: pure functions from (victim, params, private batch) to gradients.

  * ``per_example_grads``: ``jax.vmap(jax.grad(loss))`` over the batch, leaf shape (B, *param).
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

from gitjax.types import Array, Grads, InputShapeError, ModelState, Params
from gitjax.victims import Victim

LossFn = Callable[[Params, ModelState, Array, Array], Array]


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
                      train: bool = False) -> Grads:
    """Per-example gradients via ``vmap(grad)``; every leaf gets a leading B axis.

    Each example is its own batch of one, so with ``train=True`` BatchNorm would
    normalise a single example; use eval mode (the default) for per-example work.
    Their mean over B equals ``batch_grad`` in eval mode.
    """
    check_batch(victim, x_BxHxWxC, y)
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
def _sharded_pe_fn(victim: Victim, mesh: jax.sharding.Mesh, train: bool):
    batch = NamedSharding(mesh, P("data"))
    repl = NamedSharding(mesh, P())

    # Each device runs vmap(grad) on its own slice of the batch (no communication needed).
    # Why shard_map and not jit with in/out shardings: XLA's SPMD partitioner split vmap's
    # batched weight-gradient convolutions wrongly, silently returning wrong conv gradients on
    # every device but the first (jax 0.10.2, XLA CPU). Inside shard_map the params must be
    # cast to device-varying: the gradient w.r.t. a replicated input is otherwise psum-med
    # over the mesh (the transpose of the implicit broadcast).
    def local(params: Params, state: ModelState, x_bxHxWxC: Array, y: Array) -> Grads:
        return per_example_grads(victim, _to_varying(params, "data"), state, x_bxHxWxC, y, train=train)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P("data"))
    return jax.jit(fn, in_shardings=(repl, repl, batch, batch), out_shardings=batch)


def sharded_per_example_grads(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array,
                              y: Array, mesh: jax.sharding.Mesh | None = None, train: bool = False) -> Grads:
    """``per_example_grads`` with the batch axis sharded over a 1-D "data" mesh.

    Params are replicated; B must be divisible by the number of devices. The
    result's leaves are sharded along their leading B axis.
    """
    check_batch(victim, x_BxHxWxC, y)
    mesh = data_mesh() if mesh is None else mesh
    n = mesh.devices.size
    if x_BxHxWxC.shape[0] % n:
        raise ValueError(f"batch of {x_BxHxWxC.shape[0]} is not divisible by the {n} devices of the mesh")
    return _sharded_pe_fn(victim, mesh, train)(params, state, x_BxHxWxC, jnp.asarray(y))


def leaked_group_grads(victim: Victim, params: Params, state: ModelState, x_NxBxHxWxC: Array, y_NxB: Array,
                       mesh: jax.sharding.Mesh | None = None) -> Grads:
    """N FedSGD gradients, each the batch-mean over its B images; leaves (N, *param).

    With a mesh of more than one device the N axis is split with ``shard_map`` (each device
    runs vmap(batch_grad) on its slice) for the same reason as ``_sharded_pe_fn``: jit's SPMD
    partitioning of vmapped conv weight gradients returned wrong values (jax 0.10.2, XLA CPU).
    Call it inside jit; N must be divisible by the mesh size.
    """

    def local(p: Params, x: Array, y: Array) -> Grads:
        return jax.vmap(lambda xi, yi: batch_grad(victim, p, state, xi, yi))(x, y)

    if mesh is None or mesh.devices.size == 1:
        return local(params, x_NxBxHxWxC, y_NxB)
    fn = jax.shard_map(lambda p, x, y: local(_to_varying(p, "data"), x, y), mesh=mesh,
                       in_specs=(P(), P("data"), P("data")), out_specs=P("data"))
    return fn(params, x_NxBxHxWxC, y_NxB)
