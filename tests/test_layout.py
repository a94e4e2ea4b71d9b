"""Layer-aligned gradient layout: forward order, round trips, and clear errors for bad gradients."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.layout import GradientLayout, check_finite, validate_gradient
from gitjax.trace import forward_order
from gitjax.types import GradientMismatchError, NonFiniteGradientError
from gitjax.victims import make_victim

NAMES = ["mlp", "lenet", "resnet8", "resnet18", "vit"]


@functools.lru_cache(maxsize=None)
def _params(name):
    """Random arrays shaped like the victim's params (random so round trips test real values)."""
    victim = make_victim(name)
    abstract, _ = jax.eval_shape(victim.init, jax.random.key(0))
    rng = np.random.default_rng(1)
    return jax.tree_util.tree_map(lambda a: jnp.asarray(rng.standard_normal(a.shape, np.float32)), abstract)


@functools.lru_cache(maxsize=None)
def _layout(name):
    # _params has sorted keys (it went through tree_map): the forward order comes from the victim.
    return GradientLayout.from_params(_params(name), order=forward_order(make_victim(name)))


def _assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", NAMES)
def test_flatten_roundtrip(name):
    layout, g = _layout(name), _params(name)
    flat = layout.flatten(g)
    assert flat.shape == (layout.size,)
    assert layout.size == sum(x.size for x in jax.tree_util.tree_leaves(g))
    _assert_trees_equal(layout.unflatten(flat), g)
    _assert_trees_equal(layout.from_blocks(layout.to_blocks(g)), g)
    # Offsets index the flat vector block by block.
    for b, vals in zip(layout.blocks, layout.to_blocks(g)):
        first_leaf = vals[b.leaves[0][0]]
        np.testing.assert_array_equal(flat[b.offset : b.offset + first_leaf.size], np.ravel(first_leaf))


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet8", "vit"])
def test_roundtrip_with_leading_axes(name):
    layout = _layout(name)
    # Numpy, not eager jnp: one XLA compile per leaf shape would dominate this test's time.
    g_2x3 = jax.tree_util.tree_map(
        lambda a: jnp.asarray(np.asarray(a) + np.arange(6, dtype=np.float32).reshape(2, 3, *[1] * a.ndim)),
        _params(name))
    flat = layout.flatten(g_2x3)
    assert flat.shape == (2, 3, layout.size)
    np.testing.assert_array_equal(flat[1, 2], layout.flatten(jax.tree_util.tree_map(lambda a: a[1, 2], g_2x3)))
    np.testing.assert_allclose(flat[1, 2], layout.flatten(_params(name)) + 5, atol=1e-5)
    _assert_trees_equal(layout.unflatten(flat), g_2x3)
    _assert_trees_equal(layout.from_blocks(layout.to_blocks(g_2x3)), g_2x3)


def test_blocks_in_forward_order():
    lenet = _layout("lenet")
    assert [(b.name, b.kind) for b in lenet.blocks] == [
        ("conv0", "conv"), ("conv1", "conv"), ("conv2", "conv"), ("head", "dense")]
    assert lenet.blocks[0].kernel_shape == (5, 5, 3, 12) and lenet.blocks[0].bias_shape == (12,)

    assert [b.name for b in _layout("mlp").blocks] == ["dense0", "dense1", "head"]

    res = _layout("resnet18")
    names = [b.name for b in res.blocks]
    assert names[:4] == ["stem", "stem_norm", "stage0_block0/conv1", "stage0_block0/norm1"]
    assert names[-1] == "head" and res.blocks[-1].kind == "dense"
    assert res.blocks[0].kind == "conv" and res.blocks[1].kind == "norm"
    assert res.blocks[0].bias_shape is None  # convs before BN have no bias
    # Within a block: conv1, norm1, conv2, norm2, then the projection shortcut.
    i = names.index("stage1_block0/conv1")
    expected = ("conv1", "norm1", "conv2", "norm2", "proj", "proj_norm")
    assert names[i : i + 6] == [f"stage1_block0/{n}" for n in expected]
    assert sorted(names) != names  # i.e. not merely alphabetical

    vit = _layout("vit")
    assert [(b.name, b.kind) for b in vit.blocks[:4]] == [
        ("patch_embed", "dense"), ("pos_embed", "embed"), ("cls", "embed"), ("block0/ln1", "norm")]
    assert vit.blocks[-1].name == "head"
    # Offsets are increasing and contiguous.
    for lay in (lenet, res, vit):
        assert [b.offset for b in lay.blocks] == list(np.cumsum([0] + [b.size for b in lay.blocks[:-1]]))


def test_forward_order_survives_jax_transformations():
    # tree_map / jit / grad rebuild dicts with sorted keys; with the victim's order the layout does not change.
    params = _params("resnet8")
    order = forward_order(make_victim("resnet8"))
    for transformed in (jax.tree_util.tree_map(lambda a: a, params), jax.jit(lambda p: p)(params),
                        jax.eval_shape(make_victim("resnet8").init, jax.random.key(3))[0]):
        assert list(transformed)[0] == "head"  # keys really are sorted now
        assert GradientLayout.from_params(transformed, order=order) == _layout("resnet8")


def test_layout_keeps_no_state_between_calls():
    # Without an order the layout follows the dict it is given, whatever was initialised before
    # (a module-level record filled by Victim.init used to change this answer).
    victim = make_victim("resnet8", input_shape=(8, 8, 3))
    sorted_params = jax.eval_shape(victim.module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))["params"]
    before = GradientLayout.from_params(sorted_params)
    jax.eval_shape(victim.init, jax.random.key(0))
    assert GradientLayout.from_params(sorted_params) == before
    assert [b.name for b in before.blocks][:2] == ["head", "stage0_block0/conv1"]  # the dict's (sorted) order
    # The order is a value: a layout rebuilt from its own leaf paths is the same layout.
    res = _layout("resnet18")
    assert GradientLayout.from_params(_params("resnet18"), order=res.leaf_paths()) == res
    # An order naming other leaves is ignored (the gradient check then names the difference).
    assert GradientLayout.from_params(sorted_params, order=res.leaf_paths()) == before
    import gitjax.layout as layout_module
    mutable = [k for k, v in vars(layout_module).items()
               if not k.startswith("__") and isinstance(v, (dict, list, set))]
    assert mutable == [], mutable


def test_groups_give_resnet_stages():
    layout = _layout("resnet18")
    groups = layout.groups()
    assert list(groups) == ["stem", "stem_norm", "stage0", "stage1", "stage2", "stage3", "head"]
    # stage0: 2 blocks x (conv, norm, conv, norm); stage1..3 add proj + proj_norm in block 0.
    assert len(groups["stage0"]) == 8
    assert all(len(groups[f"stage{s}"]) == 10 for s in (1, 2, 3))
    assert all(layout.blocks[i].group == "stage2" for i in groups["stage2"])
    assert sorted(i for idx in groups.values() for i in idx) == list(range(len(layout)))
    assert "total" in layout.describe()


def test_other_models_gradient_raises():
    with pytest.raises(GradientMismatchError, match="does not match the victim model.*missing layer 'dense0'"):
        _layout("mlp").check(_params("lenet"))
    with pytest.raises(GradientMismatchError):
        _layout("mlp").flatten(_params("lenet"))


def test_wrong_leaf_shape_named():
    g = jax.tree_util.tree_map(lambda a: a, _params("lenet"))
    g["conv1"]["kernel"] = jnp.zeros((3, 3, 12, 12))
    with pytest.raises(GradientMismatchError, match=r"conv1/kernel: expected shape \(\.\.\., 5, 5, 12, 12\)"):
        _layout("lenet").check(g)


def test_missing_and_extra_leaves():
    g = jax.tree_util.tree_map(lambda a: a, _params("lenet"))
    del g["head"]["bias"]
    with pytest.raises(GradientMismatchError, match="missing head/bias"):
        _layout("lenet").check(g)
    g = jax.tree_util.tree_map(lambda a: a, _params("lenet"))
    g["extra"] = jnp.zeros(3)
    with pytest.raises(GradientMismatchError, match="9 arrays, the victim has 8"):
        _layout("lenet").check(g)


def test_inconsistent_leading_axes():
    g = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), _params("lenet"))
    g["head"]["bias"] = g["head"]["bias"][0]
    with pytest.raises(GradientMismatchError, match="leading axes"):
        _layout("lenet").check(g)


def test_unflatten_wrong_size():
    with pytest.raises(GradientMismatchError, match="entries"):
        _layout("lenet").unflatten(jnp.zeros(_layout("lenet").size + 1))
    with pytest.raises(GradientMismatchError, match="expected 4 blocks"):
        _layout("lenet").from_blocks([{}])


def test_nan_gradient_raises():
    g = jax.tree_util.tree_map(lambda a: a, _params("lenet"))
    validate_gradient(_layout("lenet"), g)  # finite: passes
    g["conv2"]["bias"] = g["conv2"]["bias"].at[3].set(jnp.nan)
    with pytest.raises(NonFiniteGradientError, match=r"conv2.*bias.*1 non-finite"):
        validate_gradient(_layout("lenet"), g)
    g["conv2"]["bias"] = g["conv2"]["bias"].at[3].set(jnp.inf)
    with pytest.raises(NonFiniteGradientError):
        check_finite(g)
