"""gitjax.losses: gradient distances, TV, prior penalty, the combined image regulariser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.data import load_dataset
from gitjax.defenses import gaussian_noise, topk_prune

from gitjax.layout import GradientLayout
from gitjax.leakage import batch_grad
from gitjax.losses import (DISTANCES, cosine_distance, holdout_masks, image_regularisers, l2_distance, layer_weights,
                           masked, noise_floor, on_support, prior_penalty, pruned_support, total_variation)
from gitjax.victims import make_victim

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


def test_pruned_support_masks_only_pruned_gradients():
    # 95 % exact zeros: top-k pruned. A gradient whose only zeros are a clean ReLU layer's
    # (50 %, equal magnitudes) is not: the zero fraction stays below the threshold.
    pruned = jnp.zeros(100).at[jnp.arange(5)].set(jnp.arange(1.0, 6.0))
    relu_like = jnp.where(jnp.arange(10) % 2 == 0, 1.0, 0.0)
    t = {"a": pruned, "b": jnp.ones(4)}
    support = pruned_support(t, 0.85)
    np.testing.assert_array_equal(np.asarray(support.mask["a"]), np.asarray(pruned != 0, np.float32))
    np.testing.assert_array_equal(np.asarray(support.mask["b"]), np.ones(4, np.float32))
    assert float(support.bound["a"][0]) == 1.0 and float(support.bound["b"][0]) == 0.0  # smallest sent |value|
    clean = pruned_support({"b": relu_like}, 0.85)
    np.testing.assert_array_equal(np.asarray(clean.mask["b"]), np.ones(10, np.float32))
    assert pruned_support(t, 0.0) is None and on_support(t, None) is t
    # Once one leaf is found pruned, a leaf with zeros too small to tell is pruned with it.
    both = pruned_support({"a": pruned, "b": relu_like}, 0.85)
    np.testing.assert_array_equal(np.asarray(both.mask["b"]), np.asarray(relu_like))
    assert float(both.bound["b"][0]) == 1.0
    # A dummy gradient equal to the target where it was sent and within the bound elsewhere
    # explains the leak; one that exceeds the bound where nothing was sent does not (unless
    # the bound is ignored).
    within = {"a": pruned + 0.3 * (pruned == 0), "b": t["b"]}
    beyond = {"a": pruned + 3.0 * (pruned == 0), "b": t["b"]}
    assert float(cosine_distance(on_support(within, support), t)) < 1e-6 < float(cosine_distance(within, t))
    assert float(cosine_distance(on_support(beyond, support), t)) > 0.1
    assert float(cosine_distance(on_support(beyond, pruned_support(t, 0.85, use_bound=False)), t)) < 1e-6
    jitted = jax.jit(lambda t: pruned_support(t, 0.85))(t)  # the per-leaf decision traces
    np.testing.assert_array_equal(np.asarray(jitted.mask["a"]), np.asarray(support.mask["a"]))


def test_holdout_masks_split_the_sent_entries():
    # fit + held-out = 1 everywhere; only sent entries are held out, about the stated fraction
    # of them; the draw is a pure function of the key; a distance on the held-out entries reads
    # nothing else.
    t = {"a": jnp.zeros(4000).at[:2000].set(1.0), "b": jnp.ones(3000)}
    support = pruned_support(t, 0.4)
    fit, held = holdout_masks(jax.random.key(0), t, support, 0.25)
    for k in t:
        np.testing.assert_array_equal(np.asarray(fit[k] + held[k]), np.ones(t[k].shape, np.float32))
    assert float(jnp.sum(held["a"][2000:])) == 0.0  # unsent entries stay in the fit (bounded there)
    for k, n in (("a", 2000), ("b", 3000)):
        frac = float(jnp.sum(held[k])) / n
        assert abs(frac - 0.25) < 0.04, (k, frac)
    again = holdout_masks(jax.random.key(0), t, support, 0.25)[1]
    np.testing.assert_array_equal(np.asarray(again["b"]), np.asarray(held["b"]))
    other = holdout_masks(jax.random.key(1), t, None, 0.25)[1]
    assert float(jnp.sum(other["a"][2000:])) > 0  # without a support every entry counts as sent
    g = {"a": t["a"] * (1.0 - held["a"]) - held["a"], "b": t["b"]}  # wrong only on held-out entries of a
    assert float(cosine_distance(masked(g, fit), masked(t, fit))) < 1e-6
    assert float(cosine_distance(masked(g, held), masked(t, held))) > 0.1


@pytest.mark.parametrize("name", ["mlp", "lenet"])
def test_magnitude_gap_finds_moderate_pruning_and_spares_clean_gradients(name):
    # Real gradients of natural patches at B = 1 and 4: clean ones (the MLP's with ReLU zeros
    # in every dense layer) are never taken as pruned; after 50 % top-k pruning every zero
    # is, though no leaf is near the 85 % zero fraction of the older rule.
    victim = make_victim(name)
    params, state = jax.jit(victim.init)(jax.random.key(0))
    data = load_dataset("patches", "train")
    rule = jax.jit(lambda g: (pruned_support(g, 0.85, True, 0.15).mask, pruned_support(g, 0.85).mask))
    leak = jax.jit(lambda x, y: batch_grad(victim, params, state, x, y))
    prune = jax.jit(lambda g: topk_prune(0.5)(jax.random.key(0), g))
    for b, start in [(1, 0), (4, 8)]:
        g = leak(jnp.asarray(data.images[start:start + b]), jnp.asarray(data.labels[start:start + b]))
        assert all(bool(jnp.all(m == 1)) for m in jax.tree.leaves(rule(g)[0])), (name, b)
        pruned = prune(g)
        masks, frac_only = rule(pruned)
        for m, t in zip(jax.tree.leaves(masks), jax.tree.leaves(pruned)):
            np.testing.assert_array_equal(np.asarray(m), np.asarray(t != 0, np.float32))
        assert all(bool(jnp.all(m == 1)) for m in jax.tree.leaves(frac_only))
    # The gap itself: survivors from 1.0 up (a top-k cut) vs magnitudes from ~0 (a clean leaf).
    cut = jnp.concatenate([jnp.zeros(64), jnp.linspace(1.0, 4.0, 64)])
    smooth = jnp.concatenate([jnp.zeros(64), jnp.linspace(0.01, 4.0, 64)])
    assert float(pruned_support({"w": cut}, 0.0, True, 0.15).bound["w"][0]) == 1.0
    assert bool(jnp.all(pruned_support({"w": smooth}, 0.0, True, 0.15).mask["w"] == 1))
    assert pruned_support({"w": cut}, 0.0, True, 0.0) is None


def test_noise_floor_predicts_the_truths_distance_under_gaussian_noise():
    # The truth's cosine distance to its own gradient + N(0, std^2) noise, mean over 6 noise
    # draws and 2 images, against the predicted floor; with and without per-layer weights.
    # Measured (MLP, |g| ~ 18): 1.7e-3 and 0.137 at std 1e-3 / 1e-2, predicted within 0.1 %.
    victim = make_victim("mlp")
    params, state = jax.jit(victim.init)(jax.random.key(0))
    data = load_dataset("patches", "train")
    leak = jax.jit(lambda x, y: batch_grad(victim, params, state, x, y))
    w = layer_weights(GradientLayout.from_params(params), "linear_increasing")
    assert float(noise_floor(leak(jnp.asarray(data.images[:1]), jnp.asarray(data.labels[:1])), 0.0)) == 0.0
    for std in (1e-3, 1e-2):
        for weights in (None, w):
            truth, floor = [], []
            for i in range(2):
                g = leak(jnp.asarray(data.images[i:i + 1]), jnp.asarray(data.labels[i:i + 1]))
                for s in range(6):
                    t = gaussian_noise(std)(jax.random.key(10 * i + s), g)
                    truth.append(float(cosine_distance(g, t, weights)))
                    floor.append(float(noise_floor(t, std, weights)))
            assert 0.0 < np.mean(truth)
            np.testing.assert_allclose(np.mean(floor), np.mean(truth), rtol=0.05)
    # Noise that swamps the gradient: the floor saturates at 1 (orthogonal), never NaN.
    assert float(noise_floor({"w": jnp.ones(4)}, 10.0)) == 1.0
