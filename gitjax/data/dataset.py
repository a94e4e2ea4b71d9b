"""The dataset type of gitjax.data: :class:`ImageDataset`, per-dataset normalisation, array helpers.

Every loader (``gitjax.data.embedded``, ``gitjax.data.tfds_loader``) returns an
:class:`ImageDataset`: float32 images in [0, 1], shape (N, H, W, C), int32 labels
(N,), and the per-channel normalisation constants a victim model should use.
The helpers here convert raw images to that form (range, channels, size).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

# ITU-R BT.601 luma weights, the ones PIL's convert("L") and torchvision use.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

SPLITS = ("train", "test")


# --------------------------------------------------------------------------
# ImageDataset
# --------------------------------------------------------------------------


# eq=False: numpy fields make the generated __eq__ ambiguous.
@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory labelled image set.

    Attributes:
      name: dataset name, e.g. "patches" or "cifar10".
      images: (N, H, W, C) float32 in [0, 1].
      labels: (N,) int32 in [0, num_classes).
      num_classes: size of the label space a victim model should have.
      source_ids: (N,) int32, which source photo / record each image came from;
        images with different source_ids share no pixels.
      mean, std: per-channel normalisation constants, C entries each (computed
        on the train split, so the test split uses the same ones).
    """

    name: str
    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    source_ids: np.ndarray
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.ndim != 4:
            raise ValueError(f"images must be (N, H, W, C); got shape {self.images.shape}")
        n, c = self.images.shape[0], self.images.shape[-1]
        if self.images.dtype != np.float32:
            raise ValueError(f"images must be float32; got {self.images.dtype}")
        if self.labels.shape != (n,) or self.source_ids.shape != (n,):
            raise ValueError(
                f"labels {self.labels.shape} and source_ids {self.source_ids.shape} must be ({n},)"
            )
        if len(self.mean) != c or len(self.std) != c:
            raise ValueError(f"mean/std need {c} entries; got {self.mean}, {self.std}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of one image."""
        h, w, c = self.images.shape[1:]
        return int(h), int(w), int(c)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageDataset:
        """The examples at ``indices`` (any int sequence or (M,) array), in that order."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return dataclasses.replace(
            self,
            images=self.images[idx],
            labels=self.labels[idx],
            source_ids=self.source_ids[idx],
        )

    def take(self, n: int) -> ImageDataset:
        """The first ``n`` examples (all of them if ``n >= len(self)``)."""
        if n < 0:
            raise ValueError(f"take needs n >= 0; got {n}")
        return self.subset(np.arange(min(n, len(self))))

    def batches(
        self,
        key_or_seed: Any,
        batch_size: int,
        drop_remainder: bool = True,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One shuffled pass over the data in batches.

        Args:
          key_or_seed: an int seed, a JAX PRNG key, or None for file order.
          batch_size: B, examples per batch.
          drop_remainder: drop the last short batch, so every batch has the
            same shape (one jit compilation downstream).

        Yields:
          (images (B, H, W, C) float32, labels (B,) int32).
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive; got {batch_size}")
        order = _permutation(key_or_seed, len(self))
        stop = len(self) - len(self) % batch_size if drop_remainder else len(self)
        for start in range(0, stop, batch_size):
            idx = order[start : start + batch_size]
            yield self.images[idx], self.labels[idx]


def _permutation(key_or_seed: Any, n: int) -> np.ndarray:
    """(n,) int64 order: identity for None, numpy for ints, jax.random for keys."""
    if key_or_seed is None:
        return np.arange(n)
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed)).permutation(n)
    import jax  # only needed for key inputs

    return np.asarray(jax.random.permutation(key_or_seed, n))


# --------------------------------------------------------------------------
# Normalisation constants
# --------------------------------------------------------------------------

# (mean, std) per channel over all pixels of the train split; 1-tuples are
# grey datasets (repeated when loaded with 3 channels).
# Embedded entries: computed with
#   d = load_embedded(name, "train", image_size=32, channels=3)
#   d.images.mean(axis=(0, 1, 2)), d.images.std(axis=(0, 1, 2))
# rounded to 4 decimals (tests/test_data.py re-checks them within 1e-3).
# TFDS entries are the usual published values for the full train sets
# (celeb_a: whole aligned images, not our 148 px crop).
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "patches": ((0.4947, 0.3453, 0.2911), (0.2996, 0.2322, 0.2258)),
    "digits": ((0.3099,), (0.3163,)),
    "faces": ((0.3723,), (0.2688,)),
    "textures": ((0.5004,), (0.2717,)),
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "celeb_a": ((0.5061, 0.4254, 0.3828), (0.2661, 0.2453, 0.2413)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}

# Measured luma constants for RGB datasets loaded with channels=1, where known
# (same recipe as above with channels=1). Others fall back to an estimate.
_GREY_NORMALIZATION: dict[str, tuple[tuple[float], tuple[float]]] = {
    "patches": ((0.3830,), (0.2364,)),
}


def normalization(name: str, channels: int = 3) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) for dataset ``name`` with ``channels`` (1 or 3) entries.

    Grey constants are repeated for 3 channels. For RGB datasets read with 1
    channel, measured luma constants are used where known (patches); otherwise
    they are estimated with the BT.601 luma weights: exact for the mean, and
    for the std the weighted sum of channel stds (exact for perfectly
    correlated channels, an upper bound otherwise: 0.015 high on patches).
    """
    if name not in NORMALIZATION:
        raise ValueError(
            f"no normalisation constants for dataset {name!r}; known: {sorted(NORMALIZATION)}"
        )
    _check_channels(channels)
    mean, std = NORMALIZATION[name]
    if len(mean) == channels:
        return mean, std
    if len(mean) == 1:  # grey -> RGB: same constants per channel
        return mean * channels, std * channels
    if name in _GREY_NORMALIZATION:
        return _GREY_NORMALIZATION[name]
    luma_mean = float(np.dot(LUMA_WEIGHTS, mean))
    luma_std = float(np.dot(LUMA_WEIGHTS, std))
    return (round(luma_mean, 4),), (round(luma_std, 4),)


# --------------------------------------------------------------------------
# Array helpers
# --------------------------------------------------------------------------


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3; got {channels}")


def _to_float01(img: np.ndarray) -> np.ndarray:
    """uint8 / bool / float image -> float32 in [0, 1] (same shape)."""
    if img.dtype == np.uint8:
        return img.astype(np.float32) / 255.0
    if img.dtype == np.bool_:
        return img.astype(np.float32)
    return np.clip(img.astype(np.float32), 0.0, 1.0)


def _to_channels(x_NxHxWxC: np.ndarray, channels: int) -> np.ndarray:
    """Convert the channel axis: grey -> RGB repeats, RGB -> grey takes BT.601 luma."""
    c = x_NxHxWxC.shape[-1]
    if c == channels:
        return x_NxHxWxC
    if c == 1 and channels == 3:
        return np.repeat(x_NxHxWxC, 3, axis=-1)
    if c == 3 and channels == 1:
        luma = x_NxHxWxC @ np.asarray(LUMA_WEIGHTS, dtype=np.float32)
        return np.clip(luma, 0.0, 1.0)[..., None].astype(np.float32)
    raise ValueError(f"cannot convert {c} channels to {channels}")


def _resize(x_NxHxWxC: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a stack of images, Gaussian anti-aliasing when shrinking.

    (N, H, W, C) float -> (N, height, width, C) float32 in [0, 1].
    """
    n, h, w, c = x_NxHxWxC.shape
    if (h, w) == (height, width):
        return x_NxHxWxC.astype(np.float32)
    from skimage.transform import resize

    # Resizing the 4-D stack at once is exact on the N and C axes (scale 1).
    out = resize(
        x_NxHxWxC,
        (n, height, width, c),
        order=1,
        mode="reflect",
        anti_aliasing=(height < h or width < w),
    )
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _center_crop(img_HxWxC: np.ndarray, size: int) -> np.ndarray:
    """Central (min(size,H), min(size,W)) window of an (H, W, C) image."""
    h, w = img_HxWxC.shape[:2]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return img_HxWxC[top : top + size, left : left + size]


def _check_common_args(split: str, image_size: int, channels: int, max_examples: int | None) -> None:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string; got {split!r}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive; got {image_size}")
    _check_channels(channels)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None; got {max_examples}")
