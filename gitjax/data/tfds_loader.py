"""TFDS datasets (mnist, cifar10, cifar100, celeb_a, imagenet), read from a prepared data_dir.

Read with ``tfds.data_source`` (array_record, no TensorFlow needed); nothing is
ever downloaded at run time: a dataset that is not prepared raises
:class:`DatasetUnavailableError` naming the command that prepares it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gitjax.data.dataset import (
    ImageDataset,
    _center_crop,
    _check_common_args,
    _resize,
    _to_channels,
    _to_float01,
    normalization,
)
from gitjax.data.embedded import EMBEDDED_DATASETS


class DatasetUnavailableError(RuntimeError):
    """A TFDS dataset is not prepared in the data_dir searched (never downloaded)."""



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
