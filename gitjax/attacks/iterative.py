"""Plumbing shared by the iterative attacks (IG, APRIL-opt, IG+BN, DLG): one implementation each.

* ``match_reconstruct``: the pure core of every signed-Adam gradient-matching attack
  (Inverting Gradients and its variants): labels (given or recovered), objective =
  gradient distance + image regularisers, R restarts in parallel (``jax.vmap``), best
  iterate and best restart by the gradient distance alone.
* A start image (``x_init``, e.g. GIT's output) is the last restart; the others start
  from random inits, so a poor start costs nothing and a good one is kept: the loop
  scores the start itself, and the result is never further from the leaked gradient
  than it. Its step size can follow the start's quality (``start_step_size``).
* ``run_iterative``: the host-side registry wrapper (validation, labels' source,
  timing, JSON-friendly info).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.attacks.labels import estimate_mean_probs, recover_labels
from gitjax.layout import GradientLayout
from gitjax.trace import forward_order
from gitjax.leakage import as_probs, batch_grad
from gitjax.losses import ExtraLoss, holdout_masks, image_regularisers, masked, on_support, pruned_support, support_rule
from gitjax.metrics import batch_psnr
from gitjax.refine import best_of_restarts, ig_optimizer, init_images, refine
from gitjax.types import Array, GitjaxError, Grads, InputShapeError, ModelState, Params, PRNGKey
from gitjax.victims import Victim

MatchFn = Callable[[Grads, Grads], Array]  # (dummy gradient, leaked gradient) -> distance
HOLDOUT_FOLD = 0x401D  # the held-out entries' key is fold_in(attack key, this): other draws stay as without


def infer_batch_size(labels: Array | None, x_init: Array | None, batch_size: int | None) -> int:
    """B from whichever of labels / x_init / batch_size is given (static)."""
    for b in (batch_size, None if labels is None else labels.shape[0], None if x_init is None else x_init.shape[0]):
        if b is not None:
            return int(b)
    raise GitjaxError("the batch size is unknown: pass labels, x_init or batch_size")


def labels_or_recovered(victim: Victim, params: Params, state: ModelState, target_grads: Grads,
                        labels: Array | None, batch_size: int, key: PRNGKey) -> Array:
    """The given labels, else the ones read off the head gradient (iDLG for B = 1, counting otherwise)."""
    if labels is not None:
        return labels
    layout = GradientLayout.from_params(params, order=forward_order(victim))
    return recover_labels(target_grads, layout, batch_size, estimate_mean_probs(victim, params, state, key))


def start_step_size(lr: float | Array, start_distance: Array, random_distance: Array, power: float = 0.25,
                    floor: float = 0.2) -> Array:
    """Signed-Adam step for a run that starts from a given image, from its gradient distance.

    A signed step moves every pixel by ~lr, so the step fit for a random start destroys
    a start that already explains the gradient far better. The step shrinks with the
    start's distance d relative to a random image's d_rand (the scale of distances varies
    by orders of magnitude between victims): ``lr * clip((d / d_rand) ** power, floor, 1)``.
    Tuned on LeNet, patches train split (docs: experiments/git_ig_refine.py): Exact-GIT
    starts (d / d_rand ~ 2e-3) do best at ~0.2 lr, Coarse-GIT starts (~0.02-0.3) at ~0.5-1 lr.
    """
    ratio = (jnp.maximum(start_distance, 0.0) / jnp.maximum(random_distance, 1e-30)) ** power
    return lr * jnp.clip(ratio, floor, 1.0)


def keep_resolved_start(x: Array, d: Array, index: Array, x_start: Array, d_start: Array, resolved: float,
                        start_index: int) -> tuple[Array, Array, Array]:
    """(x, d, index) of the refinement's pick, or of the start when its distance is <= ``resolved``.

    A start that explains the leaked gradient to the distance's numerical resolution (float32
    cosine distances of such starts are +-1e-7 noise) is kept as it is: below that, "a lower
    distance" is rounding, and picking by it only moves away from the start. One problem; vmap
    it over N (``stacked_ig``).
    """
    keep = d_start <= resolved
    return jnp.where(keep, x_start, x), jnp.where(keep, d_start, d), jnp.where(keep, start_index, index)


def above_floor(d: Array, floor: Array | None) -> Array:
    """The selection score of a gradient distance: itself, or its excess over a known noise floor."""
    return d if floor is None else jnp.maximum(d - floor, 0.0)


def floor_ties_to_later(restarts: int, floored: bool, with_start: bool) -> Array:
    """``refine``'s ``ties_to_later`` per restart (R,): at a noise floor a random restart keeps its
    last iterate there, the run from a start (the last slot) its first; without a floor, none."""
    later_R = jnp.full((restarts,), floored)
    return later_R.at[-1].set(False) if with_start else later_R


def match_reconstruct(victim: Victim, params: Params, state: ModelState, target_grads: Grads,
                      labels: Array | None, key: PRNGKey, config: Any, match: MatchFn, *,
                      x_init: Array | None = None, x_prior: Array | None = None,
                      extra_loss: ExtraLoss | None = None, x_true: Array | None = None,
                      batch_size: int | None = None, floor: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Gradient matching with signed Adam and restarts (pure; jit with victim, config, match static).

    ``config`` needs: steps, lr, signed, lr_decay, restarts, init, tv_weight, prior_weight,
    record_every, and optionally support_above (match a pruned layer on its nonzero entries),
    start_lr (> 0: fixed step for the run from ``x_init``;
    0: ``start_step_size``; absent: config.lr) and start_resolved (> 0: an ``x_init`` whose
    gradient distance is at most this is returned unchanged).

    ``floor``: the distance the truth itself has (noise on the leaked gradient,
    ``losses.noise_floor``). Given, iterates and restarts are chosen by their distance above
    it, ``max(d - floor, 0)`` (Morozov's discrepancy principle: any image that explains the
    gradient down to the noise is consistent with it; the prior decides among them). The run
    from ``x_init`` keeps its first iterate at the floor (the closest to the prior's output)
    and wins a tie with the random restarts; a random restart keeps its last one (at the floor
    it goes on minimising the regularised objective, as without a floor); the start's step
    scales with its excess. The reported distances are then these excesses.

    ``config.holdout`` > 0 (optional field): a random ``holdout`` fraction of the sent entries
    (``losses.holdout_masks``, drawn from ``fold_in(key, HOLDOUT_FOLD)``) is left out of the
    objective, and iterates and restarts are chosen by the distance on those entries alone, so
    a start that the refinement only over-fits (noise, a 99 %-pruned update) keeps winning. The
    step size and ``start_resolved`` still read the full distance; the reported distances are
    the held-out ones. Not combined with ``floor``.

    Returns x_BxHxWxC in [0, 1] and info arrays: grad_distance (scalar), labels (B,),
    loss (T,), psnr (T // record_every,), restart_grad_distance (R,), restart_index.
    """
    b = infer_batch_size(labels, x_init, batch_size)
    k_lab, k_run = jax.random.split(key)
    labels = labels_or_recovered(victim, params, state, target_grads, labels, b, k_lab)
    y_BxK = as_probs(labels, victim.num_classes)
    reg = image_regularisers(config.tv_weight, config.prior_weight, x_prior, extra_loss)
    support = pruned_support(target_grads, *support_rule(config))
    holdout = getattr(config, "holdout", 0.0)
    if holdout > 0 and floor is not None:
        raise GitjaxError("holdout and a noise floor are two selection rules: use one")

    def dummy_grads(x_BxHxWxC: Array) -> Grads:
        return on_support(batch_grad(victim, params, state, x_BxHxWxC, y_BxK), support)

    def distance(x_BxHxWxC: Array) -> Array:
        return match(dummy_grads(x_BxHxWxC), target_grads)

    if holdout > 0:
        fit, held = holdout_masks(jax.random.fold_in(key, HOLDOUT_FOLD), target_grads, support, holdout)
        t_fit, t_held = masked(target_grads, fit), masked(target_grads, held)

        def objective(x_BxHxWxC: Array) -> tuple[Array, Array]:
            g = dummy_grads(x_BxHxWxC)
            # minimise on the fitted entries; select by the held-out ones
            return match(masked(g, fit), t_fit) + reg(x_BxHxWxC), match(masked(g, held), t_held)
    else:
        def objective(x_BxHxWxC: Array) -> tuple[Array, Array]:
            d = distance(x_BxHxWxC)
            return d + reg(x_BxHxWxC), above_floor(d, floor)  # minimise the sum; select by the distance alone

    metric = None if x_true is None else (lambda x: batch_psnr(x, x_true))
    keys_R = jax.random.split(k_run, config.restarts)
    x0_R = jax.vmap(lambda k: init_images(k, (b, *victim.input_shape), config.init))(keys_R)
    lr_R = jnp.full((config.restarts,), config.lr, jnp.float32)
    if x_init is not None:
        # The start takes the last slot: the random restarts before it are exactly the runs
        # of the same attack without a start (split(k, R)[i] does not depend on R), so the
        # result is the better, by gradient distance, of "without the start" and "from it".
        x_init = jnp.clip(x_init, 0.0, 1.0)
        x0_R = x0_R.at[-1].set(x_init)
        d_start = jax.lax.stop_gradient(above_floor(distance(x_init), floor))  # the start's quality: step, kept start
        start_lr = getattr(config, "start_lr", None)
        if start_lr is None:
            lr0 = config.lr
        elif start_lr > 0:
            lr0 = start_lr
        else:
            # A random image (the first restart's init) is the reference for "how good is the start".
            d_rand = above_floor(distance(init_images(keys_R[0], x_init.shape, config.init)), floor)
            lr0 = start_step_size(config.lr, d_start, jax.lax.stop_gradient(d_rand))
        lr_R = lr_R.at[-1].set(lr0)

    later_R = floor_ties_to_later(config.restarts, floor is not None, x_init is not None)

    def one_run(x0: Array, lr: Array, later: Array):
        opt = ig_optimizer(lr, config.steps, config.signed, config.lr_decay)
        x, trace = refine(objective, x0, opt, config.steps, record_every=config.record_every, metric_fn=metric,
                          has_aux=True, ties_to_later=later)
        return x, trace, trace.best_score

    best = best_of_restarts(one_run, x0_R, lr_R, later_R, prefer_last=x_init is not None and floor is not None)
    x_out, info = best.x, best.info()
    resolved = getattr(config, "start_resolved", 0.0)
    if x_init is not None and resolved > 0:
        x_out, d_out, i_out = keep_resolved_start(x_out, info["grad_distance"], info["restart_index"], x_init,
                                                  d_start, resolved, config.restarts - 1)
        info = {**info, "grad_distance": d_out, "restart_index": i_out}
    labels_B = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
    return x_out, {**info, "labels": labels_B.astype(jnp.int32), "start_lr": lr_R[-1]}


# ----------------------------------------------------------------------------- host-side wrapper


def image_arg(problem: AttackProblem, name: str, x: Array | None) -> Array | None:
    """Checks an optional (B, H, W, C) image argument against the problem; float32 or None."""
    if x is None:
        return None
    x = jnp.asarray(x, jnp.float32)
    problem.victim.check_images(x)
    if x.shape[0] != problem.batch_size:
        raise InputShapeError(f"{name} holds {x.shape[0]} images; the problem's batch size is {problem.batch_size}")
    return x


def run_iterative(reconstruct: Callable[..., tuple[Array, dict[str, Array]]], problem: AttackProblem,
                  key: PRNGKey, config: Any, *, recover_labels_always: bool = False, x_init: Array | None = None,
                  x_prior: Array | None = None, x_true: Array | None = None,
                  extra_loss: ExtraLoss | None = None) -> AttackResult:
    """Validates the problem and optional images, runs a jitted reconstruct fn, times it.

    ``info``: iterations, grad_distance, seconds (wall time, compilation included on a
    first call), labels_source ('given' | 'recovered' | 'optimised'), restarts,
    restart_grad_distance, restart_index (restarts - 1 = the run from ``x_init`` when one is given),
    loss_history (objective per step of the kept restart), and psnr_history (list, one
    entry per ``record_every`` steps) when ``x_true`` is given.
    """
    problem.validate()
    x_init, x_prior, x_true = (image_arg(problem, n, v) for n, v in
                               (("x_init", x_init), ("x_prior", x_prior), ("x_true", x_true)))
    if config.prior_weight and x_prior is None:
        raise GitjaxError(f"prior_weight={config.prior_weight} needs an x_prior image")
    labels = None if (recover_labels_always or problem.labels is None) else jnp.asarray(problem.labels)
    if labels is not None and (labels.dtype.kind not in "iu" or not bool(
            jnp.all((labels >= 0) & (labels < problem.victim.num_classes)))):
        raise GitjaxError(f"labels must be ints in [0, {problem.victim.num_classes}), got {labels}")
    if labels is not None:
        source = "given"
    else:
        source = "optimised" if getattr(config, "soft_labels", False) and not recover_labels_always else "recovered"
    t0 = time.perf_counter()
    x, info = reconstruct(problem.victim, problem.params, problem.state, problem.grads, labels, key, config,
                          x_init=x_init, x_prior=x_prior, extra_loss=extra_loss, x_true=x_true,
                          batch_size=problem.batch_size)
    x = jax.block_until_ready(x)
    seconds = time.perf_counter() - t0
    out = {"iterations": int(config.steps), "grad_distance": float(info["grad_distance"]), "seconds": seconds,
           "labels_source": source, "restarts": int(config.restarts),
           "restart_grad_distance": np.asarray(info["restart_grad_distance"]).tolist(),
           "restart_index": int(info["restart_index"]),
           "loss_history": np.asarray(info["loss"]).tolist()}
    if "start_lr" in info and x_init is not None:
        out["start_lr"] = float(info["start_lr"])
    if x_true is not None:
        out["psnr_history"] = np.asarray(info["psnr"]).tolist()
    return AttackResult(images=x, labels=info["labels"], info=out)
