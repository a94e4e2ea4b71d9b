"""Gradient defences and parameter discrepancy: measured statistics against their definitions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.defenses import (DEFENSES, compose, defended_gradient, dp_sgd, gaussian_noise, identity, laplace_noise,
                             list_defenses, make_defense, quantize, sign_compress, topk_prune)
from gitjax.discrepancy import perturb_params, relative_distance, train_params_further
from gitjax.leakage import make_loss, per_example_grads
from gitjax.types import GitjaxError, GradientMismatchError
from gitjax.victims import make_victim

KEY = jax.random.key(0)


def _grads(seed=0, scales=(1.0, 0.1, 3.0)):
    """A pytree of ~200k random entries with differently scaled leaves (like real layer gradients)."""
    rng = np.random.default_rng(seed)
    return {
        "conv": {"kernel": jnp.asarray(scales[0] * rng.standard_normal((5, 5, 16, 32), np.float32)),
                 "bias": jnp.asarray(scales[1] * rng.standard_normal((32,), np.float32))},
        "head": {"kernel": jnp.asarray(scales[2] * rng.standard_normal((1000, 190), np.float32))},
    }


@functools.lru_cache(maxsize=None)
def _small_mlp():
    victim = make_victim("mlp", widths=(32,))
    params, state = jax.jit(victim.init)(jax.random.key(0))
    return victim, params, state


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


def _sub(a, b):
    return jax.tree_util.tree_map(lambda x, y: x - y, a, b)


# ----------------------------------------------------------------------------- noise


def test_gaussian_noise_std():
    g = _grads()
    noisy = gaussian_noise(0.05)(KEY, g)
    assert jax.tree_util.tree_structure(noisy) == jax.tree_util.tree_structure(g)
    noise = _flat(_sub(noisy, g))
    assert abs(noise.std() / 0.05 - 1) < 0.05
    assert abs(noise.mean()) < 0.05 * 0.05
    # Leaves get independent noise (not one key reused): the two kernels' noise is uncorrelated.
    n_conv = np.ravel(noisy["conv"]["kernel"] - g["conv"]["kernel"])
    n_head = np.ravel(noisy["head"]["kernel"] - g["head"]["kernel"])[: n_conv.size]
    assert abs(np.corrcoef(n_conv, n_head)[0, 1]) < 0.05
    # std 0 is the identity.
    np.testing.assert_array_equal(_flat(gaussian_noise(0.0)(KEY, g)), _flat(g))


def test_laplace_noise_scale():
    g = _grads()
    noise = _flat(_sub(laplace_noise(0.02)(KEY, g), g))
    assert abs(noise.std() / (np.sqrt(2) * 0.02) - 1) < 0.05
    assert abs(np.mean(np.abs(noise)) / 0.02 - 1) < 0.05  # E|X| = scale
    # Laplace, not Gaussian: excess kurtosis 3 (Gaussian: 0).
    kurt = np.mean(noise**4) / np.mean(noise**2) ** 2 - 3
    assert 2.5 < kurt < 3.5


def test_noise_with_leading_axes():
    g = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), _grads())
    noisy = gaussian_noise(0.1)(KEY, g)
    assert jax.tree_util.tree_map(jnp.shape, noisy) == jax.tree_util.tree_map(jnp.shape, g)
    d = noisy["head"]["kernel"] - g["head"]["kernel"]
    assert float(jnp.max(jnp.abs(d[0] - d[1]))) > 0.1  # independent noise per stacked gradient


# ----------------------------------------------------------------------------- DP-SGD


def _per_example(b=4):
    # Example i has global norm growing with i, so a clip norm in between clips some of them.
    g = _grads(scales=(0.01, 0.01, 0.01))
    growth_B = np.arange(1, b + 1, dtype=np.float32)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(growth_B.reshape(-1, *[1] * a.ndim) * np.asarray(a)), g)


def _global_norms(g_B):
    return np.sqrt(sum(np.sum(np.asarray(a).reshape(a.shape[0], -1) ** 2, 1) for a in jax.tree_util.tree_leaves(g_B)))


def test_dp_sgd_clipping_without_noise():
    g_B = _per_example()
    norms_B = _global_norms(g_B)
    for clip in (0.5 * (norms_B[1] + norms_B[2]), 10 * norms_B.max()):  # active for 2 of 4; inactive
        out = dp_sgd(clip, 0.0)(KEY, g_B)
        factor_B = np.minimum(1.0, clip / norms_B)
        expected = jax.tree_util.tree_map(
            lambda a: np.tensordot(factor_B, np.asarray(a), axes=1) / a.shape[0], g_B)
        assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(expected)
        np.testing.assert_allclose(_flat(out), _flat(expected), rtol=1e-5, atol=1e-9)
        # Each clipped example contributes norm <= clip.
        clipped = jax.tree_util.tree_map(lambda a: factor_B.reshape(-1, *[1] * (a.ndim - 1)) * np.asarray(a), g_B)
        assert np.all(_global_norms(clipped) <= clip * (1 + 1e-5))
    # Inactive clipping is the plain mean of the per-example gradients.
    mean = jax.tree_util.tree_map(lambda a: a.mean(0), g_B)
    np.testing.assert_allclose(_flat(dp_sgd(1e6, 0.0)(KEY, g_B)), _flat(mean), rtol=1e-5, atol=1e-9)


def test_dp_sgd_noise_std():
    g_B = _per_example(b=4)
    clean = dp_sgd(0.3, 0.0)(KEY, g_B)
    noise = _flat(_sub(dp_sgd(0.3, 1.5)(KEY, g_B), clean))
    assert abs(noise.std() / (1.5 * 0.3 / 4) - 1) < 0.05


def test_dp_sgd_needs_per_example_grads():
    g_B = _per_example()
    g_B["conv"]["bias"] = g_B["conv"]["bias"][:3]
    with pytest.raises(ValueError, match="per-example gradients"):
        dp_sgd(1.0, 1.0)(KEY, g_B)
    assert dp_sgd(1.0, 1.0).per_example and not gaussian_noise(1.0).per_example


# ----------------------------------------------------------------------------- compression


@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.9, 0.999])
def test_prune_per_layer(ratio):
    g = _grads()
    out = topk_prune(ratio)(KEY, g)
    for a, o in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(out)):
        a, o = np.ravel(np.asarray(a)), np.ravel(np.asarray(o))
        zeros = o == 0
        assert abs(zeros.sum() - ratio * a.size) <= 1  # measured sparsity = ratio (+-1 entry)
        np.testing.assert_array_equal(o[~zeros], a[~zeros])  # kept entries untouched
        if zeros.any() and (~zeros).any():
            assert np.abs(a[~zeros]).min() >= np.abs(a[zeros]).max()  # kept = the largest


@pytest.mark.parametrize("ratio", [0.3, 0.9, 0.995])
def test_prune_drops_the_same_entries_as_a_stable_sort(ratio):
    # Ties (repeated magnitudes, zeros, +-x) are broken by position, as a stable argsort does;
    # under jit and vmap (the trainer prunes N gradients per step).
    rng = np.random.default_rng(1)
    x_Nxn = rng.normal(size=(3, 1000)).astype(np.float32)
    x_Nxn[:, rng.integers(0, 1000, 300)] = 0.25
    x_Nxn[:, rng.integers(0, 1000, 100)] = -0.25
    x_Nxn[:, :50] = 0.0
    k = int(round(ratio * 1000))
    want = x_Nxn.copy()
    for row in want:
        row[np.argsort(np.abs(row), kind="stable")[:k]] = 0.0
    got = jax.jit(jax.vmap(lambda v: topk_prune(ratio)(KEY, {"w": v})["w"]))(jnp.asarray(x_Nxn))
    np.testing.assert_array_equal(np.asarray(got), want)


def test_prune_global():
    g = _grads()  # the bias leaf is 10x smaller than the kernels
    out = topk_prune(0.5, per_layer=False)(KEY, g)
    a, o = _flat(g), _flat(out)
    assert abs((o == 0).sum() - 0.5 * a.size) <= 1
    assert np.abs(a[o != 0]).min() >= np.abs(a[o == 0]).max()  # one global threshold
    # Globally the small-scale leaf loses more than half; per layer exactly half.
    assert float(jnp.mean(out["conv"]["bias"] == 0)) > 0.9
    assert float(jnp.mean(topk_prune(0.5)(KEY, g)["conv"]["bias"] == 0)) == 0.5


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_deterministic(bits):
    g = _grads()
    out = quantize(bits)(KEY, g)
    for a, q in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(out)):
        a, q = np.asarray(a), np.asarray(q)
        s = np.abs(a).max()
        assert len(np.unique(q)) <= 2**bits
        assert np.abs(q - a).max() <= s / (2**bits - 1) * (1 + 1e-5)
        assert np.abs(q).max() <= s * (1 + 1e-6)
    if bits == 1:
        leaf = np.asarray(out["head"]["kernel"])
        s = np.abs(np.asarray(g["head"]["kernel"])).max()
        np.testing.assert_allclose(np.unique(np.abs(leaf)), [s], rtol=1e-6)


def test_quantize_stochastic_is_unbiased():
    g = {"w": jnp.linspace(-1.0, 1.0, 101)}
    q = quantize(2, stochastic=True)
    samples = jax.vmap(q, in_axes=(0, None))(jax.random.split(KEY, 4000), g)["w"]
    step = 2.0 / 3
    assert float(jnp.max(jnp.abs(samples - g["w"]))) < step * (1 + 1e-5)
    assert len(np.unique(np.asarray(samples))) <= 4
    # Unbiased: mean over 4000 draws within ~4 standard errors (<= step/2 / sqrt(4000)).
    assert float(jnp.max(jnp.abs(samples.mean(0) - g["w"]))) < 4 * 0.5 * step / np.sqrt(4000)


def test_quantize_zero_leaf_and_vmap_over_stacked_grads():
    assert float(jnp.max(jnp.abs(quantize(3)(KEY, {"z": jnp.zeros(5)})["z"]))) == 0.0
    # vmap treats each stacked gradient as its own unit (own scale).
    g2 = {"w": jnp.stack([jnp.linspace(-1, 1, 9), jnp.linspace(-100, 100, 9)])}
    out = jax.vmap(quantize(1), in_axes=(None, 0))(KEY, g2)["w"]
    np.testing.assert_allclose(np.unique(np.abs(out[0])), [1.0])
    np.testing.assert_allclose(np.unique(np.abs(out[1])), [100.0])


def test_sign_compress():
    g = _grads()
    out = sign_compress()(KEY, g)
    for a, o in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(out)):
        a, o = np.asarray(a), np.asarray(o)
        s = np.abs(a).mean()
        np.testing.assert_allclose(np.unique(o), [-s, s], rtol=1e-6)
        np.testing.assert_array_equal(np.sign(o), np.sign(a))
        np.testing.assert_allclose(np.abs(o).sum(), np.abs(a).sum(), rtol=1e-4)  # L1 kept


# ----------------------------------------------------------------------------- composition, registry, jit


def test_compose_applies_in_order():
    g = _grads()
    prune_then_noise = compose(topk_prune(0.5), gaussian_noise(0.01))(KEY, g)
    noise_then_prune = compose(gaussian_noise(0.01), topk_prune(0.5))(KEY, g)
    assert float(np.mean(_flat(prune_then_noise) == 0)) == 0.0
    assert abs(float(np.mean(_flat(noise_then_prune) == 0)) - 0.5) < 1e-3
    # Exactly b(k2, a(k1, g)).
    k1, k2 = jax.random.split(KEY)
    manual = gaussian_noise(0.01)(k2, topk_prune(0.5)(k1, g))
    np.testing.assert_array_equal(_flat(prune_then_noise), _flat(manual))
    np.testing.assert_array_equal(_flat(compose()(KEY, g)), _flat(g))
    assert compose(dp_sgd(1.0, 0.0), quantize(4)).per_example
    with pytest.raises(ValueError, match="must come first"):
        compose(quantize(4), dp_sgd(1.0, 0.0))


@pytest.mark.parametrize("factory,kwargs,bad", [
    (gaussian_noise, {"std": -0.1}, "std"),
    (gaussian_noise, {"std": float("nan")}, "std"),
    (laplace_noise, {"scale": -1.0}, "scale"),
    (dp_sgd, {"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip_norm"),
    (dp_sgd, {"clip_norm": 1.0, "noise_multiplier": -1.0}, "noise_multiplier"),
    (topk_prune, {"ratio": 1.0}, "ratio"),
    (topk_prune, {"ratio": -0.1}, "ratio"),
    (quantize, {"bits": 0}, "bits"),
    (quantize, {"bits": 2.5}, "bits"),
])
def test_invalid_hyper_parameters(factory, kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        factory(**kwargs)


def test_registry():
    assert set(DEFENSES) == {"none", "gaussian", "laplace", "dpsgd", "prune", "quantize", "sign"}
    assert set(list_defenses()) == set(DEFENSES)
    g = _grads()
    np.testing.assert_array_equal(_flat(make_defense("none")(KEY, g)), _flat(g))
    np.testing.assert_array_equal(_flat(make_defense("prune", ratio=0.5)(KEY, g)), _flat(topk_prune(0.5)(KEY, g)))
    with pytest.raises(ValueError, match="unknown defence 'blur'.*gaussian"):
        make_defense("blur")
    with pytest.raises(GitjaxError, match="defence 'gaussian' has no hyper-parameter 'sigma'; it takes: std"):
        make_defense("gaussian", sigma=0.1)
    with pytest.raises(GitjaxError, match="defence 'dpsgd' needs 'noise_multiplier'"):
        make_defense("dpsgd", clip_norm=1.0)


@pytest.mark.parametrize("name,kwargs,bad", [
    ("gaussian", {"std": -1}, "std must be >= 0, got -1"),
    ("gaussian", {"std": "abc"}, "std must be a number, got 'abc'"),
    ("gaussian", {"std": float("nan")}, "std must be finite"),
    ("prune", {"ratio": 1.5}, r"ratio must be in \[0, 1\), got 1.5"),
    ("prune", {"ratio": 0.5, "per_layer": "yes"}, "per_layer must be true or false"),
    ("quantize", {"bits": 4, "stochastic": 1}, "stochastic must be true or false"),
])
def test_make_defense_rejects_bad_values_in_one_line(name, kwargs, bad):
    with pytest.raises(GitjaxError, match=bad) as e:
        make_defense(name, **kwargs)
    assert "\n" not in str(e.value)


REGISTRY_KWARGS = {
    "none": {}, "gaussian": {"std": 0.1}, "laplace": {"scale": 0.1},
    "dpsgd": {"clip_norm": 0.5, "noise_multiplier": 1.0},
    "prune": {"ratio": 0.7}, "quantize": {"bits": 3}, "sign": {},
}


@pytest.mark.parametrize("name", sorted(REGISTRY_KWARGS))
def test_jit_equals_eager(name):
    t = make_defense(name, **REGISTRY_KWARGS[name])
    g = _per_example() if name == "dpsgd" else _grads()
    np.testing.assert_allclose(_flat(jax.jit(t)(KEY, g)), _flat(t(KEY, g)), rtol=1e-5, atol=1e-6)
    assert identity()(KEY, g) is g


def test_defended_gradient_uses_per_example_grads_for_dpsgd():
    victim, params, state = _small_mlp()
    x = jax.random.uniform(jax.random.key(1), (4, 32, 32, 3))
    y = jnp.array([0, 1, 2, 3])
    t = dp_sgd(0.1, 0.0)
    out = jax.jit(defended_gradient, static_argnums=(0, 5))(victim, params, state, x, y, t, KEY)
    expected = t(KEY, jax.jit(per_example_grads, static_argnums=0)(victim, params, state, x, y))
    np.testing.assert_allclose(_flat(out), _flat(expected), rtol=1e-5, atol=1e-8)
    assert jax.tree_util.tree_map(jnp.shape, out) == jax.tree_util.tree_map(jnp.shape, params)


# ----------------------------------------------------------------------------- parameter discrepancy


def test_perturb_params_relative_size():
    _, params, _ = _small_mlp()
    distance = jax.jit(lambda key, p, rel: relative_distance(p, perturb_params(key, p, rel)))
    for rel in (0.01, 0.1, 0.5):
        d = float(distance(jax.random.key(3), params, rel))
        assert abs(d / rel - 1) < 0.2, (rel, d)
    np.testing.assert_array_equal(_flat(perturb_params(KEY, params, 0.0)), _flat(params))
    with pytest.raises(ValueError, match="relative"):
        perturb_params(KEY, params, -0.1)


def test_relative_distance():
    a = {"w": jnp.array([3.0, 4.0])}
    assert float(relative_distance(a, {"w": jnp.array([3.0, 4.0])})) == 0.0
    np.testing.assert_allclose(float(relative_distance(a, {"w": jnp.array([0.0, 0.0])})), 1.0)
    with pytest.raises(GradientMismatchError, match="structure"):
        relative_distance(a, {"v": jnp.zeros(2)})
    with pytest.raises(GradientMismatchError, match="shapes"):
        relative_distance(a, {"w": jnp.zeros(3)})


def test_train_params_further_lowers_loss():
    victim, params, state = _small_mlp()
    x = jax.random.uniform(jax.random.key(1), (64, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (64,), 0, 10)
    new = train_params_further(victim, params, state, x, y, steps=40, lr=0.05, batch_size=16, key=KEY)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(params)
    d = float(relative_distance(params, new))
    assert 1e-4 < d < 1.0
    loss = jax.jit(make_loss(victim))
    before, after = float(loss(params, state, x, y)), float(loss(new, state, x, y))
    assert after < 0.8 * before, (before, after)
    assert train_params_further(victim, params, state, x, y, steps=0, lr=0.05, batch_size=16, key=KEY) is params
    with pytest.raises(ValueError, match="batch_size"):
        train_params_further(victim, params, state, x, y, steps=1, lr=0.05, batch_size=65, key=KEY)
