"""Shared pieces of the GIT generators: the victim's wiring, backward-pass algebra, features.

Three parts (derivations in docs/theory.md):

* **The plan** (``VictimPlan``, ``build_plan``). A generator is built from the
  victim's gradient layout. The layout lists the layer blocks but not how they are
  wired, so ``build_plan`` runs the victim once on a random input with Flax's method
  interceptor and records every layer call. From that record it derives, with no
  per-victim code:

  - the input and output shapes of each layer, and its conv geometry;
  - the op that links each layer's output to whatever reads it next: an
    elementwise activation (found by testing candidates on the recorded values),
    a flatten, a global average pool, a token select, or "mixed" (residual add,
    attention);
  - the composite units (ResNet blocks, transformer blocks): their skip branches
    (layers that read the unit's input, e.g. ``proj``) and fan-outs (q/k/v);
  - the index map from image pixels to the first layer's input (identity for a
    conv stem, flatten for an MLP, patchify for a ViT), found by feeding pixel
    indices through the model.
* **Backward-pass algebra** (pure functions): the layer map ``f(a, K)`` and its
  adjoints, the ridge (pseudo-inverse) solve that recovers a layer's input from its
  weight gradient and output error, a fixed-iteration conjugate-gradient
  least-squares refinement (R-GAP's linear system), and the activation inverses
  and derivatives.
* **Gradient features** for Coarse-GIT: factorised bilinear sketches ``U^T G V``,
  probe vectors ``dK db / |db|^2``, and per-axis statistics. None of them needs a
  dense ``(block_size x width)`` projection.

Shape letters: B victim batch, M = B x positions (pixels or tokens) at a layer
output, I/O the input/output features of a layer, R the sketch rank.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from gitjax.layout import GradientLayout, LayerBlock
from gitjax.types import Array, GradientMismatchError, GitjaxError, Grads, Params
from gitjax.victims import Victim

TINY = 1e-30

GENERATORS = ("exact", "coarse", "lti")


@dataclasses.dataclass(frozen=True)
class GeneratorConfig:
    """Hyper-parameters of a GIT generator (re-exported as ``gitjax.generators.GeneratorConfig``).

    Attributes:
      kind: "exact" (Exact-GIT), "coarse" (Coarse-GIT, the paper's main variant) or
        "lti" (Learning to Invert, Wu et al. 2023).
      batch_size: B, the victim images behind one leaked gradient; the generator
        outputs B images per gradient.
      width: hidden width of the MLP parts (Coarse-GIT blocks, Exact-GIT's label-error head).
      depth: layers per MLP block (Coarse-GIT).
      use_victim_params: Exact-GIT reads the victim's weights from ``victim_params``
        (the FL server knows them); if False it learns them, as the paper's Exact-GIT does.
      exact_cg_iters: conjugate-gradient steps per underdetermined layer (Exact-GIT).
      exact_cg_grad_iters: CG steps of the transposed solve that gives the implicit gradient
        of each CG solve (training only; the output does not depend on it); 0: as many as
        ``exact_cg_iters``. Fewer give a truncated (Krylov) gradient at a fraction of the
        cost (LeNet step 12.7x -> 2.6x Coarse-GIT at 16), not yet validated for training quality.
      exact_noise_aware: Exact-GIT estimates the leaked gradient's noise level (the energy of
        the head's gradient beyond rank B) and adds noise-scaled, learned ridge terms to every
        underdetermined layer's solves (0 on a clean gradient: the exact inverse is kept).
      exact_ridge: relative singular-value cutoff of Exact-GIT's exact pseudo-inverses (the
        initial relative ridge of the underdetermined ones is max(exact_ridge, 1e-4)).
      refine_channels: channels of the zero-initialised residual image refiner
        that ends Exact-GIT (0: none).
      coarse_rank: R of Coarse-GIT's factorised sketches ``U^T G V``.
      probe_max: probe vectors and per-channel gradients up to this length enter
        Coarse-GIT raw; longer ones are sketched.
      decoder_channels: channels of Coarse-GIT's image decoder at its lowest resolution.
      lti_hidden: hidden width of the LTI MLP (the paper uses 3000; the default fits a CPU).
      lti_layers: hidden layers of the LTI MLP (the paper uses 2).
      lti_compress_dim: LTI compresses gradients longer than this with a fixed
        seeded random projection (Kronecker-structured, so it also fits ResNet-18).
      seed: seed of the fixed random projections.
    """

    kind: str = "coarse"
    batch_size: int = 1
    width: int = 256
    depth: int = 2
    use_victim_params: bool = True
    exact_cg_iters: int = 64
    exact_cg_grad_iters: int = 0
    exact_noise_aware: bool = True
    exact_ridge: float = 1e-6
    refine_channels: int = 16
    coarse_rank: int = 16
    probe_max: int = 1024
    decoder_channels: int = 64
    lti_hidden: int = 1000
    lti_layers: int = 2
    lti_compress_dim: int = 1024
    seed: int = 0

    def __post_init__(self):
        if self.kind not in GENERATORS:
            raise ValueError(f"unknown generator kind {self.kind!r}; expected one of {', '.join(GENERATORS)}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.exact_cg_iters < 0 or self.exact_cg_grad_iters < 0:
            raise ValueError("exact_cg_iters and exact_cg_grad_iters must be >= 0")
        if min(self.width, self.depth, self.coarse_rank, self.lti_hidden, self.lti_compress_dim) < 1:
            raise ValueError("width, depth, coarse_rank, lti_hidden and lti_compress_dim must be >= 1")

# ----------------------------------------------------------------------------- activations

# name -> elementwise forward function, used to identify the op between two layers.
_ACT_FNS: dict[str, Callable[[Array], Array]] = {
    "identity": lambda z: z,
    "relu": jax.nn.relu,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
    "gelu": lambda z: jax.nn.gelu(z, approximate=True),
    "gelu_exact": lambda z: jax.nn.gelu(z, approximate=False),
    "silu": jax.nn.silu,
}


def act_inverse(name: str, a: Array) -> tuple[Array, Array, Array]:
    """Inverts ``a = f(z)`` elementwise: returns (z estimate, f'(z), weight of each z entry).

    The weight is how far ``z`` can be trusted when ``a`` carries an error: an error
    da becomes dz = da / f'(z), so forward equations in z are weighted by f'(z)
    (normalised to max 1; the error-in-variables linearisation). ReLU loses ``z``
    where ``a = 0`` (it is only known to be <= 0): weight 0 there. GELU/SiLU are
    inverted by Newton steps on their monotone branch z > 0.
    """
    one = jnp.ones_like(a)
    if name == "identity":
        return a, one, one
    if name == "relu":
        m = (a > 0).astype(a.dtype)
        return a, m, m
    if name == "sigmoid":
        ac = jnp.clip(a, 1e-6, 1 - 1e-6)
        return jnp.log(ac) - jnp.log1p(-ac), ac * (1 - ac), 4 * ac * (1 - ac)
    if name == "tanh":
        ac = jnp.clip(a, -1 + 1e-6, 1 - 1e-6)
        return jnp.arctanh(ac), 1 - ac**2, 1 - ac**2
    if name in ("gelu", "gelu_exact", "silu"):
        f = _ACT_FNS[name]
        z = jnp.maximum(a, 0.0)
        for _ in range(4):  # Newton on f(z) = a, z > 0 (f' > 0.5 there)
            fz, dz = jax.jvp(f, (z,), (one,))
            z = jnp.maximum(z - (fz - a) / jnp.maximum(dz, 0.5), 0.0)
        _, dz = jax.jvp(f, (z,), (one,))
        return z, dz, (a > 0).astype(a.dtype) * jnp.minimum(dz, 1.0)
    raise ValueError(f"unknown activation {name!r}")


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer block of the victim, as the generator sees it.

    Attributes:
      index: position of the block in the (forward) layout.
      block: the layout block.
      op: "dense" | "conv" | "norm" | "embed".
      norm_type: "batch" | "layer" | "group" | None.
      in_shape, out_shape: per-example shapes of the layer's input and output
        (for an embed: the shape of its value without leading singleton axes).
      strides, padding: conv geometry in ``lax.conv_general_dilated`` form.
      post: how this layer's output reaches its reader: an activation name
        ("identity", "relu", "sigmoid", ...; a flatten is implied by equal sizes),
        "pool" (global average pool), "select:<t>" (one token), "mixed" (residual
        add, attention: not invertible from this layer alone), "embed" (additive or
        concatenated parameters follow) or "top" (the logits).
    """

    index: int
    block: LayerBlock
    op: str
    norm_type: str | None
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    strides: tuple[int, ...] | None = None
    padding: Any = None
    post: str = "top"

    @property
    def name(self) -> str:
        return self.block.name

    @property
    def has_bias(self) -> bool:
        return self.block.bias_shape is not None


@dataclasses.dataclass(frozen=True)
class UnitPlan:
    """A top-level module of the victim: one layer, or a composite block with a skip.

    Attributes:
      name: the top-level module name (``LayerBlock.path[0]``).
      main: chain items in forward order; an item is a tuple of layer indices that
        read the same input (a fan-out such as q/k/v), usually of length 1.
      side: items of a skip branch (layers reading the unit's input after the main
        chain started, e.g. a ResNet ``proj``/``proj_norm``); empty if none.
      composite: True for multi-layer modules (they get a skip in the mirror).
      in_shape, out_shape: per-example shapes of the unit's input and output.
      post: relation of the unit's output to the next reader (see LayerPlan.post).
    """

    name: str
    main: tuple[tuple[int, ...], ...]
    side: tuple[tuple[int, ...], ...]
    composite: bool
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    post: str


@dataclasses.dataclass(frozen=True)
class VictimPlan:
    """The victim's layout plus its wiring, in forward order (generators walk it backwards)."""

    layout: GradientLayout
    layers: tuple[LayerPlan, ...]
    units: tuple[UnitPlan, ...]
    image_shape: tuple[int, int, int]
    first: int  # index of the layer that reads the image
    image_perm: tuple[int, ...] | None  # first_input.flat == image.flat[perm]; None if not a permutation
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def describe(self) -> str:
        lines = []
        for u in self.units:
            kind = "composite" if u.composite else "single"
            lines.append(f"unit {u.name} ({kind}) {u.in_shape} -> {u.out_shape} post={u.post}")
            for tag, items in (("main", u.main), ("side", u.side)):
                for item in items:
                    for i in item:
                        lp = self.layers[i]
                        fan = " (fan-out)" if len(item) > 1 else ""
                        lines.append(f"  {tag} {lp.name:<26} {lp.op:<5} {lp.in_shape} -> {lp.out_shape} "
                                     f"post={lp.post}{fan}")
        return "\n".join(lines)


def forward_layout(victim: Victim) -> GradientLayout:
    """The victim's gradient layout in forward (module creation) order.

    ``GradientLayout.from_params`` follows the dict order of the pytree it is given,
    and JAX transformations return dicts with sorted keys ("head" before "stem"), so
    the generators take the order from a fresh, traced ``init`` instead.
    """
    box: dict[str, GradientLayout] = {}

    def init(key):
        variables = victim.module.init(key, jnp.zeros((1, *victim.input_shape), jnp.float32))
        box["layout"] = GradientLayout.from_params(variables["params"])
        return jnp.zeros(())

    jax.eval_shape(init, jax.random.PRNGKey(0))
    return box["layout"]


def check_victim_params(layout: GradientLayout, victim_params: Params) -> None:
    """Raises GradientMismatchError unless ``victim_params`` has exactly the victim's leaf shapes."""
    layout.check(victim_params)
    first = layout.blocks[0]
    leaf = layout.to_blocks(victim_params)[0][first.leaves[0][0]]
    if tuple(leaf.shape) != first.leaves[0][1]:
        raise GradientMismatchError(
            f"victim_params must be one parameter set without leading axes; {first.name} has shape {tuple(leaf.shape)}")


def check_grads_n(layout: GradientLayout, grads_N: Grads) -> int:
    """Checks a stack of N gradients against the layout (works under jit); returns N."""
    layout.check(grads_N)
    first = layout.blocks[0]
    name, shape = first.leaves[0]
    leaf = layout.to_blocks(grads_N)[0][name]
    lead = tuple(leaf.shape[: leaf.ndim - len(shape)])
    if len(lead) != 1:
        raise GradientMismatchError(
            f"generators take N leaked gradients with one leading axis N (leaf shapes (N, *param)); "
            f"got leading axes {lead} on {first.name}/{name}")
    return lead[0]


@dataclasses.dataclass
class _Call:
    """One recorded module call: values are concrete; ``x_id``/``out_id`` identify the traced arrays."""

    path: tuple[str, ...]
    type_name: str
    module: nn.Module
    x: np.ndarray
    out: np.ndarray
    x_id: int
    out_id: int


def _random_variables(victim: Victim) -> tuple[Params, Any]:
    """Random victim params/state built in numpy from abstract shapes (no compilation needed).

    Only the wiring is read from them, so any non-degenerate values do: kernels
    ~ N(0, 1/fan_in), biases and norm shifts ~ N(0, 0.1^2), scales ~ 1 + N(0, 0.1^2),
    BatchNorm running statistics mean 0, variance 1.
    """
    abstract = jax.eval_shape(victim.init, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def fill(path, sds):
        name = getattr(path[-1], "key", str(path[-1]))
        shape = tuple(sds.shape)
        if name == "kernel":
            fan_in = max(1, math.prod(shape[:-1]))
            v = rng.standard_normal(shape) / math.sqrt(fan_in)
        elif name == "scale":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif name == "var":
            v = np.ones(shape)
        elif name == "mean":
            v = np.zeros(shape)
        else:
            v = 0.1 * rng.standard_normal(shape)
        return v.astype(np.float32)

    return jax.tree_util.tree_map_with_path(fill, abstract)


def _record_calls(victim: Victim, params: Params, state: Any, x: np.ndarray
                  ) -> tuple[list[_Call], dict[tuple[str, ...], float]]:
    """Runs the victim once under jit with Flax's method interceptor; records every module call.

    The wiring is read from the identity of the traced arrays (a layer that receives
    the very array another layer returned reads it directly), the values from the
    jitted outputs. Every Dense/Conv call is also recomputed as ``f(x, kernel) + bias``
    with the geometry the generators will use; the returned dict holds the maximum
    relative deviation per layer path. One compilation, no op-by-op dispatch.
    """
    meta: list[tuple[tuple[str, ...], str, nn.Module, Any, Any]] = []
    check_paths: list[tuple[str, ...]] = []

    def run(params, state, x):
        seen: list[tuple[Array, Array]] = []
        devs: list[Array] = []

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            mod = context.module
            if context.method_name == "__call__" and args and hasattr(args[0], "shape") and hasattr(out, "shape"):
                meta.append((tuple(mod.path), type(mod).__name__, mod, args[0], out))
                seen.append((args[0], out))
                own = mod.variables.get("params", {})
                kern = own.get("kernel") if hasattr(own, "get") else None
                if kern is not None and kern.ndim in (2, 4) and not any(isinstance(v, Mapping) for v in own.values()):
                    op = "conv" if kern.ndim == 4 else "dense"
                    strides, padding = _conv_geometry(mod) if op == "conv" else (None, None)
                    lp = LayerPlan(0, LayerBlock(tuple(mod.path), op, (("kernel", tuple(kern.shape)),), 0),
                                   op, None, (), (), strides, padding)
                    y = layer_fn(lp)(args[0], kern) + own.get("bias", 0.0)
                    devs.append(jnp.max(jnp.abs(y - out)) / (jnp.max(jnp.abs(out)) + 1e-6))
                    check_paths.append(tuple(mod.path))
            return out

        with nn.intercept_methods(interceptor):
            victim.module.apply({"params": params, **(state or {})}, x)
        return [s_[0] for s_ in seen], [s_[1] for s_ in seen], devs

    xs, outs, devs = jax.jit(run)(params, state, x)
    # The tracers in `meta` stay alive until here, so their ids are unique.
    calls = [_Call(path, tn, mod, np.asarray(xv), np.asarray(ov), id(xt), id(ot))
             for (path, tn, mod, xt, ot), xv, ov in zip(meta, xs, outs)]
    meta.clear()
    return calls, {p_: float(d) for p_, d in zip(check_paths, devs)}


_NP_ACTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda z: z,
    "relu": lambda z: np.maximum(z, 0.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "gelu": lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
    "gelu_exact": lambda z: 0.5 * z * (1 + scipy.special.erf(z / np.sqrt(2))),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], Any]:
    strides = module.strides if module.strides is not None else 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pad = module.padding
    if isinstance(pad, str):
        if pad.upper() not in ("SAME", "VALID"):
            raise NotImplementedError(f"conv padding {pad!r} is not supported by the GIT generators")
        padding: Any = pad.upper()
    elif isinstance(pad, int):
        padding = ((pad, pad), (pad, pad))
    else:
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
    for attr in ("input_dilation", "kernel_dilation"):
        d = getattr(module, attr, None)
        if d not in (None, 1, (1, 1)):
            raise NotImplementedError(f"dilated convs ({attr}={d}) are not supported by the GIT generators")
    if getattr(module, "feature_group_count", 1) != 1:
        raise NotImplementedError("grouped convs are not supported by the GIT generators")
    return strides, padding


def extract_patches(a: Array, kernel_hw: tuple[int, int], strides: tuple[int, int], padding: Any) -> Array:
    """(B, H, W, C) -> (B, Ho, Wo, kh, kw, C): the input patch under every output position of a conv.

    Built from kh * kw strided slices (data movement only); its transpose (col2im, via
    ``jax.vjp``) is a pad-and-add. Every conv of the generators is an einsum with these
    patches, so per-gradient kernels and error maps (vmapped over N) stay batched
    matmuls instead of grouped convolutions.
    """
    kh, kw = kernel_hw
    sh, sw = strides
    h, w = a.shape[-3], a.shape[-2]
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads((h, w), (kh, kw), (sh, sw), padding)
    else:
        pads = padding
    (pt, pb), (pl, pr) = pads
    ap = jnp.pad(a, [(0, 0)] * (a.ndim - 3) + [(pt, pb), (pl, pr), (0, 0)])
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    rows = []
    for i in range(kh):
        cols = []
        for j in range(kw):
            cols.append(ap[..., i: i + sh * (ho - 1) + 1: sh, j: j + sw * (wo - 1) + 1: sw, :])
        rows.append(jnp.stack(cols, axis=-2))
    return jnp.stack(rows, axis=-3)


def layer_fn(lp: LayerPlan) -> Callable[[Array, Array], Array]:
    """The linear part ``f(a, K)`` of a dense/conv layer; ``a`` is (B, *in_shape)."""
    if lp.op not in ("dense", "conv"):
        raise ValueError(f"layer {lp.name} ({lp.op}) has no linear map")
    return lambda a, k: LinearOps(lp, tuple(a.shape)).forward(LinearOps(lp, tuple(a.shape)).unfold(a), k)


def _relation(out: np.ndarray, succ: np.ndarray) -> str:
    """Which op turns a layer's recorded output into the (different) array its reader receives."""
    o = np.asarray(out, np.float64).reshape(-1)
    s = np.asarray(succ, np.float64).reshape(-1)
    tol = 1e-4 * (np.abs(s).max() + 1e-6)
    if o.size == s.size:
        for name, fn in _NP_ACTS.items():
            if np.allclose(fn(o), s, atol=tol, rtol=1e-4):
                return name
        return "mixed"
    c = out.shape[-1]
    if s.size == c and o.size % c == 0:
        rows = o.reshape(-1, c)
        if np.allclose(rows.mean(0), s, atol=tol, rtol=1e-4):
            return "pool"
        for t in range(rows.shape[0]):
            if np.allclose(rows[t], s, atol=tol, rtol=1e-4):
                return f"select:{t}"
    return "mixed"


def build_plan(victim: Victim, layout: GradientLayout | None = None) -> VictimPlan:
    """Traces the victim once (random weights and input) and derives the generator's plan.

    Args:
      victim: the victim model (its architecture is what the attacker knows).
      layout: its forward-order layout (``forward_layout(victim)`` if None).

    Returns:
      The plan. Raises NotImplementedError for wiring the generators cannot mirror
      (shared layers, dilated or grouped convs).
    """
    layout = forward_layout(victim) if layout is None else layout
    params, state = _random_variables(victim)
    h, w, c = victim.input_shape
    n_pix = h * w * c
    # Example 0: a random (normalised) image, to identify the ops between layers.
    # Example 1: pixel indices, to find where each pixel lands in the first layer's input.
    x = np.concatenate([np.random.default_rng(1).standard_normal((1, h, w, c)),
                        np.arange(n_pix, dtype=np.float64).reshape(1, h, w, c)]).astype(np.float32)
    calls, deviations = _record_calls(victim, params, state, x)
    by_path: dict[tuple[str, ...], _Call] = {}
    for call in calls:
        if call.path in by_path and call.path:
            raise NotImplementedError(f"module {'/'.join(call.path)} is called twice (shared weights); "
                                      "the GIT generators mirror each layer once")
        by_path[call.path] = call

    # A port is (value of example 0, traced id) of an array flowing between modules.
    in_port = lambda cl: (cl.x[:1], cl.x_id)
    out_port = lambda cl: (cl.out[:1], cl.out_id)

    # --- per-layer geometry
    raw_layers = []
    checks = []
    for i, b in enumerate(layout.blocks):
        if b.kind == "embed":
            shape = tuple(b.leaves[0][1])
            while len(shape) > 2 and shape[0] == 1:  # (1, T, D) -> (T, D); (1, 1, D) -> (1, D)
                shape = shape[1:]
            raw_layers.append(dict(index=i, block=b, op="embed", norm_type=None, in_shape=shape, out_shape=shape))
            continue
        call = by_path.get(b.path)
        if call is None:
            raise NotImplementedError(f"layer {b.name} owns parameters but was never called")
        d = dict(index=i, block=b, op=b.kind, norm_type=None,
                 in_shape=tuple(call.x.shape[1:]), out_shape=tuple(call.out.shape[1:]))
        if b.kind == "conv":
            d["strides"], d["padding"] = _conv_geometry(call.module)
        if b.kind == "norm":
            t = call.type_name.lower()
            d["norm_type"] = "batch" if "batch" in t else "group" if "group" in t else "layer"
        raw_layers.append(d)
        if b.kind in ("dense", "conv"):
            checks.append((LayerPlan(**d), call))

    # --- every dense/conv must be y = f(x, kernel) + bias with the recorded geometry
    for lp, _ in checks:
        if deviations.get(lp.block.path, 1.0) > 1e-3:
            raise NotImplementedError(f"layer {lp.name} is not a plain {lp.op} layer (its output differs from "
                                      "f(x, kernel) + bias); the GIT generators cannot mirror it")

    # --- units: consecutive blocks sharing a top-level module
    unit_blocks: list[list[int]] = []
    for i, b in enumerate(layout.blocks):
        if unit_blocks and layout.blocks[unit_blocks[-1][0]].path[0] == b.path[0] and len(b.path) > 1:
            unit_blocks[-1].append(i)
        else:
            unit_blocks.append([i])

    posts: dict[int, str] = {}
    units_raw = []
    for idxs in unit_blocks:
        b0 = layout.blocks[idxs[0]]
        composite = len(b0.path) > 1
        if b0.kind == "embed":
            ux = uy = None
        else:
            ucall = by_path[(b0.path[0],)] if composite else by_path[b0.path]
            ux, uy = in_port(ucall), out_port(ucall)
        main: list[list[int]] = []
        side: list[list[int]] = []
        target = main
        for j, i in enumerate(idxs):
            call = by_path.get(layout.blocks[i].path)
            if composite and j > 0 and call is not None and call.x_id == ux[1]:
                target = side  # reads the unit input again: a skip branch (ResNet proj)
                target.append([i])
            elif target and call is not None and by_path[layout.blocks[target[-1][0]].path].x_id == call.x_id:
                target[-1].append(i)  # same input as the previous layer: fan-out (q/k/v)
            else:
                target.append([i])
        units_raw.append(dict(name=b0.path[0], main=main, side=side, composite=composite, x=ux, y=uy))

    def relation(producer: tuple[np.ndarray, int], reader: tuple[np.ndarray, int]) -> str:
        if reader[1] == producer[1]:
            return "identity"
        return _relation(producer[0], reader[0])

    def chain_posts(items: list[list[int]], end: Any, end_is_embed: bool) -> None:
        for k, item in enumerate(items):
            nxt = in_port(by_path[layout.blocks[items[k + 1][0]].path]) if k + 1 < len(items) else end
            for i in item:
                if nxt is None:
                    posts[i] = "embed" if end_is_embed else "top"
                else:
                    posts[i] = relation(out_port(by_path[layout.blocks[i].path]), nxt)

    units = []
    for u, ur in enumerate(units_raw):
        nx = units_raw[u + 1]["x"] if u + 1 < len(units_raw) else None
        nx_embed = u + 1 < len(units_raw) and units_raw[u + 1]["x"] is None
        if ur["x"] is None:  # embed unit
            unit_post = "embed"
            in_shape = out_shape = raw_layers[ur["main"][0][0]]["in_shape"]
        elif ur["composite"]:
            unit_post = "embed" if nx_embed else ("top" if nx is None else relation(ur["y"], nx))
            chain_posts(ur["main"], ur["y"], False)
            chain_posts(ur["side"], ur["y"], False)
            in_shape, out_shape = tuple(ur["x"][0].shape[1:]), tuple(ur["y"][0].shape[1:])
        else:
            chain_posts(ur["main"], nx, nx_embed)
            unit_post = posts[ur["main"][0][0]]
            in_shape, out_shape = tuple(ur["x"][0].shape[1:]), tuple(ur["y"][0].shape[1:])
        units.append(UnitPlan(ur["name"], tuple(map(tuple, ur["main"])), tuple(map(tuple, ur["side"])),
                              ur["composite"], in_shape, out_shape, unit_post))

    layers = tuple(LayerPlan(**d, post=posts.get(d["index"], "embed" if d["op"] == "embed" else "top"))
                   for d in raw_layers)

    # --- image -> first layer's input, from the pixel-index example
    first = next(i for i, lp in enumerate(layers) if lp.op != "embed")
    vals = by_path[layers[first].block.path].x[1].astype(np.float64).reshape(-1)
    perm = None
    if vals.size == n_pix and np.allclose(vals, np.round(vals)):
        cand = np.round(vals).astype(np.int64)
        if np.array_equal(np.sort(cand), np.arange(n_pix)):
            perm = tuple(int(v) for v in cand)

    return VictimPlan(layout, layers, tuple(units), (h, w, c), first, perm,
                      tuple(float(m) for m in victim.mean), tuple(float(s) for s in victim.std))


# ----------------------------------------------------------------------------- backward-pass algebra


def project_sum(e: Array, target: Array, axes: Sequence[int]) -> Array:
    """Shifts ``e`` evenly along ``axes`` so that ``e.sum(axes) == target``.

    The minimum-norm correction enforcing a bias-gradient constraint
    ``sum_{i,p} delta_i[p] = B * db`` (or ``sum_i delta_i = B * d pos_embed``).
    """
    count = math.prod(e.shape[a] for a in axes)
    if count == 1:  # fully determined: take the target itself (e + (target - e) loses digits when |e| >> |target|)
        return jnp.broadcast_to(jnp.expand_dims(target, tuple(axes)), e.shape).astype(e.dtype)
    return e + jnp.expand_dims((target - e.sum(axes)) / count, tuple(axes))


def _gram_solve(g: Array, rhs: Array, eps: Array) -> Array:
    """Solves ``(G + lam I) X = rhs`` with ``lam = eps * tr(G)/n`` (ridge, scale-free)."""
    n = g.shape[0]
    lam = eps * jnp.trace(g) / n + TINY
    chol = jax.scipy.linalg.cho_factor(g + lam * jnp.eye(n, dtype=g.dtype), lower=True)
    return jax.scipy.linalg.cho_solve(chol, rhs)


@dataclasses.dataclass(frozen=True)
class LinearOps:
    """The four linear maps of a dense/conv layer with input ``a`` (B, *in) and output error ``delta``.

    With ``P = unfold(a)`` (conv: the patches (B, Ho, Wo, kh, kw, C); dense: ``a``):

    * forward ``F_K(a) = P . K`` -> (B, *out)       (the layer without bias)
    * weight gradient ``G(a) = P^T . delta`` -> kernel shape (summed over B and positions)
    * both transposes are ``fold(r . K^T)``: ``fold`` = col2im (the adjoint of unfold)

    Every op is an einsum, so per-gradient kernels and errors (vmapped over N) stay
    batched matmuls; ``fold`` of a conv is a pad-and-add.
    """

    lp: LayerPlan
    in_shape: tuple[int, ...]  # (B, *in)

    def unfold(self, a: Array) -> Array:
        if self.lp.op == "dense":
            return a
        return extract_patches(a, self.lp.block.kernel_shape[:2], self.lp.strides, self.lp.padding)

    def fold(self, p: Array) -> Array:
        if self.lp.op == "dense":
            return p
        zero = jnp.zeros(self.in_shape, p.dtype)
        return jax.linear_transpose(self.unfold, zero)(p)[0]

    @property
    def _spec(self) -> tuple[str, str]:
        return ("...i", "io") if self.lp.op == "dense" else ("...hwijc", "ijco")

    def forward(self, p: Array, k: Array) -> Array:
        if self.lp.op == "dense":
            return jnp.einsum("...i,io->...o", p, k)
        return jnp.einsum("...hwijc,ijco->...hwo", p, k)

    def weight_grad(self, p: Array, delta: Array) -> Array:
        pa, kk = self._spec
        d = "...o" if self.lp.op == "dense" else "...hwo"
        return jnp.einsum(f"{pa},{d}->{kk}", p, delta)

    def back(self, r: Array, k: Array) -> Array:
        """``r . K^T`` in unfolded input space (fold it to get the input-space adjoint)."""
        pa, kk = self._spec
        d = "...o" if self.lp.op == "dense" else "...hwo"
        return jnp.einsum(f"{d},{kk}->{pa}", r, k)

    # The victim's kernel is shared by all N gradients (it is not vmapped), so the forward map
    # and its adjoint run as plain convolutions: XLA:CPU's conv kernels, no explicit patches and
    # no col2im. Patches stay for the maps whose "kernel" is per gradient (weight gradients).
    def apply(self, a: Array, k: Array) -> Array:
        """``F_K(a)`` from the input: (B, *in) -> (B, *out) (the layer without bias)."""
        if self.lp.op == "dense":
            return jnp.einsum("...i,io->...o", a, k)
        return jax.lax.conv_general_dilated(a, k, self.lp.strides, self.lp.padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def adjoint(self, r: Array, k: Array) -> Array:
        """``F_K^T r``: (B, *out) -> (B, *in), the transposed layer (a transposed conv)."""
        if self.lp.op == "dense":
            return jnp.einsum("...o,io->...i", r, k)
        zero = jnp.zeros(self.in_shape, r.dtype)
        return jax.linear_transpose(lambda a: self.apply(a, k), zero)(r)[0]


def ridge_invert(ops: LinearOps, dk_sum: Array, delta: Array, a0: Array, eps: Array,
                 coverage: Array | None = None, rtol: float = 1e-6) -> Array:
    """Closed-form layer-input estimate from the weight gradient: the (regularised) pseudo-inverse.

    With patches ``X`` (features x M) of the input and errors ``D`` (M x O), the
    weight gradient is ``Y = B dK = X D``. Given D, the solution closest to a prior
    ``X0`` is ``X = X0 + (Y - X0 D) (D^T D + lam I)^{-1} D^T``, which for a dense
    layer at B = 1 is the exact ratio ``a = dK db / |db|^2``. When M <= O (dense
    layers; token layers at small B) it uses the dual form with the pseudo-inverse
    ``D^+`` (singular values below ``rtol * s_max`` cut), otherwise the O x O primal
    system with ridge ``eps``; the primal correction is folded back to the input by
    col2im (``coverage`` averages overlapping patches).

    Args:
      ops: the layer's linear maps.
      dk_sum: kernel-shaped ``B * dK`` (the batch-summed weight gradient).
      delta: (B, *out_shape) error at the layer output (already bias-projected).
      a0: (B, *in_shape) prior input estimate.
      eps: relative ridge of the primal system (scalar, may be traced).
      coverage: (*in_shape[:-1], 1) patch overlap counts (convs) or None.
      rtol: relative singular-value cutoff of the dual pseudo-inverse (static).

    Returns:
      (B, *in_shape) input estimate.
    """
    o = delta.shape[-1]
    d_mo = delta.reshape(-1, o)
    m = d_mo.shape[0]
    p0 = ops.unfold(a0)
    res = dk_sum - ops.weight_grad(p0, delta)  # Y - X0 D
    if ops.lp.op == "dense" and m <= o:
        # Dual form X = X0 + R D^+ with D^+ from the SVD (cutoff rtol): forming D D^T would square
        # D's condition number (the ViT patch embedding at B = 1). jnp.linalg.pinv has a stable JVP
        # (no 1/(s_i^2 - s_j^2) terms), so repeated or zero singular values do not give NaN grads.
        x_im = res.reshape(-1, o) @ jnp.linalg.pinv(d_mo, rtol=rtol)  # (I, M)
        return a0 + x_im.T.reshape(a0.shape)
    c = jnp.einsum("...o,op->...p", res, _gram_solve(d_mo.T @ d_mo, jnp.eye(o, dtype=d_mo.dtype), eps))
    da = ops.fold(ops.back(delta, c))
    return a0 + (da / coverage if coverage is not None else da)


def conv_coverage(ops: LinearOps) -> Array:
    """(*in_shape[:-1], 1) for a conv: how many output positions' patches cover each input pixel."""
    lp = ops.lp
    kh, kw = lp.block.kernel_shape[:2]
    one = LinearOps(lp, (1, *lp.in_shape[:-1], 1))
    patches = one.back(jnp.ones((1, *lp.out_shape[:-1], 1), jnp.float32), jnp.ones((kh, kw, 1, 1), jnp.float32))
    return jnp.maximum(one.fold(patches)[0], 1.0)


def cg_refine(ops: LinearOps, kernel: Array, bias: Array | None, dk_sum: Array, delta: Array, z: Array,
              weight: Array, a_init: Array, log_w: Array, iters: int, noise: Array | None = None,
              grad_iters: int | None = None) -> Array:
    """R-GAP's least-squares step: refines a layer-input estimate by preconditioned conjugate gradient.

    Minimises over ``a``::

        w_f |weight * (F_W(a) + b - z)|^2 + w_g |G(a) - B dK|^2 + w_r |a - a_init|^2

    where ``F_W(a) + b = z`` are the forward equations (z: the layer output the
    layer above recovered; ``weight`` says how much each entry is trusted) and
    ``G(a) = sum_i grad_K <F_K(a_i), delta_i>`` the weight-gradient equations. Each
    term is normalised by the squared size of its right-hand side and scaled by
    ``exp(log_w)`` (learned). ``iters`` steps of Jacobi-preconditioned CG; its
    gradient is implicit (one more solve via ``lax.custom_linear_solve``, of
    ``grad_iters`` steps, default ``iters``), so nothing is unrolled or stored per step.

    ``noise`` (optional, scalar >= 0): the leaked gradient's estimated noise-to-signal
    ratio at this layer. The weights are inverse relative error variances, so the
    noise adds to the gradient equations' one: ``w_g = e^{log_w[1]} / (1 + e^{log_w[1]} noise)``
    (normalised as above); ``noise`` is also added to the relative ridge. 0 reproduces
    the noise-free system.
    """
    zb = z - (bias if bias is not None else 0.0)
    w2 = jnp.broadcast_to(weight**2, zb.shape)
    nsr = jnp.zeros(()) if noise is None else noise
    w_f = jnp.exp(log_w[0]) / (jnp.sum(w2 * zb**2) + TINY)
    # Weights are inverse relative error variances: exp(-log_w[1]) is the model error of the
    # gradient equations, the noise adds nsr to it (Wiener weighting).
    w_g = jnp.exp(log_w[1]) / (jnp.sum(dk_sum**2) + TINY) / (1.0 + jnp.exp(log_w[1]) * nsr)
    w_r = (jnp.exp(log_w[2]) + nsr) / (jnp.sum(a_init**2) + a_init.size)

    def normal_op(v):
        p = ops.unfold(v)
        back = w_f * ops.back(w2 * ops.forward(p, kernel), kernel) + w_g * ops.back(delta, ops.weight_grad(p, delta))
        return ops.fold(back) + w_r * v

    rhs = ops.fold(w_f * ops.back(w2 * zb, kernel) + w_g * ops.back(delta, dk_sum)) + w_r * a_init
    # Jacobi preconditioner: the exact diagonals of F^T W^2 F and G^T G.
    diag = ops.fold(w_f * ops.back(w2, kernel**2) + w_g * ops.back(delta**2, jnp.ones_like(dk_sum))) + w_r
    inv_diag = jax.lax.stop_gradient(1.0 / diag)
    precond = lambda r: inv_diag * r
    # Solve for the correction from a_init (zero initial guess), so that the transposed solve
    # of the implicit gradient starts from zero too.
    res = rhs - normal_op(a_init)
    grad_iters = iters if not grad_iters else grad_iters
    dx = jax.lax.custom_linear_solve(normal_op, res, lambda mv, b: _pcg(mv, b, precond, iters),
                                     transpose_solve=lambda mv, b: _pcg(mv, b, precond, grad_iters),
                                     symmetric=True)
    return a_init + dx


def _pcg(matvec: Callable[[Array], Array], b: Array, precond: Callable[[Array], Array], iters: int) -> Array:
    """``iters`` steps of preconditioned CG for ``A x = b`` from x = 0 (fixed trip count)."""
    vdot = lambda u, v: jnp.sum(u * v)
    z0 = precond(b)
    rz0 = vdot(b, z0)

    def step(_, carry):
        x, r, p, rz = carry
        ap = matvec(p)
        pap = vdot(p, ap)
        ok = (pap > TINY) & (rz > 1e-14 * rz0 + TINY)
        alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1.0), 0.0)
        x = x + alpha * p
        r = r - alpha * ap
        z = precond(r)
        rz_new = vdot(r, z)
        beta = jnp.where(ok, rz_new / jnp.where(ok, rz, 1.0), 0.0)
        return x, r, z + beta * p, rz_new

    return jax.lax.fori_loop(0, iters, step, (jnp.zeros_like(b), b, z0, rz0))[0]


def low_rank_noise_var(g_rc: Array, rank: int) -> Array:
    """Per-entry noise variance of a matrix whose clean value has rank <= ``rank``.

    The head of a classifier reads one feature vector per image, so its batch-mean
    kernel gradient ``(1/B) sum_i a_i delta_i^T`` has rank <= B. Whatever lies beyond
    rank B is noise (a defence's Gaussian noise, quantisation, pruning error): its
    energy over its degrees of freedom, ``(rows - B)(cols - B)``, estimates the
    per-entry noise variance. Returns 0 when the matrix has no room beyond rank B.
    """
    rows, cols = g_rc.shape
    if min(rows, cols) <= rank:
        return jnp.zeros((), g_rc.dtype)
    g_rc = jax.lax.stop_gradient(g_rc)
    small = g_rc.T @ g_rc if cols <= rows else g_rc @ g_rc.T
    ev = jnp.linalg.eigvalsh(small)  # ascending; the top `rank` carry the clean signal
    tail = jnp.sum(jnp.maximum(ev[: small.shape[0] - rank], 0.0))
    return tail / ((rows - rank) * (cols - rank))


def noise_to_signal(noise_var: Array, y: Array) -> Array:
    """Noise energy over signal energy of an observed ``y`` with i.i.d. noise of variance ``noise_var``."""
    energy = jnp.sum(y**2)
    noise = noise_var * y.size
    return noise / jnp.maximum(energy - noise, 1e-3 * energy + TINY)


def to_image(plan: VictimPlan, a_first: Array) -> Array | None:
    """(B, *first_in_shape) normalised first-layer input -> (B, H, W, C) pixels, via the traced index map."""
    if plan.image_perm is None:
        return None
    b = a_first.shape[0]
    inv = np.argsort(np.asarray(plan.image_perm))
    z = a_first.reshape(b, -1)[:, inv].reshape(b, *plan.image_shape)
    return z * jnp.asarray(plan.std) + jnp.asarray(plan.mean)


def ste_clip01(x: Array) -> Array:
    """Clips to [0, 1] in the forward pass with an identity gradient (clipping would zero it)."""
    return x + jax.lax.stop_gradient(jnp.clip(x, 0.0, 1.0) - x)


def block_value(tree: Params, block: LayerBlock, leaf: str) -> Array:
    """One leaf of a block from a params/grads pytree ("value" for loose embed arrays)."""
    node = tree
    for k in block.path:
        node = node[k]
    return node if block.kind == "embed" else node[leaf]


# ----------------------------------------------------------------------------- Coarse-GIT features


def rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(x**2) + TINY)


def bias_probe(block: LayerBlock, grads: Mapping[str, Array], next_grads: Mapping[str, Array] | None,
               next_block: LayerBlock | None) -> Array | None:
    """The bias gradient that probes a dense/conv kernel gradient, or None.

    A layer without bias followed by a norm layer (conv -> BN in a ResNet) is probed
    with the norm's bias gradient: in eval mode the norm is a per-channel affine map,
    so ``d beta`` equals the conv's (virtual) bias gradient up to a per-channel scale.
    """
    if "bias" in grads:
        return grads["bias"]
    o = block.kernel_shape[-1]
    if (next_block is not None and next_block.kind == "norm" and next_grads is not None
            and next_block.bias_shape == (o,)):
        return next_grads["bias"]
    return None


def probe_rows(kernel_grad: Array, db: Array) -> Array:
    """``dK db / |db|^2`` over the kernel's output axis: the db-weighted mean input patch.

    (in, out) -> (in,): for a dense layer at B = 1 this is exactly the layer input.
    (kh, kw, ci, co) -> (kh, kw, ci): the error-weighted average input patch of a conv.
    """
    return jnp.einsum("...o,o->...", kernel_grad, db) / (jnp.sum(db**2) + TINY)


class Sketch(nn.Module):
    """Learned factorised projection of a matrix-shaped gradient: ``U^T G V`` (R x R) plus row/col summaries.

    G (rows, cols) is a kernel gradient reshaped to (prod(kernel[:-1]), out). The
    parameters are (rows + cols) x R, so a ResNet-18 conv (4608 x 512) costs 82k
    parameters at R = 16 instead of the 1.2M of a dense projection.
    """

    rank: int = 16

    @nn.compact
    def __call__(self, g_rc: Array) -> tuple[Array, Array, Array]:
        rows, cols = g_rc.shape
        u = self.param("u", nn.initializers.normal(1.0 / math.sqrt(rows)), (rows, self.rank))
        v = self.param("v", nn.initializers.normal(1.0 / math.sqrt(cols)), (cols, self.rank))
        return (u.T @ g_rc @ v).reshape(-1), u, v  # (R*R,), (rows, R), (cols, R)


def fixed_gaussian(seed: int, shape: tuple[int, ...]) -> Array:
    """A fixed (not trained) Gaussian matrix with unit-variance columns' inner products (scaled 1/sqrt(rows))."""
    return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32) / math.sqrt(shape[0])
