"""Offline datasets built from images bundled in the scikit-image / scikit-learn wheels.

``patches`` (the default: real natural-photo statistics at CIFAR size) and
``textures`` are grid patches of bundled photographs, split by photograph;
``digits`` and ``faces`` are small sklearn/skimage image sets. Nothing is ever
downloaded. Also here: the full-resolution source photos the training stream
crops (``source_photos``) and the validation split of a train set
(``split_validation``: held-out photographs, or every 10th example).
See ``docs/data.md`` for sources, split rules and label rules.
"""

from __future__ import annotations

import functools

import numpy as np

from gitjax.data.dataset import (
    SPLITS,
    ImageDataset,
    _check_channels,
    _check_common_args,
    _resize,
    _to_channels,
    _to_float01,
    normalization,
)

# The embedded datasets all report 10 classes so one victim head fits them all.
EMBEDDED_NUM_CLASSES = 10
PSEUDO_LABEL_SEED = 20240917


def _pseudo_labels(split: str, count: int) -> np.ndarray:
    """(count,) int32 fixed random labels in [0, 10), one per candidate patch index.

    Keyed on (seed, split) and the patch's grid index, so a patch keeps its
    label whatever image_size, channels or max_examples is asked for.
    """
    split_key = SPLITS.index(split)
    rng = np.random.default_rng([PSEUDO_LABEL_SEED, split_key])
    return rng.integers(0, EMBEDDED_NUM_CLASSES, size=count).astype(np.int32)


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


def photo_dataset(name: str) -> bool:
    """True when ``name`` is cut from bundled photographs (``source_photos`` works; the stream can crop it)."""
    return name in _PHOTO_SOURCES


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
