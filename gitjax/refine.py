"""The one optimisation loop every iterative gradient-inversion attack reuses, and its losses.

``refine`` minimises ``objective(x)`` from ``x0`` with an optax optimiser inside one
``jax.lax.scan`` (no host round-trips), projects every iterate (box [0, 1] by
default), records the loss at every step and optionally a metric (e.g. PSNR
against the ground truth, for convergence curves), and keeps the best iterate by
objective. It is pure, so it jits and vmaps over independent runs (restarts, or N
leaked gradients): vmap over ``x0`` and whatever the objective closes over.

The gradient-matching losses live here too, so DLG, iDLG, Inverting Gradients and
the GIT-prior variants share one definition:

  * ``l2_distance``: sum of squared differences (DLG, Zhu et al. 2019).
  * ``cosine_distance``: 1 - <g, t> / (|g| |t|) over the whole gradient (Inverting
    Gradients, Geiping et al. 2020), optionally with per-layer weights.
  * ``total_variation``: anisotropic TV, the image prior of Geiping et al. 2020.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gitjax.layout import GradientLayout
from gitjax.types import Array, Grads

X = Any  # the optimised pytree: images (B, H, W, C), or (images, label logits)
Objective = Callable[[X], Array]


# ----------------------------------------------------------------------------- projection


def clamp01(x: X) -> X:
    """Box projection of every leaf onto [0, 1] (images live in pixel space)."""
    return jax.tree_util.tree_map(lambda a: jnp.clip(a, 0.0, 1.0), x)


def clamp_first01(x: tuple[Array, ...]) -> tuple[Array, ...]:
    """Projects only the first element of a tuple, e.g. (images, label logits)."""
    return (jnp.clip(x[0], 0.0, 1.0),) + tuple(x[1:])


# ----------------------------------------------------------------------------- optimisers


def sign_gradients() -> optax.GradientTransformation:
    """Replaces every gradient entry by its sign (Inverting Gradients' signed Adam).

    Chain it before the optimiser: ``optax.chain(sign_gradients(), optax.adam(lr))``.
    Geiping et al. 2020 found the sign more robust than the raw gradient, whose
    scale varies by orders of magnitude over the course of the attack.
    """

    def init(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update(updates: Any, state: optax.EmptyState, params: Any = None) -> tuple[Any, optax.EmptyState]:
        del params
        return jax.tree_util.tree_map(jnp.sign, updates), state

    return optax.GradientTransformation(init, update)


def multistep_decay(lr: float, num_steps: int, fractions: tuple[float, ...] = (3 / 8, 5 / 8, 7 / 8),
                    factor: float = 0.1) -> optax.Schedule:
    """Piecewise-constant schedule: ``lr`` times ``factor`` at each fraction of ``num_steps``.

    The defaults are Inverting Gradients' decay (x0.1 at 3/8, 5/8 and 7/8 of the run).
    Boundaries that coincide for tiny ``num_steps`` compound.
    """
    boundaries: dict[int, float] = {}
    for f in fractions:
        b = max(1, int(f * num_steps))
        boundaries[b] = boundaries.get(b, 1.0) * factor
    return optax.piecewise_constant_schedule(lr, boundaries)


def _stores_value(state: Any) -> bool:
    """Whether an optimiser state caches value and grad (optax's linesearches do)."""
    try:
        return optax.tree.get(state, "value") is not None and optax.tree.get(state, "grad") is not None
    except (KeyError, ValueError):
        return False


# ----------------------------------------------------------------------------- the loop


class Trace(NamedTuple):
    """What ``refine`` records (all arrays, so it vmaps).

    Attributes:
      loss_T: objective at the iterate entering each of the T steps.
      metric_R: ``metric_fn`` after steps r, 2r, ..., R r (r = record_every, R = T // r);
        shape (0,) when no metric is recorded.
      best_loss: objective of the returned (best) iterate.
      final_loss: objective of the last iterate.
    """

    loss_T: Array
    metric_R: Array
    best_loss: Array
    final_loss: Array


def refine(objective: Objective, x0: X, optimizer: optax.GradientTransformation, num_steps: int, *,
           project: Callable[[X], X] | None = clamp01, record_every: int = 0,
           metric_fn: Callable[[X], Array] | None = None) -> tuple[X, Trace]:
    """Minimises ``objective`` from ``x0``; returns (best iterate by objective, trace).

    Args:
      objective: x -> scalar; the caller closes over the leaked gradient and priors.
      x0: starting point (any pytree of float arrays).
      optimizer: an optax transformation. L-BFGS (``optax.lbfgs``) works as-is: it is
        called with ``value=, grad=, value_fn=`` like optax's linesearches need.
      num_steps: T, number of optimiser steps (static).
      project: applied to x0 and after every step (default: clip to [0, 1]); None = none.
      record_every: record ``metric_fn`` every this many steps (0 = never).
      metric_fn: x -> scalar, e.g. PSNR against the ground truth.

    NaN objectives never become the best iterate, so a run that diverges returns
    its last finite point (or x0).
    """
    opt = optax.with_extra_args_support(optimizer)
    proj = (lambda x: x) if project is None else project
    x0 = proj(x0)
    state0 = opt.init(x0)
    # A linesearch caches value/grad at the accepted point; the projection would
    # make that cache stale, so it is reused only for unprojected runs.
    if project is None and _stores_value(state0):
        cached = optax.value_and_grad_from_state(objective)
        value_and_grad = lambda x, s: cached(x, state=s)
    else:
        value_and_grad = lambda x, s: jax.value_and_grad(objective)(x)
    recording = bool(record_every) and metric_fn is not None
    nan = jnp.asarray(jnp.nan, jnp.float32)

    def step(carry, t):
        x, s, best_x, best_loss = carry
        loss, g = value_and_grad(x, s)
        better = loss < best_loss  # False for NaN
        best_x = jax.tree_util.tree_map(lambda b, c: jnp.where(better, c, b), best_x, x)
        best_loss = jnp.where(better, loss, best_loss)
        updates, s = opt.update(g, s, x, value=loss, grad=g, value_fn=objective)
        x = proj(optax.apply_updates(x, updates))
        if recording:
            m = jax.lax.cond((t + 1) % record_every == 0, lambda z: jnp.asarray(metric_fn(z), jnp.float32),
                             lambda z: nan, x)
        else:
            m = nan
        return (x, s, best_x, best_loss), (loss, m)

    init = (x0, state0, x0, jnp.asarray(jnp.inf, jnp.float32))
    (x, _, best_x, best_loss), (loss_T, m_T) = jax.lax.scan(step, init, jnp.arange(num_steps))
    final_loss = objective(x)
    better = final_loss < best_loss
    best_x = jax.tree_util.tree_map(lambda b, c: jnp.where(better, c, b), best_x, x)
    best_loss = jnp.where(better, final_loss, best_loss)
    metric_R = m_T[record_every - 1 :: record_every] if recording else jnp.zeros((0,), jnp.float32)
    return best_x, Trace(loss_T, metric_R, best_loss, final_loss)


# ----------------------------------------------------------------------------- losses

LAYER_WEIGHTS = ("equal", "linear", "linear_increasing")


def layer_weights(layout: GradientLayout, scheme: str = "equal") -> Grads | None:
    """Per-layer weights as a pytree of scalars shaped like the gradient (None for 'equal').

    'linear' decreases from 1 (first layer) to 1/L (last), as Inverting Gradients'
    'linear' option, which emphasises the early, image-revealing layers;
    'linear_increasing' is its reverse.
    """
    if scheme not in LAYER_WEIGHTS:
        raise ValueError(f"unknown layer weighting {scheme!r}; expected one of {LAYER_WEIGHTS}")
    if scheme == "equal":
        return None
    n = len(layout.blocks)
    w_L = np.arange(n, 0, -1, dtype=np.float32) / n
    if scheme == "linear_increasing":
        w_L = w_L[::-1]
    return layout.from_blocks([{leaf: jnp.float32(w) for leaf, _ in b.leaves} for b, w in zip(layout.blocks, w_L)])


def _weighted_sum(fn: Callable[[Array, Array], Array], g: Grads, t: Grads, w: Grads | None) -> Array:
    parts = jax.tree_util.tree_map(fn, g, t)
    if w is not None:
        parts = jax.tree_util.tree_map(lambda p, wi: p * wi, parts, w)
    return sum(jax.tree_util.tree_leaves(parts))


def l2_distance(g: Grads, t: Grads, weights: Grads | None = None) -> Array:
    """sum_l w_l |g_l - t_l|^2 over all gradient leaves (DLG's matching loss)."""
    return _weighted_sum(lambda a, b: jnp.sum(jnp.square(a - b)), g, t, weights)


def cosine_distance(g: Grads, t: Grads, weights: Grads | None = None) -> Array:
    """1 - <g, t>_w / (|g|_w |t|_w) over the whole flattened gradient (Geiping et al. 2020).

    With weights, every sum is per-layer weighted, as in Inverting Gradients.
    """
    gt = _weighted_sum(lambda a, b: jnp.sum(a * b), g, t, weights)
    gg = _weighted_sum(lambda a, b: jnp.sum(a * a), g, t, weights)
    tt = _weighted_sum(lambda a, b: jnp.sum(b * b), g, t, weights)
    # The tiny offset keeps sqrt differentiable when the dummy gradient is all zero.
    return 1.0 - gt / jnp.sqrt(gg * tt + 1e-30)


DISTANCES: dict[str, Callable[[Grads, Grads, Grads | None], Array]] = {"l2": l2_distance, "cosine": cosine_distance}


def total_variation(x_BxHxWxC: Array) -> Array:
    """Anisotropic TV: mean |vertical diffs| + mean |horizontal diffs| (Geiping et al. 2020)."""
    dv = jnp.mean(jnp.abs(x_BxHxWxC[:, 1:] - x_BxHxWxC[:, :-1]))
    dh = jnp.mean(jnp.abs(x_BxHxWxC[:, :, 1:] - x_BxHxWxC[:, :, :-1]))
    return dv + dh


def prior_penalty(x_BxHxWxC: Array, x_prior_BxHxWxC: Array) -> Array:
    """mean (x - x_prior)^2: pulls the reconstruction toward a prior image (e.g. GIT's output)."""
    return jnp.mean(jnp.square(x_BxHxWxC - x_prior_BxHxWxC))


# ----------------------------------------------------------------------------- plumbing shared by DLG / IG

INITS = ("uniform", "gaussian", "zeros")


def init_images(key: Array, shape_BxHxWxC: tuple[int, ...], init: str) -> Array:
    """Dummy images in [0, 1]: 'uniform' U[0,1], 'gaussian' N(0.5, 0.25^2) clipped, 'zeros'."""
    if init == "uniform":
        return jax.random.uniform(key, shape_BxHxWxC, jnp.float32)
    if init == "gaussian":
        return jnp.clip(0.5 + 0.25 * jax.random.normal(key, shape_BxHxWxC, jnp.float32), 0.0, 1.0)
    if init == "zeros":
        return jnp.zeros(shape_BxHxWxC, jnp.float32)
    raise ValueError(f"unknown init {init!r}; expected one of {INITS}")


def select_best(distances_R: Array, tree_R: Any) -> tuple[Array, Any]:
    """Index of the smallest (non-NaN) distance over R runs, and that run's slice of ``tree_R``."""
    i = jnp.argmin(jnp.where(jnp.isnan(distances_R), jnp.inf, distances_R))
    return i, jax.tree_util.tree_map(lambda a: a[i], tree_R)
