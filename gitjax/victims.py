"""The victim model zoo: the models whose gradients leak.

Every victim takes images in [0, 1] (NHWC) and normalises them itself with its
dataset's per-channel mean/std, so attacks optimise and clamp in pixel space.

A victim is used through pure functions only::

    victim = make_victim("lenet")
    params, state = victim.init(key)
    logits_BxK = victim.apply(params, state, x_BxHxWxC)            # eval mode
    logits_BxK = victim.apply(params, state, x_BxHxWxC, train=True) # BN uses batch stats

BatchNorm: ``train=False`` (the default) normalises with the running statistics
in ``state["batch_stats"]`` so each example's gradient depends on that example
alone; ``train=True`` normalises with the statistics of the batch passed in, as
a client that trains in train mode would, which mixes the examples of a batch.
The running statistics are never updated by ``apply`` (a leaked gradient does
not carry them).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from gitjax.types import Array, InputShapeError, ModelState, Params, PRNGKey


# ----------------------------------------------------------------------------- models


class MLP(nn.Module):
    """Fully connected classifier: flatten -> [Dense -> act] * len(widths) -> Dense."""

    widths: Sequence[int] = (256, 128)
    num_classes: int = 10
    activation: Callable[[Array], Array] = nn.relu

    @nn.compact
    def __call__(self, x_BxHxWxC: Array, train: bool = False) -> Array:
        h_BxD = x_BxHxWxC.reshape((x_BxHxWxC.shape[0], -1))
        for i, width in enumerate(self.widths):
            h_BxD = self.activation(nn.Dense(width, name=f"dense{i}")(h_BxD))
        return nn.Dense(self.num_classes, name="head")(h_BxD)


class LeNet(nn.Module):
    """LeNet as used by DLG (Zhu et al. 2019): three 5x5 convs with sigmoids, one dense.

    Strides 2, 2, 1 and 12 channels; the sigmoid keeps the network twice
    differentiable everywhere, which gradient-matching attacks need.
    """

    channels: int = 12
    num_classes: int = 10

    @nn.compact
    def __call__(self, x_BxHxWxC: Array, train: bool = False) -> Array:
        h = x_BxHxWxC
        for i, stride in enumerate((2, 2, 1)):
            h = nn.Conv(self.channels, (5, 5), strides=stride, padding=2, name=f"conv{i}")(h)
            h = nn.sigmoid(h)
        h_BxD = h.reshape((h.shape[0], -1))
        return nn.Dense(self.num_classes, name="head")(h_BxD)


def _norm_layer(kind: str, train: bool, name: str) -> Callable[[Array], Array]:
    if kind == "batch":
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)
    if kind == "group":
        return nn.GroupNorm(num_groups=None, group_size=8, name=name)
    if kind == "none":
        return lambda h: h
    raise ValueError(f"unknown norm {kind!r}; expected 'batch', 'group' or 'none'")


class BasicBlock(nn.Module):
    """ResNet basic block: conv-norm-relu-conv-norm plus a (projected) shortcut."""

    features: int
    stride: int = 1
    norm: str = "batch"

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        use_bias = self.norm == "none"
        h = nn.Conv(self.features, (3, 3), self.stride, padding=1, use_bias=use_bias, name="conv1")(x)
        h = nn.relu(_norm_layer(self.norm, train, "norm1")(h))
        h = nn.Conv(self.features, (3, 3), 1, padding=1, use_bias=use_bias, name="conv2")(h)
        h = _norm_layer(self.norm, train, "norm2")(h)
        shortcut = x
        if self.stride != 1 or x.shape[-1] != self.features:
            shortcut = nn.Conv(self.features, (1, 1), self.stride, use_bias=use_bias, name="proj")(x)
            shortcut = _norm_layer(self.norm, train, "proj_norm")(shortcut)
        return nn.relu(h + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, stages of basic blocks, global average pool, dense head."""

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)
    num_classes: int = 10
    norm: str = "batch"

    @nn.compact
    def __call__(self, x_BxHxWxC: Array, train: bool = False) -> Array:
        use_bias = self.norm == "none"
        h = nn.Conv(self.widths[0], (3, 3), padding=1, use_bias=use_bias, name="stem")(x_BxHxWxC)
        h = nn.relu(_norm_layer(self.norm, train, "stem_norm")(h))
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                stride = 2 if (s > 0 and b == 0) else 1
                h = BasicBlock(width, stride, self.norm, name=f"stage{s}_block{b}")(h, train)
        h_BxD = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(h_BxD)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block with explicit q/k/v/out dense layers (one per layer block)."""

    dim: int
    heads: int
    mlp_ratio: int = 2

    @nn.compact
    def __call__(self, z_BxTxD: Array) -> Array:
        b, t, d = z_BxTxD.shape
        hd = self.dim // self.heads
        h = nn.LayerNorm(name="ln1")(z_BxTxD)
        split = lambda a: a.reshape(b, t, self.heads, hd)
        q = split(nn.Dense(self.dim, name="query")(h))
        k = split(nn.Dense(self.dim, name="key")(h))
        v = split(nn.Dense(self.dim, name="value")(h))
        att_BxHxTxT = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(hd), axis=-1)
        o = jnp.einsum("bhqk,bkhd->bqhd", att_BxHxTxT, v).reshape(b, t, d)
        z_BxTxD = z_BxTxD + nn.Dense(self.dim, name="out")(o)
        h = nn.LayerNorm(name="ln2")(z_BxTxD)
        h = nn.gelu(nn.Dense(self.dim * self.mlp_ratio, name="mlp1")(h))
        return z_BxTxD + nn.Dense(self.dim, name="mlp2")(h)


class ViT(nn.Module):
    """Small Vision Transformer: patch embedding + learned positional embedding + CLS token."""

    patch: int = 4
    dim: int = 64
    depth: int = 2
    heads: int = 4
    num_classes: int = 10

    @nn.compact
    def __call__(self, x_BxHxWxC: Array, train: bool = False) -> Array:
        b, hgt, wid, c = x_BxHxWxC.shape
        p = self.patch
        # Patches flattened row-major as (p, p, C) so the embedding is a plain dense layer,
        # which is what APRIL's closed-form attack inverts.
        x_BxTxE = (
            x_BxHxWxC.reshape(b, hgt // p, p, wid // p, p, c)
            .transpose(0, 1, 3, 2, 4, 5)
            .reshape(b, (hgt // p) * (wid // p), p * p * c)
        )
        z = nn.Dense(self.dim, name="patch_embed")(x_BxTxE)
        pos_1xTxD = self.param("pos_embed", nn.initializers.normal(0.02), (1, z.shape[1], self.dim))
        z = z + pos_1xTxD
        cls_1x1xD = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
        z = jnp.concatenate([jnp.broadcast_to(cls_1x1xD, (b, 1, self.dim)), z], axis=1)
        for i in range(self.depth):
            z = EncoderBlock(self.dim, self.heads, name=f"block{i}")(z)
        z = nn.LayerNorm(name="ln_final")(z)
        return nn.Dense(self.num_classes, name="head")(z[:, 0])


# ----------------------------------------------------------------------------- victim


@dataclasses.dataclass(frozen=True)
class Victim:
    """A victim model with its input spec and pure init/apply functions.

    Attributes:
      name: registry name.
      module: the Flax module.
      input_shape: (H, W, C) of one image.
      num_classes: K.
      mean, std: per-channel normalisation applied inside ``apply``.
    """

    name: str
    module: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def init(self, key: PRNGKey) -> tuple[Params, ModelState]:
        """Returns (params, state); state holds BatchNorm statistics or is {}."""
        variables = self.module.init(key, jnp.zeros((1, *self.input_shape), jnp.float32))
        variables = dict(variables)
        params = variables.pop("params")
        return params, variables

    def normalize(self, x_BxHxWxC: Array) -> Array:
        return (x_BxHxWxC - jnp.asarray(self.mean)) / jnp.asarray(self.std)

    def denormalize(self, z_BxHxWxC: Array) -> Array:
        return z_BxHxWxC * jnp.asarray(self.std) + jnp.asarray(self.mean)

    def apply(self, params: Params, state: ModelState, x_BxHxWxC: Array, train: bool = False) -> Array:
        """Logits (B, K) of images x in [0, 1]; pure, state is never updated."""
        variables = {"params": params, **(state or {})}
        z = self.normalize(x_BxHxWxC)
        if train and "batch_stats" in (state or {}):
            logits, _ = self.module.apply(variables, z, train=True, mutable=["batch_stats"])
            return logits
        return self.module.apply(variables, z, train=False)

    def check_images(self, x_BxHxWxC: Array) -> None:
        """Raises InputShapeError unless x has shape (B, *input_shape)."""
        shape = tuple(getattr(x_BxHxWxC, "shape", ()))
        if len(shape) != 4 or shape[1:] != tuple(self.input_shape):
            raise InputShapeError(
                f"victim {self.name!r} expects images of shape (B, {', '.join(map(str, self.input_shape))}) "
                f"(NHWC, values in [0, 1]); got shape {shape}"
            )


@dataclasses.dataclass(frozen=True)
class VictimInfo:
    """Registry entry: a factory and a one-line description."""

    factory: Callable[..., nn.Module]
    description: str


def _resnet(stage_sizes, widths):
    def factory(num_classes: int, norm: str = "batch", **_) -> nn.Module:
        return ResNet(stage_sizes=stage_sizes, widths=widths, num_classes=num_classes, norm=norm)

    return factory


VICTIMS: dict[str, VictimInfo] = {
    "mlp": VictimInfo(
        lambda num_classes, widths=(256, 128), **_: MLP(widths=widths, num_classes=num_classes),
        "MLP 256-128, ReLU; its first dense layer leaks its input exactly",
    ),
    "lenet": VictimInfo(
        lambda num_classes, **_: LeNet(num_classes=num_classes),
        "LeNet of DLG: 3 conv 5x5 (12 ch, sigmoid), dense head",
    ),
    "resnet8": VictimInfo(_resnet((1, 1, 1), (16, 32, 64)), "small CIFAR ResNet: 3 stages x 1 basic block, 16-32-64"),
    "resnet18": VictimInfo(_resnet((2, 2, 2, 2), (64, 128, 256, 512)), "CIFAR ResNet-18: 4 stages x 2 basic blocks"),
    "vit": VictimInfo(
        lambda num_classes, **_: ViT(num_classes=num_classes),
        "small ViT: patch 4, dim 64, depth 2, 4 heads, learned pos-embedding",
    ),
}


def list_victims() -> dict[str, str]:
    """Registry name -> description."""
    return {name: info.description for name, info in VICTIMS.items()}


def make_victim(
    name: str,
    input_shape: tuple[int, int, int] = (32, 32, 3),
    num_classes: int = 10,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs,
) -> Victim:
    """Builds a registered victim; ``kwargs`` go to its factory (e.g. norm='group' for ResNets)."""
    if name not in VICTIMS:
        raise ValueError(f"unknown victim model {name!r}; available: {', '.join(sorted(VICTIMS))}")
    c = input_shape[-1]
    mean = tuple(mean) if mean is not None else (0.5,) * c
    std = tuple(std) if std is not None else (0.5,) * c
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean/std need {c} entries for input shape {input_shape}; got {mean}, {std}")
    module = VICTIMS[name].factory(num_classes=num_classes, **kwargs)
    return Victim(name, module, tuple(input_shape), num_classes, mean, std)


def count_params(params: Params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
