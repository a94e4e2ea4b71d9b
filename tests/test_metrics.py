"""Tests for gitjax.metrics against scikit-image references and known cases."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from gitjax import metrics


def _sk_ssim_batch(x_BxHxWxC: np.ndarray, y_BxHxWxC: np.ndarray) -> np.ndarray:
    # float64 so the reference itself is not the source of error.
    return np.array(
        [
            sk_ssim(
                a.astype(np.float64),
                b.astype(np.float64),
                data_range=1.0,
                gaussian_weights=True,
                sigma=1.5,
                use_sample_covariance=False,
                channel_axis=-1,
            )
            for a, b in zip(x_BxHxWxC, y_BxHxWxC)
        ]
    )


def _smooth_image(h: int, w: int, c: int) -> np.ndarray:
    """Deterministic smooth (H, W, C) image in [0, 1]."""
    yy, xx = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    chans = [0.5 + 0.4 * np.sin(2 * np.pi * (xx * (k + 1) + yy * 0.7) + k) for k in range(c)]
    return np.stack(chans, axis=-1).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage_random(seed, channels):
    rng = np.random.default_rng(seed)
    x = rng.random((3, 32, 32, channels), dtype=np.float32)
    y = rng.random((3, 32, 32, channels), dtype=np.float32)
    ours = np.asarray(metrics.ssim(x, y))
    ref = _sk_ssim_batch(x, y)
    assert ours.shape == (3,)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("noise", [0.01, 0.05, 0.2])
@pytest.mark.parametrize("channels", [1, 3])
def test_ssim_matches_skimage_noisy_smooth(noise, channels):
    rng = np.random.default_rng(int(noise * 1000) + channels)
    clean = np.stack([_smooth_image(32, 28, channels)] * 2)  # non-square on purpose
    noisy = np.clip(clean + noise * rng.standard_normal(clean.shape), 0, 1).astype(np.float32)
    ours = np.asarray(metrics.ssim(noisy, clean))
    ref = _sk_ssim_batch(noisy, clean)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
    # SSIM must degrade with noise: light noise stays high, heavy noise low.
    if noise == 0.01:
        assert ours.min() > 0.9
    if noise == 0.2:
        assert ours.max() < 0.7


def test_ssim_identical_is_one_and_symmetric():
    rng = np.random.default_rng(3)
    x = rng.random((2, 16, 16, 3), dtype=np.float32)
    y = rng.random((2, 16, 16, 3), dtype=np.float32)
    np.testing.assert_allclose(np.asarray(metrics.ssim(x, x)), 1.0, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(metrics.ssim(x, y)), np.asarray(metrics.ssim(y, x)), atol=1e-6
    )


def test_ssim_jit_equals_eager():
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.random((2, 24, 24, 3), dtype=np.float32))
    y = jnp.asarray(rng.random((2, 24, 24, 3), dtype=np.float32))
    eager = np.asarray(metrics.ssim(x, y))
    jitted = np.asarray(jax.jit(metrics.ssim)(x, y))
    np.testing.assert_allclose(jitted, eager, atol=1e-6)


def test_ssim_rejects_small_images():
    x = np.zeros((1, 8, 8, 1), np.float32)
    with pytest.raises(ValueError, match="win_size"):
        metrics.ssim(x, x)


def test_mse_per_image():
    x = np.zeros((3, 4, 4, 1), np.float32)
    y = np.zeros((3, 4, 4, 1), np.float32)
    y[0] = 0.5  # mse 0.25
    y[1, :2] = 1.0  # half the pixels differ by 1 -> mse 0.5
    out = np.asarray(metrics.mse(x, y))
    np.testing.assert_allclose(out, [0.25, 0.5, 0.0], atol=1e-7)


@pytest.mark.parametrize("channels", [1, 3])
def test_psnr_matches_skimage(channels):
    rng = np.random.default_rng(5)
    x = rng.random((4, 16, 16, channels), dtype=np.float32)
    y = np.clip(x + 0.05 * rng.standard_normal(x.shape), 0, 1).astype(np.float32)
    ours = np.asarray(metrics.psnr(x, y))
    ref = np.array(
        [sk_psnr(a.astype(np.float64), b.astype(np.float64), data_range=1.0) for a, b in zip(x, y)]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-3)
    assert float(metrics.batch_psnr(x, y)) == pytest.approx(ref.mean(), abs=1e-3)


def test_psnr_identical_is_capped_and_data_range():
    x = np.full((2, 8, 8, 3), 0.3, np.float32)
    np.testing.assert_allclose(np.asarray(metrics.psnr(x, x)), [100.0, 100.0], atol=1e-4)
    y = x + 0.1  # mse 0.01 -> 20 dB at range 1, 20 + 20*log10(2) at range 2
    np.testing.assert_allclose(np.asarray(metrics.psnr(x, y)), 20.0, atol=1e-3)
    np.testing.assert_allclose(
        np.asarray(metrics.psnr(x, y, data_range=2.0)), 20.0 + 20 * np.log10(2.0), atol=1e-3
    )


def test_label_accuracy():
    pred = jnp.array([1, 2, 3, 4])
    true = jnp.array([1, 2, 4, 3])
    assert float(metrics.label_accuracy(pred, true)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "pred, true, expected",
    [
        ([1, 2, 3, 4], [4, 3, 2, 1], 1.0),  # order does not matter
        ([1, 1, 2], [1, 2, 2], 2 / 3),  # multiplicity matters
        ([5, 5, 5, 5], [5, 0, 0, 0], 1 / 4),
        ([0, 1, 2], [3, 4, 5], 0.0),
        ([7, 7, 3, 7], [3, 7, 7, 7], 1.0),
    ],
)
def test_label_multiset_accuracy(pred, true, expected):
    got = float(metrics.label_multiset_accuracy(jnp.array(pred), jnp.array(true)))
    assert got == pytest.approx(expected)
    got_jit = float(jax.jit(metrics.label_multiset_accuracy)(jnp.array(pred), jnp.array(true)))
    assert got_jit == pytest.approx(expected)


def test_label_multiset_accuracy_matches_counter():
    from collections import Counter

    rng = np.random.default_rng(6)
    for _ in range(20):
        pred = rng.integers(0, 5, size=12)
        true = rng.integers(0, 5, size=12)
        expected = sum((Counter(pred.tolist()) & Counter(true.tolist())).values()) / 12
        got = float(metrics.label_multiset_accuracy(pred, true))
        assert got == pytest.approx(expected)


def test_label_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        metrics.label_accuracy(jnp.zeros(3), jnp.zeros(4))


def test_match_recovers_known_permutation():
    rng = np.random.default_rng(7)
    truth = rng.random((6, 16, 16, 3), dtype=np.float32)
    shuffle = np.array([3, 0, 5, 1, 4, 2])
    # Noisy, shuffled reconstructions: recon[k] approximates truth[inv[k]].
    recon = np.clip(truth + 0.05 * rng.standard_normal(truth.shape), 0, 1)[shuffle]
    perm = metrics.match_reconstructions(recon, truth)
    assert perm.shape == (6,)
    # recon[perm[i]] must be the noisy copy of truth[i].
    inverse = np.argsort(shuffle)
    np.testing.assert_array_equal(perm, inverse)
    assert np.all(np.asarray(metrics.psnr(recon[perm], truth)) > 20.0)


def test_evaluate_matched_and_unmatched():
    rng = np.random.default_rng(8)
    truth = rng.random((4, 16, 16, 1), dtype=np.float32)
    shuffle = np.array([2, 3, 1, 0])
    recon = np.clip(truth + 0.02 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
    recon = recon[shuffle]

    res = metrics.evaluate(recon, truth, match=True)
    json.dumps(res)  # must be JSON-serialisable
    for key in ("mse", "psnr", "ssim"):
        assert isinstance(res[key], float)
        assert len(res[f"{key}_per_image"]) == 4
        assert res[key] == pytest.approx(np.mean(res[f"{key}_per_image"]), rel=1e-6)
    assert res["permutation"] == np.argsort(shuffle).tolist()
    aligned = recon[np.argsort(shuffle)]
    np.testing.assert_allclose(
        res["psnr_per_image"], np.asarray(metrics.psnr(aligned, truth)), atol=1e-4
    )
    assert res["psnr"] > 30.0
    assert res["ssim"] > 0.9

    unmatched = metrics.evaluate(recon, truth, match=False)
    assert unmatched["permutation"] == [0, 1, 2, 3]
    assert unmatched["psnr"] < res["psnr"] - 20.0


def test_evaluate_shape_mismatch_names_both_shapes():
    a = np.zeros((2, 16, 16, 3), np.float32)
    b = np.zeros((2, 16, 16, 1), np.float32)
    with pytest.raises(ValueError) as err:
        metrics.evaluate(a, b)
    msg = str(err.value)
    assert "(2, 16, 16, 3)" in msg and "(2, 16, 16, 1)" in msg


@pytest.mark.parametrize("fn", [metrics.mse, metrics.psnr, metrics.ssim, metrics.evaluate])
def test_non_4d_input_raises(fn):
    x = np.zeros((16, 16, 3), np.float32)
    with pytest.raises(ValueError, match="4-D"):
        fn(x, x)


# ----------------------------------------------------------------------------- oracles


def test_oracles_are_exact_on_a_flat_image():
    """A flat image: the mean-colour oracle and both blurs reproduce it exactly (PSNR at the 100 dB cap)."""
    flat = np.broadcast_to(np.array([0.2, 0.5, 0.9], np.float32), (2, 16, 16, 3)).copy()
    rows = {r["method"]: r for r in metrics.oracle_rows(flat, mean_image_HxWxC=np.full((16, 16, 3), 0.5))}
    assert list(rows) == ["oracle: mean image", "oracle: mean colour", "oracle: blur 1px", "oracle: blur 2px"]
    for label in ("oracle: mean colour", "oracle: blur 1px", "oracle: blur 2px"):
        assert rows[label]["psnr"] == pytest.approx(100.0), label
    # The mean image (0.5 everywhere) misses the colour by (0.3, 0, 0.4): MSE = 0.25 / 3.
    assert rows["oracle: mean image"]["mse"] == pytest.approx(0.25 / 3, rel=1e-5)


def test_blur_oracle_of_a_checkerboard_loses_a_computable_amount():
    """Checkerboard 0.5 +- 0.25: inside the image a Gaussian blur scales the +-0.25 by H(pi)^2, H(pi) =
    sum_t k_t (-1)^t of the normalised 1-D kernel; everywhere it equals scipy's reflect-mode filter."""
    from scipy.ndimage import gaussian_filter

    i, j = np.meshgrid(np.arange(24), np.arange(24), indexing="ij")
    board = (0.5 + 0.25 * (-1.0) ** (i + j))[None, :, :, None].repeat(3, axis=-1).astype(np.float32)
    for sigma in (1.0, 2.0):
        blurred = np.asarray(metrics.gaussian_blur(board, sigma))
        ref = gaussian_filter(board[0].astype(np.float64), (sigma, sigma, 0), mode="reflect", truncate=4.0)
        np.testing.assert_allclose(blurred[0], ref, atol=2e-6)
        t = np.arange(-round(4 * sigma), round(4 * sigma) + 1)
        k = np.exp(-0.5 * (t / sigma) ** 2)
        h = np.sum(k / k.sum() * (-1.0) ** t)
        r = round(4 * sigma)
        inner = blurred[0, r:-r, r:-r] - 0.5
        np.testing.assert_allclose(np.abs(inner), 0.25 * h * h, atol=2e-6)
        want = 10 * np.log10(1.0 / np.mean((np.clip(ref, 0, 1) - board[0]) ** 2))
        row = {r_["method"]: r_ for r_ in metrics.oracle_rows(board)}[f"oracle: blur {sigma:g}px"]
        assert row["psnr"] == pytest.approx(want, abs=1e-3)
        assert row["psnr"] < 30.0  # a pixel-scale pattern is (almost) erased
    colour = {r_["method"]: r_ for r_ in metrics.oracle_rows(board)}["oracle: mean colour"]
    assert colour["mse"] == pytest.approx(0.25 ** 2, rel=1e-5)


def test_score_groups_matches_within_each_group():
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(2, 3, 12, 12, 1)).astype(np.float32)
    shuffled = x[:, ::-1]
    out = metrics.score_groups(shuffled, x, np.array([[1, 2, 3], [0, 0, 1]]), np.array([[3, 2, 1], [0, 1, 1]]))
    assert out["psnr"] == pytest.approx(100.0) and len(out["psnr_per_image"]) == 6
    assert out["permutation_NxB"] == [[2, 1, 0], [2, 1, 0]]
    assert out["label_acc"] == pytest.approx((1.0 + 2 / 3) / 2)


# ----------------------------------------------------------------------------- matching (optax Hungarian)


def _brute_force_perm(recon: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The permutation with the largest total PSNR, by trying all B! of them (float64)."""
    import itertools

    b = len(truth)
    mse_BxB = np.array([[np.mean((r.astype(np.float64) - t) ** 2) for r in recon] for t in truth])
    psnr_BxB = 10 * np.log10(1.0 / np.maximum(mse_BxB, 1e-10))
    best = max(itertools.permutations(range(b)), key=lambda p: sum(psnr_BxB[i, p[i]] for i in range(b)))
    return np.array(best)


@pytest.mark.parametrize("seed", range(6))
def test_match_permutation_equals_brute_force_search(seed):
    """Random groups where matching is not obvious (each recon a random mix of a shuffled truth and
    noise): the jitted Hungarian assignment is the brute-force optimum, for B = 2..6."""
    rng = np.random.default_rng(seed)
    for b in range(2, 7):
        truth = rng.random((b, 8, 8, 3)).astype(np.float32)
        mix_B = rng.uniform(0.0, 0.6, size=(b, 1, 1, 1))
        recon = (mix_B * truth[rng.permutation(b)] + (1 - mix_B) * rng.random(truth.shape)).astype(np.float32)
        want = _brute_force_perm(recon, truth)
        np.testing.assert_array_equal(metrics.match_reconstructions(recon, truth), want)
        np.testing.assert_array_equal(np.asarray(jax.jit(metrics.match_permutation)(recon, truth)), want)


def test_match_permutation_vmaps_over_groups_and_handles_b1():
    rng = np.random.default_rng(3)
    truth = rng.random((5, 4, 8, 8, 1)).astype(np.float32)
    recon = np.clip(truth + 0.1 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
    shuffles = np.stack([rng.permutation(4) for _ in range(5)])
    recon = np.take_along_axis(recon, shuffles[:, :, None, None, None], axis=1)
    perm_NxB = np.asarray(jax.jit(jax.vmap(metrics.match_permutation))(recon, truth))
    np.testing.assert_array_equal(perm_NxB, np.argsort(shuffles, axis=1))
    assert metrics.match_reconstructions(recon[0, :1], truth[0, :1]).tolist() == [0]


def test_score_groups_equals_evaluate_per_group():
    """The one-program score (vmapped matching, all groups at once) agrees with evaluate() group by group."""
    rng = np.random.default_rng(5)
    truth = rng.random((3, 4, 16, 16, 3)).astype(np.float32)
    recon = np.clip(truth[:, ::-1] + 0.1 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
    out = metrics.score_groups(recon, truth)
    per = [metrics.evaluate(r, t) for r, t in zip(recon, truth)]
    assert out["permutation_NxB"] == [p["permutation"] for p in per] == [[3, 2, 1, 0]] * 3
    for m in ("psnr", "ssim", "mse"):
        np.testing.assert_allclose(out[f"{m}_per_image"], [v for p in per for v in p[f"{m}_per_image"]],
                                   rtol=1e-5, atol=1e-6)
