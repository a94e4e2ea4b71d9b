"""Gradient features for Coarse-GIT (and LTI's fixed sketch), none needing a dense projection.

Factorised bilinear sketches ``U^T G V``, probe vectors ``dK db / |db|^2`` and
fixed seeded Gaussian matrices; R is the sketch rank.
"""

from __future__ import annotations

import math
from typing import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from gitjax.generators.linalg import TINY
from gitjax.layout import LayerBlock
from gitjax.types import Array


def rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(x**2) + TINY)


def bias_probe(block: LayerBlock, grads: Mapping[str, Array], next_grads: Mapping[str, Array] | None,
               next_block: LayerBlock | None) -> Array | None:
    """The bias gradient that probes a dense/conv kernel gradient, or None.

    A layer without bias followed by a norm layer (conv -> BN in a ResNet) is probed
    with the norm's bias gradient: in eval mode the norm is a per-channel affine map,
    so ``d beta`` equals the conv's (virtual) bias gradient up to a per-channel scale.
    """
    if "bias" in grads:
        return grads["bias"]
    o = block.kernel_shape[-1]
    if (next_block is not None and next_block.kind == "norm" and next_grads is not None
            and next_block.bias_shape == (o,)):
        return next_grads["bias"]
    return None


def probe_rows(kernel_grad: Array, db: Array) -> Array:
    """``dK db / |db|^2`` over the kernel's output axis: the db-weighted mean input patch.

    (in, out) -> (in,): for a dense layer at B = 1 this is exactly the layer input.
    (kh, kw, ci, co) -> (kh, kw, ci): the error-weighted average input patch of a conv.
    """
    return jnp.einsum("...o,o->...", kernel_grad, db) / (jnp.sum(db**2) + TINY)


class Sketch(nn.Module):
    """Learned factorised projection of a matrix-shaped gradient: ``U^T G V`` (R x R) plus row/col summaries.

    G (rows, cols) is a kernel gradient reshaped to (prod(kernel[:-1]), out). The
    parameters are (rows + cols) x R, so a ResNet-18 conv (4608 x 512) costs 82k
    parameters at R = 16 instead of the 1.2M of a dense projection.
    """

    rank: int = 16

    @nn.compact
    def __call__(self, g_rc: Array) -> tuple[Array, Array, Array]:
        rows, cols = g_rc.shape
        u = self.param("u", nn.initializers.normal(1.0 / math.sqrt(rows)), (rows, self.rank))
        v = self.param("v", nn.initializers.normal(1.0 / math.sqrt(cols)), (cols, self.rank))
        return (u.T @ g_rc @ v).reshape(-1), u, v  # (R*R,), (rows, R), (cols, R)


def fixed_gaussian(seed: int, shape: tuple[int, ...]) -> Array:
    """A fixed (not trained) Gaussian matrix with unit-variance columns' inner products (scaled 1/sqrt(rows))."""
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) / math.sqrt(shape[0])
