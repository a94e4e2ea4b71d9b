"""Exact-GIT's noise-aware inversions: exact when the gradient is clean, better than exact when it is not."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gitjax.generators import GeneratorConfig
from gitjax.generators.linalg import LinearOps, cg_refine, low_rank_noise_var, noise_to_signal, ridge_invert
from gitjax.layout import LayerBlock
from gitjax.trace import LayerPlan


def test_low_rank_noise_estimate():
    """The head gradient has rank <= B: its energy beyond rank B is the noise (zero when clean)."""
    rng = np.random.default_rng(0)
    for b in (1, 3):
        clean = rng.standard_normal((200, b)) @ rng.standard_normal((b, 10))
        # float32 round-off only (relative to the entries' mean square)
        assert float(low_rank_noise_var(jnp.asarray(clean, jnp.float32), b)) < 1e-6 * np.mean(clean**2)
        est = [float(low_rank_noise_var(jnp.asarray(clean + 0.05 * rng.standard_normal(clean.shape), jnp.float32), b))
               for _ in range(5)]
        assert abs(np.mean(est) / 0.05**2 - 1.0) < 0.15, est
    # No room beyond rank B: no estimate.
    assert float(low_rank_noise_var(jnp.ones((5, 2)), 2)) == 0.0


def _conv_problem(seed: int):
    rng = np.random.default_rng(seed)
    lp = LayerPlan(0, LayerBlock(("c",), "conv", (("kernel", (3, 3, 3, 4)),), 0), "conv", None,
                   (8, 8, 3), (8, 8, 4), (1, 1), "SAME")
    ops = LinearOps(lp, (1, 8, 8, 3))
    x = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 3, 4)) / 5, jnp.float32)
    delta = jnp.asarray(rng.standard_normal((1, 8, 8, 4)), jnp.float32)
    z = ops.forward(ops.unfold(x), k)
    dk = ops.weight_grad(ops.unfold(x), delta)
    return ops, x, k, delta, z, dk, rng


def test_zero_noise_keeps_the_exact_solves():
    """ridge 0 (no noise): the noise-aware solves are the noise-free ones (to float32 round-off)."""
    ops, x, k, delta, z, dk, _ = _conv_problem(0)
    log_w = jnp.array([0.0, 0.0, math.log(1e-6)])
    run = jax.jit(lambda nsr: cg_refine(ops, k, None, dk, delta, z, jnp.ones_like(z), jnp.zeros_like(x), log_w, 100,
                                        noise=nsr))
    exact = jax.jit(lambda: cg_refine(ops, k, None, dk, delta, z, jnp.ones_like(z), jnp.zeros_like(x), log_w, 100))()
    np.testing.assert_allclose(run(jnp.float32(0.0)), exact, rtol=1e-4, atol=1e-5)
    assert float(jnp.linalg.norm(exact - x) / jnp.linalg.norm(x)) < 1e-2
    # The dense pseudo-inverse (B = 3 inputs from their errors) is exact at ridge 0.
    rng = np.random.default_rng(1)
    a_BxI = jnp.asarray(rng.standard_normal((3, 20)), jnp.float32)
    d_BxO = jnp.asarray(rng.standard_normal((3, 7)), jnp.float32)
    lp = LayerPlan(0, LayerBlock(("d",), "dense", (("kernel", (20, 7)),), 0), "dense", None, (20,), (7,))
    a_hat = ridge_invert(LinearOps(lp, (3, 20)), a_BxI.T @ d_BxO, d_BxO, jnp.zeros((3, 20)), jnp.float32(0.0))
    np.testing.assert_allclose(a_hat, a_BxI, rtol=1e-4, atol=1e-4)


def test_noise_scaled_ridge_lowers_the_error_of_a_noisy_conv_inversion():
    """R-GAP's system with a noisy weight gradient: weighting by the estimated noise-to-signal ratio
    (gradient equations down-weighted, Tikhonov towards the prior) beats the noise-free weights.

    Mean relative error over 6 seeds; margin: at least 25% lower. The forward equations
    carry a small error too (they come from the layer above in the generator).
    """
    errs = {False: [], True: []}
    for seed in range(6):
        ops, x, k, delta, z, dk, rng = _conv_problem(seed)
        sigma = 0.3 * float(jnp.sqrt(jnp.mean(dk**2)))
        dk_noisy = dk + sigma * jnp.asarray(rng.standard_normal(dk.shape), jnp.float32)
        z_noisy = z + 0.05 * float(jnp.std(z)) * jnp.asarray(rng.standard_normal(z.shape), jnp.float32)
        # Equation weights = inverse relative error variances: forward 0.05^2, gradient ~exact when clean.
        log_w = jnp.array([-2 * math.log(0.05), 6.0, math.log(1e-6)])

        @jax.jit
        def solve(nsr):
            a0 = ridge_invert(ops, dk_noisy, delta, jnp.zeros_like(x), 1e-4 + nsr)
            return cg_refine(ops, k, None, dk_noisy, delta, z_noisy, jnp.ones_like(z), a0, log_w, 64, noise=nsr)

        nsr = noise_to_signal(jnp.float32(sigma**2), dk_noisy)
        for aware, value in ((False, jnp.float32(0.0)), (True, nsr)):
            errs[aware].append(float(jnp.linalg.norm(solve(value) - x) / jnp.linalg.norm(x)))
    assert np.mean(errs[True]) < 0.75 * np.mean(errs[False]), errs


def test_bad_cg_iteration_counts_are_rejected():
    with pytest.raises(ValueError, match="exact_cg_grad_iters"):
        GeneratorConfig(kind="exact", exact_cg_grad_iters=-1)
    with pytest.raises(ValueError, match="exact_cg_iters"):
        GeneratorConfig(kind="exact", exact_cg_iters=-1)
