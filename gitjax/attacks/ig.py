"""Inverting Gradients (Geiping, Bauermeister, Droege, Moeller, NeurIPS 2020).

Minimises the cosine distance between the dummy and the leaked gradient plus a
total-variation prior, with signed gradients into Adam, a step decay of x0.1 at
3/8, 5/8 and 7/8 of the run, box projection onto [0, 1], and restarts (run in
parallel with ``jax.vmap``). The iterate and the restart kept are the ones with the
lowest gradient distance (TV is minimised, not used to select). Labels are used
when given, else recovered analytically (``gitjax.attacks.labels``).

``ig_reconstruct`` is the pure, jit/vmap-friendly core (``gitjax.attacks.iterative``);
``run`` is the registry wrapper. GIT as a prior: ``x_init`` (the last restart starts there,
with a step scaled to how well it already explains the gradient; the start itself is
a candidate, so the result never matches the gradient worse), ``x_prior`` +
``config.prior_weight`` (penalty), or both; ``extra_loss`` hooks further image
regularisers in. A known noise level (``noise_std``) stops the fit at the noise floor.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.attacks.iterative import match_reconstruct, run_iterative
from gitjax.layout import GradientLayout
from gitjax.trace import forward_order
from gitjax.losses import LAYER_WEIGHTS, ExtraLoss, cosine_distance, layer_weights, noise_floor
from gitjax.refine import INITS
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class IGConfig:
    """Inverting Gradients settings (paper defaults except the step count and TV weight).

    Attributes:
      steps: Adam steps (the paper runs 4.8k-24k; the MLP/LeNet victims need a few hundred).
      lr: Adam step size; with signed gradients this is the per-pixel step in [0, 1] units.
      tv_weight: total-variation weight for [0, 1] images (tuned on 32x32 patches).
      signed: feed sign(gradient) to Adam.
      lr_decay: multiply lr by 0.1 at 3/8, 5/8, 7/8 of the steps.
      restarts: parallel runs; with an ``x_init`` the last starts there, the others from
        ``init``; the run (and iterate) with the lowest gradient distance is kept.
      layer_weights: 'equal' | 'linear' (early layers first) | 'linear_increasing'.
      init: 'uniform' | 'gaussian' | 'zeros'.
      prior_weight: weight of mean((x - x_prior)^2) when an ``x_prior`` is given.
      record_every: record PSNR vs the truth every this many steps when ``x_true`` is given.
      start_lr: step of the run from ``x_init``: > 0 fixed, 0 scaled to the start's gradient
        distance (``gitjax.attacks.iterative.start_step_size``).
      start_resolved: an ``x_init`` whose cosine gradient distance is at most this is kept
        as it is (float32 resolution: near-exact starts measure +-1e-7; 0 turns it off).
        Measured on 16 LeNet patches of the train split with the shipped Exact-GIT prior
        (starts at 43-65 dB): without it the best-by-distance pick lost up to 15 dB on some
        images; with it GIT+IG equals GIT one-shot there.
      support_above: match only the nonzero entries of a leaked layer more than this
        fraction of whose entries are exactly zero (top-k pruning; ``losses.pruned_support``);
        the objective and the choice of the best iterate both use it. 0 turns it off.
      support_gap: also take a leaf as pruned when its nonzero magnitudes start at least
        this fraction of their median (top-k leaves a gap above 0; clean gradients do not),
        which catches moderate pruning (50 %) below ``support_above``. 0 turns it off.
      support_bound: off that support, penalise only what exceeds the smallest sent
        magnitude (top-k drops only entries at most that large); False ignores them.
      noise_std: std of Gaussian noise the attacker knows is on the leaked gradient (a
        published DP level; 0: none known). > 0: iterates and restarts are chosen by their
        distance above the truth's expected distance (``losses.noise_floor``): the run from
        ``x_init`` stops at its first iterate that reaches the noise and wins a tie with the
        random restarts, which keep their last iterate there; reported distances are these
        excesses (``iterative.match_reconstruct``).
      holdout: fraction of the sent gradient entries held out of the objective; iterates and
        restarts are then chosen by the distance on the held-out entries alone (cross-validated
        selection: an iterate that only fits what it was fitted to, e.g. noise or the few
        entries of a 99 %-pruned update, does not beat a start there). 0 turns it off; not
        combined with ``noise_std``.
    """

    steps: int = 1000
    lr: float = 0.1
    tv_weight: float = 1e-2
    signed: bool = True
    lr_decay: bool = True
    restarts: int = 1
    layer_weights: str = "equal"
    init: str = "uniform"
    prior_weight: float = 0.0
    record_every: int = 10
    start_lr: float = 0.0
    start_resolved: float = 1e-6
    support_above: float = 0.85
    support_bound: bool = True
    support_gap: float = 0.15
    noise_std: float = 0.0
    holdout: float = 0.0

    def __post_init__(self):
        if self.init not in INITS:
            raise GitjaxError(f"IG init must be one of {INITS}, got {self.init!r}")
        if self.layer_weights not in LAYER_WEIGHTS:
            raise GitjaxError(f"IG layer_weights must be one of {LAYER_WEIGHTS}, got {self.layer_weights!r}")
        if not 0.0 <= self.support_above < 1.0:
            raise GitjaxError(f"IG support_above must be in [0, 1), got {self.support_above}")
        if not 0.0 <= self.support_gap < 1.0:
            raise GitjaxError(f"IG support_gap must be in [0, 1), got {self.support_gap}")
        if not (self.noise_std >= 0.0 and self.noise_std < float("inf")):
            raise GitjaxError(f"IG noise_std must be a finite number >= 0, got {self.noise_std}")
        if not 0.0 <= self.holdout < 1.0:
            raise GitjaxError(f"IG holdout must be in [0, 1), got {self.holdout}")
        if self.holdout > 0 and self.noise_std > 0:
            raise GitjaxError("IG holdout and noise_std are two selection rules: set one of them to 0")
        if self.steps < 1 or self.restarts < 1:
            raise GitjaxError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")


def ig_reconstruct(victim: Victim, params: Params, state: ModelState, target_grads: Grads, labels: Array | None,
                   key: PRNGKey, config: IGConfig, x_init: Array | None = None, x_prior: Array | None = None,
                   extra_loss: ExtraLoss | None = None, x_true: Array | None = None,
                   batch_size: int | None = None) -> tuple[Array, dict[str, Array]]:
    """Inverting Gradients reconstruction (pure; jit with victim, config, extra_loss, batch_size static).

    Args:
      target_grads: the leaked batch-mean gradient (params' structure).
      labels: (B,) int or (B, K) probabilities; None = recovered (iDLG / counting).
      x_init: (B, H, W, C) start point of the last restart (e.g. GIT's output); the
        others start from ``config.init``, exactly as without x_init.
      x_prior: (B, H, W, C) prior image for the ``prior_weight`` penalty.
      extra_loss: x_BxHxWxC -> scalar added to the objective.
      x_true: (B, H, W, C) ground truth (same order as labels) to record PSNR.
      batch_size: B when neither labels nor x_init give it.

    Returns:
      x_BxHxWxC in [0, 1] and info arrays: grad_distance (cosine, scalar), labels (B,),
      loss (T,), psnr (T // record_every,), restart_grad_distance (restarts,), restart_index.
    """
    weights = layer_weights(GradientLayout.from_params(params, order=forward_order(victim)), config.layer_weights)
    match = functools.partial(cosine_distance, weights=weights)
    floor = noise_floor(target_grads, config.noise_std, weights) if config.noise_std > 0 else None
    return match_reconstruct(victim, params, state, target_grads, labels, key, config, match, x_init=x_init,
                             x_prior=x_prior, extra_loss=extra_loss, x_true=x_true, batch_size=batch_size,
                             floor=floor)


_ig_jit = jax.jit(ig_reconstruct, static_argnames=("victim", "config", "extra_loss", "batch_size"))


def run(problem: AttackProblem, key: PRNGKey, config: IGConfig, x_init: Array | None = None,
        x_prior: Array | None = None, x_true: Array | None = None, extra_loss: ExtraLoss | None = None) -> AttackResult:
    """Registry entry 'ig'; the keyword arguments carry GIT priors and ground truth for curves."""
    return run_iterative(_ig_jit, problem, key, config, x_init=x_init, x_prior=x_prior, x_true=x_true,
                         extra_loss=extra_loss)
