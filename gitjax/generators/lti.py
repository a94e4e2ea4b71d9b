"""LTI: Learning to Invert (Wu, Chen, Guo & Weinberger, UAI 2023, arXiv 2210.10880).

The baseline GIT is compared with: a plain MLP from the flattened gradient to the
B images, trained on (gradient, image) pairs of auxiliary data::

    g (P,) -> [compress to Q] -> Dense(hidden) -> ReLU -> ... -> Dense(B*H*W*C) -> sigmoid

The reference code uses two hidden layers of 3000 units ("MLP-3000") and, for large
victims, keeps a fixed random subset of the gradient. Here:

* the gradient is flattened in the victim's forward layout order and divided by
  its RMS (its log-RMS is appended), so one learning rate fits every victim;
* gradients longer than ``lti_compress_dim`` are compressed by a fixed, seeded
  Kronecker-structured Gaussian projection ``U^T G V`` of the gradient reshaped to
  a near-square matrix: every coordinate contributes (unlike a subset) and the
  projection needs O(sqrt(P) * sqrt(Q)) memory (11M-parameter ResNet-18: two 3343 x 32
  matrices), never a P x Q matrix. It has no trainable parameters;
* widths are configurable (``lti_hidden``, ``lti_layers``); the default 1000 keeps
  the generator near 5M parameters for CPU training, 3000 reproduces the paper.

``paper_config`` is the paper's form: the full flat gradient (no projection:
``lti_compress_dim=FULL_GRADIENT``) into two hidden layers of 3000 units; its optimiser
recipe (Adam 1e-4, batch 256, learning rate /10 at 75 % of training) is the trainer's
(``gitjax.configs.lenet_lti_paper``). On LeNet's 15.8k-entry gradient that is a 66M-parameter
MLP (~0.4 GFLOP per example for forward and backward), a GPU job; the CPU preset
``lenet_lti`` keeps the full gradient with ``CPU_HIDDEN`` units.

For B > 1 the slot order of the B outputs is arbitrary; the paper trains with a
Hungarian-matched MSE (the trainer's concern).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gitjax.generators.config import GeneratorConfig
from gitjax.generators.features import fixed_gaussian
from gitjax.generators.io import check_grads_n
from gitjax.trace import VictimPlan
from gitjax.types import Array, Grads, Params

# lti_compress_dim at least this large: every gradient enters the MLP whole (no projection).
FULL_GRADIENT = 2**31 - 1
PAPER_HIDDEN = 3000  # Wu et al. 2023's "MLP-3000"
CPU_HIDDEN = 500  # lets ~1M LeNet examples fit ~45 min on 2 CPU cores (1000 measured ~50 min)


def paper_config(batch_size: int = 1, hidden: int = PAPER_HIDDEN) -> GeneratorConfig:
    """LTI as its paper builds it: the full flat gradient, two hidden ReLU layers of ``hidden`` units."""
    return GeneratorConfig(kind="lti", batch_size=batch_size, lti_hidden=hidden, lti_layers=2,
                           lti_compress_dim=FULL_GRADIENT)


def kronecker_sketch(g_NxP: Array, dim: int, seed: int) -> Array:
    """Fixed random projection (N, P) -> (N, ~dim) via ``U^T reshape(g, (P1, P2)) V``.

    P1 = ceil(sqrt(P)), P2 = ceil(P / P1) (zero padded); U (P1, r1), V (P2, r2) are
    Gaussian with r1 * r2 <= dim. E|U^T G V|^2 = |G|^2 * r1 r2 / (P1 P2) up to the
    scaling of ``fixed_gaussian``, i.e. a Johnson-Lindenstrauss-style sketch.
    """
    n, p = g_NxP.shape
    p1 = math.ceil(math.sqrt(p))
    p2 = math.ceil(p / p1)
    r1 = max(1, math.isqrt(dim))
    r2 = max(1, dim // r1)
    g = jnp.pad(g_NxP, ((0, 0), (0, p1 * p2 - p))).reshape(n, p1, p2)
    u = fixed_gaussian(seed, (p1, r1))
    v = fixed_gaussian(seed + 1, (p2, r2))
    return jnp.einsum("npq,pr,qs->nrs", g, u, v).reshape(n, r1 * r2)


class LTI(nn.Module):
    """LTI generator. ``apply({"params": p}, grads_N, victim_params=None) -> (N, B, H, W, C)`` in [0, 1]."""

    config: GeneratorConfig
    plan: VictimPlan

    @nn.compact
    def __call__(self, grads_N: Grads, victim_params: Params | None = None) -> Array:
        cfg = self.config
        n = check_grads_n(self.plan.layout, grads_N)
        g_NxP = self.plan.layout.flatten(grads_N).astype(jnp.float32)
        s_N1 = jnp.sqrt(jnp.mean(g_NxP**2, -1, keepdims=True) + 1e-30)
        g_NxP = g_NxP / s_N1
        if g_NxP.shape[-1] > cfg.lti_compress_dim:
            g_NxP = kronecker_sketch(g_NxP, cfg.lti_compress_dim, cfg.seed)
        x = jnp.concatenate([g_NxP, jnp.log(s_N1)], -1)
        for i in range(cfg.lti_layers):
            x = nn.relu(nn.Dense(cfg.lti_hidden, name=f"hidden{i}")(x))
        h, w, c = self.plan.image_shape
        out = nn.Dense(cfg.batch_size * h * w * c, name="out")(x)
        return jax.nn.sigmoid(out).reshape(n, cfg.batch_size, h, w, c)
