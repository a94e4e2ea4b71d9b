"""The victim zoo: init/apply shapes, registry errors, input checks, BatchNorm modes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.leakage import per_example_grads
from gitjax.types import InputShapeError
from gitjax.victims import VICTIMS, count_params, list_victims, make_victim

# Parameter counts of the zoo at 32x32x3 input, 10 classes (pinned so an accidental
# architecture change is noticed; resnet18 is checked separately at shape level only).
EXPECTED_PARAMS = {"mlp": 820_874, "lenet": 15_826, "resnet8": 78_042, "vit": 75_018}


def _images(key, b, shape=(32, 32, 3)):
    return jax.random.uniform(key, (b, *shape))


@functools.lru_cache(maxsize=None)
def _setup(name, **kw):
    """(victim, params, state, jitted apply); jitted because eager Flax dispatch is slow on CPU."""
    victim = make_victim(name, **kw)
    params, state = jax.jit(victim.init)(jax.random.key(0))
    apply = jax.jit(victim.apply, static_argnames="train")
    return victim, params, state, apply


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet8", "vit"])
def test_init_and_logits_shape(name):
    victim, params, state, apply = _setup(name)
    logits = apply(params, state, _images(jax.random.key(1), 3))
    assert logits.shape == (3, 10)
    assert bool(jnp.all(jnp.isfinite(logits)))
    assert count_params(params) == EXPECTED_PARAMS[name]


def test_resnet18_abstract_shapes():
    # 11M parameters: check shapes abstractly, no FLOPs spent.
    victim = make_victim("resnet18")
    params, state = jax.eval_shape(victim.init, jax.random.key(0))
    assert 11_000_000 < count_params(params) < 11_300_000
    assert "batch_stats" in state
    out = jax.eval_shape(lambda p, s, x: victim.apply(p, s, x), params, state,
                         jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
    assert out.shape == (2, 10)


def test_num_classes_and_input_shape():
    victim, params, state, apply = _setup("lenet", input_shape=(28, 28, 1), num_classes=7)
    assert apply(params, state, _images(jax.random.key(1), 2, (28, 28, 1))).shape == (2, 7)


def test_registry_listing_and_unknown_name():
    listing = list_victims()
    assert set(listing) == set(VICTIMS) == {"mlp", "lenet", "resnet8", "resnet18", "vit"}
    assert all(isinstance(d, str) and d for d in listing.values())
    with pytest.raises(ValueError, match="resnet999"):
        make_victim("resnet999")


def test_bad_mean_std_length():
    with pytest.raises(ValueError, match="mean/std"):
        make_victim("mlp", mean=(0.5, 0.5), std=(0.5, 0.5))


@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 32, 32, 1), (32, 32, 3), (2, 3, 32, 32)])
def test_check_images_wrong_shape(shape):
    victim = make_victim("lenet")
    with pytest.raises(InputShapeError, match=r"\(B, 32, 32, 3\)"):
        victim.check_images(jnp.zeros(shape))
    victim.check_images(jnp.zeros((2, 32, 32, 3)))  # the right shape passes


def test_normalize_roundtrip():
    victim = make_victim("lenet", mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25))
    x = _images(jax.random.key(0), 2)
    np.testing.assert_allclose(victim.denormalize(victim.normalize(x)), x, atol=1e-6)


def test_resnet_batchnorm_train_vs_eval():
    victim, params, state, apply = _setup("resnet8")
    x = _images(jax.random.key(1), 4)
    eval_logits = apply(params, state, x)
    train_logits = apply(params, state, x, train=True)
    assert float(jnp.max(jnp.abs(eval_logits - train_logits))) > 1e-3
    # Train mode mixes the batch: example 0's logits change when example 1 changes.
    x2 = x.at[1].set(1.0 - x[1])
    assert float(jnp.max(jnp.abs(apply(params, state, x2, train=True)[0] - train_logits[0]))) > 1e-4
    # Eval mode does not.
    np.testing.assert_allclose(apply(params, state, x2)[0], eval_logits[0], atol=1e-5)
    # apply never updates the running statistics (fresh BN: mean 0, var 1).
    stats = jax.tree_util.tree_leaves_with_path(state["batch_stats"])
    assert stats and all(
        np.all(np.asarray(v) == (0.0 if "mean" in jax.tree_util.keystr(p) else 1.0)) for p, v in stats)


def test_resnet_eval_per_example_grads_independent_of_batch():
    victim, params, state, _ = _setup("resnet8")
    pe = jax.jit(functools.partial(per_example_grads, victim))
    x = _images(jax.random.key(1), 3)
    g = pe(params, state, x, jnp.array([0, 3, 7]))
    x_other = x.at[1:].set(_images(jax.random.key(2), 2))
    g_other = pe(params, state, x_other, jnp.array([0, 1, 1]))
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_other)):
        np.testing.assert_allclose(a[0], b[0], atol=1e-6)


def test_group_norm_resnet_has_no_batch_stats():
    victim, params, state, apply = _setup("resnet8", norm="group")
    assert "batch_stats" not in state
    assert apply(params, state, _images(jax.random.key(1), 2)).shape == (2, 10)
    with pytest.raises(ValueError, match="unknown norm"):
        jax.eval_shape(make_victim("resnet8", norm="layer").init, jax.random.key(0))
