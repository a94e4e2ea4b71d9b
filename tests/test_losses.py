"""gitjax.losses: gradient distances, TV, prior penalty, the combined image regulariser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.layout import GradientLayout
from gitjax.losses import (DISTANCES, cosine_distance, image_regularisers, l2_distance, layer_weights, on_support,
                           prior_penalty, pruned_support, total_variation)

G = {"a": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}, "b": {"kernel": -jnp.ones((3, 2))}}


def test_cosine_distance_range_scale_and_weights():
    t = jax.tree.map(lambda a: a + 0.5, G)
    d = float(cosine_distance(G, t))
    assert 0.0 < d < 2.0
    assert abs(float(cosine_distance(jax.tree.map(lambda a: 7 * a, G), t)) - d) < 1e-5  # scale invariant
    assert abs(float(cosine_distance(jax.tree.map(jnp.negative, G), G)) - 2.0) < 1e-6
    # The zero gradient is finite (no NaN) and differentiable.
    zeros = jax.tree.map(jnp.zeros_like, G)
    grads = jax.grad(cosine_distance)(zeros, G)
    assert np.isfinite(float(cosine_distance(zeros, G)))
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
    # Per-layer weights: weighting every layer by the same constant changes nothing.
    w = jax.tree.map(lambda a: jnp.float32(3.0), G)
    np.testing.assert_allclose(float(cosine_distance(G, t, w)), d, rtol=1e-4)


def test_l2_distance_and_layer_weights():
    zeros = jax.tree.map(jnp.zeros_like, G)
    np.testing.assert_allclose(float(l2_distance(G, zeros)), 55.0 + 3.0 + 6.0)
    layout = GradientLayout.from_params(G)
    np.testing.assert_allclose(float(l2_distance(G, zeros, layer_weights(layout, "linear"))), 55.0 + 3.0 + 3.0)
    np.testing.assert_allclose(float(l2_distance(G, zeros, layer_weights(layout, "linear_increasing"))),
                               0.5 * 58.0 + 6.0)
    assert layer_weights(layout, "equal") is None
    with pytest.raises(ValueError, match="layer weighting"):
        layer_weights(layout, "nope")
    assert set(DISTANCES) == {"l2", "cosine"}


def test_total_variation_and_prior_penalty():
    assert float(total_variation(jnp.full((2, 4, 4, 3), 0.3))) == 0.0
    ramp = jnp.broadcast_to(jnp.arange(4.0)[None, None, :, None], (1, 4, 4, 1))  # +1 per column
    np.testing.assert_allclose(float(total_variation(ramp)), 1.0)
    np.testing.assert_allclose(float(total_variation(jnp.swapaxes(ramp, 1, 2))), 1.0)  # +1 per row
    # A leading group axis (N, B, H, W, C) keeps the spatial axes.
    np.testing.assert_allclose(float(total_variation(ramp[None])), 1.0)
    x = jax.random.uniform(jax.random.key(0), (2, 4, 4, 3))
    assert float(prior_penalty(x, x)) == 0.0
    np.testing.assert_allclose(float(prior_penalty(x, x + 0.1)), 0.01, rtol=1e-5)


def test_image_regularisers_add_the_weighted_terms():
    x = jax.random.uniform(jax.random.key(1), (1, 8, 8, 3))
    p = jax.random.uniform(jax.random.key(2), (1, 8, 8, 3))
    extra = lambda z: jnp.sum(z)
    reg = image_regularisers(0.3, 2.0, p, extra)
    want = 0.3 * total_variation(x) + 2.0 * prior_penalty(x, p) + jnp.sum(x)
    np.testing.assert_allclose(float(reg(x)), float(want), rtol=1e-6)
    assert float(image_regularisers()(x)) == 0.0
    assert float(image_regularisers(0.0, 2.0, None)(x)) == 0.0  # no prior image: no penalty
    # Traced weights (e.g. one per restart under vmap) work too.
    ws = jnp.array([0.0, 1.0])
    vals = jax.vmap(lambda w: image_regularisers(w)(x))(ws)
    np.testing.assert_allclose(np.asarray(vals), [0.0, float(total_variation(x))], rtol=1e-6)


def test_pruned_support_masks_only_pruned_layers():
    # One leaf with 95 % exact zeros (top-k pruned), one with 50 % (a clean ReLU layer can be
    # that sparse): only the first is matched on its support.
    pruned = jnp.zeros(100).at[jnp.arange(5)].set(jnp.arange(1.0, 6.0))
    relu_like = jnp.where(jnp.arange(10) % 2 == 0, 1.0, 0.0)
    t = {"a": pruned, "b": relu_like}
    support = pruned_support(t, 0.85)
    np.testing.assert_array_equal(np.asarray(support.mask["a"]), np.asarray(pruned != 0, np.float32))
    np.testing.assert_array_equal(np.asarray(support.mask["b"]), np.ones(10, np.float32))
    assert float(support.bound["a"][0]) == 1.0 and float(support.bound["b"][0]) == 0.0  # smallest sent |value|
    assert pruned_support(t, 0.0) is None and on_support(t, None) is t
    # A dummy gradient equal to the target where it was sent and within the bound elsewhere
    # explains the leak; one that exceeds the bound where nothing was sent does not (unless
    # the bound is ignored).
    within = {"a": pruned + 0.3 * (pruned == 0), "b": relu_like}
    beyond = {"a": pruned + 3.0 * (pruned == 0), "b": relu_like}
    assert float(cosine_distance(on_support(within, support), t)) < 1e-6 < float(cosine_distance(within, t))
    assert float(cosine_distance(on_support(beyond, support), t)) > 0.1
    assert float(cosine_distance(on_support(beyond, pruned_support(t, 0.85, use_bound=False)), t)) < 1e-6
    jitted = jax.jit(lambda t: pruned_support(t, 0.85))(t)  # the per-leaf decision traces
    np.testing.assert_array_equal(np.asarray(jitted.mask["a"]), np.asarray(support.mask["a"]))
