"""Many leaked gradients attacked at once, optionally sharded over devices.

An auditor measuring leakage over a dataset runs the same iterative attack on N
independent gradients (N clients, or N examples).

* IG (``stacked_ig``): the N problems and their R restarts are stacked into one
  refinement of an (N*R, B, H, W, C) array. Signed Adam is elementwise, so this is
  exactly N*R independent runs, but every dummy gradient of a step comes from one
  call of a group-gradient function over all N*R groups: with
  ``gitjax.per_example.group_grads`` (one batched backward pass and per-layer
  contractions) when that module exists, else ``vmap(batch_grad)``. Best iterate and
  best restart are chosen per problem by its gradient distance.
* DLG / iDLG: ``jax.vmap`` of the single-problem reconstruct function.

With a 1-D "data" mesh (``gitjax.leakage.data_mesh``) the N axis is split over
devices with ``NamedSharding`` while the victim parameters are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from gitjax.attacks.ig import IGConfig
from gitjax.attacks.iterative import (HOLDOUT_FOLD, above_floor, floor_ties_to_later, keep_resolved_start,
                                     labels_or_recovered, start_step_size)
from gitjax.layout import GradientLayout, check_finite
from gitjax.trace import forward_order
from gitjax.leakage import as_probs, batch_grad
from gitjax.losses import (cosine_distance, holdout_masks, layer_weights, masked, noise_floor, on_support,
                           prior_penalty, pruned_support, support_rule, total_variation)
from gitjax.refine import argmin_runs, ig_optimizer, init_images, refine
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim

GroupGrads = Callable[[Victim, Params, ModelState, Array, Array], Grads]


def vmap_group_grads(victim: Victim, params: Params, state: ModelState, x_MxBxHxWxC: Array,
                     y_MxBxK: Array) -> Grads:
    """M batch-mean gradients, one per group of B images, by ``vmap(batch_grad)`` (leaves (M, ...))."""
    return jax.vmap(lambda x, y: batch_grad(victim, params, state, x, y))(x_MxBxHxWxC, y_MxBxK)


def map_group_grads(victim: Victim, params: Params, state: ModelState, x_MxBxHxWxC: Array,
                    y_MxBxK: Array) -> Grads:
    """M batch-mean gradients by ``lax.map`` (one group after another inside one program).

    ``vmap`` of a conv weight gradient becomes a grouped convolution, and IG
    differentiates it once more: on XLA:CPU that is ~100x slower than M separate
    gradients at M = 64 (measured 57 s vs 0.46 s for one objective gradient, LeNet).
    """
    return jax.lax.map(lambda xy: batch_grad(victim, params, state, *xy), (x_MxBxHxWxC, y_MxBxK))


def default_group_grads() -> GroupGrads:
    """The fastest group-gradient rule available: ``gitjax.per_example.group_grads`` where that
    module exists (one batched backward pass + per-layer contractions; LeNet, M = 64, 2-core
    CPU: 0.75 s per IG objective gradient), else ``map_group_grads`` on CPU (1.5 s) and
    ``vmap_group_grads`` elsewhere (57 s on CPU: grouped convolutions)."""
    if importlib.util.find_spec("gitjax.per_example") is not None:
        from gitjax.per_example import group_grads

        return group_grads
    return map_group_grads if jax.default_backend() == "cpu" else vmap_group_grads


def stacked_ig(victim: Victim, params: Params, state: ModelState, grads_N: Grads, labels_NxB: Array | None,
               keys_N: PRNGKey, config: IGConfig, *, batch_size: int, x_init_N: Array | None = None,
               x_prior_N: Array | None = None, x_true_N: Array | None = None,
               group_grads: GroupGrads = vmap_group_grads) -> tuple[Array, dict[str, Array]]:
    """Inverting Gradients on N problems in one stacked refinement (pure; jit with victim, config,
    batch_size, group_grads static). Problem n equals ``ig_reconstruct`` with key ``keys_N[n]``.

    Returns x_NxBxHxWxC and info arrays with a leading N axis: grad_distance, labels (N, B),
    psnr (N, T // record_every) when x_true_N is given, restart_grad_distance (N, R),
    restart_index (N,), start_lr (N,).
    """
    n, r, b = keys_N.shape[0], config.restarts, batch_size
    shape = (b, *victim.input_shape)
    k_lab_N, k_run_N = jnp.moveaxis(jax.vmap(jax.random.split)(keys_N), 1, 0)
    if labels_NxB is None:
        labels_NxB = jax.vmap(lambda g, k: labels_or_recovered(victim, params, state, g, None, b, k))(grads_N, k_lab_N)
    y_NxBxK = as_probs(labels_NxB, victim.num_classes)
    weights = layer_weights(GradientLayout.from_params(params, order=forward_order(victim)), config.layer_weights)

    def rep(a):  # (N, ...) -> (N*R, ...), problem-major so a device's block holds whole problems
        return jnp.repeat(a, r, axis=0)

    keys_NxR = jax.vmap(lambda k: jax.random.split(k, r))(k_run_N)
    x0_NxR = jax.vmap(jax.vmap(lambda k: init_images(k, shape, config.init)))(keys_NxR)
    lr_NxR = jnp.full((n, r), config.lr, jnp.float32)
    t_M, y_M = jax.tree_util.tree_map(rep, grads_N), rep(y_NxBxK)

    rule = support_rule(config)
    # The support is a property of each problem's leaked gradient: found once per problem, shared by its restarts.
    support_N = jax.vmap(lambda t: pruned_support(t, *rule))(grads_N) if rule[0] > 0 or rule[2] > 0 else None
    support_M = jax.tree_util.tree_map(rep, support_N)
    cosine_M = jax.vmap(lambda g, t: cosine_distance(g, t, weights))

    def dummy_grads(x_M: Array) -> Grads:
        return on_support(group_grads(victim, params, state, x_M, y_M), support_M)

    def distances(x_M: Array) -> Array:
        return cosine_M(dummy_grads(x_M), t_M)

    holdout = config.holdout > 0
    if holdout:  # as match_reconstruct: one draw per problem from its own key, shared by its restarts
        fit_N, held_N = jax.vmap(lambda k, t, s: holdout_masks(jax.random.fold_in(k, HOLDOUT_FOLD), t, s,
                                                               config.holdout))(keys_N, grads_N, support_N)
        fit_M, held_M = jax.tree_util.tree_map(rep, fit_N), jax.tree_util.tree_map(rep, held_N)
        t_fit_M, t_held_M = masked(t_M, fit_M), masked(t_M, held_M)

        def fit_and_held(x_M: Array) -> tuple[Array, Array]:
            g_M = dummy_grads(x_M)
            return cosine_M(masked(g_M, fit_M), t_fit_M), cosine_M(masked(g_M, held_M), t_held_M)

    # With a known noise level, runs are scored by their distance above the truth's (as ig_reconstruct).
    noisy = config.noise_std > 0
    floor_M = rep(jax.vmap(lambda t: noise_floor(t, config.noise_std, weights))(grads_N)) if noisy else None
    excess = functools.partial(above_floor, floor=floor_M)

    if x_init_N is not None:
        x_init_N = jnp.clip(x_init_N, 0.0, 1.0)
        # The start's quality (step size, kept start); ``distances`` works on all N*R rows.
        d_start_N = jax.lax.stop_gradient(excess(distances(rep(x_init_N)))).reshape(n, r)[:, 0]
        if config.start_lr > 0:
            lr0_N = jnp.full((n,), config.start_lr, jnp.float32)
        else:
            d_rand = jax.lax.stop_gradient(excess(distances(x0_NxR.reshape(n * r, *shape)))).reshape(n, r)[:, 0]
            lr0_N = start_step_size(config.lr, d_start_N, d_rand)
        # The start takes the last slot, as in ``match_reconstruct``.
        lr_NxR = lr_NxR.at[:, -1].set(lr0_N)
        x0_NxR = x0_NxR.at[:, -1].set(x_init_N)
    x_prior_M = None if x_prior_N is None else rep(x_prior_N)

    def objective(x_M: Array) -> tuple[Array, Array]:
        if holdout:
            d_M, score_M = fit_and_held(x_M)  # minimise on the fitted entries; select by the held-out ones
        else:
            d_M = distances(x_M)
            score_M = excess(d_M)
        reg = jnp.float32(0.0)
        if config.tv_weight:
            reg = reg + config.tv_weight * jnp.sum(jax.vmap(total_variation)(x_M))
        if x_prior_M is not None and config.prior_weight:
            reg = reg + config.prior_weight * jnp.sum(jax.vmap(prior_penalty)(x_M, x_prior_M))
        return jnp.sum(d_M) + reg, score_M

    metric = None
    if x_true_N is not None:
        x_true_M = rep(x_true_N)
        # metrics.psnr per group (floored MSE, range 1), averaged over each group's B images.
        metric = lambda x_M: jnp.mean(-10.0 * jnp.log10(jnp.maximum(
            jnp.mean(jnp.square(x_M - x_true_M), axis=(2, 3, 4)), 1e-10)), axis=1)
    x0_M = x0_NxR.reshape(n * r, *shape)
    lr_M = lr_NxR.reshape(n * r, *(1,) * len(shape))  # one signed step size per group
    opt = ig_optimizer(lr_M, config.steps, config.signed, config.lr_decay)
    later_M = jnp.tile(floor_ties_to_later(r, noisy, x_init_N is not None), n)  # problem-major, as x0_M
    x_M, trace = refine(objective, x0_M, opt, config.steps, record_every=config.record_every, metric_fn=metric,
                        has_aux=True, ties_to_later=later_M)
    d_NxR = trace.best_score.reshape(n, r)
    i_N = argmin_runs(d_NxR, prefer_last=noisy and x_init_N is not None, axis=1)
    pick = lambda a_M: jnp.take_along_axis(a_M.reshape(n, r, *a_M.shape[1:]),
                                          i_N.reshape(n, 1, *(1,) * (a_M.ndim - 1)), axis=1)[:, 0]
    labels_B = labels_NxB if labels_NxB.ndim == 2 else jnp.argmax(labels_NxB, axis=-1)
    info = {"grad_distance": jnp.min(jnp.where(jnp.isnan(d_NxR), jnp.inf, d_NxR), axis=1),
            "labels": labels_B.astype(jnp.int32), "restart_grad_distance": d_NxR, "restart_index": i_N,
            "start_lr": lr_NxR[:, -1]}
    if metric is not None and config.record_every:
        info["psnr"] = pick(jnp.moveaxis(trace.metric_R, 0, 1))  # (T/r, M) -> (N, T/r)
    x_N = pick(x_M)
    if x_init_N is not None and config.start_resolved > 0:
        x_N, d_N, i_N = jax.vmap(keep_resolved_start, in_axes=(0, 0, 0, 0, 0, None, None))(
            x_N, info["grad_distance"], i_N, x_init_N, d_start_N, config.start_resolved, r - 1)
        info.update(grad_distance=d_N, restart_index=i_N)
    return x_N, info



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
                extra_names: tuple[str, ...], mesh: jax.sharding.Mesh | None, group_grads: GroupGrads):
    if method == "ig":
        def fn(params, state, g_N, y_N, keys_N, extras):
            return stacked_ig(victim, params, state, g_N, y_N if has_labels else None, keys_N, config,
                              batch_size=batch_size, group_grads=group_grads,
                              **{f"{k}_N": v for k, v in extras.items()})
    else:
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
                   x_prior_N: Array | None = None, x_true_N: Array | None = None,
                   group_grads: GroupGrads | None = None) -> tuple[Array, dict[str, Array]]:
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
      group_grads: IG only: (victim, params, state, x_MxBxHxWxC, y_MxBxK) -> M gradients
        (default: ``default_group_grads()``).

    Returns:
      x_NxBxHxWxC and the reconstruct function's info arrays with a leading N axis.
    """
    _reconstruct_fn(method)  # a clear error for a method without a pure core
    layout = GradientLayout.from_params(params, order=forward_order(victim))
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
    if group_grads is None:
        group_grads = default_group_grads()
    fn = _batched_fn(method, victim, config, int(batch_size), labels_NxB is not None, tuple(sorted(extras)), mesh,
                     group_grads)
    return fn(params, state, grads_N, labels_NxB, jax.random.split(key, n), extras)
