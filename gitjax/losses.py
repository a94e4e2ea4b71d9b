"""The losses every iterative gradient-inversion attack is built from (one definition each).

Gradient distances (the data term), compared leaf by leaf over a gradient pytree:

  * ``l2_distance``: sum of squared differences (DLG, Zhu et al. 2019).
  * ``cosine_distance``: 1 - <g, t> / (|g| |t|) over the whole gradient (Inverting
    Gradients, Geiping et al. 2020), optionally with per-layer weights (``layer_weights``).

Image regularisers (the prior term), on a batch x_BxHxWxC in [0, 1]:

  * ``total_variation``: anisotropic TV, the image prior of Geiping et al. 2020.
  * ``prior_penalty``: mean squared distance to a prior image (e.g. GIT's output).
  * ``image_regularisers``: TV + prior penalty + any extra term, as one x -> scalar.

All are pure and jit/vmap/grad-friendly.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.layout import GradientLayout
from gitjax.types import Array, Grads

ExtraLoss = Callable[[Array], Array]
Distance = Callable[[Grads, Grads, "Grads | None"], Array]

# ----------------------------------------------------------------------------- gradient distances

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
    In [0, 2]; 0 iff g is a positive multiple of t.
    """
    gt = _weighted_sum(lambda a, b: jnp.sum(a * b), g, t, weights)
    gg = _weighted_sum(lambda a, b: jnp.sum(a * a), g, t, weights)
    tt = _weighted_sum(lambda a, b: jnp.sum(b * b), g, t, weights)
    # The tiny offset keeps sqrt differentiable when the dummy gradient is all zero.
    return 1.0 - gt / jnp.sqrt(gg * tt + 1e-30)


DISTANCES: dict[str, Distance] = {"l2": l2_distance, "cosine": cosine_distance}


class Support(NamedTuple):
    """What a top-k pruned leaked gradient says beyond its values, per leaf: ``mask`` is 1.0
    where an entry was sent (all ones for a leaf that was not pruned) and ``bound`` the
    smallest sent magnitude: every entry that was not sent was at most that large (inf when
    the bound is not used: then unsent entries say nothing)."""

    mask: Grads
    bound: Grads


def pruned_support(target: Grads, above: float, use_bound: bool = True) -> Support | None:
    """The support of a pruned gradient: a leaf more than ``above`` of whose entries are exactly
    zero is taken as top-k pruned. None when ``above`` <= 0 (off). Traceable: the decision is
    made per leaf inside jit. ``use_bound=False`` ignores the unsent entries altogether.

    A pruned gradient's zeros say "not sent, and small", not "zero": matching a dummy gradient
    against them pulls the reconstruction toward images whose gradient vanishes there, and
    scoring iterates by that distance prefers them over a better start. Clean gradients have
    few exact zeros (a ReLU net's dense layer at B = 1 up to ~75 %), so the threshold sits above
    that and below the usual pruning ratios (>= 90 %).
    """
    if above <= 0:
        return None

    def leaf(t: Array) -> tuple[Array, Array]:
        sent = t != 0
        pruned = 1.0 - jnp.mean(sent.astype(t.dtype)) > above
        mask = jnp.where(pruned, sent.astype(t.dtype), jnp.ones_like(t))
        if use_bound:
            smallest_sent = jnp.min(jnp.where(sent, jnp.abs(t), jnp.inf))
            bound = jnp.where(pruned & jnp.isfinite(smallest_sent), smallest_sent, 0.0).astype(t.dtype)
        else:
            bound = jnp.full((), jnp.inf, t.dtype)
        return mask, jnp.reshape(bound, (1,) * t.ndim)  # broadcasts against the leaf (and under vmap)

    pairs = jax.tree_util.tree_map(leaf, target)
    outer = jax.tree_util.tree_structure(target)
    mask, bound = jax.tree_util.tree_transpose(outer, jax.tree_util.tree_structure((0, 0)), pairs)
    return Support(mask, bound)


def on_support(g: Grads, support: Support | None) -> Grads:
    """``g`` as the pruned leak can judge it: sent entries unchanged; an entry that was not sent
    keeps only its excess over the leaf's bound (0 when within it; always 0 for an infinite
    bound). ``g`` itself when support is None."""
    if support is None:
        return g

    def leaf(a: Array, m: Array, b: Array) -> Array:
        return m * a + (1.0 - m) * (a - jnp.clip(a, -b, b))

    return jax.tree_util.tree_map(leaf, g, support.mask, support.bound)


# ----------------------------------------------------------------------------- image regularisers


def total_variation(x_BxHxWxC: Array) -> Array:
    """Anisotropic TV: mean |vertical diffs| + mean |horizontal diffs| (Geiping et al. 2020).

    Works on any (..., H, W, C) array: the two spatial axes are the third- and second-last.
    """
    dv = jnp.mean(jnp.abs(x_BxHxWxC[..., 1:, :, :] - x_BxHxWxC[..., :-1, :, :]))
    dh = jnp.mean(jnp.abs(x_BxHxWxC[..., :, 1:, :] - x_BxHxWxC[..., :, :-1, :]))
    return dv + dh


def prior_penalty(x_BxHxWxC: Array, x_prior_BxHxWxC: Array) -> Array:
    """mean (x - x_prior)^2: pulls the reconstruction toward a prior image (e.g. GIT's output)."""
    return jnp.mean(jnp.square(x_BxHxWxC - x_prior_BxHxWxC))


def image_regularisers(tv_weight: float | Array = 0.0, prior_weight: float | Array = 0.0,
                       x_prior: Array | None = None, extra_loss: ExtraLoss | None = None) -> ExtraLoss:
    """x -> tv_weight * TV(x) + prior_weight * mean((x - x_prior)^2) + extra_loss(x).

    Terms with a (static) zero weight or a missing image/function are left out of the
    graph; weights may also be traced scalars (then the term is always built).
    """

    def active(w) -> bool:
        return not (isinstance(w, (int, float)) and w == 0)

    def reg(x_BxHxWxC: Array) -> Array:
        r = jnp.float32(0.0)
        if active(tv_weight):
            r = r + tv_weight * total_variation(x_BxHxWxC)
        if x_prior is not None and active(prior_weight):
            r = r + prior_weight * prior_penalty(x_BxHxWxC, x_prior)
        if extra_loss is not None:
            r = r + extra_loss(x_BxHxWxC)
        return r

    return reg
