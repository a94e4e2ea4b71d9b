"""experiments.exact_oracle: the exit-ReLU oracle masks, the generator's ``oracle`` collection, identifiability."""

import jax
import jax.numpy as jnp
import numpy as np

from experiments.exact_oracle import exit_masks, identifiability
from gitjax.generators import GeneratorConfig, build_generator
from gitjax.leakage import batch_grad
from gitjax.trace import trace_victim
from gitjax.victims import make_victim

S = 16  # 16x16 keeps the ResNet passes cheap


def _resnet():
    victim = make_victim("resnet8", input_shape=(S, S, 3))
    params, state = jax.jit(victim.init)(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (2, 1, S, S, 3))
    return victim, params, state, np.asarray(x)


def test_exit_masks_are_the_units_relu_patterns():
    victim, params, state, x = _resnet()
    masks = exit_masks(trace_victim(victim), victim, params, state, x)
    assert set(masks) == {"stage0_block0_exit_mask", "stage1_block0_exit_mask", "stage2_block0_exit_mask"}
    assert masks["stage2_block0_exit_mask"].shape == (2, 1, S // 4, S // 4, 64)
    for m in masks.values():
        assert set(np.unique(m)) <= {0.0, 1.0} and 0.1 < m.mean() < 0.9  # a ReLU's pattern, not all on or off


def test_oracle_collection_masks_the_error_at_a_units_exit():
    """All-ones masks change nothing; masking the last unit's error changes the reconstruction."""
    victim, params, state, x = _resnet()
    y = jnp.zeros((2, 1), jnp.int32)
    grads = jax.vmap(lambda xi, yi: batch_grad(victim, params, state, xi, yi))(x, y)
    gen = build_generator(GeneratorConfig(kind="exact", batch_size=1, exact_cg_iters=0), victim, params)
    gp = jax.jit(gen.init)(jax.random.key(0), grads, params)["params"]
    apply = jax.jit(lambda oracle: gen.apply({"params": gp, "oracle": oracle}, grads, params))
    plain = np.asarray(jax.jit(lambda: gen.apply({"params": gp}, grads, params))())
    ones = {"core": {"stage2_block0_exit_mask": jnp.ones((2, 1, S // 4, S // 4, 64))}}
    # slot 0 all ones, slot 1 half masked: each of the N gradients gets its own mask
    half = {"core": {"stage2_block0_exit_mask": jnp.ones((2, 1, S // 4, S // 4, 64)).at[1, ..., ::2, :, :].set(0.0)}}
    np.testing.assert_allclose(np.asarray(apply(ones)), plain, atol=1e-6)
    masked = np.asarray(apply(half))
    np.testing.assert_allclose(masked[0], plain[0], atol=1e-6)
    assert np.abs(masked[1] - plain[1]).max() > 1e-3


def test_identifiability_counts_equations_from_the_true_error():
    """LeNet at B = 1: the head's input is determined by its gradient (one equation per unknown), the first
    conv's is not (12 output channels x 75 patch entries < 3072 pixels): the known R-GAP picture."""
    victim = make_victim("lenet")
    params, state = jax.jit(victim.init)(jax.random.key(0))
    x = np.asarray(jax.random.uniform(jax.random.key(1), (1, 32, 32, 3)))
    rows = {r["layer"]: r for r in identifiability(victim, params, state, x, np.array([3], np.int32))}
    assert rows["head"]["delta_rank"] == 1 and rows["head"]["equations_bound"] == rows["head"]["unknowns"]
    first = rows["conv0"]
    assert first["unknowns"] == 32 * 32 * 3 and first["delta_rank"] == first["delta_shape"][1]
    assert first["equations_bound"] == 5 * 5 * 3 * first["delta_rank"] < first["unknowns"]
