"""APRIL: attacks through a ViT's learnable positional embedding (Lu et al., CVPR 2022).

"APRIL: Finding the Achilles' Heel on Privacy for Vision Transformers". In the
zoo ViT the patch tokens are ``z = X K + b + pos`` (X: (T, E) flattened patches
of the normalised image, K: (E, D), pos: (1, T, D)), so for one example

  * ``dL/dpos = dL/dz =: Delta`` (T, D),
  * ``dL/dK = X^T Delta`` (E, D),  ``dL/db = sum_t Delta_t``.

Closed form ('april'): ``X^T = dK Delta^+``, i.e. X = lstsq(Delta^T, dK^T); unique
when Delta has full row rank T, which needs D >= T (zoo ViT: T = 64 tokens of
4x4x3 patches at 32x32, D = 64: square, so the condition number of Delta decides
the accuracy and is reported). The patches are folded back into the image and
denormalised.

Optimisation variant ('april-opt'): gradient matching (cosine distance over the
whole gradient, as Inverting Gradients) plus APRIL's positional term, the cosine
distance between the dummy's and the leaked positional-embedding gradient,
weighted higher, plus TV; optimised with the shared ``gitjax.refine`` loop.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.attacks.iterative import match_reconstruct, run_iterative
from gitjax.leakage import batch_grad
from gitjax.losses import ExtraLoss, cosine_distance
from gitjax.refine import INITS
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import ViT, Victim


def check_vit(victim: Victim, params: Params) -> int:
    """Returns the patch size; raises GitjaxError unless the victim is a ViT with a learnable pos-embedding."""
    if not isinstance(victim.module, ViT) or "pos_embed" not in params or "patch_embed" not in params:
        raise GitjaxError(
            f"APRIL needs a Vision Transformer whose patch tokens get a learnable positional embedding "
            f"(the zoo's 'vit'); victim {victim.name!r} is a {type(victim.module).__name__}")
    h, w, _ = victim.input_shape
    p = victim.module.patch
    if h % p or w % p:
        raise GitjaxError(f"image size {h}x{w} is not a multiple of the ViT patch size {p}")
    return p


def fold_patches(x_BxTxE: Array, input_shape: tuple[int, int, int], patch: int) -> Array:
    """Inverse of the zoo ViT's patch flattening: (B, T, p*p*C) -> (B, H, W, C)."""
    h, w, c = input_shape
    b = x_BxTxE.shape[0]
    return (x_BxTxE.reshape(b, h // patch, w // patch, patch, patch, c)
            .transpose(0, 1, 3, 2, 4, 5).reshape(b, h, w, c))


def april_closed_form(dk_ExD: Array, dpos_TxD: Array, rcond: float = 1e-8) -> tuple[np.ndarray, np.ndarray]:
    """Patches X (T, E) from dK = X^T Delta with Delta = dL/dpos, and the singular values of Delta.

    Host-side float64 (a 64x64 SVD): Delta's singular values span ~5 decades
    (measured 0.16 down to 1e-6 on the zoo ViT), below what a float32 SVD
    resolves, while the float32 leaked gradient itself supports ~65 dB.
    """
    dk = np.asarray(dk_ExD, np.float64)
    delta = np.asarray(dpos_TxD, np.float64)
    # dK^T = Delta^T X  (D x T)(T x E): minimum-norm least squares through the SVD of Delta^T.
    u, s, vt = np.linalg.svd(delta.T, full_matrices=False)
    k = int(np.sum(s > rcond * s[0]))
    x_TxE = vt[:k].T @ ((u[:, :k].T @ dk.T) / s[:k, None])
    return x_TxE.astype(np.float32), s


@dataclasses.dataclass(frozen=True)
class APRILConfig:
    """Closed-form APRIL.

    rcond: singular values of Delta below rcond * s_max count as zero (its exact null
      directions sit at ~1e-11 relative, its smallest informative ones at ~1e-5).
    """

    rcond: float = 1e-8


def run(problem: AttackProblem, key, config: APRILConfig, **_) -> AttackResult:
    """Registry entry 'april': closed form from the positional-embedding and patch-embedding gradients."""
    del key
    t0 = time.perf_counter()
    problem.validate()
    victim = problem.victim
    p = check_vit(victim, problem.params)
    if problem.batch_size != 1:
        raise GitjaxError(
            f"closed-form APRIL inverts one example (dL/dpos is then dL/dz); got batch_size={problem.batch_size}. "
            "Use 'april-opt' for batches")
    g = problem.grads
    dpos_TxD = g["pos_embed"][0]
    t, d = dpos_TxD.shape
    x_TxE, s = april_closed_form(g["patch_embed"]["kernel"], dpos_TxD, config.rcond)
    x = victim.denormalize(fold_patches(jnp.asarray(x_TxE)[None], victim.input_shape, p))
    images = jnp.clip(x, 0.0, 1.0).block_until_ready()
    rank = int(np.sum(s > config.rcond * s[0]))
    db = np.asarray(g["patch_embed"]["bias"])
    delta_sum = np.asarray(dpos_TxD).sum(0)
    labels = jnp.argmin(g["head"]["bias"])[None].astype(jnp.int32)  # iDLG: p - onehot(y) < 0 only at y
    info = {
        "seconds": time.perf_counter() - t0,
        "tokens": int(t), "dim": int(d), "rank": rank,
        # Token directions the gradient does not determine (their image component is set to zero).
        "null_dim": int(t - rank),
        "condition_number": float(s[0] / s[rank - 1]),
        "unique": bool(rank == t),
        # dL/db must equal sum_t Delta_t: a check that the gradient is a single example's.
        "bias_consistency": float(np.linalg.norm(delta_sum - db) / max(np.linalg.norm(db), 1e-30)),
    }
    return AttackResult(images=images, labels=labels, info=info)


# ----------------------------------------------------------------------------- optimisation variant


@dataclasses.dataclass(frozen=True)
class APRILOptConfig:
    """Optimisation-based APRIL.

    steps, lr, signed, lr_decay, init, restarts, tv_weight, prior_weight, record_every: as Inverting Gradients.
    pos_weight: weight of the positional-embedding cosine term. APRIL weighs it above the
      whole-gradient term; on the zoo ViT (2000 steps, 3 patches) 1.0 measured best:
      0 -> 12.1 dB, 0.3 -> 20.8, 1 -> 27.3, 3 -> 25.0 (mean PSNR; 10 with TV 1e-3: 14.4).
    """

    steps: int = 2000
    lr: float = 0.1
    pos_weight: float = 1.0
    tv_weight: float = 1e-2
    signed: bool = True
    lr_decay: bool = True
    restarts: int = 1
    init: str = "uniform"
    prior_weight: float = 0.0
    record_every: int = 10

    def __post_init__(self):
        if self.init not in INITS:
            raise GitjaxError(f"april-opt init must be one of {INITS}, got {self.init!r}")
        if self.steps < 1 or self.restarts < 1:
            raise GitjaxError(f"steps and restarts must be >= 1, got {self.steps}, {self.restarts}")


def pos_cosine(g: Grads, t: Grads) -> Array:
    """APRIL's positional term: 1 - cos(dL/dpos of the dummy, dL/dpos leaked)."""
    a, b = g["pos_embed"].reshape(-1), t["pos_embed"].reshape(-1)
    return 1.0 - jnp.dot(a, b) / jnp.sqrt(jnp.dot(a, a) * jnp.dot(b, b) + 1e-30)


def april_match(pos_weight: float):
    """(dummy gradient, leaked gradient) -> cosine distance + pos_weight * positional cosine distance."""

    def match(g: Grads, t: Grads) -> Array:
        return cosine_distance(g, t) + pos_weight * pos_cosine(g, t)

    return match


def april_objective(victim: Victim, params: Params, state: ModelState, target_grads: Grads, y_BxK: Array,
                    pos_weight: float):
    """x -> cosine gradient distance + pos_weight * positional cosine distance (pure)."""
    match = april_match(pos_weight)
    return lambda x_BxHxWxC: match(batch_grad(victim, params, state, x_BxHxWxC, y_BxK), target_grads)


def april_opt_reconstruct(victim: Victim, params: Params, state: ModelState, target_grads: Grads,
                          labels: Array | None, key: PRNGKey, config: APRILOptConfig, x_init: Array | None = None,
                          x_prior: Array | None = None, extra_loss: ExtraLoss | None = None,
                          x_true: Array | None = None, batch_size: int | None = None) -> tuple[Array, dict[str, Array]]:
    """APRIL-opt reconstruction (pure; same signature and info as ``ig_reconstruct``)."""
    return match_reconstruct(victim, params, state, target_grads, labels, key, config,
                             april_match(config.pos_weight), x_init=x_init, x_prior=x_prior, extra_loss=extra_loss,
                             x_true=x_true, batch_size=batch_size)


_april_opt_jit = jax.jit(april_opt_reconstruct, static_argnames=("victim", "config", "extra_loss", "batch_size"))


def run_opt(problem: AttackProblem, key: PRNGKey, config: APRILOptConfig, x_init: Array | None = None,
            x_prior: Array | None = None, x_true: Array | None = None,
            extra_loss: ExtraLoss | None = None) -> AttackResult:
    """Registry entry 'april-opt'."""
    problem.validate()
    check_vit(problem.victim, problem.params)
    return run_iterative(_april_opt_jit, problem, key, config, x_init=x_init, x_prior=x_prior, x_true=x_true,
                         extra_loss=extra_loss)
