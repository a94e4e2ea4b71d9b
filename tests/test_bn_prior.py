"""BatchNorm-statistics prior (See Through Gradients) and the 'ig+bn' attack."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.attacks.base import AttackProblem, get_attack, run_attack
from gitjax.attacks.bn_prior import (IGBNConfig, batch_stats_from_update, bn_statistics, bn_stats_loss,
                                     calibrate_batch_stats, client_running_stats, group_consistency,
                                     ig_bn_reconstruct)
from gitjax.attacks.ig import IGConfig, ig_reconstruct
from gitjax.data import load_dataset
from gitjax.leakage import batch_grad
from gitjax.metrics import evaluate
from gitjax.types import GitjaxError
from gitjax.victims import make_victim

S = 16  # 16x16 images keep the ResNet passes cheap


@pytest.fixture(scope="module")
def setup():
    victim = make_victim("resnet8", input_shape=(S, S, 3))
    params, state = jax.jit(victim.init)(jax.random.key(0))
    train = load_dataset("patches", "train", image_size=S)
    test = load_dataset("patches", "test", image_size=S)
    # Running statistics of natural images stand in for a trained victim's.
    state = jax.jit(lambda x: calibrate_batch_stats(victim, params, state, x))(jnp.asarray(train.images[:256]))
    x, y = jnp.asarray(test.images[:4]), jnp.asarray(test.labels[:4])
    return victim, params, state, x, y


def test_statistics_of_every_batchnorm_input(setup):
    victim, params, state, x, _ = setup
    stats = bn_statistics(victim, params, state, x)
    assert len(stats) == 9  # stem + 2 per block + 2 projections
    first = stats[0]
    assert first.path == ("stem_norm",) and first.mean.shape == (16,)
    np.testing.assert_array_equal(first.running_mean, state["batch_stats"]["stem_norm"]["mean"])
    # The stem BN's input is the stem conv of the normalised images: check its mean directly.
    h = nn.Conv(16, (3, 3), padding=1, use_bias=False).apply({"params": params["stem"]}, victim.normalize(x))
    np.testing.assert_allclose(first.mean, h.mean(axis=(0, 1, 2)), atol=1e-5)


def test_calibrated_stats_make_eval_equal_train(setup):
    victim, params, state, x, _ = setup
    own = calibrate_batch_stats(victim, params, state, x)
    np.testing.assert_allclose(victim.apply(params, own, x), victim.apply(params, own, x, train=True), atol=2e-4)
    assert float(bn_stats_loss(victim, params, state, train=True, targets=own)(x)) < 1e-3


def test_prior_prefers_the_true_batch_to_noise(setup):
    victim, params, state, x, _ = setup
    noise = jax.random.uniform(jax.random.key(1), x.shape)
    loss = jax.jit(bn_stats_loss(victim, params, state))
    # Measured (population statistics from 256 train patches): 103.8 at the true batch, 142.6 at noise.
    assert float(loss(x)) < 0.85 * float(loss(noise))
    own = calibrate_batch_stats(victim, params, state, x)
    exact = jax.jit(bn_stats_loss(victim, params, state, train=True, targets=own))
    assert float(exact(x)) < 1e-3 < 10.0 < float(exact(noise))  # measured 6e-6 vs 18.2


def test_shared_running_stats_leak_the_batch_stats(setup):
    victim, params, state, x, _ = setup
    # A FedAvg client trains one step in train mode and shares its new running statistics.
    leaked = batch_stats_from_update(state, client_running_stats(victim, params, state, x), momentum=0.9)
    truth = calibrate_batch_stats(victim, params, state, x)
    for a, b in zip(jax.tree_util.tree_leaves(leaked), jax.tree_util.tree_leaves(truth)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


def test_group_consistency():
    x = jax.random.uniform(jax.random.key(0), (3, 2, 4, 4, 3))
    assert float(group_consistency(jnp.broadcast_to(x[:1], x.shape))) < 1e-12
    assert float(group_consistency(x)) > 0.0


def test_ig_bn_runs_and_refuses_victims_without_bn(setup):
    victim, params, state, x, y = setup
    g = batch_grad(victim, params, state, x[:2], y[:2])
    problem = AttackProblem(victim, params, state, g, 2, labels=y[:2])
    res = run_attack("ig+bn", problem, jax.random.key(0), IGBNConfig(steps=4, record_every=0))
    assert res.images.shape == (2, S, S, 3) and res.info["iterations"] == 4
    assert np.isfinite(res.info["grad_distance"])
    with pytest.raises(GitjaxError, match="restarts >= 2"):
        get_attack("ig+bn").run(problem, jax.random.key(0), IGBNConfig(steps=4, group_weight=0.1))
    mlp = make_victim("mlp", input_shape=(S, S, 3))
    shapes, mstate = jax.eval_shape(mlp.init, jax.random.key(0))
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    with pytest.raises(GitjaxError, match="BatchNorm"):
        run_attack("ig+bn", AttackProblem(mlp, zeros, mstate, zeros, 1, labels=y[:1]))


def test_bn_term_lowers_ig_error_at_equal_budget(setup):
    """See Through Gradients' claim, as a mean over inits: IG vs IG + BN prior, same 300 steps, same keys.

    Threat model: a FedAvg client shares its BN running statistics with the update, so
    the server knows the private batch's own statistics (``batch_stats_from_update``)
    and matches them in a train-mode forward. A single trajectory may not improve (on one
    machine init 1 went 0.0979 -> 0.0641, on another 0.082 -> 0.062, and others by less),
    so the claim is on the mean MSE over INITS inits, with a margin: measured mean ratio
    (with BN / without) 0.79 for 5 vmapped inits (identical with
    --xla_cpu_multi_thread_eigen=false; 2-core CPU, 2026-11-30), 0.84 for these 3 vmapped
    inits and 0.81 for the same 3 under lax.map (2026-12-01), 0.85-0.86 earlier with 3 inits
    run one by one, 0.73-0.84 on three other batches; asserted < 0.92. (3 inits, not 5:
    this test was the suite's slowest.) At 200 steps
    the gain is not there yet (0.965), so the budget stays 300. Population statistics alone (eval mode) did not help
    consistently on this random-init victim (0.078 -> 0.144 on one batch), so they are not
    asserted (docs/closed_form_attacks.md).
    """
    victim, params, state, x, y = setup
    g = batch_grad(victim, params, state, x, y)
    leaked = batch_stats_from_update(state, client_running_stats(victim, params, state, x), momentum=0.9)
    steps, inits = 300, 3

    def mse(x_hat):
        return evaluate(np.asarray(x_hat), np.asarray(x), match=True)["mse"]

    # The INITS runs of each attack as one vmapped program (same keys as one run per seed).
    keys = jnp.stack([jax.random.key(seed) for seed in range(inits)])
    ig_cfg, bn_cfg = IGConfig(steps=steps, record_every=0), IGBNConfig(steps=steps, record_every=0)
    runs = {
        "ig": lambda k: ig_reconstruct(victim, params, state, g, y, k, ig_cfg)[0],
        "bn": lambda k: ig_bn_reconstruct(victim, params, state, g, y, k, bn_cfg, bn_targets=leaked)[0],
    }
    ig, with_bn = ([mse(x_hat) for x_hat in np.asarray(jax.jit(jax.vmap(runs[m]))(keys))] for m in ("ig", "bn"))
    ratio = np.mean(with_bn) / np.mean(ig)
    print(f"IG MSE {np.round(ig, 4)}, IG + leaked BN statistics MSE {np.round(with_bn, 4)}, ratio {ratio:.3f}")
    assert ratio < 0.92, (ig, with_bn)
