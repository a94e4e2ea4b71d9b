"""R-GAP: recursive closed-form inversion of small sequential nets, with the per-layer rank analysis."""

import jax
import jax.numpy as jnp
import pytest

from gitjax.attacks.base import AttackProblem, run_attack
from gitjax.attacks.rgap import make_rgap_victim, trace_sequential
from gitjax.data import load_dataset
from gitjax.leakage import batch_grad
from gitjax.metrics import psnr
from gitjax.types import GitjaxError, NonFiniteGradientError
from gitjax.victims import make_victim


@pytest.fixture(scope="module")
def images16():
    ds = load_dataset("patches", "test", image_size=16)
    return jnp.asarray(ds.images[:2]), jnp.asarray(ds.labels[:2])


def _rgap(victim, x, y):
    params, state = victim.init(jax.random.key(0))
    g = batch_grad(victim, params, state, x, y)
    res = run_attack("rgap", AttackProblem(victim, params, state, g, 1))
    return res, float(psnr(res.images, x)[0])


def test_full_rank_conv_net_is_inverted(images16):
    # Sigmoid conv net 16x16x3 -> conv 4ch -> conv 4ch (stride 1) -> dense: every layer over-determined.
    x, y = images16
    res, db = _rgap(make_rgap_victim((16, 16, 3), channels=(4, 4)), x[:1], y[:1])
    assert db >= 30.0, db  # measured 100 dB (the metric's cap)
    assert res.info["underdetermined"] == []
    by_layer = {r["layer"]: r for r in res.info["layers"]}
    assert by_layer["conv0"]["unknowns"] == 16 * 16 * 3
    assert by_layer["conv0"]["rank"] == 16 * 16 * 3
    assert by_layer["conv1"]["equations"] == 16 * 16 * 4 + 3 * 3 * 4 * 4
    assert by_layer["conv0"]["delta_error"] < 1e-4  # recursed deltas reproduce the leaked bias gradients
    assert int(res.labels[0]) == int(y[0])
    assert "UNDER" not in res.info["rank_report"]


def test_dlg_lenet_at_16px_is_fully_determined(images16):
    # The stacked forward + gradient system is full rank for DLG's LeNet even though the
    # gradient rows alone (5*5*3*12 = 900 for conv0 at 32px) are fewer than the unknowns.
    x, y = images16
    res, db = _rgap(make_victim("lenet", input_shape=(16, 16, 3)), x[1:2], y[1:2])
    assert db >= 30.0, db  # measured 100 dB
    assert res.info["underdetermined"] == []


def test_rank_deficient_layer_is_flagged(images16):
    # Stride-2 conv with 2 channels: 768 unknowns against 8*8*2 forward + 3*3*3*2 gradient rows.
    x, y = images16
    res, db = _rgap(make_rgap_victim((16, 16, 3), channels=(2,), strides=(2,)), x[:1], y[:1])
    conv0 = res.info["layers"][0]
    assert conv0["layer"] == "conv0" and conv0["underdetermined"]
    assert conv0["rank"] <= 8 * 8 * 2 + 3 * 3 * 3 * 2 < conv0["unknowns"]
    assert res.info["underdetermined"] == ["conv0"]
    assert "UNDER-DETERMINED" in res.info["rank_report"]
    assert db < 20.0, db  # the minimum-norm solution is not the image (measured ~9 dB)


def test_unsupported_victims_and_inputs_are_refused(images16):
    x, y = images16
    for name in ("resnet8", "vit"):
        victim = make_victim(name)
        shapes, state = jax.eval_shape(victim.init, jax.random.key(0))
        params = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        with pytest.raises(GitjaxError, match="sequential"):
            trace_sequential(victim, params, state)
    victim = make_rgap_victim((16, 16, 3), channels=(2,))
    params, state = victim.init(jax.random.key(0))
    g = batch_grad(victim, params, state, x, y)
    with pytest.raises(GitjaxError, match="single example"):
        run_attack("rgap", AttackProblem(victim, params, state, g, 2))
    g = jax.tree_util.tree_map(lambda a: a.at[..., 0].set(jnp.inf), g)
    with pytest.raises(NonFiniteGradientError):
        run_attack("rgap", AttackProblem(victim, params, state, g, 2))
