"""DLG and iDLG: L2 gradient matching over dummy images (and soft labels).

DLG (Zhu et al. 2019, "Deep Leakage from Gradients") optimises dummy images and
dummy label logits jointly so that their gradient matches the leaked one in L2,
with L-BFGS. iDLG (Zhao et al. 2020) first reads the labels off the head's bias
gradient (``gitjax.attacks.labels``), then optimises only the images.

``dlg_reconstruct`` is the pure, jit/vmap-friendly core; ``run`` / ``run_idlg`` are
the registry wrappers (host-side validation, timing, AttackResult). GIT can act
as a prior through ``x_init`` (start from GIT's output) and/or ``x_prior`` with
``config.prior_weight`` (penalise the distance to it); ``extra_loss`` adds any other
image regulariser (e.g. BatchNorm statistics).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.attacks.iterative import infer_batch_size, labels_or_recovered, run_iterative
from gitjax.leakage import as_probs, batch_grad
from gitjax.losses import ExtraLoss, image_regularisers, l2_distance
from gitjax.metrics import batch_psnr
from gitjax.refine import INITS, best_of_restarts, clamp01, clamp_first01, init_images, multistep_decay, refine
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class DLGConfig:
    """DLG / iDLG settings.

    Attributes:
      steps: optimiser steps (L-BFGS steps each run a linesearch of up to 20 evaluations).
      optimizer: 'lbfgs' (the paper's) or 'adam'.
      lr: learning rate (L-BFGS: a scale on the linesearch step; 1.0 = plain L-BFGS).
      lr_decay: Adam only: x0.1 at 3/8, 5/8, 7/8 of the steps (not in the paper; helps Adam settle).
      init: dummy image init, 'uniform' | 'gaussian' | 'zeros'.
      soft_labels: when labels are unknown, optimise label logits jointly (DLG);
        if False they are recovered analytically first (iDLG / counting).
      prior_weight: weight of mean((x - x_prior)^2) when an ``x_prior`` is given.
      tv_weight: weight of the total-variation prior (0 in the paper).
      restarts: independent runs in parallel (vmap); the best by gradient distance is kept.
      record_every: record PSNR vs the truth every this many steps when ``x_true`` is given.
    """

    steps: int = 300
    optimizer: str = "lbfgs"
    lr: float = 1.0
    lr_decay: bool = False
    init: str = "uniform"
    soft_labels: bool = True
    prior_weight: float = 0.0
    tv_weight: float = 0.0
    restarts: int = 1
    record_every: int = 10

    def __post_init__(self):
        if self.optimizer not in ("lbfgs", "adam"):
            raise GitjaxError(f"DLG optimizer must be 'lbfgs' or 'adam', got {self.optimizer!r}")
        if self.init not in INITS:
            raise GitjaxError(f"DLG init must be one of {INITS}, got {self.init!r}")
        if self.steps < 1 or self.restarts < 1:
            raise GitjaxError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")


def _optimizer(config: DLGConfig) -> optax.GradientTransformation:
    if config.optimizer == "lbfgs":
        return optax.lbfgs(learning_rate=config.lr)
    return optax.adam(multistep_decay(config.lr, config.steps) if config.lr_decay else config.lr)


def dlg_reconstruct(victim: Victim, params: Params, state: ModelState, target_grads: Grads,
                    labels: Array | None, key: PRNGKey, config: DLGConfig, x_init: Array | None = None,
                    x_prior: Array | None = None, extra_loss: ExtraLoss | None = None,
                    x_true: Array | None = None, batch_size: int | None = None) -> tuple[Array, dict[str, Array]]:
    """DLG reconstruction (pure; jit with victim, config, extra_loss, batch_size static).

    Args:
      target_grads: the leaked batch-mean gradient (params' structure).
      labels: (B,) int or (B, K) probabilities; None = unknown (soft labels if
        ``config.soft_labels``, else recovered by iDLG / counting).
      x_init: (B, H, W, C) start point for every restart (e.g. GIT's output).
      x_prior: (B, H, W, C) prior image for the ``prior_weight`` penalty.
      extra_loss: x_BxHxWxC -> scalar added to the objective.
      x_true: (B, H, W, C) ground truth (same order as labels) to record PSNR.
      batch_size: B when neither labels nor x_init give it.

    Returns:
      x_BxHxWxC in [0, 1] and info arrays: grad_distance (L2, scalar), labels (B,),
      loss (T,), psnr (T // record_every,), restart_grad_distance (restarts,).
    """
    b = infer_batch_size(labels, x_init, batch_size)
    k = victim.num_classes
    shape = (b, *victim.input_shape)
    k_lab, k_run = jax.random.split(key)
    joint = labels is None and config.soft_labels
    if not joint:
        labels = labels_or_recovered(victim, params, state, target_grads, labels, b, k_lab)
    reg = image_regularisers(config.tv_weight, config.prior_weight, x_prior, extra_loss)

    def distance(x_BxHxWxC: Array, y_BxK: Array) -> Array:
        return l2_distance(batch_grad(victim, params, state, x_BxHxWxC, y_BxK), target_grads)

    if joint:
        probs = lambda z: jax.nn.softmax(z[1])
        project, image_of = clamp_first01, (lambda z: z[0])
    else:
        y_BxK = as_probs(labels, k)
        probs = lambda z: y_BxK
        project, image_of = clamp01, (lambda x: x)

    def objective(z) -> tuple[Array, Array]:
        d = distance(image_of(z), probs(z))
        return d + reg(image_of(z)), d  # minimise the sum; keep the iterate by the distance alone

    metric = None if x_true is None else (lambda z: batch_psnr(image_of(z), x_true))

    def one_run(rk: PRNGKey):
        kx, ky = jax.random.split(rk)
        x0 = init_images(kx, shape, config.init) if x_init is None else x_init
        z0 = (x0, jax.random.normal(ky, (b, k))) if joint else x0
        z, trace = refine(objective, z0, _optimizer(config), config.steps, project=project,
                          record_every=config.record_every, metric_fn=metric, has_aux=True)
        return (image_of(z), jnp.argmax(probs(z), axis=-1).astype(jnp.int32)), trace, trace.best_score

    best = best_of_restarts(one_run, jax.random.split(k_run, config.restarts))
    x, y = best.x
    return x, {**best.info(), "labels": y}


_dlg_jit = jax.jit(dlg_reconstruct, static_argnames=("victim", "config", "extra_loss", "batch_size"))


# ----------------------------------------------------------------------------- host-side wrappers


def run(problem: AttackProblem, key: PRNGKey, config: DLGConfig, x_init: Array | None = None,
        x_prior: Array | None = None, x_true: Array | None = None, extra_loss: ExtraLoss | None = None) -> AttackResult:
    """Registry entry 'dlg': labels given, else soft labels (or recovered if ``soft_labels=False``)."""
    return run_iterative(_dlg_jit, problem, key, config, x_init=x_init, x_prior=x_prior, x_true=x_true,
                         extra_loss=extra_loss)


def run_idlg(problem: AttackProblem, key: PRNGKey, config: DLGConfig, x_init: Array | None = None,
             x_prior: Array | None = None, x_true: Array | None = None,
             extra_loss: ExtraLoss | None = None) -> AttackResult:
    """Registry entry 'idlg': labels always recovered from the head gradient, then images optimised."""
    config = dataclasses.replace(config, soft_labels=False)
    return run_iterative(_dlg_jit, problem, key, config, recover_labels_always=True, x_init=x_init,
                         x_prior=x_prior, x_true=x_true, extra_loss=extra_loss)
