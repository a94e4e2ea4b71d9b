"""Many leaked gradients attacked at once: ``jax.vmap`` over N, optionally sharded over devices.

An auditor measuring leakage over a dataset runs the same iterative attack on N
independent gradients (N clients, or N examples). The pure reconstruct
functions of DLG / iDLG / IG vmap over (gradient, labels, key); with a 1-D
"data" mesh (``gitjax.leakage.data_mesh``) the N axis is split over devices
with ``NamedSharding`` while the victim parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gitjax.layout import GradientLayout, check_finite
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim

def _reconstruct_fn(method: str) -> Callable[..., tuple[Array, dict[str, Array]]]:
    """The registry's pure core of ``method`` (one signature for every vmappable attack)."""
    from gitjax.attacks.registry import ATTACKS

    spec = ATTACKS.get(method)
    if spec is None or spec.reconstruct is None:
        vmappable = sorted(n for n, s in ATTACKS.items() if s.reconstruct is not None)
        raise GitjaxError(f"batched_attack supports {vmappable}; got {method!r}")
    return spec.reconstruct


@functools.lru_cache(maxsize=64)
def _batched_fn(method: str, victim: Victim, config: Any, batch_size: int, has_labels: bool,
                extra_names: tuple[str, ...], mesh: jax.sharding.Mesh | None):
    reconstruct = _reconstruct_fn(method)

    def one(params: Params, state: ModelState, g: Grads, y: Array | None, k: PRNGKey,
            extras: dict[str, Array]) -> tuple[Array, dict[str, Array]]:
        return reconstruct(victim, params, state, g, y if has_labels else None, k, config,
                           batch_size=batch_size, **extras)

    fn = jax.vmap(one, in_axes=(None, None, 0, 0 if has_labels else None, 0, 0))
    if mesh is None:
        return jax.jit(fn)
    data, repl = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    y_sharding = data if has_labels else repl
    return jax.jit(fn, in_shardings=(repl, repl, data, y_sharding, data, data), out_shardings=data)


def batched_attack(method: str, victim: Victim, params: Params, state: ModelState, grads_N: Grads,
                   labels_NxB: Array | None, key: PRNGKey, config: Any, mesh: jax.sharding.Mesh | None = None,
                   *, batch_size: int | None = None, x_init_N: Array | None = None,
                   x_prior_N: Array | None = None, x_true_N: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Attacks N leaked gradients in parallel; equal to N single runs with keys ``split(key, N)``.

    Args:
      method: 'ig' | 'dlg' | 'idlg'.
      grads_N: gradient pytree whose leaves carry a leading N axis.
      labels_NxB: (N, B) int labels, or None to recover them (iDLG / counting; DLG with
        ``soft_labels`` optimises them instead).
      config: the method's config (IGConfig / DLGConfig).
      mesh: optional 1-D mesh with axis "data"; N must be divisible by its size.
      batch_size: B, needed when labels_NxB is None (else read from it).
      x_init_N, x_prior_N, x_true_N: optional (N, B, H, W, C) GIT init / prior / truth.

    Returns:
      x_NxBxHxWxC and the reconstruct function's info arrays with a leading N axis.
    """
    _reconstruct_fn(method)  # a clear error for a method without a pure core
    layout = GradientLayout.from_params(params)
    layout.check(grads_N)
    check_finite(grads_N)
    g_leaf, p_leaf = jax.tree_util.tree_leaves(grads_N)[0], jax.tree_util.tree_leaves(params)[0]
    if g_leaf.ndim != p_leaf.ndim + 1:
        raise GitjaxError("grads_N must have exactly one leading N axis on every leaf")
    n = g_leaf.shape[0]
    if labels_NxB is not None:
        labels_NxB = jnp.asarray(labels_NxB)
        if labels_NxB.ndim != 2 or labels_NxB.shape[0] != n:
            raise GitjaxError(f"labels_NxB must have shape ({n}, B); got {tuple(labels_NxB.shape)}")
        batch_size = labels_NxB.shape[1]
    if batch_size is None:
        raise GitjaxError("pass batch_size when labels_NxB is None")
    if method == "idlg":
        labels_NxB = None
        config = dataclasses.replace(config, soft_labels=False)
    extras = {}
    for name, x in (("x_init", x_init_N), ("x_prior", x_prior_N), ("x_true", x_true_N)):
        if x is not None:
            x = jnp.asarray(x, jnp.float32)
            if x.shape != (n, batch_size, *victim.input_shape):
                raise GitjaxError(f"{name}_N must have shape {(n, batch_size, *victim.input_shape)}; "
                                  f"got {tuple(x.shape)}")
            extras[name] = x
    if mesh is not None and n % mesh.devices.size:
        raise GitjaxError(f"N={n} gradients are not divisible by the {mesh.devices.size} devices of the mesh")
    fn = _batched_fn(method, victim, config, int(batch_size), labels_NxB is not None, tuple(sorted(extras)), mesh)
    return fn(params, state, grads_N, labels_NxB, jax.random.split(key, n), extras)
