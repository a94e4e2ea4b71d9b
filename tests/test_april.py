"""APRIL on the zoo ViT: closed form from the positional-embedding gradient, and the optimisation variant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.attacks.april import APRILOptConfig, april_objective, fold_patches
from gitjax.attacks.base import AttackProblem, run_attack
from gitjax.data import load_dataset
from gitjax.leakage import as_probs, batch_grad
from gitjax.metrics import psnr
from gitjax.types import GitjaxError
from gitjax.victims import make_victim


@pytest.fixture(scope="module")
def vit():
    victim = make_victim("vit")
    params, state = jax.jit(victim.init)(jax.random.key(0))
    ds = load_dataset("patches", "test")
    x, y = jnp.asarray(ds.images[:2]), jnp.asarray(ds.labels[:2])
    grad = jax.jit(lambda xi, yi: batch_grad(victim, params, state, xi, yi))
    return victim, params, state, x, y, grad


def test_fold_inverts_the_vit_patch_flattening():
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 3))
    b, h, w, c, p = 2, 32, 32, 3, 4
    x_BxTxE = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 64, p * p * c)
    np.testing.assert_array_equal(fold_patches(x_BxTxE, (32, 32, 3), 4), x)


def test_closed_form_recovers_the_image(vit):
    victim, params, state, x, y, grad = vit
    for i in range(2):
        g = grad(x[i:i + 1], y[i:i + 1])
        res = run_attack("april", AttackProblem(victim, params, state, g, 1))
        db = float(psnr(res.images, x[i:i + 1])[0])
        assert db >= 30.0, db  # measured 66.2 and 63.9 dB
        assert int(res.labels[0]) == int(y[i])
        info = res.info
        assert (info["tokens"], info["dim"]) == (64, 64)
        # Every patch token only reaches the loss through LayerNorms, so dL/dz_t is orthogonal to
        # the all-ones vector: Delta has rank T - 1 and one token direction stays undetermined.
        assert info["rank"] == 63 and info["null_dim"] == 1 and not info["unique"]
        assert 1e3 < info["condition_number"] < 1e7  # measured ~1.5e5
        assert info["bias_consistency"] < 1e-5


def test_closed_form_needs_one_vit_example(vit):
    victim, params, state, x, y, _ = vit
    g = jax.tree_util.tree_map(jnp.zeros_like, params)  # well-formed; the batch size is what fails
    with pytest.raises(GitjaxError, match="april-opt"):
        run_attack("april", AttackProblem(victim, params, state, g, 2))
    mlp = make_victim("mlp")
    shapes, mstate = jax.eval_shape(mlp.init, jax.random.key(0))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(GitjaxError, match="Vision Transformer"):
        run_attack("april", AttackProblem(mlp, zeros, mstate, zeros, 1))


def test_opt_objective_and_short_run(vit):
    victim, params, state, x, y, grad = vit
    x1, y1 = x[:1], y[:1]
    g = grad(x1, y1)
    obj = jax.jit(april_objective(victim, params, state, g, as_probs(y1, 10), pos_weight=1.0))
    noise = jax.random.uniform(jax.random.key(1), x1.shape)
    assert float(obj(x1)) < 1e-5 < float(obj(noise))
    cfg = APRILOptConfig(steps=20, record_every=0)
    res = run_attack("april-opt", AttackProblem(victim, params, state, g, 1, labels=y1), jax.random.key(0), cfg)
    hist = res.info["loss_history"]
    assert res.images.shape == x1.shape and res.info["iterations"] == 20
    assert min(hist) < 0.8 * hist[0], (hist[0], min(hist))  # the matching objective goes down
