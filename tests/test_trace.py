"""The victim trace: one plan per victim (deterministic), one activation table whose inverses invert."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.attacks.rgap import make_rgap_victim, trace_sequential
from gitjax.trace import ACTIVATIONS, act_inverse, build_plan, forward_layout, record_calls, trace_victim
from gitjax.victims import make_victim


def test_tracing_twice_gives_equal_plans():
    victim = make_victim("resnet8", input_shape=(8, 8, 3))
    first, second = build_plan(victim), build_plan(victim)  # two independent traces, no memo
    assert first == second and hash(first) == hash(second)
    assert trace_victim(victim) == first
    # A victim equal by value (built again) shares the trace.
    assert trace_victim(make_victim("resnet8", input_shape=(8, 8, 3))) is trace_victim(victim)
    assert first.layout == forward_layout(victim)
    assert [lp.index for lp in first.layers] == list(range(len(first.layout)))
    assert first.head_is_output and first.layers[-1].post == "top"


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_every_activation_inverse_round_trips(name):
    act = ACTIVATIONS[name]
    z = jnp.linspace(-3.0, 3.0, 601, dtype=jnp.float32)
    a = act.fn(z)
    z_hat, slope, weight = act_inverse(name, a)
    trusted = np.asarray(weight) > 0
    # Where the inverse trusts itself, it recovers z and the derivative f'(z).
    assert trusted.sum() >= 290, trusted.sum()  # at least the branch z > 0
    np.testing.assert_allclose(np.asarray(z_hat)[trusted], np.asarray(z)[trusted], atol=2e-3, rtol=2e-3)
    dfdz = jax.vmap(jax.grad(act.fn))(z)
    np.testing.assert_allclose(np.asarray(slope)[trusted], np.asarray(dfdz)[trusted], atol=2e-3, rtol=2e-3)
    assert np.all(np.asarray(weight) <= 1.0 + 1e-6) and np.all(np.asarray(weight) >= 0.0)
    # The host copy (float64 numpy, used to identify ops) is the same function.
    np.testing.assert_allclose(act.host_fn(np.asarray(z, np.float64)), np.asarray(a), atol=1e-5, rtol=1e-5)


def test_unknown_activation_and_relu_dead_zone():
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        act_inverse("swish", jnp.zeros(3))
    a = jnp.asarray([0.0, 1e-9, 0.5, 1.0])
    assert act_inverse("relu", a)[2].tolist() == [0.0, 1.0, 1.0, 1.0]
    assert act_inverse("relu", a, dead_zone=1e-6)[2].tolist() == [0.0, 0.0, 1.0, 1.0]


def test_plan_identifies_each_table_activation_between_layers():
    for name in ("relu", "tanh", "leaky_relu", "silu"):
        fn = ACTIVATIONS[name].fn
        victim = make_rgap_victim((6, 6, 3), channels=(4,), activation=fn)
        assert [lp.post for lp in trace_victim(victim).layers] == [name, "top"]
        if name in ("relu", "tanh", "leaky_relu"):  # R-GAP reads the same trace
            params, state = jax.eval_shape(victim.init, jax.random.key(0))
            assert [(lay.name, lay.activation) for lay in trace_sequential(victim, params, state)] == [
                ("conv0", name), ("head", "identity")]


def test_record_calls_sees_every_batchnorm_in_forward_order():
    victim = make_victim("resnet8", input_shape=(8, 8, 3))
    params, state = jax.eval_shape(victim.init, jax.random.key(0))
    seen = []

    def run(p, s, x):
        logits, calls = record_calls(lambda: victim.apply(p, s, x), select=lambda m: isinstance(m, nn.BatchNorm))
        seen.extend((c.path, c.x.shape) for c in calls)
        return logits

    jax.eval_shape(run, params, state, jnp.zeros((2, 8, 8, 3)))
    plan = trace_victim(victim)
    assert [p for p, _ in seen] == [lp.block.path for lp in plan.layers if lp.norm_type == "batch"]
    assert all(shape[0] == 2 for _, shape in seen)
