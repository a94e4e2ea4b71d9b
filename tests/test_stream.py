"""The streaming auxiliary source: no repeats, purity, spectra, photo/validation split, dataset path."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from gitjax import data, stream
from gitjax.data import embedded
from gitjax.stream import StreamConfig

MIX = StreamConfig(photos=2, dead_leaves=1, spectral=1)
HW = (32, 32)
# Radially averaged power-spectrum slope of 1/f^alpha fields, fitted over 2-12 cycles per
# image on 32 px: measured within 0.05 of -alpha for the raw fields (mean of 64), within
# 0.1 after colouring and clipping; the margins below are 3x that.
RAW_SLOPE_TOL = 0.15
IMAGE_SLOPE_TOL = 0.3


@pytest.fixture(scope="module")
def photo_sources():
    return jax.device_put(stream.make_sources(MIX, photos=data.source_photos("patches")))


def _slope(x_NxHxW: np.ndarray) -> float:
    """Slope of log power vs log radial frequency (2..H/2-4 cycles per image), averaged over images."""
    n, h, w = x_NxHxW.shape
    x = x_NxHxW - x_NxHxW.mean(axis=(1, 2), keepdims=True)
    power = np.mean(np.abs(np.fft.fft2(x)) ** 2, axis=0)
    fy, fx = np.meshgrid(np.fft.fftfreq(h) * h, np.fft.fftfreq(w) * w, indexing="ij")
    r = np.rint(np.hypot(fy, fx)).astype(int)
    radii = np.arange(2, h // 2 - 3)
    radial = np.array([power[r == k].mean() for k in radii])
    return float(np.polyfit(np.log(radii), np.log(radial), 1)[0])


def _hashes(x_NxHxWxC: np.ndarray) -> list[str]:
    return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in x_NxHxWxC]


def test_stream_never_repeats_an_image(photo_sources):
    draw = jax.jit(lambda s, k: stream.make_draw(MIX, (32, 32, 3), 10)(s, k, 64))
    seen = []
    key = jax.random.PRNGKey(0)
    for step in range(40):  # 2560 images: 1280 photo crops, 640 dead leaves, 640 noise
        x, y = draw(photo_sources, stream.stream_key(jax.random.fold_in(key, step)))
        x = np.asarray(x)
        assert x.shape == (64, 32, 32, 3) and x.min() >= 0.0 and x.max() <= 1.0
        assert np.asarray(y).min() >= 0 and np.asarray(y).max() < 10
        seen += _hashes(x)
    assert len(set(seen)) == len(seen), f"{len(seen) - len(set(seen))} repeated images"


def test_stream_is_a_pure_function_of_its_key(photo_sources):
    draw = jax.jit(lambda s, k: stream.make_draw(MIX, (32, 32, 3), 10)(s, k, 16))
    a = [np.asarray(v) for v in draw(photo_sources, jax.random.PRNGKey(3))]
    b = [np.asarray(v) for v in draw(photo_sources, jax.random.PRNGKey(3))]
    c = np.asarray(draw(photo_sources, jax.random.PRNGKey(4))[0])
    assert all(np.array_equal(u, v) for u, v in zip(a, b))
    assert not np.array_equal(a[0], c)
    assert stream.component_counts(MIX, 16) == {"photos": 8, "dead_leaves": 4, "spectral": 4}
    assert sum(stream.component_counts(StreamConfig(photos=1, spectral=1, dead_leaves=1), 64).values()) == 64


@pytest.mark.parametrize("alpha", [1.0, 2.0, 3.0])
def test_spectral_fields_have_the_intended_slope(alpha):
    f = np.asarray(stream.spectral_fields(jax.random.PRNGKey(0), 64, HW, jnp.full((64,), alpha)))
    assert abs(_slope(f) + alpha) < RAW_SLOPE_TOL, (_slope(f), alpha)


def test_spectral_noise_images_keep_their_slope():
    x = np.asarray(stream.spectral_noise(jax.random.PRNGKey(1), 64, HW, 3, alpha=(2.0, 2.0)))
    luma = x @ np.asarray(data.LUMA_WEIGHTS, np.float32)
    assert abs(_slope(luma) + 2.0) < IMAGE_SLOPE_TOL, _slope(luma)
    assert 0.05 < float(luma.std(axis=(1, 2)).mean()) < 0.3  # a visible, unclipped texture


def test_dead_leaves_are_scale_invariant_like_natural_images():
    x = np.asarray(stream.dead_leaves(jax.random.PRNGKey(2), 64, HW, 3))
    luma = x @ np.asarray(data.LUMA_WEIGHTS, np.float32)
    s = _slope(luma)
    # Natural images and dead leaves: ~ -2 (Ruderman 1997); white noise would be 0.
    assert -3.0 < s < -1.4, s
    patches = data.load_dataset("patches", "test").images @ np.asarray(data.LUMA_WEIGHTS, np.float32)
    print(f"dead leaves slope {s:.2f}, test patches slope {_slope(patches):.2f}")


def test_photo_crops_come_from_train_photos_only():
    photos = data.source_photos("patches")
    held_out = data.source_photos("patches", exclude_validation=False)
    assert len(held_out) == len(photos) + len(data.VALIDATION_SOURCES["patches"])
    assert min(min(p.shape[:2]) for p in photos) >= 300  # full resolution, not the 128 px grid
    # The validation photo is not among the stream's photos.
    val = embedded._load_source_photo(data.VALIDATION_SOURCES["patches"][0])
    assert not any(p.shape == val.shape and np.array_equal(p, val) for p in photos)
    # A crop's pixels are pixels of its photo at some scale: colour range stays inside the photo's.
    atlas = stream.build_atlas(photos[:1])
    x, p = stream.render_crop(jnp.full((10,), 0.5), jax.device_put(atlas), HW, (0.1, 0.5), 4 / 3, True, 0.0)
    assert int(p) == 0 and float(x.min()) >= photos[0].min() - 1e-6 and float(x.max()) <= photos[0].max() + 1e-6


def test_atlas_levels_are_box_filtered_halves():
    img = np.random.default_rng(0).random((70, 45, 3)).astype(np.float32)
    atlas = stream.build_atlas([img], min_side=8)
    assert int(atlas.levels[0]) == 3 and tuple(atlas.height[0, :3]) == (70, 35, 18)
    lvl1 = atlas.pixels[atlas.offset[0, 1]: atlas.offset[0, 1] + 35 * 23].reshape(35, 23, 3)
    np.testing.assert_allclose(lvl1[0, 0], img[:2, :2].mean(axis=(0, 1)), rtol=1e-6)
    # A crop of the whole image at its own size reproduces it (level 0, pixel centres).
    whole, _ = stream.render_crop(jnp.array([0.0, 1.0, 0.5, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.0]),
                                  jax.device_put(stream.build_atlas([img[:32, :32]])), HW, (1.0, 1.0), 1.0,
                                  False, 0.0)
    np.testing.assert_allclose(np.asarray(whole), img[:32, :32], atol=1e-5)


def test_dataset_component_reads_a_tfds_dataset():
    with tfds.testing.mock_data(num_examples=40):
        ds = data.load_dataset("cifar10", "train")
    fit, val = data.split_validation(ds)
    assert len(fit) == 36 and len(val) == 4
    assert not set(val.source_ids.tolist()) & set(fit.source_ids.tolist())
    for augment in (True, False):
        cfg = StreamConfig(dataset=1.0, dataset_augment=augment)
        src = jax.device_put(stream.make_sources(cfg, dataset_images=fit.images, dataset_labels=fit.labels))
        x, y = jax.jit(lambda s, k: stream.make_draw(cfg, (32, 32, 3), 10)(s, k, 64))(src, jax.random.PRNGKey(0))
        x, y = np.asarray(x), np.asarray(y)
        # Which fit image each drawn one is (exactly, or nearest after augmentation).
        d = ((x[:, None] - fit.images[None]) ** 2).mean(axis=(2, 3, 4))
        nearest = d.argmin(axis=1)
        if augment:
            assert len(set(_hashes(x))) == 64 and d.min(axis=1).max() > 0  # continuous crops: new images
        else:
            assert d.min(axis=1).max() < 1e-10  # the stored images themselves
            np.testing.assert_array_equal(y, fit.labels[nearest])  # with their labels
        assert set(y.tolist()) <= set(fit.labels.tolist())


def test_stream_config_problems_are_named():
    assert StreamConfig().problems() == [] and not StreamConfig().enabled
    bad = StreamConfig(photos=-1, crop_side=(0.5, 0.1), jitter=1.5)
    msg = " ".join(bad.problems())
    assert "weights must be >= 0" in msg and "crop_side" in msg and "jitter" in msg
    with pytest.raises(ValueError, match="needs source photos"):
        stream.make_sources(StreamConfig(photos=1))
