"""What a client shares: per-example / batch / FedAvg gradients, sharding, the dense-layer leak, input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.leakage import (as_probs, batch_grad, data_mesh, fedavg_update, make_loss, per_example_grads,
                            sharded_per_example_grads)
from gitjax.types import InputShapeError
from gitjax.victims import make_victim
from treeclose import assert_trees_close

# resnet18 (11M params) at batch 2 keeps its per-example gradients at ~90 MB and the test cheap.
# LeNet uses 8, one example per simulated device, so the sharding test reuses its compiled functions.
BATCH = {"mlp": 3, "lenet": 8, "resnet8": 3, "vit": 3, "resnet18": 2}
# float32 agreement, relative to the largest entry of the leaf's gradient (vmap batches convs
# into grouped convs, which sums in a different order than the single-example kernels).
RTOL = 1e-5


def _numpy_init(victim):
    """He-scaled random params from numpy: jit(init) of ResNet-18 costs more than its whole test."""
    rng = np.random.default_rng(0)
    abstract_params, abstract_state = jax.eval_shape(victim.init, jax.random.key(0))

    def leaf(path, a):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:
            std = np.sqrt(2.0 / np.prod(a.shape[:-1]))
        elif "scale" in name or "var" in name:
            return jnp.ones(a.shape, a.dtype)
        else:  # biases, BN means, embeddings
            std = 0.02
        return jnp.asarray(std * rng.standard_normal(a.shape, np.float32))

    return (jax.tree_util.tree_map_with_path(leaf, abstract_params),
            jax.tree_util.tree_map_with_path(leaf, abstract_state))


@functools.lru_cache(maxsize=None)
def _problem(name, b):
    victim = make_victim(name)
    params, state = _numpy_init(victim) if name == "resnet18" else jax.jit(victim.init)(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (b, *victim.input_shape))
    y = jax.random.randint(jax.random.key(2), (b,), 0, victim.num_classes)
    return victim, params, state, x, y


@functools.lru_cache(maxsize=None)
def _jitted(name):
    """One jitted function object per victim and kind, so tests share compilations."""
    victim = make_victim(name)
    return {
        "per_example": jax.jit(functools.partial(per_example_grads, victim)),
        "batch": jax.jit(functools.partial(batch_grad, victim)),
        "single": jax.jit(jax.grad(make_loss(victim))),
    }


@functools.lru_cache(maxsize=None)
def _per_example(name, b):
    _, params, state, x, y = _problem(name, b)
    return _jitted(name)["per_example"](params, state, x, y)


def _assert_close(actual, expected, rtol=RTOL):
    assert_trees_close(actual, expected, rtol)


@pytest.mark.parametrize("name", ["mlp", "lenet", "resnet8", "vit", "resnet18"])
def test_per_example_grads_match_python_loop_and_batch_grad(name):
    b = BATCH[name]
    victim, params, state, x, y = _problem(name, b)
    g_pe = _per_example(name, b)
    assert all(leaf.shape[0] == b for leaf in jax.tree_util.tree_leaves(g_pe))

    single = _jitted(name)["single"]
    for i in range(b):
        g_i = single(params, state, x[i : i + 1], y[i : i + 1])
        _assert_close(jax.tree_util.tree_map(lambda a: a[i], g_pe), g_i)

    if name == "resnet18":
        return  # the batch-mean identity below is model-agnostic; spare ResNet-18 a third compile
    # Eval mode: the batch-mean gradient is the mean of the per-example ones.
    g_batch = _jitted(name)["batch"](params, state, x, y)
    _assert_close(jax.tree_util.tree_map(lambda a: a.mean(0), g_pe), g_batch)


def test_per_example_grads_differ_between_examples():
    # Guards the test above against a degenerate victim whose per-example grads coincide.
    g_pe = _per_example("lenet", 8)
    assert float(jnp.max(jnp.abs(g_pe["head"]["kernel"][0] - g_pe["head"]["kernel"][1]))) > 1e-4


def test_soft_labels_equal_one_hot():
    victim, params, state, x, y = _problem("lenet", 8)
    grad = _jitted("lenet")["batch"]
    _assert_close(grad(params, state, x, as_probs(y, 10)), grad(params, state, x, y), rtol=1e-6)


def test_dense_layer_leaks_its_input_exactly():
    # dL/dW = x^T dL/db for the first dense layer, so W_grad @ b_grad / ||b_grad||^2 = x (batch of one).
    victim, params, state, _, _ = _problem("mlp", BATCH["mlp"])
    x = jax.random.uniform(jax.random.key(5), (1, *victim.input_shape))
    g = _jitted("mlp")["single"](params, state, x, jnp.array([4]))  # = batch_grad at B=1
    kernel_DxW, bias_W = g["dense0"]["kernel"], g["dense0"]["bias"]
    assert float(jnp.sum(bias_W**2)) > 1e-12
    x_rec_D = kernel_DxW @ bias_W / jnp.sum(bias_W**2)
    x_true_D = victim.normalize(x).reshape(-1)
    np.testing.assert_allclose(x_rec_D, x_true_D, atol=1e-5)
    np.testing.assert_allclose(victim.denormalize(x_rec_D.reshape(x.shape)), x, atol=1e-5)


def test_fedavg_one_full_step_is_batch_grad_and_more_steps_differ():
    victim, params, state, x, y = _problem("lenet", 8)
    fed = jax.jit(functools.partial(fedavg_update, victim), static_argnames=("local_steps", "local_batch"))
    g_batch = _jitted("lenet")["batch"](params, state, x, y)
    _assert_close(fed(params, state, x, y, local_steps=1, lr=0.1), g_batch, rtol=1e-4)
    # K steps on mini-batches of one, cycling through the 8 examples (wrapping around):
    # compare with SGD written out by hand.
    lr, steps = 0.3, 10
    single = _jitted("lenet")["single"]
    p = params
    for k in range(steps):
        i = k % 8
        p = jax.tree_util.tree_map(lambda a, d: a - lr * d, p, single(p, state, x[i : i + 1], y[i : i + 1]))
    expected = jax.tree_util.tree_map(lambda a, f: (a - f) / (steps * lr), params, p)
    g_k = fed(params, state, x, y, local_steps=steps, lr=lr, local_batch=1)
    _assert_close(g_k, expected, rtol=1e-4)
    # ... and it is not the FedSGD gradient any more.
    diff = max(float(jnp.max(jnp.abs(a - b) / (jnp.max(jnp.abs(b)) + 1e-12)))
               for a, b in zip(jax.tree_util.tree_leaves(g_k), jax.tree_util.tree_leaves(g_batch)))
    assert diff > 0.05


def test_fedavg_bad_arguments():
    victim, params, state, x, y = _problem("lenet", 8)
    with pytest.raises(ValueError, match="local_batch=3 must divide"):
        fedavg_update(victim, params, state, x, y, local_batch=3)
    with pytest.raises(ValueError, match="local_steps"):
        fedavg_update(victim, params, state, x, y, local_steps=0)


def test_sharded_per_example_grads_match_single_device():
    assert len(jax.devices()) == 8
    victim, params, state, x, y = _problem("lenet", 8)
    g_sharded = sharded_per_example_grads(victim, params, state, x, y)
    for leaf in jax.tree_util.tree_leaves(g_sharded):
        assert len(leaf.sharding.device_set) == 8
        assert leaf.sharding.spec[0] == "data"
    _assert_close(g_sharded, _per_example("lenet", 8), rtol=1e-6)
    with pytest.raises(ValueError, match="not divisible by the 8 devices"):
        sharded_per_example_grads(victim, params, state, x[:6], y[:6])
    # A smaller mesh works too.
    g4 = sharded_per_example_grads(victim, params, state, x, y, mesh=data_mesh(jax.devices()[:4]))
    assert len(jax.tree_util.tree_leaves(g4)[0].sharding.device_set) == 4


@pytest.mark.parametrize("fn", [batch_grad, per_example_grads, fedavg_update, sharded_per_example_grads])
def test_bad_images_and_labels_raise_input_shape_error(fn):
    victim, params, state, x, y = _problem("lenet", 8)
    with pytest.raises(InputShapeError, match=r"expects images of shape \(B, 32, 32, 3\).*got shape \(8, 28, 28, 3\)"):
        fn(victim, params, state, jnp.zeros((8, 28, 28, 3)), y)
    with pytest.raises(InputShapeError, match=r"expects images of shape \(B, 32, 32, 3\)"):
        fn(victim, params, state, x[0], y)  # missing batch axis
    with pytest.raises(InputShapeError, match=r"labels must have shape \(8,\) or \(8, 10\).*got \(7,\)"):
        fn(victim, params, state, x, y[:7])
    with pytest.raises(InputShapeError, match=r"labels must have shape \(8,\) or \(8, 10\).*got \(8, 3\)"):
        fn(victim, params, state, x, jnp.zeros((8, 3)))


def test_leaked_group_grads_sharded_matches_unsharded_for_conv_victim():
    """The trainer's N x B FedSGD leak, split over 8 devices with B=1 on a conv net (the case
    where jit's SPMD partitioning of vmapped conv gradients was wrong), equals one device."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from gitjax.leakage import data_mesh, leaked_group_grads

    assert len(jax.devices()) == 8
    v = make_victim("lenet")
    params, state = jax.jit(v.init)(jax.random.key(0))
    x = jax.random.uniform(jax.random.key(1), (8, 1, 32, 32, 3))
    y = jax.random.randint(jax.random.key(2), (8, 1), 0, 10)
    ref = jax.jit(lambda p, a, b: leaked_group_grads(v, p, state, a, b))(params, x, y)
    mesh = data_mesh()
    rep, bat = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    out = jax.jit(lambda p, a, b: leaked_group_grads(v, p, state, a, b, mesh),
                  in_shardings=(rep, bat, bat), out_shardings=bat)(params, x, y)
    for a, b in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("fn", [batch_grad, per_example_grads])
def test_labels_outside_the_classes_raise(fn):
    # one_hot of an out-of-range id is all zero, which silently gave an all-zero gradient.
    from gitjax.types import GitjaxError

    victim, params, state, x, y = _problem("lenet", 8)
    for bad in (10, -1):
        with pytest.raises(GitjaxError, match=rf"label {bad} is outside \[0, 10\).*class ids 0..9"):
            fn(victim, params, state, x, y.at[3].set(bad))
