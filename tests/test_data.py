"""Tests for gitjax.data: embedded offline datasets, TFDS loaders, normalisation."""

from __future__ import annotations

import socket
import urllib.request

import numpy as np
import pytest
import tensorflow_datasets as tfds

from gitjax import data
from gitjax.data import dataset, embedded, tfds_loader

EMBEDDED = ("patches", "digits", "faces", "textures")
TFDS_NAMES = ("mnist", "cifar10", "cifar100", "celeb_a", "imagenet")


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to open a connection fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("gitjax.data tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)


# --------------------------------------------------------------------------
# Embedded datasets
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", EMBEDDED)
@pytest.mark.parametrize("split", ["train", "test"])
def test_embedded_shape_dtype_range(name: str, split: str, no_network: None) -> None:
    embedded._cached_embedded.cache_clear()  # really build it under no_network
    ds = data.load_embedded(name, split)
    n = len(ds)
    assert n > 0
    assert ds.name == name
    assert ds.images.shape == (n, 32, 32, 3) and ds.image_shape == (32, 32, 3)
    assert ds.images.dtype == np.float32
    assert ds.images.min() >= 0.0 and ds.images.max() <= 1.0
    assert ds.labels.shape == (n,) and ds.labels.dtype == np.int32
    assert ds.source_ids.shape == (n,) and ds.source_ids.dtype == np.int32
    assert ds.num_classes == 10
    assert 0 <= ds.labels.min() and ds.labels.max() < ds.num_classes
    assert len(ds.mean) == len(ds.std) == 3


def test_embedded_sizes() -> None:
    """Sizes the docs promise (CIFAR-like patches: 1k-3k train, 200-600 test)."""
    sizes = {(n, s): len(data.load_embedded(n, s)) for n in EMBEDDED for s in ("train", "test")}
    assert 1000 <= sizes["patches", "train"] <= 3000
    assert 200 <= sizes["patches", "test"] <= 600
    assert sizes["digits", "train"] == 1500 and sizes["digits", "test"] == 297
    assert sizes["faces", "train"] == 160 and sizes["faces", "test"] == 40
    assert sizes["textures", "train"] >= 500 and sizes["textures", "test"] >= 200


@pytest.mark.parametrize("name", ["patches", "textures", "digits", "faces"])
def test_train_test_sources_disjoint(name: str) -> None:
    train = data.load_embedded(name, "train")
    test = data.load_embedded(name, "test")
    assert not set(train.source_ids.tolist()) & set(test.source_ids.tolist())


def test_patch_splits_use_several_photos() -> None:
    assert len(np.unique(data.load_embedded("patches", "train").source_ids)) == 7
    assert len(np.unique(data.load_embedded("patches", "test").source_ids)) == 2


def test_patches_are_not_near_constant() -> None:
    ds = data.load_embedded("patches", "train")
    assert ds.images.std(axis=(1, 2)).mean(axis=-1).min() >= embedded._MIN_PATCH_STD


def test_real_labels() -> None:
    digits = data.load_embedded("digits", "train")
    assert set(np.unique(digits.labels).tolist()) == set(range(10))
    faces = data.load_embedded("faces", "test")
    # lfw_subset: faces come first, labelled 1; non-faces labelled 0.
    assert faces.labels.tolist() == [1] * 20 + [0] * 20


def test_pseudo_labels_cover_all_classes() -> None:
    labels = data.load_embedded("patches", "train").labels
    counts = np.bincount(labels, minlength=10)
    assert counts.min() > 0.5 * counts.mean()


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_deterministic(name: str) -> None:
    embedded._cached_embedded.cache_clear()
    a = data.load_embedded(name, "train")
    embedded._cached_embedded.cache_clear()
    b = data.load_embedded(name, "train")
    assert a is not b
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.source_ids, b.source_ids)


def test_embedded_cached_arrays_read_only() -> None:
    ds = data.load_embedded("digits", "train")
    assert data.load_embedded("digits", "train") is ds
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 0.5


@pytest.mark.parametrize("name", EMBEDDED)
def test_channels(name: str) -> None:
    rgb = data.load_embedded(name, "test", channels=3)
    grey = data.load_embedded(name, "test", channels=1)
    assert grey.images.shape == rgb.images.shape[:3] + (1,)
    assert len(grey.mean) == len(grey.std) == 1
    assert grey.images.min() >= 0.0 and grey.images.max() <= 1.0
    np.testing.assert_array_equal(grey.labels, rgb.labels)
    if name != "patches":  # grey sources: the 3 channels repeat the grey one
        np.testing.assert_allclose(rgb.images, np.repeat(grey.images, 3, axis=-1), atol=1e-6)
    else:  # luma is a convex combination of R, G, B
        assert np.all(grey.images[..., 0] >= rgb.images.min(-1) - 1e-5)
        assert np.all(grey.images[..., 0] <= rgb.images.max(-1) + 1e-5)


@pytest.mark.parametrize("size", [16, 28, 64])
def test_patch_image_size_keeps_content(size: int) -> None:
    base = data.load_embedded("patches", "test")
    ds = data.load_embedded("patches", "test", image_size=size)
    assert ds.images.shape == (len(base), size, size, 3)
    # Same patches (same order/labels), only another resolution.
    np.testing.assert_array_equal(ds.labels, base.labels)
    np.testing.assert_array_equal(ds.source_ids, base.source_ids)
    back = dataset._resize(ds.images, 32, 32)
    assert np.abs(back - base.images).mean() < 0.05


@pytest.mark.parametrize("name", ["digits", "faces"])
def test_small_sources_resize(name: str) -> None:
    ds = data.load_embedded(name, "test", image_size=20, channels=1)
    assert ds.images.shape[1:] == (20, 20, 1)


def test_max_examples() -> None:
    ds = data.load_embedded("patches", "train", max_examples=7)
    full = data.load_embedded("patches", "train")
    assert len(ds) == 7
    np.testing.assert_array_equal(ds.images, full.images[:7])


def test_bad_embedded_args() -> None:
    with pytest.raises(ValueError, match="splits"):
        data.load_embedded("patches", "validation")
    with pytest.raises(ValueError, match="channels"):
        data.load_embedded("patches", channels=2)
    with pytest.raises(ValueError, match="unknown embedded"):
        data.load_embedded("cifar10")


# --------------------------------------------------------------------------
# ImageDataset helpers
# --------------------------------------------------------------------------


def test_take_subset() -> None:
    ds = data.load_embedded("faces", "train")
    sub = ds.subset([3, 0, 150])
    assert len(sub) == 3
    np.testing.assert_array_equal(sub.images[1], ds.images[0])
    assert sub.labels.tolist() == [1, 1, 0]
    assert len(ds.take(10)) == 10 and len(ds.take(10_000)) == len(ds)
    assert sub.mean == ds.mean and sub.num_classes == ds.num_classes


def test_batches_int_seed() -> None:
    ds = data.load_embedded("faces", "train")  # 160 examples
    batches = list(ds.batches(0, 64))
    assert len(batches) == 2  # the 32 left over are dropped
    assert all(x.shape == (64, 32, 32, 3) and y.shape == (64,) for x, y in batches)
    again = list(ds.batches(0, 64))
    np.testing.assert_array_equal(batches[0][1], again[0][1])
    assert len(list(ds.batches(0, 64, drop_remainder=False))) == 3
    ordered = next(ds.batches(None, 5))
    np.testing.assert_array_equal(ordered[0], ds.images[:5])


def test_batches_jax_key() -> None:
    import jax

    ds = data.load_embedded("faces", "test")  # 40 examples
    x, y = next(ds.batches(jax.random.key(1), 40))
    # A full-size batch is a permutation of the whole set.
    assert sorted(y.tolist()) == sorted(ds.labels.tolist())
    assert not np.array_equal(x, ds.images)


def test_dataset_validation() -> None:
    with pytest.raises(ValueError):
        data.ImageDataset(
            "x",
            np.zeros((2, 4, 4, 3), np.float32),
            np.zeros(3, np.int32),
            10,
            np.zeros(2, np.int32),
            (0.5,) * 3,
            (0.5,) * 3,
        )


# --------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", EMBEDDED)
@pytest.mark.parametrize("channels", [1, 3])
def test_normalization_matches_train_data(name: str, channels: int) -> None:
    ds = data.load_embedded(name, "train", channels=channels)
    mean, std = data.normalization(name, channels)
    assert ds.mean == mean and ds.std == std
    np.testing.assert_allclose(ds.images.mean(axis=(0, 1, 2)), mean, atol=1e-3)
    np.testing.assert_allclose(ds.images.std(axis=(0, 1, 2)), std, atol=1e-3)


def test_normalization_table() -> None:
    assert set(data.NORMALIZATION) == set(data.list_datasets())
    assert data.normalization("cifar10") == ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    assert data.normalization("mnist", 3)[0] == (0.1307,) * 3
    mean1, std1 = data.normalization("imagenet", 1)
    assert len(mean1) == len(std1) == 1 and 0.4 < mean1[0] < 0.5
    with pytest.raises(ValueError, match="no normalisation constants"):
        data.normalization("svhn")


# --------------------------------------------------------------------------
# TFDS loaders (mocked: no data on disk, no network)
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", TFDS_NAMES)
@pytest.mark.parametrize(("image_size", "channels"), [(32, 3), (24, 1)])
def test_tfds_mocked(name: str, image_size: int, channels: int, no_network: None) -> None:
    with tfds.testing.mock_data(num_examples=5):
        ds = data.load_dataset(name, "train", image_size=image_size, channels=channels)
        test = data.load_dataset(name, "test", image_size=image_size, max_examples=3)
    assert ds.images.shape == (5, image_size, image_size, channels)
    assert ds.images.dtype == np.float32
    assert 0.0 <= ds.images.min() and ds.images.max() <= 1.0
    assert ds.labels.dtype == np.int32
    assert 0 <= ds.labels.min() and ds.labels.max() < ds.num_classes
    assert (ds.mean, ds.std) == data.normalization(name, channels)
    assert test.images.shape == (3, image_size, image_size, 3)


@pytest.mark.parametrize(
    ("image_size", "tfds_name"),
    [(32, "imagenet_resized/32x32"), (64, "imagenet_resized/64x64"), (96, "imagenet2012")],
)
def test_imagenet_variant(image_size: int, tfds_name: str) -> None:
    assert tfds_loader._imagenet_tfds_name(image_size) == tfds_name
    with tfds.testing.mock_data(num_examples=2):
        ds = data.load_dataset("imagenet", "test", image_size=image_size)
    assert ds.images.shape == (2, image_size, image_size, 3) and ds.num_classes == 1000


def test_celeb_a_label_is_male_attribute() -> None:
    assert tfds_loader._celeba_label({"attributes": {"Male": np.True_}}) == 1
    assert tfds_loader._celeba_label({"attributes": {"Male": False}}) == 0


@pytest.mark.parametrize("name", ["cifar10", "imagenet"])
def test_tfds_missing_raises(name: str, tmp_path, no_network: None) -> None:
    with pytest.raises(data.DatasetUnavailableError) as info:
        data.load_dataset(name, "train", data_dir=tmp_path)
    message = str(info.value)
    assert name in message and str(tmp_path) in message
    assert "tfds build" in message and "patches" in message
    assert isinstance(info.value, RuntimeError)


# --------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------


def test_list_datasets() -> None:
    names = data.list_datasets()
    assert set(EMBEDDED) | set(TFDS_NAMES) == set(names)
    assert all(isinstance(d, str) and d for d in names.values())


def test_load_dataset_dispatch_and_unknown() -> None:
    ds = data.load_dataset("digits", "test", max_examples=4)
    assert ds.images.shape == (4, 32, 32, 3)
    with pytest.raises(ValueError, match="valid names") as info:
        data.load_dataset("not_a_dataset")
    assert "patches" in str(info.value) and "cifar10" in str(info.value)


# --------------------------------------------------------------------------
# Validation split and source photos
# --------------------------------------------------------------------------


def test_validation_split_holds_out_whole_train_photos() -> None:
    ds = data.load_dataset("patches", "train")
    fit, val = data.split_validation(ds)
    assert len(fit) + len(val) == len(ds) and len(val) == 263 and len(fit) == 1161
    sources = embedded._PHOTO_SOURCES["patches"]["train"]
    assert {sources[i] for i in set(val.source_ids.tolist())} == set(data.VALIDATION_SOURCES["patches"])
    assert not set(val.source_ids.tolist()) & set(fit.source_ids.tolist())
    digits_fit, digits_val = data.split_validation(data.load_dataset("digits", "train"))
    assert len(digits_val) == 150 and len(digits_fit) == 1350
    assert not set(digits_val.source_ids.tolist()) & set(digits_fit.source_ids.tolist())


def test_source_photos_are_the_full_resolution_train_photos() -> None:
    photos = data.source_photos("patches")
    assert len(photos) == 6 and all(p.dtype == np.float32 and p.shape[-1] == 3 for p in photos)
    assert max(p.shape[0] for p in photos) == 1411  # retina, native size
    grey = data.source_photos("textures", channels=1)
    assert len(grey) == 5 and all(p.shape[-1] == 1 for p in grey)
    with pytest.raises(ValueError, match="no source photos"):
        data.source_photos("digits")
