"""Tap-based per-example / per-group gradients equal vmap(grad) for every victim and conv variant."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from gitjax.leakage import (data_mesh, leaked_group_grads, make_loss, per_example_grads,
                            sharded_per_example_grads)
from gitjax.per_example import covered_fraction, group_grads
from gitjax.victims import MLP, LeNet, ResNet, ViT, Victim
from treeclose import assert_trees_close

RTOL = 1e-5  # float32, relative to the leaf's largest entry (summation order differs)


class ConvZoo(nn.Module):
    """Every Conv option the tap rule handles (and two it leaves to the local VJP rule)."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        h = nn.Conv(6, (3, 3), strides=2, padding="SAME", name="same_s2")(x)
        h = nn.tanh(nn.Conv(6, (3, 2), strides=(1, 2), padding=((1, 2), (0, 1)), name="asym")(h))
        h = nn.tanh(nn.Conv(6, (3, 3), padding=2, kernel_dilation=2, name="dilated")(h))
        h = nn.tanh(nn.Conv(6, (3, 3), padding=1, feature_group_count=3, name="groups")(h))
        h = nn.tanh(nn.Conv(4, (1, 1), use_bias=False, name="pointwise")(h))
        h = nn.tanh(nn.Conv(4, (3, 3), padding="CIRCULAR", name="circular")(h))  # local rule
        h = nn.tanh(nn.Conv(4, (2, 2), input_dilation=2, padding=1, name="in_dilated")(h))  # local rule
        return nn.Dense(10, name="head")(h.reshape(h.shape[0], -1))


def _victim(name):
    shape = (8, 8, 3)  # small images and widths: the whole matrix must compile fast
    module = {
        "mlp": lambda: MLP(widths=(16, 8)),
        "lenet": lambda: LeNet(channels=4),
        "resnet8_group": lambda: ResNet((1, 1, 1), (8, 8, 16), norm="group"),
        "resnet8_bn_eval": lambda: ResNet((1, 1, 1), (4, 8, 8), norm="batch"),
        "resnet8_nonorm": lambda: ResNet((1, 1, 1), (4, 8, 8), norm="none"),
        "resnet18": lambda: ResNet((2, 2, 2, 2), (4, 4, 8, 8), norm="batch"),
        "vit": lambda: ViT(patch=4, dim=8, depth=1, heads=2),
        "convzoo": lambda: ConvZoo(),
    }[name]()
    return Victim(name, module, shape, 10)


# (victim, N groups, B images per group): B = 1 is per-example, B > 1 per-group (the trainer's leak).
CASES = [("mlp", 3, 1), ("lenet", 2, 2), ("resnet8_group", 3, 1), ("resnet8_bn_eval", 2, 2),
         ("resnet8_nonorm", 3, 1), ("resnet18", 2, 1), ("vit", 2, 2), ("convzoo", 3, 1), ("convzoo", 2, 2)]


@functools.lru_cache(maxsize=None)
def _setup(name):
    victim = _victim(name)
    params, state = victim.init(jax.random.key(0))
    # Running statistics away from (0, 1) so eval-mode BatchNorm is not the identity.
    state = jax.tree_util.tree_map(lambda a: a + 0.5 * jax.random.uniform(jax.random.key(7), a.shape), state)
    return victim, params, state


def _data(victim, n, b, seed=1):
    x = jax.random.uniform(jax.random.key(seed), (n, b, *victim.input_shape))
    y = jax.random.randint(jax.random.key(seed + 1), (n, b), 0, victim.num_classes)
    return x, y


def _reference(victim, params, state, x_NxB, y_NxB):
    return jax.jit(jax.vmap(lambda x, y: jax.grad(make_loss(victim))(params, state, x, y)))(x_NxB, y_NxB)


def _assert_close(actual, expected, rtol=RTOL):
    assert_trees_close(actual, expected, rtol)


@pytest.mark.parametrize("name,n,b", CASES)
def test_group_grads_equal_vmap_grad_under_jit(name, n, b):
    victim, params, state = _setup(name)
    x, y = _data(victim, n, b)
    got = jax.jit(functools.partial(group_grads, victim))(params, state, x, y)
    _assert_close(got, _reference(victim, params, state, x, y))


@pytest.mark.parametrize("ratio", [0, 10**6])
def test_both_conv_contractions_equal_vmap_grad(monkeypatch, ratio):
    """Every conv option through each contraction: one per kernel offset (ratio 0), one stacked patches tensor (huge)."""
    import gitjax.per_example as pe

    monkeypatch.setattr(pe, "STACK_RATIO", ratio)
    monkeypatch.setattr(pe, "STACK_MAX_PATCH", ratio)
    victim, params, state = _setup("convzoo")
    x, y = _data(victim, 2, 2)
    got = jax.jit(lambda p, s, x, y: group_grads(victim, p, s, x, y))(params, state, x, y)
    _assert_close(got, _reference(victim, params, state, x, y))


def test_single_example_and_soft_labels():
    victim, params, state = _setup("lenet")
    x, y = _data(victim, 1, 1, seed=5)
    ref = _reference(victim, params, state, x, y)
    _assert_close(group_grads(victim, params, state, x, y), ref)  # eager, N = B = 1
    y_soft = jax.nn.softmax(jax.random.normal(jax.random.key(3), (1, 1, 10)))
    _assert_close(group_grads(victim, params, state, x, y_soft),
                  _reference(victim, params, state, x, y_soft))


def test_per_example_grads_methods_agree_and_examples_differ():
    victim, params, state = _setup("resnet8_group")
    x, y = _data(victim, 1, 4)
    g = {m: jax.jit(functools.partial(per_example_grads, victim, method=m))(params, state, x[0], y[0])
         for m in ("vmap", "patches", "auto")}
    _assert_close(g["patches"], g["vmap"])
    _assert_close(g["auto"], g["vmap"])
    k = g["patches"]["stem"]["kernel"]
    assert float(jnp.max(jnp.abs(k[0] - k[1]))) > 1e-5 * float(jnp.max(jnp.abs(k)))
    with pytest.raises(ValueError, match="method must be one of"):
        per_example_grads(victim, params, state, x[0], y[0], method="loop")


def test_coverage_and_auto_rule():
    # Every parameter of a conv/dense/norm victim is owned by a leaf module; a ViT's
    # positional embedding and CLS token are not (they get vmap(grad)).
    for name in ("mlp", "lenet", "resnet8_bn_eval", "convzoo"):
        assert covered_fraction(*_setup(name)) == 1.0
    assert 0.5 < covered_fraction(*_setup("vit")) < 1.0


def test_train_mode_batchnorm_keeps_vmap_semantics():
    # Train-mode BN mixes a batch's examples, so per-example work keeps "each example its own batch".
    victim, params, state = _setup("resnet8_bn_eval")
    x, y = _data(victim, 1, 3)
    got = per_example_grads(victim, params, state, x[0], y[0], train=True, method="patches")
    loss = make_loss(victim, train=True)
    ref = jax.vmap(lambda xi, yi: jax.grad(loss)(params, state, xi[None], yi[None]))(x[0], y[0])
    _assert_close(got, ref)


def test_sharded_per_example_and_group_grads_match_vmap():
    assert len(jax.devices()) == 8
    victim, params, state = _setup("resnet8_bn_eval")
    x, y = _data(victim, 8, 1)
    ref = _reference(victim, params, state, x, y)
    got = sharded_per_example_grads(victim, params, state, x[:, 0], y[:, 0], method="patches")
    assert len(jax.tree_util.tree_leaves(got)[0].sharding.device_set) == 8
    _assert_close(got, ref)

    # The trainer's path: N groups of B images, N split over the mesh inside jit.
    from jax.sharding import NamedSharding, PartitionSpec as P

    xg, yg = _data(victim, 8, 2, seed=11)
    mesh = data_mesh()
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    out = jax.jit(lambda p, a, b: leaked_group_grads(victim, p, state, a, b, mesh, method="patches"),
                  in_shardings=(rep, bat, bat), out_shardings=bat)(params, xg, yg)
    _assert_close(out, _reference(victim, params, state, xg, yg))
