"""What enters and leaves a generator: input checks, block values, and the map back to pixels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.layout import GradientLayout, LayerBlock
from gitjax.trace import VictimPlan
from gitjax.types import Array, GradientMismatchError, Grads, Params


def check_victim_params(layout: GradientLayout, victim_params: Params) -> None:
    """Raises GradientMismatchError unless ``victim_params`` has exactly the victim's leaf shapes."""
    layout.check(victim_params)
    first = layout.blocks[0]
    leaf = layout.to_blocks(victim_params)[0][first.leaves[0][0]]
    if tuple(leaf.shape) != first.leaves[0][1]:
        raise GradientMismatchError(
            f"victim_params must be one parameter set without leading axes; {first.name} has shape {tuple(leaf.shape)}")


def check_grads_n(layout: GradientLayout, grads_N: Grads) -> int:
    """Checks a stack of N gradients against the layout (works under jit); returns N."""
    layout.check(grads_N)
    first = layout.blocks[0]
    name, shape = first.leaves[0]
    leaf = layout.to_blocks(grads_N)[0][name]
    lead = tuple(leaf.shape[: leaf.ndim - len(shape)])
    if len(lead) != 1:
        raise GradientMismatchError(
            f"generators take N leaked gradients with one leading axis N (leaf shapes (N, *param)); "
            f"got leading axes {lead} on {first.name}/{name}")
    return lead[0]


def to_image(plan: VictimPlan, a_first: Array) -> Array | None:
    """(B, *first_in_shape) normalised first-layer input -> (B, H, W, C) pixels, via the traced index map."""
    if plan.image_perm is None:
        return None
    b = a_first.shape[0]
    inv = np.argsort(np.asarray(plan.image_perm))
    z = a_first.reshape(b, -1)[:, inv].reshape(b, *plan.image_shape)
    return z * jnp.asarray(plan.std) + jnp.asarray(plan.mean)


def ste_clip01(x: Array) -> Array:
    """Clips to [0, 1] in the forward pass with an identity gradient (clipping would zero it)."""
    return x + jax.lax.stop_gradient(jnp.clip(x, 0.0, 1.0) - x)


def block_value(tree: Params, block: LayerBlock, leaf: str) -> Array:
    """One leaf of a block from a params/grads pytree ("value" for loose embed arrays)."""
    node = tree
    for k in block.path:
        node = node[k]
    return node if block.kind == "embed" else node[leaf]

