"""Coarse-GIT: one shallow MLP per layer group, wired in the victim's reverse order.

Coarse-GIT (Chen & Liu, arXiv 2505.20026; the variant behind the paper's main
results) keeps Exact-GIT's wiring, one block per leaked layer (group) fed with
its own gradient and visited from the output back to the input, but replaces each
inversion step with a shallow MLP. Here a block is a group of the layout
(``LayerBlock.group``: a ResNet stage, a transformer block, or a single layer of a
small net) and the carried state is a latent vector h::

    h_top = 0
    h <- h + MLP_g([LayerNorm(h), features(grads of group g)])    for g = last .. first
    images_B = sigmoid(decoder(h) + alpha * logit(probe image))

Features follow the backward-pass identities of docs/theory.md, in compressed form,
so a block costs O((rows + cols) R) parameters, never O(block size x width):

* dense/conv kernel gradient G (rows = prod(kernel[:-1]), cols = out): a learned
  bilinear sketch ``U^T (G / rms G) V`` (R x R);
* the probe ``dK db / |db|^2`` (the db-weighted mean input patch; exactly the
  input of a dense layer at B = 1), raw if short, else ``U^T probe``; a conv
  without bias is probed with the bias gradient of the norm that follows it;
* the (normalised) bias gradient, i.e. the summed error of the layer;
* norm layers: their scale and bias gradients (FiLM-like statistics of the
  normalised input: ``d gamma = sum delta x_hat``, ``d beta = sum delta``);
* embeddings: a sketch plus per-row norms (per-token error sums of pos_embed);
* log-RMS of every part, so gradient scale is kept after normalisation.

When the first layer is dense over the flattened image (an MLP victim), its probe
is an image; it enters the output through a learned gate ``alpha`` (init 0).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gitjax.generators.config import GeneratorConfig
from gitjax.generators.features import Sketch, bias_probe, probe_rows, rms
from gitjax.generators.io import check_grads_n, to_image
from gitjax.generators.linalg import TINY
from gitjax.trace import VictimPlan
from gitjax.types import Array, Grads, Params


class CoarseGIT(nn.Module):
    """Coarse-GIT generator. ``apply({"params": p}, grads_N, victim_params=None) -> (N, B, H, W, C)`` in [0, 1].

    ``victim_params`` is accepted for the common interface and ignored: Coarse-GIT
    needs only the leaked gradients.
    """

    config: GeneratorConfig
    plan: VictimPlan

    @nn.compact
    def __call__(self, grads_N: Grads, victim_params: Params | None = None) -> Array:
        check_grads_n(self.plan.layout, grads_N)
        core = nn.vmap(_CoarseCore, in_axes=0, out_axes=0,
                       variable_axes={"params": None}, split_rngs={"params": False})
        return core(self.config, self.plan, name="core")(grads_N)


def _squash(x: Array, limit: float = 5.0) -> Array:
    """Soft clip to (-limit, limit): probes of nearly-zero bias gradients can be huge."""
    return limit * jnp.tanh(x / limit)


class _CoarseCore(nn.Module):
    """Coarse-GIT on one leaked gradient (no N axis)."""

    config: GeneratorConfig
    plan: VictimPlan

    def _features(self, i: int, gb: list[dict[str, Array]]) -> tuple[Array, Array | None]:
        """Compressed features of block i, and its probe (or None)."""
        cfg = self.config
        layout = self.plan.layout
        b = layout.blocks[i]
        g = gb[i]
        name = b.name.replace("/", "_")
        parts: list[Array] = []
        probe = None
        if b.kind in ("dense", "conv"):
            k = g["kernel"]
            out = k.shape[-1]
            k_rc = k.reshape(-1, out)
            s = rms(k_rc)
            sk, u, v = Sketch(cfg.coarse_rank, name=f"{name}_sketch")(k_rc / s)
            parts += [sk, jnp.log(s)[None]]
            nxt = i + 1 if i + 1 < len(layout.blocks) else None
            db = bias_probe(b, g, gb[nxt] if nxt is not None else None,
                            layout.blocks[nxt] if nxt is not None else None)
            if db is not None:
                probe = probe_rows(k, db).reshape(-1)
                p = probe if probe.size <= cfg.probe_max else u.T @ probe / math.sqrt(probe.size)
                dbs = rms(db)
                dbn = db / dbs
                dbf = dbn if out <= cfg.probe_max else v.T @ dbn
                parts += [_squash(p), dbf, jnp.log(dbs)[None]]
        elif b.kind == "norm":
            for leaf in ("scale", "bias"):
                if leaf in g:
                    x = g[leaf]
                    sx = rms(x)
                    xn = x / sx
                    if xn.size > cfg.probe_max:
                        proj = self.param(f"{name}_{leaf}_proj", nn.initializers.normal(1 / math.sqrt(xn.size)),
                                          (xn.size, cfg.coarse_rank))
                        xn = xn @ proj
                    parts += [xn, jnp.log(sx)[None]]
        else:  # embed: a (rows, D) table
            x = g["value"]
            x_rc = x.reshape(-1, x.shape[-1])
            s = rms(x_rc)
            sk, _, _ = Sketch(cfg.coarse_rank, name=f"{name}_sketch")(x_rc / s)
            parts += [sk, jnp.log(s)[None]]
            if x_rc.shape[0] <= cfg.probe_max:
                rn = jnp.sqrt(jnp.mean(x_rc**2, -1))
                parts.append(rn / (rms(rn) + TINY))
        return jnp.concatenate([p.reshape(-1) for p in parts]), probe

    @nn.compact
    def __call__(self, grads: Grads) -> Array:
        cfg, plan = self.config, self.plan
        layout = plan.layout
        gb = layout.to_blocks(grads)
        h = jnp.zeros((cfg.width,), jnp.float32)
        first_probe = None
        feats_of: dict[int, Array] = {}
        probe_of: dict[int, Array | None] = {}
        for gname, idxs in reversed(list(layout.groups().items())):
            feats = []
            for i in idxs:
                f, probe = self._features(i, gb)
                feats.append(f)
                feats_of[i], probe_of[i] = f, probe
                if i == plan.first:
                    first_probe = probe
            gn = gname.replace("/", "_")
            x = jnp.concatenate([nn.LayerNorm(name=f"{gn}_ln")(h)] + feats)
            for d in range(cfg.depth):
                x = nn.gelu(nn.Dense(cfg.width, name=f"{gn}_mlp{d}")(x))
            h = h + nn.Dense(cfg.width, name=f"{gn}_out")(x)

        hh, ww, cc = plan.image_shape
        if cfg.coarse_decoder == "mirror" and _spatial_units(plan):
            logits = _MirrorDecoder(cfg, plan, name="mirror")(h, feats_of, probe_of)
        else:
            logits = self._latent_decoder(h)

        # --- exact probe of a dense first layer over the flattened image
        lp = plan.layers[plan.first]
        if (first_probe is not None and lp.op == "dense" and first_probe.size == hh * ww * cc
                and plan.image_perm is not None):
            img = to_image(plan, first_probe.reshape(1, *lp.in_shape))
            alpha = self.param("probe_gate", nn.initializers.zeros, ())
            pc = jnp.clip(img, 1e-3, 1 - 1e-3)
            logits = logits + alpha * (jnp.log(pc) - jnp.log1p(-pc))
        return jax.nn.sigmoid(logits)

    def _latent_decoder(self, h: Array) -> Array:
        """Latent (width,) -> image logits (B, H, W, C): dense slots, then transposed convs."""
        cfg, plan = self.config, self.plan
        hh, ww, cc = plan.image_shape
        n_up = 0
        while n_up < 3 and hh % 2 ** (n_up + 1) == 0 and ww % 2 ** (n_up + 1) == 0:
            n_up += 1
        h0, w0, ch = hh // 2**n_up, ww // 2**n_up, cfg.decoder_channels
        bsz = cfg.batch_size
        z = nn.gelu(nn.Dense(bsz * cfg.width, name="dec_slots")(nn.LayerNorm(name="dec_ln")(h)))
        z = z.reshape(bsz, cfg.width)
        y = nn.gelu(nn.Dense(h0 * w0 * ch, name="dec_dense")(z)).reshape(bsz, h0, w0, ch)
        for k in range(n_up):
            ch = max(ch // 2, 8)
            y = nn.gelu(nn.ConvTranspose(ch, (4, 4), strides=(2, 2), name=f"dec_up{k}")(y))
        return nn.Conv(cc, (3, 3), name="dec_out")(y)


def _spatial_units(plan: VictimPlan) -> list:
    """The victim's units whose input and output are (H, W, C) maps, in forward order."""
    return [u for u in plan.units if len(u.in_shape) == 3 and len(u.out_shape) == 3]


class _MirrorDecoder(nn.Module):
    """Spatial decoder that mirrors the victim's conv units in reverse (coarse_decoder="mirror").

    The state starts shaped like the top conv unit's output: a dense map of the latent h,
    plus, as extra channels, the head's probe reshaped to that map (at B = 1 the probe is
    the head's exact input; if the head reads pooled features it is broadcast over space).
    Each unit, from the top down, is inverted coarsely by one shallow conv block: conv,
    FiLM from [LayerNorm(h), the unit's own gradient features], and an upsampling to the
    unit's input resolution (sub-pixel: a conv, then depth-to-space, when the unit downsamples).
    Channels double per halving of the resolution, capped at ``decoder_channels``, so the
    full-resolution blocks stay cheap.
    """

    config: GeneratorConfig
    plan: VictimPlan

    def _channels(self, side: int, top_side: int) -> int:
        return max(8, min(self.config.decoder_channels, self.config.decoder_channels * side // top_side))

    @nn.compact
    def __call__(self, h: Array, feats_of: dict, probe_of: dict) -> Array:
        cfg, plan = self.config, self.plan
        units = _spatial_units(plan)
        top = units[-1]
        th, tw, tc = top.out_shape
        bsz = cfg.batch_size
        ch = self._channels(th, th)
        hn = nn.LayerNorm(name="h_ln")(h)
        state = nn.Dense(bsz * th * tw * ch, name="init",
                         kernel_init=nn.initializers.normal(0.02))(hn).reshape(bsz, th, tw, ch)
        # The head's probe: the exact input of the first dense layer after the conv units.
        reader = next((l for l in plan.layers if l.index > max(max(i) for i in top.main) and l.op == "dense"), None)
        probe = probe_of.get(reader.index) if reader is not None else None
        if probe is not None:
            if probe.size == th * tw * tc:
                pmap = probe.reshape(th, tw, tc)
            elif probe.size == tc:
                pmap = jnp.broadcast_to(probe, (th, tw, tc))
            else:
                pmap = None
            if pmap is not None:
                pmap = _squash(pmap / (rms(pmap) + TINY))
                state = jnp.concatenate([state, jnp.broadcast_to(pmap, (bsz, th, tw, tc))], -1)
        for u in reversed(units):
            name = u.name.replace("/", "_")
            ih, iw, _ = u.in_shape
            oh, ow, _ = u.out_shape
            if state.shape[1:3] != (oh, ow):  # a pooling or other resampling between units
                state = jax.image.resize(state, (bsz, oh, ow, state.shape[-1]), "linear")
            idx = [i for item in u.main + u.side for i in item]
            cond = jnp.concatenate([hn] + [feats_of[i] for i in idx if i in feats_of])
            ch_out = self._channels(ih, th)
            y = nn.gelu(nn.Conv(ch, (3, 3), name=f"{name}_conv")(state))
            film = nn.Dense(2 * ch, name=f"{name}_film", kernel_init=nn.initializers.zeros)(cond)
            y = y * (1 + film[:ch]) + film[ch:]
            if (ih, iw) == (oh, ow):
                y = nn.gelu(nn.Conv(ch_out, (3, 3), name=f"{name}_up")(y))
            else:
                # Sub-pixel upsampling (conv to s*s*C channels, then depth-to-space): on XLA:CPU a
                # strided ConvTranspose's backward pass ran ~12x slower for the same FLOPs.
                sh, sw = max(ih // oh, 1), max(iw // ow, 1)
                y = nn.Conv(ch_out * sh * sw, (3, 3), name=f"{name}_up")(y)
                y = y.reshape(bsz, oh, ow, sh, sw, ch_out).transpose(0, 1, 3, 2, 4, 5)
                y = nn.gelu(y.reshape(bsz, oh * sh, ow * sw, ch_out))
                if y.shape[1:3] != (ih, iw):
                    y = jax.image.resize(y, (bsz, ih, iw, ch_out), "linear")
            state, ch = y, ch_out
        return nn.Conv(plan.image_shape[-1], (3, 3), name="out")(state)
