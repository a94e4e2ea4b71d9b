"""The one Prior type: save/load round trip, jit(attack)(load_prior(dir), grads), no stale cache, gradient checks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gitjax
from gitjax.configs import PRESETS
from gitjax.generators import build_generator
from gitjax.leakage import batch_grad
from gitjax.prior import Prior, check_gradients, load_prior, save_prior
from gitjax.types import GradientMismatchError, NonFiniteGradientError
from gitjax.victims import make_victim

TINY = PRESETS["tiny"]


def _hand_built_prior(seed: int, config=TINY) -> Prior:
    victim = make_victim(config.victim, input_shape=(32, 32, 3), **dict(config.victim_kwargs))
    params, state = jax.jit(victim.init)(jax.random.key(0))
    generator = build_generator(config.generator, victim, params)
    grads_1 = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape, p.dtype), params)
    # jit: an eager Flax init runs op by op (~50 s on a shared 2-core CPU); rbg keys compile fast.
    gen_params = jax.jit(generator.init)(jax.random.key(seed, impl="rbg"), grads_1, params)["params"]
    return Prior(gen_params, params, state, generator, victim, config)


def _leaves(t):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(t)]


def test_save_load_round_trip_and_jitted_attack(tmp_path):
    prior = _hand_built_prior(1)
    save_prior(prior, tmp_path / "run")
    loaded = gitjax.load_prior(tmp_path / "run")
    assert isinstance(loaded, Prior) and loaded.config == TINY and loaded.batch_size == 1
    assert loaded.victim.name == prior.victim.name and loaded.victim.input_shape == prior.victim.input_shape
    for a, b in zip(_leaves((prior.gen_params, prior.victim_params)), _leaves((loaded.gen_params,
                                                                                loaded.victim_params))):
        assert np.array_equal(a, b)
    x = jax.random.uniform(jax.random.key(3), (1, 32, 32, 3))
    grads = jax.jit(batch_grad, static_argnums=0)(loaded.victim, loaded.victim_params, loaded.victim_state, x,
                                                 jnp.array([2]))
    attack = jax.jit(gitjax.attack)
    out = attack(gitjax.load_prior(tmp_path / "run"), grads)  # as the README shows
    assert out.shape == (1, 32, 32, 3) and np.all(np.isfinite(np.asarray(out)))
    np.testing.assert_allclose(np.asarray(out), np.asarray(attack(prior, grads)), rtol=1e-5, atol=1e-6)
    # vmapped over N gradients: the same as one at a time.
    grads_N = jax.tree_util.tree_map(lambda g: jnp.stack([g, 2 * g]), grads)
    out_N = jax.jit(jax.vmap(gitjax.attack, in_axes=(None, 0)))(loaded, grads_N)
    np.testing.assert_allclose(np.asarray(out_N[0]), np.asarray(out), rtol=1e-5, atol=1e-6)


def test_load_prior_of_an_exact_generator(tmp_path):
    """Exact-GIT's init computes with the victim params: the abstract state must trace them (eval_shape args)."""
    import dataclasses

    exact = TINY.replace(generator=dataclasses.replace(TINY.generator, kind="exact"))
    prior = _hand_built_prior(1, exact)
    loaded = load_prior(save_prior(prior, tmp_path / "run"))
    assert loaded.config.generator.kind == "exact"
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(prior.gen_params), _leaves(loaded.gen_params)))
    # Solver steps are not parameters: the same params run under a config with more of them.
    more = loaded.with_generator_config(exact_cg_iters=2 * loaded.config.generator.exact_cg_iters)
    assert more.generator.config.exact_cg_iters == more.config.generator.exact_cg_iters == \
        2 * loaded.config.generator.exact_cg_iters
    assert more.gen_params is loaded.gen_params and more.config.steps == loaded.config.steps


def test_load_prior_is_not_cached(tmp_path):
    """A retrain in the same process (a newer step in the same directory) is seen by the next load."""
    save_prior(_hand_built_prior(1), tmp_path / "run", step=1)
    first = load_prior(tmp_path / "run")
    save_prior(_hand_built_prior(2), tmp_path / "run", step=2)
    second = load_prior(tmp_path / "run")
    assert not all(np.array_equal(a, b) for a, b in zip(_leaves(first.gen_params), _leaves(second.gen_params)))
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(first.gen_params),
                                                    _leaves(load_prior(tmp_path / "run", step=1).gen_params)))


def test_train_reexports_the_one_prior():
    import gitjax.attacks.git as git_attack
    import gitjax.train as train

    assert train.load_prior is load_prior and train.Prior is Prior and git_attack.Prior is Prior
    assert gitjax.Prior is Prior and gitjax.attack is git_attack.attack


def test_check_gradients_one_line_errors():
    prior = _hand_built_prior(1)
    g = jax.tree_util.tree_map(jnp.ones_like, prior.victim_params)
    check_gradients(prior, g)
    check_gradients(prior, jax.tree_util.tree_map(lambda a: a[None], g), leading=1)
    with pytest.raises(NonFiniteGradientError, match="NaN/inf"):
        check_gradients(prior, jax.tree_util.tree_map(lambda a: a * jnp.nan, g))
    with pytest.raises(GradientMismatchError, match="another model"):
        check_gradients(prior, {"dense0": g["dense0"]})
    other = make_victim("mlp", input_shape=(32, 32, 3), widths=(16,))
    with pytest.raises(GradientMismatchError, match="another model"):
        check_gradients(prior, other.init(jax.random.key(0))[0])
    with pytest.raises(GradientMismatchError, match="leading batch axes"):
        check_gradients(prior, g, leading=1)
