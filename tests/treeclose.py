"""Tree comparison shared by the gradient tests."""

import jax
import numpy as np


def assert_trees_close(actual, expected, rtol):
    """Every leaf: max |actual - expected| <= rtol * scale, scale = max |expected| of the leaf.

    The scale is floored at 1e-3 of the whole gradient's max: some leaves are exactly zero in
    exact arithmetic (ViT's key bias: softmax ignores a shift of all keys) and hold only roundoff.
    """
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    floor = 1e-3 * max(float(np.max(np.abs(e))) for e in jax.tree_util.tree_leaves(expected))
    for (path, a), e in zip(jax.tree_util.tree_leaves_with_path(actual), jax.tree_util.tree_leaves(expected)):
        a, e = np.asarray(a), np.asarray(e)
        assert a.shape == e.shape, jax.tree_util.keystr(path)
        scale = max(float(np.max(np.abs(e))), floor)
        err = float(np.max(np.abs(a - e)))
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: max error {err:.3g} vs scale {scale:.3g}"
