"""Image datasets for gradient-inversion experiments, as numpy arrays.

Every loader returns an :class:`ImageDataset` holding float32 images in [0, 1]
with shape (N, H, W, C) (NHWC), int32 labels with shape (N,), and the
per-channel normalisation constants a victim model should use.

Two families:

* **Embedded** (``patches``, ``digits``, ``faces``, ``textures``): built from
  images that ship inside the scikit-image and scikit-learn wheels, so they
  work with no network and no preparation. ``patches`` is the default: real
  natural-photo statistics at CIFAR size.
* **TFDS** (``mnist``, ``cifar10``, ``cifar100``, ``celeb_a``, ``imagenet``):
  read with ``tfds.data_source`` (array_record, no TensorFlow needed) from a
  data_dir prepared beforehand; nothing is ever downloaded at run time.

See ``docs/data.md`` for sources, split rules and label rules.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "DatasetUnavailableError",
    "EMBEDDED_DATASETS",
    "ImageDataset",
    "NORMALIZATION",
    "TFDS_DATASETS",
    "list_datasets",
    "load_dataset",
    "load_embedded",
    "load_tfds",
    "normalization",
    "source_photos",
    "split_validation",
    "VALIDATION_SOURCES",
]

# ITU-R BT.601 luma weights, the ones PIL's convert("L") and torchvision use.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

# The embedded datasets all report 10 classes so one victim head fits them all.
EMBEDDED_NUM_CLASSES = 10
PSEUDO_LABEL_SEED = 20240917

SPLITS = ("train", "test")


class DatasetUnavailableError(RuntimeError):
    """A TFDS dataset is not prepared in the data_dir searched (never downloaded)."""


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


def _pseudo_labels(split: str, count: int) -> np.ndarray:
    """(count,) int32 fixed random labels in [0, 10), one per candidate patch index.

    Keyed on (seed, split) and the patch's grid index, so a patch keeps its
    label whatever image_size, channels or max_examples is asked for.
    """
    split_key = SPLITS.index(split)
    rng = np.random.default_rng([PSEUDO_LABEL_SEED, split_key])
    return rng.integers(0, EMBEDDED_NUM_CLASSES, size=count).astype(np.int32)


# --------------------------------------------------------------------------
# Embedded datasets
# --------------------------------------------------------------------------

# Patch geometry at image_size 32 ("canonical"): each photo is resized so its
# short side is each of _PATCH_SCALES px, then cut into a 32 px grid with a
# 16 px stride. At 128 px a 32 px patch is a quarter of the photo's short
# side, so it holds recognisable object parts, like a CIFAR image.
_PATCH_SCALES: tuple[int, ...] = (128, 192)
_CANON_PATCH = 32
_CANON_STRIDE = 16
# Near-constant patches (flat sky, blank paper, retina's dark rim) carry
# nothing to reconstruct; drop those whose spatial std, averaged over channels,
# is below ~5 grey levels (measured on the 32 px patch).
_MIN_PATCH_STD = 0.02

# Split by source photo, so no test patch shares a pixel with a train patch.
# "sklearn:<file>" names come from sklearn.datasets.load_sample_image.
_PHOTO_SOURCES: dict[str, dict[str, tuple[str, ...]]] = {
    "patches": {
        "train": (
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "immunohistochemistry",
            "hubble_deep_field",
            "retina",
        ),
        "test": ("sklearn:china.jpg", "sklearn:flower.jpg"),
    },
    "textures": {
        "train": ("brick", "grass", "camera", "coins", "horse", "page"),
        "test": ("gravel", "moon", "clock", "text"),
    },
}

# Validation (model selection) comes from TRAIN photographs held out of training: the
# fixed-patches path drops their patches and the stream (gitjax.stream) never crops them,
# so no validation pixel is ever trained on, and the test photos stay for final numbers.
# coffee (400x600) is the train photo whose patches are most like the test photos' (PSNR of
# the dataset-mean image 12.9 dB vs test 11.0; of each patch's own mean colour 18.4 vs 18.9;
# chelsea, the other candidate, is near-monochrome: 17.2 / 20.1): its 263 patches validate.
VALIDATION_SOURCES: dict[str, tuple[str, ...]] = {
    "patches": ("coffee",),
    "textures": ("coins",),
}
# Datasets without source photos hold out every 10th train example (stratified by position).
_VALIDATION_EVERY = 10

_DIGITS_TRAIN = 1500  # load_digits has 1797 images: [0, 1500) train, rest test
_FACES_PER_CLASS = 100  # lfw_subset: 100 faces, then 100 non-faces
_FACES_TRAIN_PER_CLASS = 80


def _load_source_photo(source: str) -> np.ndarray:
    """One bundled photo as float32 (H, W, C) in [0, 1]; never downloads."""
    if source.startswith("sklearn:"):
        from sklearn.datasets import load_sample_image

        img = load_sample_image(source.removeprefix("sklearn:"))
    else:
        import skimage.data

        # Only files present in the wheel are used (see tests); skimage would
        # reach for pooch (not a dependency) for any other name.
        img = getattr(skimage.data, source)()
    img = _to_float01(np.asarray(img))
    return img[..., None] if img.ndim == 2 else img


def _grid_starts(length: int, patch: int, stride: int) -> np.ndarray:
    """Start offsets of a regular grid of ``patch``-wide windows along ``length``."""
    return np.arange(0, length - patch + 1, stride)


def _photo_patches(img_HxWxC: np.ndarray, image_size: int) -> np.ndarray:
    """All grid patches of one photo, over every scale, at ``image_size`` px.

    The grid is defined at the canonical 32 px geometry and scaled by
    image_size / 32, so every image_size yields the same patches (same order,
    same content) at a different resolution.

    Returns:
      (P, image_size, image_size, C) float32.
    """
    h, w = img_HxWxC.shape[:2]
    ratio = image_size / _CANON_PATCH
    out = []
    for scale in _PATCH_SCALES:
        scale = min(scale, h, w)  # never upscale a small source for the grid
        ch, cw = round(h * scale / min(h, w)), round(w * scale / min(h, w))
        rh, rw = max(round(ch * ratio), image_size), max(round(cw * ratio), image_size)
        big = _resize(img_HxWxC[None], rh, rw)[0]
        for y in _grid_starts(ch, _CANON_PATCH, _CANON_STRIDE):
            for x in _grid_starts(cw, _CANON_PATCH, _CANON_STRIDE):
                # Clamp: rounding can push the scaled window one pixel past the edge.
                top = min(round(y * ratio), rh - image_size)
                left = min(round(x * ratio), rw - image_size)
                out.append(big[top : top + image_size, left : left + image_size])
    return np.stack(out).astype(np.float32)


def _build_photo_patches(name: str, split: str, image_size: int) -> tuple[np.ndarray, ...]:
    """(images, labels, source_ids) for ``patches`` / ``textures`` before channel conversion."""
    sources = _PHOTO_SOURCES[name]
    all_sources = sources["train"] + sources["test"]  # global ids: splits never collide
    images, ids, keep = [], [], []
    for source in sources[split]:
        photo = _load_source_photo(source)
        canon = _photo_patches(photo, _CANON_PATCH)
        patches = canon if image_size == _CANON_PATCH else _photo_patches(photo, image_size)
        images.append(patches)
        ids.append(np.full(len(patches), all_sources.index(source), np.int32))
        # Spatial std per channel: a flat coloured patch must not pass on colour alone.
        keep.append(canon.std(axis=(1, 2)).mean(axis=-1) >= _MIN_PATCH_STD)
    images_all, ids_all, keep_all = map(np.concatenate, (images, ids, keep))
    labels_all = _pseudo_labels(split, len(images_all))
    return images_all[keep_all], labels_all[keep_all], ids_all[keep_all]


def source_photos(name: str, split: str = "train", channels: int = 3,
                  exclude_validation: bool = True) -> list[np.ndarray]:
    """The bundled full-resolution photos behind a photo dataset's split (what gitjax.stream crops).

    Args:
      name: a photo dataset ("patches" or "textures").
      split: "train" or "test".
      channels: 1 (BT.601 luma) or 3 (grey sources repeated).
      exclude_validation: for "train", leave out ``VALIDATION_SOURCES[name]``.

    Returns:
      One float32 (H, W, channels) array in [0, 1] per photo, in the split's order, at the
      photo's native size (e.g. retina 1411 x 1411).
    """
    if name not in _PHOTO_SOURCES:
        raise ValueError(f"dataset {name!r} has no source photos; photo datasets: {sorted(_PHOTO_SOURCES)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}; got {split!r}")
    _check_channels(channels)
    held_out = VALIDATION_SOURCES.get(name, ()) if (split == "train" and exclude_validation) else ()
    return [_to_channels(_load_source_photo(s)[None], channels)[0]
            for s in _PHOTO_SOURCES[name][split] if s not in held_out]


def split_validation(ds: ImageDataset) -> tuple[ImageDataset, ImageDataset]:
    """(fit, val): a train split divided into the part to train on and the validation part.

    Photo datasets (``VALIDATION_SOURCES``) hold out whole source photos, so fit and val
    share no pixel; any other dataset holds out every 10th example (by position). The two
    parts are disjoint and together are ``ds``.
    """
    if ds.name in VALIDATION_SOURCES:
        sources = _PHOTO_SOURCES[ds.name]
        all_sources = sources["train"] + sources["test"]  # the global source_ids of _build_photo_patches
        held = [all_sources.index(s) for s in VALIDATION_SOURCES[ds.name]]
        is_val = np.isin(ds.source_ids, held)
    else:
        is_val = np.arange(len(ds)) % _VALIDATION_EVERY == _VALIDATION_EVERY - 1
    return ds.subset(np.flatnonzero(~is_val)), ds.subset(np.flatnonzero(is_val))


def _build_digits(split: str, image_size: int) -> tuple[np.ndarray, ...]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 17 grey levels (0..16) -> [0, 1], then bilinear upsampling.
    images = (bunch.images.astype(np.float32) / 16.0)[..., None]
    idx = np.arange(len(images))
    idx = idx[:_DIGITS_TRAIN] if split == "train" else idx[_DIGITS_TRAIN:]
    images = _resize(images[idx], image_size, image_size)
    return images, bunch.target[idx].astype(np.int32), idx.astype(np.int32)


def _build_faces(split: str, image_size: int) -> tuple[np.ndarray, ...]:
    import skimage.data

    raw = skimage.data.lfw_subset()  # (200, 25, 25) float64 in [0, 1]
    images = _to_float01(raw)[..., None]
    labels = np.zeros(len(images), np.int32)
    labels[:_FACES_PER_CLASS] = 1  # the first 100 are faces, the rest are not
    k, m = _FACES_PER_CLASS, _FACES_TRAIN_PER_CLASS
    if split == "train":
        idx = np.r_[0:m, k : k + m]
    else:
        idx = np.r_[m:k, k + m : 2 * k]
    images = _resize(images[idx], image_size, image_size)
    return images, labels[idx], idx.astype(np.int32)


EMBEDDED_DATASETS: dict[str, str] = {
    "patches": "32x32 RGB patches of 9 bundled colour photos (CIFAR-like); "
    "split by photo; pseudo-labels",
    "digits": "sklearn 8x8 handwritten digits upsampled; labels 0-9",
    "faces": "skimage LFW subset, 25x25 grey faces vs non-faces; labels 1/0",
    "textures": "grey patches of 10 bundled texture/photo images; split by image; pseudo-labels",
}


@functools.lru_cache(maxsize=32)
def _cached_embedded(name: str, split: str, image_size: int, channels: int) -> ImageDataset:
    """Build once per process; arrays are made read-only because they are shared."""
    if name in _PHOTO_SOURCES:
        images, labels, ids = _build_photo_patches(name, split, image_size)
    elif name == "digits":
        images, labels, ids = _build_digits(split, image_size)
    else:
        images, labels, ids = _build_faces(split, image_size)
    images = np.ascontiguousarray(_to_channels(images, channels), dtype=np.float32)
    for arr in (images, labels, ids):
        arr.setflags(write=False)
    mean, std = normalization(name, channels)
    return ImageDataset(name, images, labels, EMBEDDED_NUM_CLASSES, ids, mean, std)


def load_embedded(
    name: str,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    max_examples: int | None = None,
) -> ImageDataset:
    """Load an offline dataset built from images bundled with skimage / sklearn.

    Args:
      name: one of ``EMBEDDED_DATASETS`` (patches, digits, faces, textures).
      split: "train" or "test".
      image_size: S, output images are S x S.
      channels: 1 (grey / BT.601 luma) or 3 (RGB; grey sources repeated).
      max_examples: keep only the first this many examples.

    Returns:
      ImageDataset with images (N, S, S, channels); arrays are read-only
      (shared by an in-process cache).
    """
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; valid: {sorted(EMBEDDED_DATASETS)}")
    _check_common_args(split, image_size, channels, max_examples)
    if split not in SPLITS:
        raise ValueError(f"embedded datasets have splits {SPLITS}; got {split!r}")
    ds = _cached_embedded(name, split, int(image_size), int(channels))
    return ds if max_examples is None else ds.take(max_examples)


def _check_common_args(split: str, image_size: int, channels: int, max_examples: int | None) -> None:
    if not isinstance(split, str) or not split:
        raise ValueError(f"split must be a non-empty string; got {split!r}")
    if int(image_size) < 1:
        raise ValueError(f"image_size must be positive; got {image_size}")
    _check_channels(channels)
    if max_examples is not None and max_examples < 0:
        raise ValueError(f"max_examples must be >= 0 or None; got {max_examples}")


# --------------------------------------------------------------------------
# TFDS datasets
# --------------------------------------------------------------------------

_CELEBA_CROP = 148  # central square of the 218x178 aligned faces, as in common GAN/VAE setups
_CELEBA_LABEL_ATTRIBUTE = "Male"


@dataclasses.dataclass(frozen=True)
class _TfdsSpec:
    """How one gitjax dataset name maps onto TFDS."""

    num_classes: int
    description: str
    label_fn: Callable[[Mapping[str, Any]], int]
    tfds_name_fn: Callable[[int], str]
    split_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    crop: int | None = None


def _imagenet_tfds_name(image_size: int) -> str:
    """Smallest pre-resized ImageNet that is at least image_size; full ImageNet above 64."""
    if image_size <= 32:
        return "imagenet_resized/32x32"
    if image_size <= 64:
        return "imagenet_resized/64x64"
    return "imagenet2012"


def _label(record: Mapping[str, Any]) -> int:
    return int(record["label"])


def _celeba_label(record: Mapping[str, Any]) -> int:
    return int(bool(record["attributes"][_CELEBA_LABEL_ATTRIBUTE]))


_TFDS_SPECS: dict[str, _TfdsSpec] = {
    "mnist": _TfdsSpec(10, "TFDS mnist, 28x28 grey digits; labels 0-9", _label, lambda s: "mnist"),
    "cifar10": _TfdsSpec(10, "TFDS cifar10, 32x32 RGB; 10 classes", _label, lambda s: "cifar10"),
    "cifar100": _TfdsSpec(
        100, "TFDS cifar100, 32x32 RGB; 100 fine labels", _label, lambda s: "cifar100"
    ),
    "celeb_a": _TfdsSpec(
        2,
        "TFDS celeb_a, 148px centre crop resized; label = attribute 'Male' (0/1)",
        _celeba_label,
        lambda s: "celeb_a",
        crop=_CELEBA_CROP,
    ),
    "imagenet": _TfdsSpec(
        1000,
        "TFDS imagenet_resized/32x32 (or /64x64, imagenet2012 for larger sizes); "
        "1000 classes; 'test' reads 'validation'",
        _label,
        _imagenet_tfds_name,
        split_map={"test": "validation"},
    ),
}

TFDS_DATASETS: dict[str, str] = {name: spec.description for name, spec in _TFDS_SPECS.items()}


def _default_tfds_data_dir() -> str:
    """Where tfds looks when data_dir is None (honours $TFDS_DATA_DIR)."""
    try:
        from tensorflow_datasets.core import constants

        return str(constants.get_default_data_dir())
    except (ImportError, AttributeError):  # layout differs across tfds versions
        return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def _open_tfds_source(
    name: str, tfds_name: str, split: str, data_dir: str | None
) -> Sequence[Mapping[str, Any]]:
    """``tfds.data_source`` with downloads off; missing data -> DatasetUnavailableError."""
    import tensorflow_datasets as tfds

    try:
        return tfds.data_source(tfds_name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # tfds raises KeyError / NotImplementedError / OSError ... here
        searched = data_dir if data_dir is not None else _default_tfds_data_dir()
        where = os.path.join(searched, tfds_name)
        # tfds' own message for an empty data_dir misleadingly talks about TFRecord files.
        state = "not prepared there" if not os.path.isdir(where) else f"could not be opened from {where!r}"
        raise DatasetUnavailableError(
            f"dataset {name!r} (TFDS {tfds_name!r}, split {split!r}) is unavailable: {state} "
            f"(data_dir searched: {searched!r}). gitjax never downloads at run time.\n"
            f"Fix: on a machine with internet run `tfds build {tfds_name} --data_dir <DIR> "
            f"--file_format array_record` (or convert an existing TFRecord copy with "
            f"`tfds convert_format`), copy <DIR> here and pass data_dir=<DIR> (CLI: --data-dir) "
            f"or set $TFDS_DATA_DIR. The embedded datasets {', '.join(EMBEDDED_DATASETS)} "
            f"work offline with no preparation.\n"
            f"tfds said: {type(err).__name__}: {str(err)[:300]}"
        ) from err


def _record_image(record: Mapping[str, Any], crop: int | None) -> np.ndarray:
    """(H, W, C) float32 in [0, 1] from one TFDS record, centre-cropped if asked."""
    img = np.asarray(record["image"])
    img = img[..., None] if img.ndim == 2 else img
    if crop is not None:
        img = _center_crop(img, crop)
    return _to_float01(img)


def load_tfds(
    name: str,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    data_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
) -> ImageDataset:
    """Load a TFDS dataset already prepared in ``data_dir`` (never downloads).

    Args:
      name: one of ``TFDS_DATASETS`` (mnist, cifar10, cifar100, celeb_a, imagenet).
      split: "train", "test", or any TFDS split string (e.g. "validation");
        for imagenet "test" means "validation".
      image_size: S, images are resized (bilinear, anti-aliased) to S x S.
      channels: 1 or 3.
      data_dir: TFDS data directory; None uses tfds' default ($TFDS_DATA_DIR
        or ~/tensorflow_datasets).
      max_examples: read only the first this many records (reading all of a
        large split decodes every image).

    Returns:
      ImageDataset with images (N, S, S, channels); source_ids are record indices.

    Raises:
      DatasetUnavailableError: the dataset is not prepared in data_dir.
    """
    if name not in _TFDS_SPECS:
        raise ValueError(f"unknown TFDS dataset {name!r}; valid: {sorted(_TFDS_SPECS)}")
    _check_common_args(split, image_size, channels, max_examples)
    spec = _TFDS_SPECS[name]
    tfds_name = spec.tfds_name_fn(int(image_size))
    tfds_split = spec.split_map.get(split, split)
    data_dir = None if data_dir is None else os.fspath(data_dir)
    source = _open_tfds_source(name, tfds_name, tfds_split, data_dir)
    n = len(source) if max_examples is None else min(len(source), max_examples)
    images = np.empty((n, image_size, image_size, channels), np.float32)
    labels = np.empty((n,), np.int32)
    for i in range(n):  # per record: source images may differ in size (celeb_a, imagenet2012)
        record = source[i]
        img = _resize(_record_image(record, spec.crop)[None], image_size, image_size)
        images[i] = _to_channels(img, channels)[0]
        labels[i] = spec.label_fn(record)
    mean, std = normalization(name, channels)
    return ImageDataset(name, images, labels, spec.num_classes, np.arange(n, dtype=np.int32), mean, std)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def list_datasets() -> dict[str, str]:
    """Every dataset name load_dataset accepts -> a one-line description."""
    return {**EMBEDDED_DATASETS, **TFDS_DATASETS}


def load_dataset(
    name: str,
    split: str = "train",
    image_size: int = 32,
    channels: int = 3,
    data_dir: str | os.PathLike[str] | None = None,
    max_examples: int | None = None,
) -> ImageDataset:
    """Load any dataset by name: embedded ones offline, TFDS ones from data_dir.

    Returns an ImageDataset with images (N, image_size, image_size, channels)
    float32 in [0, 1]. See :func:`load_embedded` and :func:`load_tfds`.
    """
    if name in EMBEDDED_DATASETS:
        return load_embedded(name, split, image_size, channels, max_examples)
    if name in _TFDS_SPECS:
        return load_tfds(name, split, image_size, channels, data_dir, max_examples)
    raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(list_datasets())}")
