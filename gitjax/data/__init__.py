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

Modules: ``dataset`` (the ImageDataset type, normalisation), ``embedded``
(bundled images, source photos, validation split), ``tfds_loader`` (TFDS);
this one picks a loader by name. See ``docs/data.md`` for sources, split rules and label rules.
"""

from __future__ import annotations

import os

from gitjax.data.dataset import LUMA_WEIGHTS, NORMALIZATION, SPLITS, ImageDataset, normalization
from gitjax.data.embedded import (
    EMBEDDED_DATASETS,
    VALIDATION_SOURCES,
    load_embedded,
    photo_dataset,
    source_photos,
    split_validation,
)
from gitjax.data.tfds_loader import TFDS_DATASETS, DatasetUnavailableError, load_tfds

__all__ = [
    "DatasetUnavailableError",
    "EMBEDDED_DATASETS",
    "ImageDataset",
    "LUMA_WEIGHTS",
    "NORMALIZATION",
    "SPLITS",
    "TFDS_DATASETS",
    "list_datasets",
    "load_dataset",
    "load_embedded",
    "load_tfds",
    "normalization",
    "photo_dataset",
    "source_photos",
    "split_validation",
    "VALIDATION_SOURCES",
]


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
    if name in TFDS_DATASETS:
        return load_tfds(name, split, image_size, channels, data_dir, max_examples)
    raise ValueError(f"unknown dataset {name!r}; valid names: {sorted(list_datasets())}")
