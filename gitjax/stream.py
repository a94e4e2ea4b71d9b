"""The streaming auxiliary source: every training image is drawn fresh, inside the jitted step.

A GIT prior trained on a fixed set of ~1.4k patches overfits (issue 10): data is the lever.
This module draws an unlimited stream of training images as a pure function of a PRNG key
(the trainer derives it from its per-step key, a pure function of (seed, step), so a
resumed run sees bit-identical data), mixing
four components by ``StreamConfig`` weights:

* ``photos``: random-resized crops of every bundled train photograph at full resolution
  (``gitjax.data.source_photos``; the validation photo is never cropped): random photo,
  log-uniform crop side, aspect ratio, continuous position, horizontal flip and mild
  brightness / contrast / saturation jitter. Crops are rendered from a mip pyramid (box
  filtered, 2x per level) by bilinear sampling at the level nearest the output's pixel
  pitch, so shrinking a 1411 px crop costs as little as a 32 px one and barely aliases. Near-flat
  crops (black sky, dark rims) are redrawn, like the patches dataset's std filter.
* ``dead_leaves``: the dead-leaves occlusion model (Matheron 1968; Lee, Mumford & Huang
  2001): opaque discs of random colour with radii ~ r^-3 stacked until the image is covered;
  scale invariant, so its power spectrum falls close to 1/f^2, as natural images' do.
* ``spectral``: Gaussian noise with a 1/f^alpha power spectrum, alpha drawn per image
  (Baradad et al. 2021, "Learning to See by Looking at Noise"), one luminance field plus two
  weaker chroma fields, random mean colour and contrast.
* ``dataset``: images of a loaded ``ImageDataset`` (the config's dataset minus its validation
  part: cifar10 from tfds, ...), optionally with the same continuous crop / flip / jitter
  augmentation (then no image repeats either; without it the dataset's images repeat).

Labels: photo crops and procedural images have no class, so each gets a pseudo label drawn
uniformly in [0, num_classes) from the same key (fixed by (seed, step, slot), like the
embedded patches' fixed random labels); dataset images keep their labels.

Every component is a pure ``jax`` function of its key with static shapes: the per-step
counts are fixed by the weights (largest remainder), the images are concatenated and
shuffled, so the N*B slots of a step mix components. No host round-trip; any image comes
from continuous random parameters, so no image repeats within a run (tests/test_stream.py
hashes thousands).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.types import Array, PRNGKey

COMPONENTS = ("photos", "dead_leaves", "spectral", "dataset")
# Same threshold as the patches dataset's filter (gitjax.data.embedded._MIN_PATCH_STD).
MIN_CROP_STD = 0.02
_CROP_TRIES = 2  # candidates per photo slot; the first that is not flat is kept
_STREAM_SALT = 0x57EA


@dataclasses.dataclass(frozen=True)
class StreamConfig:
    """The mix and the augmentation of the streaming training source (all weights 0: off).

    Attributes:
      photos, dead_leaves, spectral, dataset: relative weights of the components; each
        step's N*B images are split between them in these proportions (fixed counts).
      crop_side: (low, high) crop side as a fraction of the photo's short side, drawn
        log-uniformly (the ``patches`` test crops are 1/6 to 1/4 of theirs); never below
        the output size in source pixels (no upscaling).
      aspect: crops have aspect ratio (h/w) log-uniform in [1/aspect, aspect].
      flip: mirror half of the crops left-right.
      jitter: brightness, contrast and saturation each scaled by a factor in [1-jitter, 1+jitter].
      dataset_crop: (low, high) crop side of dataset images as a fraction of their side.
      dataset_augment: crop / flip / jitter the dataset images (False: as stored).
      leaves: discs per dead-leaves image; leaf_radius: (low, high) radius range as a
        fraction of the image side, density ~ r^-3.
      spectral_alpha: (low, high) range of the power-spectrum exponent alpha (1/f^alpha;
        natural images ~2).
    """

    photos: float = 0.0
    dead_leaves: float = 0.0
    spectral: float = 0.0
    dataset: float = 0.0
    crop_side: tuple[float, float] = (1 / 16, 1 / 2)
    aspect: float = 4 / 3
    flip: bool = True
    jitter: float = 0.1
    dataset_crop: tuple[float, float] = (0.7, 1.0)
    dataset_augment: bool = True
    leaves: int = 96
    leaf_radius: tuple[float, float] = (0.05, 0.6)
    spectral_alpha: tuple[float, float] = (1.5, 2.5)

    def __post_init__(self) -> None:
        for name in COMPONENTS + ("aspect", "jitter"):
            object.__setattr__(self, name, float(getattr(self, name)))
        for name in ("crop_side", "dataset_crop", "leaf_radius", "spectral_alpha"):
            object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))

    @property
    def enabled(self) -> bool:
        return self.total > 0

    @property
    def total(self) -> float:
        return float(sum(getattr(self, c) for c in COMPONENTS))

    def problems(self) -> list[str]:
        """Inconsistent fields, one phrase each (TrainConfig.validate reports them)."""
        out = []
        if any(getattr(self, c) < 0 for c in COMPONENTS):
            out.append(f"stream weights must be >= 0, got {[getattr(self, c) for c in COMPONENTS]}")
        for name, lo_min in (("crop_side", 0.0), ("dataset_crop", 0.0), ("leaf_radius", 0.0)):
            v = getattr(self, name)
            if len(v) != 2 or not lo_min < v[0] <= v[1] <= 1.0:
                out.append(f"stream.{name} must be (low, high) with 0 < low <= high <= 1, got {v}")
        a = self.spectral_alpha
        if len(a) != 2 or not 0.0 <= a[0] <= a[1] <= 6.0:
            out.append(f"stream.spectral_alpha must be (low, high) with 0 <= low <= high <= 6, got {a}")
        if self.aspect < 1.0:
            out.append(f"stream.aspect must be >= 1, got {self.aspect}")
        if not 0.0 <= self.jitter < 1.0:
            out.append(f"stream.jitter must be in [0, 1), got {self.jitter}")
        if self.leaves < 1:
            out.append(f"stream.leaves must be >= 1, got {self.leaves}")
        return out


def component_counts(config: StreamConfig, total: int) -> dict[str, int]:
    """Images per component in one draw of ``total``: proportional, largest remainder, sum = total."""
    w = np.array([getattr(config, c) for c in COMPONENTS], np.float64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return {c: int(n) for c, n in zip(COMPONENTS, counts) if n > 0}


def stream_key(step_key: PRNGKey) -> PRNGKey:
    """The key of one step's images, derived from the trainer's per-step key.

    The trainer's key at step t is a pure function of (seed, t), so the images are too
    (exact resume); folding in a salt keeps them independent of the step's other draws.
    """
    return jax.random.fold_in(step_key, _STREAM_SALT)


def _uniform(key: PRNGKey, shape: tuple[int, ...], lo: float = 0.0, hi: float = 1.0) -> Array:
    # One 1-D draw reshaped: XLA:CPU compiles threefry over 3-D/4-D shapes several times slower.
    return jax.random.uniform(key, (math.prod(shape),), minval=lo, maxval=hi).reshape(shape)


def _normal(key: PRNGKey, shape: tuple[int, ...]) -> Array:
    return jax.random.normal(key, (math.prod(shape),)).reshape(shape)


# ----------------------------------------------------------------------------- image atlas


class Atlas(NamedTuple):
    """Images of different sizes (and their mip levels) packed in one flat buffer (a pytree).

    pixels: (T, C) float32, every level of every image, row-major, concatenated.
    offset, height, width: (P, L) int32, where level l of image p starts in ``pixels`` and
      its size (level l is level 0 box-downsampled by 2^l).
    levels: (P,) int32, valid levels of image p (>= 1).
    """

    pixels: Array
    offset: Array
    height: Array
    width: Array
    levels: Array


def build_atlas(images: Sequence[np.ndarray], min_side: int = 32, max_levels: int = 8) -> Atlas:
    """Packs (H, W, C) float images (host numpy) with mip levels down to a short side >= ``min_side``.

    All images must have the same C. Level l + 1 is the 2x2 mean of level l (odd edges
    replicated), so level l holds the image box-filtered to 1/2^l of its size.
    """
    if not len(images):
        raise ValueError("build_atlas needs at least one image")
    chans = {int(im.shape[-1]) for im in images}
    if len(chans) != 1:
        raise ValueError(f"all atlas images need the same channel count; got {sorted(chans)}")
    chunks, offs, hs, ws, nlev = [], [], [], [], []
    start = 0
    for im in images:
        level = np.asarray(im, np.float32)
        o, h, w = [], [], []
        for _ in range(max_levels):
            o.append(start), h.append(level.shape[0]), w.append(level.shape[1])
            chunks.append(level.reshape(-1, level.shape[-1]))
            start += level.shape[0] * level.shape[1]
            if min(level.shape[:2]) // 2 < min_side:
                break
            ph, pw = level.shape[0] % 2, level.shape[1] % 2
            level = np.pad(level, ((0, ph), (0, pw), (0, 0)), mode="edge")
            level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, -1).mean(axis=(1, 3))
        nlev.append(len(o))
        pad = max_levels - len(o)
        offs.append(o + [o[-1]] * pad), hs.append(h + [h[-1]] * pad), ws.append(w + [w[-1]] * pad)
    return Atlas(np.concatenate(chunks).astype(np.float32), np.asarray(offs, np.int32),
                 np.asarray(hs, np.int32), np.asarray(ws, np.int32), np.asarray(nlev, np.int32))


def _bilinear(atlas: Atlas, p: Array, level: Array, y: Array, x: Array) -> Array:
    """Samples level ``level`` of image ``p`` at continuous level-0 pixel coordinates (y, x).

    p, level: scalars; y (Hs,), x (Ws,) level-0 coordinates (pixel centres at k + 0.5).
    Returns (Hs, Ws, C). Coordinates outside the image are clamped to its edge. Each row
    of the 2x2 neighbourhood is one 2-pixel slice of the flat buffer (half the gathers).
    """
    h, w, off = atlas.height[p, level], atlas.width[p, level], atlas.offset[p, level]
    s = jnp.exp2(level.astype(jnp.float32))
    u = jnp.clip(y / s - 0.5, 0.0, (h - 1).astype(jnp.float32))  # level-l index coordinates
    v = jnp.clip(x / s - 0.5, 0.0, (w - 1).astype(jnp.float32))
    iu0 = jnp.minimum(jnp.floor(u).astype(jnp.int32), jnp.maximum(h - 2, 0))
    iv0 = jnp.minimum(jnp.floor(v).astype(jnp.int32), jnp.maximum(w - 2, 0))
    fu = jnp.clip(u - iu0, 0.0, 1.0)[:, None, None]
    fv = jnp.clip(v - iv0, 0.0, 1.0)[None, :, None]
    iu1 = jnp.minimum(iu0 + 1, h - 1)
    c = atlas.pixels.shape[-1]
    dnums = jax.lax.GatherDimensionNumbers(offset_dims=(2, 3), collapsed_slice_dims=(), start_index_map=(0,))

    def pair(iu: Array) -> Array:  # (Hs, Ws, 2, C): pixels (iu, iv0) and (iu, iv0 + 1)
        start = (off + iu[:, None] * w + iv0[None, :])[..., None]
        return jax.lax.gather(atlas.pixels, start, dnums, slice_sizes=(2, c),
                              mode=jax.lax.GatherScatterMode.CLIP)

    top, bot = pair(iu0), pair(iu1)
    top = top[:, :, 0] * (1 - fv) + top[:, :, 1] * fv
    bot = bot[:, :, 0] * (1 - fv) + bot[:, :, 1] * fv
    return top * (1 - fu) + bot * fu


_CROP_UNIFORMS = 10  # uniforms one crop consumes (photo, side, aspect, y, x, flip, 3 x jitter, spare)


def _jitter(u_3: Array, x_HxWxC: Array, amount: float) -> Array:
    """Brightness, contrast and saturation each scaled by 1 + amount * (2u - 1), u from ``u_3``."""
    if amount <= 0:
        return x_HxWxC
    b, c, s = 1.0 + amount * (2.0 * u_3 - 1.0)
    x = x_HxWxC * b
    x = jnp.mean(x) + c * (x - jnp.mean(x))
    grey = jnp.mean(x, axis=-1, keepdims=True)
    x = grey + s * (x - grey)
    return jnp.clip(x, 0.0, 1.0)


def render_crop(u: Array, atlas: Atlas, out_hw: tuple[int, int], side: tuple[float, float],
                aspect: float, flip: bool, jitter: float) -> tuple[Array, Array]:
    """One random-resized crop of an atlas image from ``_CROP_UNIFORMS`` uniforms ``u``: ((H, W, C), p).

    The image p is uniform over the atlas; the crop side log-uniform in ``side`` x the
    image's short side (at least the output size, so never upscaled when the image is large
    enough), the aspect ratio log-uniform in [1/aspect, aspect], the position uniform
    (continuous). It is sampled bilinearly from the mip level whose pixel pitch is nearest
    the output's (box-filtered by the pyramid: little aliasing however large the crop, and
    the cost of a 32 px crop). Taking uniforms rather than a key
    lets callers draw all crops' randomness in one op (fast to compile on CPU).
    """
    out_h, out_w = out_hw
    n_img = atlas.offset.shape[0]
    p = jnp.minimum((u[0] * n_img).astype(jnp.int32), n_img - 1)
    h = atlas.height[p, 0].astype(jnp.float32)
    w = atlas.width[p, 0].astype(jnp.float32)
    short = jnp.minimum(h, w)
    lo, hi = math.log(side[0]), math.log(side[1])
    s = short * jnp.exp(lo + u[1] * (hi - lo))
    s = jnp.minimum(jnp.maximum(s, float(min(out_h, out_w))), short)
    r = jnp.exp(math.log(aspect) * (2.0 * u[2] - 1.0))
    ch, cw = jnp.minimum(s * jnp.sqrt(r), h), jnp.minimum(s / jnp.sqrt(r), w)
    top, left = u[3] * (h - ch), u[4] * (w - cw)
    # The mip level whose pixel pitch is nearest the output's (crop pixels per output pixel
    # in [0.71, 1.41]): bilinear sampling there barely aliases (mip-mapping).
    ratio = jnp.minimum(ch / out_h, cw / out_w)
    level = jnp.clip(jnp.round(jnp.log2(jnp.maximum(ratio, 1.0))).astype(jnp.int32), 0, atlas.levels[p] - 1)
    fy = (jnp.arange(out_h) + 0.5) / out_h
    fx = (jnp.arange(out_w) + 0.5) / out_w
    if flip:
        fx = jnp.where(u[5] < 0.5, 1.0 - fx, fx)
    x = _bilinear(atlas, p, level, top + fy * ch, left + fx * cw)
    return _jitter(u[6:9], x, jitter), p


def photo_crops(key: PRNGKey, atlas: Atlas, count: int, out_hw: tuple[int, int], config: StreamConfig
                ) -> Array:
    """(count, H, W, C) crops of the photos; each slot keeps the first of 2 candidates with std >= 0.02."""
    u_NxTxU = _uniform(key, (count, _CROP_TRIES, _CROP_UNIFORMS))
    crop = lambda u: render_crop(u, atlas, out_hw, config.crop_side, config.aspect, config.flip,  # noqa: E731
                                 config.jitter)[0]
    x_NxTxHxWxC = jax.vmap(jax.vmap(crop))(u_NxTxU)
    std_NxT = jnp.mean(jnp.std(x_NxTxHxWxC, axis=(2, 3)), axis=-1)
    pick_N = jnp.argmax(std_NxT >= MIN_CROP_STD, axis=1)  # 0 when none passes
    return jnp.take_along_axis(x_NxTxHxWxC, pick_N[:, None, None, None, None], axis=1)[:, 0]


def dataset_images(key: PRNGKey, atlas: Atlas, labels: Array, count: int, out_hw: tuple[int, int],
                   config: StreamConfig) -> tuple[Array, Array]:
    """(count, H, W, C) images of a dataset atlas with their labels; augmented if ``dataset_augment``."""
    if config.dataset_augment:
        u_NxU = _uniform(key, (count, _CROP_UNIFORMS))
        x, p = jax.vmap(lambda u: render_crop(u, atlas, out_hw, config.dataset_crop, config.aspect,
                                              config.flip, config.jitter))(u_NxU)
        return x, labels[p]
    n_img = atlas.offset.shape[0]
    p = jnp.minimum((_uniform(key, (count,)) * n_img).astype(jnp.int32), n_img - 1)
    ys, xs = jnp.arange(out_hw[0]) + 0.5, jnp.arange(out_hw[1]) + 0.5
    x = jax.vmap(lambda i: _bilinear(atlas, i, jnp.int32(0), ys, xs))(p)
    return x, labels[p]


# ----------------------------------------------------------------------------- procedural images


def dead_leaves(key: PRNGKey, count: int, out_hw: tuple[int, int], channels: int, leaves: int = 96,
                radius: tuple[float, float] = (0.05, 0.6)) -> Array:
    """(count, H, W, C) dead-leaves images in [0, 1].

    ``leaves`` opaque discs per image, centres uniform over (a margin around) the image,
    radii with density ~ r^-3 on ``radius`` x the image side (inverse-CDF draw), each of a
    random, moderately saturated colour; the later disc covers the earlier, a random colour
    fills what no disc covers. Hard edges, one sample per pixel.
    """
    h, w = out_hw
    side = float(max(h, w))
    k_c, k_r, k_col, k_g = jax.random.split(key, 4)
    centre_NxLx2 = _uniform(k_c, (count, leaves, 2), -0.1, 1.1) * jnp.array([h, w], jnp.float32)
    a, b = radius[0] ** -2, radius[1] ** -2
    r_NxL = side * (a - _uniform(k_r, (count, leaves)) * (a - b)) ** -0.5  # density ~ r^-3
    grey = _uniform(k_g, (count, leaves + 1, 1))
    colour_NxLxC = jnp.clip(grey + 0.25 * _normal(k_col, (count, leaves + 1, channels)), 0.0, 1.0)
    ys, xs = jnp.arange(h) + 0.5, jnp.arange(w) + 0.5

    def one(centre_Lx2: Array, r_L: Array, colour_LxC: Array) -> Array:
        d2_LxHxW = (ys[None, :, None] - centre_Lx2[:, 0, None, None]) ** 2 + \
                   (xs[None, None, :] - centre_Lx2[:, 1, None, None]) ** 2
        inside_LxHxW = d2_LxHxW <= r_L[:, None, None] ** 2
        # Index of the last disc covering each pixel (0 = background), then its colour.
        idx_HxW = jnp.max(jnp.where(inside_LxHxW, jnp.arange(1, leaves + 1)[:, None, None], 0), axis=0)
        return colour_LxC[idx_HxW]

    return jax.vmap(one)(centre_NxLx2, r_NxL, colour_NxLxC)


def spectral_fields(key: PRNGKey, count: int, out_hw: tuple[int, int], alpha_N: Array) -> Array:
    """(count, H, W) zero-mean, unit-std Gaussian fields with power spectrum ~ 1/f^alpha (DC removed)."""
    h, w = out_hw
    f = jnp.sqrt(jnp.fft.fftfreq(h)[:, None] ** 2 + jnp.fft.fftfreq(w)[None, :] ** 2)
    log_f = jnp.log(jnp.where(f > 0, f, 1.0))
    amp_NxHxW = jnp.where(f > 0, jnp.exp(-0.5 * alpha_N[:, None, None] * log_f), 0.0)
    white = _normal(key, (count, h, w))
    field = jnp.real(jnp.fft.ifft2(jnp.fft.fft2(white) * amp_NxHxW))
    field = field - jnp.mean(field, axis=(1, 2), keepdims=True)
    return field / (jnp.std(field, axis=(1, 2), keepdims=True) + 1e-8)


def spectral_noise(key: PRNGKey, count: int, out_hw: tuple[int, int], channels: int,
                   alpha: tuple[float, float] = (1.5, 2.5)) -> Array:
    """(count, H, W, C) coloured 1/f^alpha noise images in [0, 1] (Baradad et al. 2021).

    alpha uniform in ``alpha`` per image; a luminance field (all channels) plus two chroma
    fields at 0.3 of its amplitude, the same alpha; random mean colour in [0.3, 0.7] and
    contrast (std) in [0.08, 0.2], so clipping to [0, 1] is rare and the spectrum survives.
    """
    k_a, k_f, k_m, k_s = jax.random.split(key, 4)
    alpha_N = _uniform(k_a, (count,), alpha[0], alpha[1])
    fields = spectral_fields(k_f, 3 * count, out_hw, jnp.repeat(alpha_N, 3)).reshape(count, 3, *out_hw)
    lum = fields[:, 0, :, :, None]
    if channels == 1:
        x = lum
    else:
        # Two opponent chroma axes (red-green, blue-yellow), weaker than luminance.
        opp = jnp.array([[1.0, -1.0, 0.0], [0.5, 0.5, -1.0]])[:, :channels]
        x = lum + 0.3 * jnp.einsum("nkhw,kc->nhwc", fields[:, 1:], opp)
    mean = _uniform(k_m, (count, 1, 1, channels), 0.3, 0.7)
    std = _uniform(k_s, (count, 1, 1, 1), 0.08, 0.2)
    return jnp.clip(mean + std * x, 0.0, 1.0)


# ----------------------------------------------------------------------------- the mixed source


class StreamSources(NamedTuple):
    """Device-side inputs of the stream (a pytree; None for an unused component)."""

    photos: Atlas | None
    dataset: Atlas | None
    dataset_labels: Array | None


def make_sources(config: StreamConfig, photos: Sequence[np.ndarray] | None = None,
                 dataset_images: np.ndarray | None = None, dataset_labels: np.ndarray | None = None,
                 out_side: int = 32) -> StreamSources:
    """Host arrays for the components the config uses (pass the photos / dataset it needs)."""
    if config.photos > 0 and not photos:
        raise ValueError("stream.photos > 0 needs source photos (gitjax.data.source_photos); "
                         "use a photo dataset (patches, textures) or set stream.photos=0")
    if config.dataset > 0 and (dataset_images is None or not len(dataset_images)):
        raise ValueError("stream.dataset > 0 needs a non-empty dataset train split")
    p = build_atlas(photos, min_side=out_side) if config.photos > 0 else None
    d = None
    if config.dataset > 0:
        d = build_atlas(list(dataset_images), min_side=out_side, max_levels=1)
        dataset_labels = np.asarray(dataset_labels, np.int32)
    return StreamSources(p, d, dataset_labels if config.dataset > 0 else None)


def make_draw(config: StreamConfig, image_shape: tuple[int, int, int], num_classes: int
              ) -> Callable[[StreamSources, PRNGKey, int], tuple[Array, Array]]:
    """``draw(sources, key, count) -> (x (count, H, W, C) float32 in [0, 1], y (count,) int32)``.

    Pure and jittable (count static). The counts per component are fixed by the weights;
    the images are concatenated in COMPONENTS order and shuffled with the key.
    """
    if not config.enabled:
        raise ValueError("the stream has no component with a positive weight")
    h, w, c = image_shape
    hw = (int(h), int(w))

    def draw(sources: StreamSources, key: PRNGKey, count: int) -> tuple[Array, Array]:
        counts = component_counts(config, count)
        k_labels, k_perm, *k_comp = jax.random.split(key, 2 + len(COMPONENTS))
        xs, ys = [], []
        pseudo = jnp.minimum((_uniform(k_labels, (count,)) * num_classes).astype(jnp.int32), num_classes - 1)
        start = 0
        for name, k in zip(COMPONENTS, k_comp):
            n = counts.get(name, 0)
            if not n:
                continue
            y = pseudo[start: start + n]
            if name == "photos":
                x = photo_crops(k, sources.photos, n, hw, config)
            elif name == "dead_leaves":
                x = dead_leaves(k, n, hw, c, config.leaves, config.leaf_radius)
            elif name == "spectral":
                x = spectral_noise(k, n, hw, c, config.spectral_alpha)
            else:
                x, y = dataset_images(k, sources.dataset, sources.dataset_labels, n, hw, config)
            xs.append(x), ys.append(y)
            start += n
        perm = jnp.argsort(_uniform(k_perm, (count,)))  # a uniform random permutation
        x = jnp.concatenate(xs)[perm].astype(jnp.float32)
        y = jnp.concatenate(ys)[perm].astype(jnp.int32)
        return x, y

    return draw
