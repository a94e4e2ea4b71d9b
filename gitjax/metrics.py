"""Image-reconstruction and label-recovery metrics.

All image metrics take float arrays in NHWC layout, shape (B, H, W, C) with
C in {1, 3}, values nominally in [0, data_range]. They return one value per
image (shape (B,)) so that callers can report both per-image and batch
numbers. The image metrics are pure ``jax.numpy`` and can be wrapped in
``jax.jit`` / ``jax.vmap``; shape checks happen at trace time (shapes are
static), so they raise ``ValueError`` eagerly and under ``jit`` alike.

Matching reconstructions to ground truths (batch inversion returns images in
any order) is ``match_permutation``: pairwise PSNR and the Hungarian algorithm
(``optax.assignment.hungarian_algorithm``), jittable and vmappable, so
``score_groups`` matches all N groups in one ``jit(vmap(...))``.
``match_reconstructions``, ``evaluate`` and ``score_groups`` take and return
host values (numpy / python).
"""

from __future__ import annotations

import functools
from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "mse",
    "psnr",
    "batch_psnr",
    "ssim",
    "gaussian_blur",
    "oracle_reconstructions",
    "oracle_rows",
    "score_groups",
    "label_accuracy",
    "label_multiset_accuracy",
    "pairwise_psnr",
    "match_permutation",
    "match_reconstructions",
    "evaluate",
]

# MSE floor used by PSNR: identical images would give +inf, which breaks
# means and JSON output. With data_range=1 this caps PSNR at 100 dB.
_MSE_FLOOR = 1e-10

# SSIM stabilising constants from Wang et al. (2004).
_K1 = 0.01
_K2 = 0.03


# ---------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------


def _check_pair(x: Any, y: Any) -> None:
    """Raise ValueError unless x and y are 4-D (B, H, W, C) of equal shape."""
    x_shape = tuple(np.shape(x))
    y_shape = tuple(np.shape(y))
    for name, shape in (("x", x_shape), ("y", y_shape)):
        if len(shape) != 4:
            raise ValueError(
                f"expected 4-D images (B, H, W, C), got {name} with shape {shape}"
            )
    if x_shape != y_shape:
        raise ValueError(
            f"image shapes do not match: {x_shape} vs {y_shape}"
        )


# ---------------------------------------------------------------------------
# MSE / PSNR
# ---------------------------------------------------------------------------


def mse(x_BxHxWxC: jax.Array, y_BxHxWxC: jax.Array) -> jax.Array:
    """Per-image mean squared error.

    Args:
      x_BxHxWxC: images (B, H, W, C).
      y_BxHxWxC: images (B, H, W, C), same shape.

    Returns:
      (B,) mean over H, W, C of (x - y)**2.
    """
    _check_pair(x_BxHxWxC, y_BxHxWxC)
    diff_BxHxWxC = jnp.asarray(x_BxHxWxC) - jnp.asarray(y_BxHxWxC)
    return jnp.mean(jnp.square(diff_BxHxWxC), axis=(1, 2, 3))


def psnr(
    x_BxHxWxC: jax.Array, y_BxHxWxC: jax.Array, data_range: float = 1.0
) -> jax.Array:
    """Per-image peak signal-to-noise ratio in dB.

    PSNR = 10 * log10(data_range**2 / MSE). The MSE is floored at 1e-10, so
    identical images give a finite 10*log10(data_range**2 / 1e-10) (= 100 dB
    for data_range=1) instead of +inf.

    Args:
      x_BxHxWxC: images (B, H, W, C).
      y_BxHxWxC: images (B, H, W, C), same shape.
      data_range: max minus min of the value range (1.0 for [0, 1] images).

    Returns:
      (B,) PSNR values in dB.
    """
    mse_B = mse(x_BxHxWxC, y_BxHxWxC)
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse_B, _MSE_FLOOR))


def batch_psnr(
    x_BxHxWxC: jax.Array, y_BxHxWxC: jax.Array, data_range: float = 1.0
) -> jax.Array:
    """Mean of the per-image PSNR over the batch (scalar, dB)."""
    return jnp.mean(psnr(x_BxHxWxC, y_BxHxWxC, data_range))


# ---------------------------------------------------------------------------
# SSIM
# ---------------------------------------------------------------------------


def ssim(
    x_BxHxWxC: jax.Array,
    y_BxHxWxC: jax.Array,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> jax.Array:
    """Per-image structural similarity with a Gaussian window.

    Matches ``skimage.metrics.structural_similarity(x, y, data_range=...,
    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    channel_axis=-1)``: population (co)variances, K1=0.01, K2=0.03, the SSIM
    map averaged over the region that excludes (win_size - 1) // 2 border
    pixels, then averaged over channels. (skimage derives its Gaussian
    support from sigma with truncate=3.5, i.e. 11 taps for sigma=1.5; here
    the kernel has exactly ``win_size`` taps, so the two agree whenever
    win_size == 2 * int(3.5 * sigma + 0.5) + 1, including the defaults.)

    Args:
      x_BxHxWxC: images (B, H, W, C), H and W >= win_size.
      y_BxHxWxC: images (B, H, W, C), same shape.
      data_range: max minus min of the value range.
      win_size: odd number of taps of the Gaussian window.
      sigma: standard deviation of the Gaussian window in pixels.

    Returns:
      (B,) mean SSIM per image.
    """
    _check_pair(x_BxHxWxC, y_BxHxWxC)
    if win_size < 1 or win_size % 2 != 1:
        raise ValueError(f"win_size must be a positive odd integer, got {win_size}")
    _, h, w, _ = np.shape(x_BxHxWxC)
    if h < win_size or w < win_size:
        raise ValueError(
            f"images of spatial size {h}x{w} are smaller than win_size={win_size}"
        )
    x_BxHxWxC = jnp.asarray(x_BxHxWxC)
    y_BxHxWxC = jnp.asarray(y_BxHxWxC)
    dtype = jnp.result_type(x_BxHxWxC.dtype, y_BxHxWxC.dtype, jnp.float32)
    # dm-pix filters with a 'valid' Gaussian window and population (co)variances, as skimage.
    return pix.ssim(x_BxHxWxC.astype(dtype), y_BxHxWxC.astype(dtype), max_val=data_range,
                    filter_size=win_size, filter_sigma=sigma, k1=_K1, k2=_K2)


def gaussian_blur(x_BxHxWxC: jax.Array, sigma: float) -> jax.Array:
    """Gaussian blur of each image and channel, sigma in pixels, borders mirrored (scipy's 'reflect').

    The kernel spans +-round(4 sigma) taps (scipy's ``truncate=4``); a flat image stays
    exactly flat. dm-pix's blur on the mirror-padded image, 'valid' region.
    """
    x_BxHxWxC = jnp.asarray(x_BxHxWxC, jnp.float32)
    if sigma <= 0:
        return x_BxHxWxC
    radius = int(round(4.0 * sigma))
    _, h, w, _ = x_BxHxWxC.shape
    if radius >= min(h, w):
        raise ValueError(f"blur sigma {sigma} needs images larger than {radius} pixels, got {h}x{w}")
    padded = jnp.pad(x_BxHxWxC, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="symmetric")
    return pix.gaussian_blur(padded, sigma, 2 * radius + 1, padding="VALID")


# ---------------------------------------------------------------------------
# oracles: what a table's rows must beat to claim structure, not colour
# ---------------------------------------------------------------------------

ORACLE_MEAN_IMAGE = "oracle: mean image"
ORACLE_MEAN_COLOUR = "oracle: mean colour"
ORACLE_BLUR = "oracle: blur {sigma:g}px"
ORACLE_BLUR_SIGMAS = (1.0, 2.0)


def oracle_reconstructions(truth_BxHxWxC: Any, mean_image_HxWxC: Any | None = None,
                           blur_sigmas: tuple[float, ...] = ORACLE_BLUR_SIGMAS) -> dict[str, np.ndarray]:
    """Reference "reconstructions" that know something about the truth, by table label.

    * ``oracle: mean image``: the dataset-mean image (the victim's auxiliary/train split) for
      every image (skipped when ``mean_image_HxWxC`` is None): what a data-starved prior outputs;
    * ``oracle: mean colour``: each image's true per-channel mean colour, flat: all colour, no structure;
    * ``oracle: blur {s}px``: the truth blurred with a Gaussian of sigma s pixels: structure at
      that scale, no finer detail.

    A method below the mean-colour row recovers less than colour; above a blur row, it
    recovers detail finer than that blur.

    Returns:
      {label: (B, H, W, C) float32 images in [0, 1]}.
    """
    truth = np.asarray(truth_BxHxWxC, np.float32)
    if truth.ndim != 4:
        raise ValueError(f"expected 4-D images (B, H, W, C), got shape {truth.shape}")
    out: dict[str, np.ndarray] = {}
    if mean_image_HxWxC is not None:
        mean_image = np.asarray(mean_image_HxWxC, np.float32)
        if mean_image.shape != truth.shape[1:]:
            raise ValueError(f"mean image has shape {mean_image.shape}; the images are {truth.shape[1:]}")
        out[ORACLE_MEAN_IMAGE] = np.broadcast_to(mean_image, truth.shape).copy()
    out[ORACLE_MEAN_COLOUR] = np.broadcast_to(truth.mean(axis=(1, 2), keepdims=True), truth.shape).copy()
    for sigma in blur_sigmas:
        out[ORACLE_BLUR.format(sigma=sigma)] = np.clip(np.asarray(gaussian_blur(truth, sigma)), 0.0, 1.0)
    return out


def oracle_rows(truth_BxHxWxC: Any, mean_image_HxWxC: Any | None = None, key: str = "method",
                blur_sigmas: tuple[float, ...] = ORACLE_BLUR_SIGMAS) -> list[dict[str, Any]]:
    """One table row per oracle: {key: label, "psnr", "ssim", "mse"} (means over the images, unmatched)."""
    rows = []
    for label, recon in oracle_reconstructions(truth_BxHxWxC, mean_image_HxWxC, blur_sigmas).items():
        ev = evaluate(recon, truth_BxHxWxC, match=False)
        rows.append({key: label, "psnr": ev["psnr"], "ssim": ev["ssim"], "mse": ev["mse"]})
    return rows


def score_groups(recon_NxBxHxWxC: Any, truth_NxBxHxWxC: Any, labels_NxB: Any | None = None,
                 true_labels_NxB: Any | None = None) -> dict[str, Any]:
    """Matched PSNR / SSIM / MSE over N groups of B (Hungarian matching within each group) and label accuracy.

    Returns:
      {"psnr", "ssim", "mse"} means over all N*B images, ``*_per_image`` lists (truth
      order), ``permutation_NxB`` (list of lists), ``label_acc`` (multiset accuracy; None
      without labels).
    """
    recon, truth = np.asarray(recon_NxBxHxWxC, np.float32), np.asarray(truth_NxBxHxWxC, np.float32)
    if recon.shape != truth.shape or recon.ndim != 5:
        raise ValueError(f"expected two (N, B, H, W, C) arrays of equal shape, got {recon.shape} and {truth.shape}")
    perm_NxB, mse_NxB, psnr_NxB, ssim_NxB = jax.device_get(
        _score_groups(recon, truth, match=recon.shape[1] > 1))
    out: dict[str, Any] = {}
    for m, v_NxB in (("psnr", psnr_NxB), ("ssim", ssim_NxB), ("mse", mse_NxB)):
        vals = [float(v) for v in np.asarray(v_NxB, np.float64).reshape(-1)]
        out[m] = float(np.mean(vals))
        out[f"{m}_per_image"] = vals
    out["permutation_NxB"] = [[int(i) for i in p] for p in perm_NxB]
    out["label_acc"] = None
    if labels_NxB is not None and true_labels_NxB is not None:
        out["label_acc"] = float(np.mean([label_multiset_accuracy(np.asarray(p), np.asarray(t))
                                          for p, t in zip(labels_NxB, true_labels_NxB)]))
    return out


@functools.partial(jax.jit, static_argnames=("match",))
def _score_groups(recon_NxBxHxWxC: jax.Array, truth_NxBxHxWxC: jax.Array, match: bool
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(perm_NxB, mse_NxB, psnr_NxB, ssim_NxB): every group matched (vmap) and scored in one program."""
    n, b = truth_NxBxHxWxC.shape[:2]
    if match:
        perm_NxB = jax.vmap(match_permutation)(recon_NxBxHxWxC, truth_NxBxHxWxC)
    else:
        perm_NxB = jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32), (n, b))
    aligned = jnp.take_along_axis(recon_NxBxHxWxC, perm_NxB[:, :, None, None, None], axis=1)
    x_MxHxWxC = aligned.reshape(n * b, *aligned.shape[2:])
    y_MxHxWxC = truth_NxBxHxWxC.reshape(n * b, *truth_NxBxHxWxC.shape[2:])
    return (perm_NxB, mse(x_MxHxWxC, y_MxHxWxC).reshape(n, b), psnr(x_MxHxWxC, y_MxHxWxC).reshape(n, b),
            ssim(x_MxHxWxC, y_MxHxWxC).reshape(n, b))


# ---------------------------------------------------------------------------
# labels
# ---------------------------------------------------------------------------


def _check_labels(pred_B: Any, true_B: Any) -> None:
    pred_shape = tuple(np.shape(pred_B))
    true_shape = tuple(np.shape(true_B))
    if len(pred_shape) != 1 or pred_shape != true_shape:
        raise ValueError(
            f"expected two 1-D label arrays of equal length, got shapes "
            f"{pred_shape} and {true_shape}"
        )


def label_accuracy(pred_labels_B: jax.Array, true_labels_B: jax.Array) -> jax.Array:
    """Fraction of positions where pred_labels[i] == true_labels[i] (scalar)."""
    _check_labels(pred_labels_B, true_labels_B)
    hits_B = jnp.asarray(pred_labels_B) == jnp.asarray(true_labels_B)
    return jnp.mean(hits_B.astype(jnp.float32))


def label_multiset_accuracy(
    pred_labels_B: jax.Array, true_labels_B: jax.Array
) -> jax.Array:
    """Order-insensitive label accuracy: |pred ∩ true| / B as multisets.

    Used for batch label recovery, where the attack recovers which labels
    are present (with multiplicity) but not which sample carries which.
    E.g. pred [1, 1, 2], true [1, 2, 2] -> 2/3.

    Jittable, O(B^2): the i-th occurrence of a label in pred counts as a hit
    iff true contains that label at least i times; summing hits gives
    sum_v min(count_pred(v), count_true(v)).

    Returns:
      scalar in [0, 1].
    """
    _check_labels(pred_labels_B, true_labels_B)
    pred_B = jnp.asarray(pred_labels_B)
    true_B = jnp.asarray(true_labels_B)
    n = pred_B.shape[0]
    if n == 0:
        return jnp.asarray(1.0, jnp.float32)
    same_pred_BxB = pred_B[:, None] == pred_B[None, :]
    earlier_BxB = jnp.tril(jnp.ones((n, n), dtype=bool), k=-1)
    # rank_B[i]: how many earlier pred entries carry the same label as pred[i].
    rank_B = jnp.sum(same_pred_BxB & earlier_BxB, axis=1)
    count_in_true_B = jnp.sum(pred_B[:, None] == true_B[None, :], axis=1)
    hits_B = rank_B < count_in_true_B
    return jnp.mean(hits_B.astype(jnp.float32))


# ---------------------------------------------------------------------------
# matching
# ---------------------------------------------------------------------------


def pairwise_psnr(
    truth_BxHxWxC: jax.Array, recon_BxHxWxC: jax.Array, data_range: float = 1.0
) -> jax.Array:
    """(B_truth, B_recon) PSNR in dB between every truth and every reconstruction (jittable).

    Same formula and MSE floor as :func:`psnr`; one truth row at a time
    (``lax.map``), so memory stays O(B * H * W * C), not O(B^2 * H * W * C).
    """
    b = truth_BxHxWxC.shape[0]
    truth_BxD = jnp.asarray(truth_BxHxWxC).reshape(b, -1)
    recon_BxD = jnp.asarray(recon_BxHxWxC).reshape(recon_BxHxWxC.shape[0], -1)
    mse_BxB = jax.lax.map(lambda t_D: jnp.mean(jnp.square(recon_BxD - t_D[None, :]), axis=1), truth_BxD)
    return 10.0 * jnp.log10(data_range**2 / jnp.maximum(mse_BxB, _MSE_FLOOR))


def match_permutation(
    recon_BxHxWxC: jax.Array, truth_BxHxWxC: jax.Array, data_range: float = 1.0
) -> jax.Array:
    """The one-to-one assignment of reconstructions to ground truths with the largest total PSNR.

    Batch gradient inversion recovers images in an arbitrary order, so each
    reconstruction is paired with a ground-truth image by the Hungarian algorithm
    (``optax.assignment.hungarian_algorithm`` on the negated :func:`pairwise_psnr`).
    Pure ``jax.numpy``: jit it, vmap it over groups.

    Returns:
      perm_B: int32 (B,) permutation such that recon[perm[i]] is matched with
      truth[i], i.e. ``recon[perm]`` is aligned with ``truth``.
    """
    _check_pair(recon_BxHxWxC, truth_BxHxWxC)
    b = truth_BxHxWxC.shape[0]
    psnr_BxB = pairwise_psnr(truth_BxHxWxC, recon_BxHxWxC, data_range)
    truth_idx_B, recon_idx_B = optax.assignment.hungarian_algorithm(-psnr_BxB)
    return jnp.zeros((b,), jnp.int32).at[truth_idx_B].set(recon_idx_B.astype(jnp.int32))


_match_permutation_jit = jax.jit(match_permutation)


def match_reconstructions(
    recon_BxHxWxC: Any, truth_BxHxWxC: Any, data_range: float = 1.0
) -> np.ndarray:
    """Host form of :func:`match_permutation`: numpy in, int64 (B,) ``perm`` out (``recon[perm]`` ~ ``truth``)."""
    _check_pair(recon_BxHxWxC, truth_BxHxWxC)
    recon = jnp.asarray(recon_BxHxWxC, jnp.float32)
    truth = jnp.asarray(truth_BxHxWxC, jnp.float32)
    return np.asarray(_match_permutation_jit(recon, truth, data_range), dtype=np.int64)


def evaluate(
    recon_BxHxWxC: Any,
    truth_BxHxWxC: Any,
    match: bool = True,
    data_range: float = 1.0,
) -> dict[str, Any]:
    """Reconstruction quality report as JSON-serialisable python values.

    Args:
      recon_BxHxWxC: reconstructed images (B, H, W, C).
      truth_BxHxWxC: ground-truth images, same shape.
      match: if True, reorder reconstructions with ``match_reconstructions``
        before scoring (needed when the attack does not preserve order).
      data_range: value range of the images.

    Returns:
      dict with batch means ``mse``, ``psnr``, ``ssim`` (floats), per-image
      lists ``mse_per_image``, ``psnr_per_image``, ``ssim_per_image`` (in
      ground-truth order), and ``permutation`` (list of ints mapping truth
      index -> recon index; the identity when match=False).
    """
    _check_pair(recon_BxHxWxC, truth_BxHxWxC)
    recon = np.asarray(recon_BxHxWxC, dtype=np.float32)
    truth = np.asarray(truth_BxHxWxC, dtype=np.float32)
    b = truth.shape[0]
    if match:
        perm_B = match_reconstructions(recon, truth, data_range)
    else:
        perm_B = np.arange(b, dtype=np.int64)
    recon = recon[perm_B]

    mse_B = np.asarray(mse(recon, truth), dtype=np.float64)
    psnr_B = np.asarray(psnr(recon, truth, data_range), dtype=np.float64)
    ssim_B = np.asarray(ssim(recon, truth, data_range), dtype=np.float64)
    return {
        "mse": float(mse_B.mean()),
        "psnr": float(psnr_B.mean()),
        "ssim": float(ssim_B.mean()),
        "mse_per_image": [float(v) for v in mse_B],
        "psnr_per_image": [float(v) for v in psnr_B],
        "ssim_per_image": [float(v) for v in ssim_B],
        "permutation": [int(i) for i in perm_B],
    }
