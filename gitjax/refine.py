"""The one optimisation loop every iterative gradient-inversion attack reuses, and best-of-restarts.

``refine`` minimises ``objective(x)`` from ``x0`` with an optax optimiser inside one
``jax.lax.scan`` (no host round-trips), projects every iterate (box [0, 1] by
default), records the loss at every step and optionally a metric (e.g. PSNR
against the ground truth, for convergence curves), and keeps the best iterate,
by the objective or, when the objective also returns a score (``has_aux``), by
that score (e.g. the gradient-matching term alone, without TV). It is pure, so it
jits and vmaps over independent runs (restarts, or N leaked gradients).

``best_of_restarts`` runs R such refinements in parallel (``jax.vmap``) and keeps
the one with the smallest gradient distance. ``ig_optimizer`` is Inverting
Gradients' signed Adam with its step decay. The losses themselves live in
``gitjax.losses``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gitjax.types import Array

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


def ig_optimizer(lr: float | Array, num_steps: int, signed: bool = True, lr_decay: bool = True
                 ) -> optax.GradientTransformation:
    """Inverting Gradients' optimiser: (sign ->) Adam, with the x0.1 decay at 3/8, 5/8, 7/8.

    Geiping et al. 2020 found the sign of the gradient more robust than the gradient,
    whose scale varies by orders of magnitude over the attack; with it ``lr`` is the
    per-pixel step in [0, 1] units. ``lr`` may be a traced scalar (e.g. one per restart).
    """
    adam = optax.adam(multistep_decay(lr, num_steps) if lr_decay else lr)
    return optax.chain(optax.scale_by_sign(), adam) if signed else adam


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
      loss_T: objective at the iterate entering each of the T steps (loss_T[0] is x0's).
      metric_R: ``metric_fn`` after steps r, 2r, ..., R r (r = record_every, R = T // r),
        with the metric's own shape after R; shape (0,) when no metric is recorded.
      best_loss: objective of the returned (best) iterate.
      final_loss: objective of the last iterate.
      best_score: the selection score of the returned iterate (= best_loss without ``has_aux``).
    """

    loss_T: Array
    metric_R: Array
    best_loss: Array
    final_loss: Array
    best_score: Array


def refine(objective: Objective, x0: X, optimizer: optax.GradientTransformation, num_steps: int, *,
           project: Callable[[X], X] | None = clamp01, record_every: int = 0,
           metric_fn: Callable[[X], Array] | None = None, has_aux: bool = False,
           ties_to_later: Array | bool = False) -> tuple[X, Trace]:
    """Minimises ``objective`` from ``x0``; returns (best iterate, trace).

    Args:
      objective: x -> scalar; the caller closes over the leaked gradient and priors.
        With ``has_aux``: x -> (scalar loss, score); the loss is minimised and the
        returned iterate is the one with the lowest score (e.g. the gradient-matching
        term alone, so a regulariser cannot make a smooth start "best"). A score of
        shape (N,) selects per leading index of every leaf of x (N independent
        problems stacked in one run); best_loss is then the loss at the step each
        selected slice came from.
      x0: starting point (any pytree of float arrays). It is a candidate too, so the
        result never has a higher score than the (projected) start.
      optimizer: an optax transformation. L-BFGS (``optax.lbfgs``) works as-is: it is
        called with ``value=, grad=, value_fn=`` like optax's linesearches need.
      num_steps: T, number of optimiser steps (static).
      project: applied to x0 and after every step (default: clip to [0, 1]); None = none.
      record_every: record ``metric_fn`` every this many steps (0 = never).
      metric_fn: x -> scalar, e.g. PSNR against the ground truth.
      ties_to_later: an iterate whose score equals the best so far replaces it (bool, or
        an array broadcast against the score: per stacked problem). Off, the first iterate
        to reach the best score is kept; on, the last (a score floored at 0 is then "reach
        the floor, then keep minimising the loss").

    NaN scores never select an iterate, so a run that diverges returns its last
    finite point (or x0).
    """
    opt = optax.with_extra_args_support(optimizer)
    proj = (lambda x: x) if project is None else project
    x0 = proj(x0)
    state0 = opt.init(x0)
    loss_fn = (lambda x: objective(x)[0]) if has_aux else objective
    # A linesearch caches value/grad at the accepted point; the projection would
    # make that cache stale, so it is reused only for unprojected runs without aux.
    if project is None and not has_aux and _stores_value(state0):
        cached = optax.value_and_grad_from_state(objective)

        def value_and_grad(x, s):
            loss, g = cached(x, state=s)
            return loss, loss, g
    elif has_aux:
        def value_and_grad(x, s):
            (loss, score), g = jax.value_and_grad(objective, has_aux=True)(x)
            return loss, score, g
    else:
        def value_and_grad(x, s):
            loss, g = jax.value_and_grad(objective)(x)
            return loss, loss, g
    recording = bool(record_every) and metric_fn is not None
    nan = jnp.full(jax.eval_shape(metric_fn, x0).shape if recording else (), jnp.nan, jnp.float32)

    def keep_better(best, cand):
        (bx, bl, bs), (cx, cl, cs) = best, cand
        better = (cs < bs) | (ties_to_later & (cs == bs))  # False for NaN; (N,) for a vector score

        def pick(b, c):
            return jnp.where(better.reshape(better.shape + (1,) * (c.ndim - better.ndim)), c, b)

        return jax.tree_util.tree_map(pick, bx, cx), jnp.where(better, cl, bl), pick(bs, cs)

    def step(carry, t):
        x, s, best = carry
        loss, score, g = value_and_grad(x, s)
        best = keep_better(best, (x, loss, score))
        updates, s = opt.update(g, s, x, value=loss, grad=g, value_fn=loss_fn)
        x = proj(optax.apply_updates(x, updates))
        if recording:
            m = jax.lax.cond((t + 1) % record_every == 0, lambda z: jnp.asarray(metric_fn(z), jnp.float32),
                             lambda z: nan, x)
        else:
            m = nan
        return (x, s, best), (loss, m)

    # The score's shape fixes the selection's: scalar, or (N,) to pick per leading index of x.
    score_shape = jax.eval_shape(objective, x0)[1].shape if has_aux else ()
    inf = jnp.full(score_shape, jnp.inf, jnp.float32)
    (x, _, best), (loss_T, m_T) = jax.lax.scan(step, (x0, state0, (x0, inf, inf)), jnp.arange(num_steps))
    final = objective(x)
    final_loss, final_score = final if has_aux else (final, final)
    best_x, best_loss, best_score = keep_better(best, (x, final_loss, final_score))
    metric_R = m_T[record_every - 1 :: record_every] if recording else jnp.zeros((0,), jnp.float32)
    return best_x, Trace(loss_T, metric_R, best_loss, final_loss, best_score)


# ----------------------------------------------------------------------------- restarts and inits

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


def select_best(distances_R: Array, tree_R: Any, prefer_last: bool = False) -> tuple[Array, Any]:
    """Index of the smallest (non-NaN) distance over R runs, and that run's slice of ``tree_R``.

    Ties go to the first run, or with ``prefer_last`` to the last (the run from a prior's start:
    when several runs reach the noise floor, the data cannot tell them apart and the prior decides).
    """
    i = argmin_runs(distances_R, prefer_last)
    return i, jax.tree_util.tree_map(lambda a: a[i], tree_R)


def argmin_runs(d_R: Array, prefer_last: bool = False, axis: int = -1) -> Array:
    """argmin over runs along ``axis`` with NaN as +inf; ties to the last run with ``prefer_last``."""
    d_R = jnp.where(jnp.isnan(d_R), jnp.inf, d_R)
    if not prefer_last:
        return jnp.argmin(d_R, axis=axis)
    r = d_R.shape[axis]
    return r - 1 - jnp.argmin(jnp.flip(d_R, axis=axis), axis=axis)


class Restarts(NamedTuple):
    """What ``best_of_restarts`` returns: the kept run and every run's distance."""

    x: Any
    trace: Trace
    index: Array
    distance_R: Array

    def info(self) -> dict[str, Array]:
        """The info arrays every iterative attack reports (grad_distance, loss, psnr, restart_grad_distance)."""
        d = self.distance_R
        return {"grad_distance": jnp.min(jnp.where(jnp.isnan(d), jnp.inf, d)), "loss": self.trace.loss_T,
                "psnr": self.trace.metric_R, "restart_grad_distance": d, "restart_index": self.index}


def best_of_restarts(one_run: Callable[..., tuple[Any, Trace, Array]], *args_R: Any,
                     prefer_last: bool = False) -> Restarts:
    """Runs ``one_run(*args)`` for R restarts in parallel (vmap over the leading axis of every
    argument) and keeps the run with the smallest (non-NaN) gradient distance.

    ``one_run`` returns (result pytree, Trace, distance); the distance is the
    gradient-matching term alone (no regulariser), so runs are compared by how well
    they explain the leaked gradient; ties go to the last run with ``prefer_last``.
    """
    xs, traces, d_R = jax.vmap(one_run)(*args_R)
    i, (x, trace) = select_best(d_R, (xs, traces), prefer_last)
    return Restarts(x, trace, i, d_R)
