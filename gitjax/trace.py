"""The victim's structure, traced once: forward order, wiring, and the one activation table.

Everything that reads a victim's architecture (the GIT generators, R-GAP, the
BatchNorm prior, the attacks' gradient layouts) takes it from here:

* ``forward_layout(victim)`` / ``forward_order(victim)``: the gradient layout in
  forward (module creation) order. JAX transformations return dicts with sorted
  keys ("head" before "stem"), so the order is read from the insertion-ordered dict
  of a traced ``init``, a pure function of the victim (no registry).
* ``trace_victim(victim)``: the immutable ``VictimPlan``. It runs the victim once
  (random weights, under jit) with Flax's method interceptor and records every
  module call; from that record, with no per-victim code, it derives each layer's
  input/output shapes and conv geometry, the op linking a layer to its reader (an
  elementwise activation found by testing the table's entries on the recorded
  values, a flatten, a global average pool, a token select, or "mixed": residual
  add, attention), the composite units (ResNet/transformer blocks) with their skip
  branches and fan-outs, and the map from image pixels to the first layer's input.
* ``ACTIVATIONS``: name -> forward (jnp), host forward (numpy float64, to identify
  ops) and inverse ``a -> (z, f'(z), weight)``.
* ``record_calls``: the one interceptor; the BN prior reads BatchNorm inputs with it.

Shape letters: B batch, I/O input/output features of a layer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from gitjax.layout import GradientLayout, LayerBlock
from gitjax.types import Array, Params
from gitjax.victims import Victim

# ----------------------------------------------------------------------------- activations


@dataclasses.dataclass(frozen=True)
class Activation:
    """An elementwise activation ``a = fn(z)``.

    Attributes:
      fn: the forward map (jnp).
      host_fn: the same map in numpy float64, to identify the op between two recorded layers.
      inverse: ``a -> (z, f'(z), weight)``; see ``act_inverse``.
    """

    name: str
    fn: Callable[[Array], Array]
    host_fn: Callable[[np.ndarray], np.ndarray]
    inverse: Callable[[Array, float], tuple[Array, Array, Array]]


def _inv_identity(a, dead_zone):
    one = jnp.ones_like(a)
    return a, one, one


def _inv_relu(a, dead_zone):
    # Zero outputs only bound z <= 0: no equation there. dead_zone > 0 also drops outputs
    # below dead_zone * max|a| (round-off of a recovered activation).
    floor = 0 if not dead_zone else dead_zone * jnp.max(jnp.abs(a))
    m = (a > floor).astype(a.dtype)
    return a, m, m


def _inv_leaky_relu(a, dead_zone):
    slope = jnp.where(a >= 0, 1.0, 0.01)
    return jnp.where(a >= 0, a, a / 0.01), slope, slope


def _inv_sigmoid(a, dead_zone):
    ac = jnp.clip(a, 1e-6, 1 - 1e-6)
    return jnp.log(ac) - jnp.log1p(-ac), ac * (1 - ac), 4 * ac * (1 - ac)


def _inv_tanh(a, dead_zone):
    ac = jnp.clip(a, -1 + 1e-6, 1 - 1e-6)
    return jnp.arctanh(ac), 1 - ac**2, 1 - ac**2


def _newton_inverse(f):
    """Inverse on the monotone branch z > 0 (GELU, SiLU: f' > 0.5 there) by 4 Newton steps."""

    def inverse(a, dead_zone):
        one = jnp.ones_like(a)
        z = jnp.maximum(a, 0.0)
        for _ in range(4):
            fz, dz = jax.jvp(f, (z,), (one,))
            z = jnp.maximum(z - (fz - a) / jnp.maximum(dz, 0.5), 0.0)
        _, dz = jax.jvp(f, (z,), (one,))
        return z, dz, (a > 0).astype(a.dtype) * jnp.minimum(dz, 1.0)

    return inverse


def _gelu(z):
    return jax.nn.gelu(z, approximate=True)


def _gelu_exact(z):
    return jax.nn.gelu(z, approximate=False)


# Order matters: ops are identified by the first entry that reproduces a recorded value.
ACTIVATIONS: dict[str, Activation] = {a.name: a for a in (
    Activation("identity", lambda z: z, lambda z: z, _inv_identity),
    Activation("relu", jax.nn.relu, lambda z: np.maximum(z, 0.0), _inv_relu),
    Activation("sigmoid", jax.nn.sigmoid, lambda z: 1.0 / (1.0 + np.exp(-z)), _inv_sigmoid),
    Activation("tanh", jnp.tanh, np.tanh, _inv_tanh),
    Activation("gelu", _gelu, lambda z: 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
               _newton_inverse(_gelu)),
    Activation("gelu_exact", _gelu_exact, lambda z: 0.5 * z * (1 + scipy.special.erf(z / np.sqrt(2))),
               _newton_inverse(_gelu_exact)),
    Activation("silu", jax.nn.silu, lambda z: z / (1.0 + np.exp(-z)), _newton_inverse(jax.nn.silu)),
    Activation("leaky_relu", lambda z: jax.nn.leaky_relu(z, 0.01), lambda z: np.where(z >= 0, z, 0.01 * z),
               _inv_leaky_relu),
)}


def act_inverse(name: str, a: Array, dead_zone: float = 0.0) -> tuple[Array, Array, Array]:
    """Inverts ``a = f(z)`` elementwise: returns (z estimate, f'(z), weight of each z entry).

    The weight is how far ``z`` can be trusted when ``a`` carries an error: an error
    da becomes dz = da / f'(z), so forward equations in z are weighted by f'(z)
    (normalised to max 1; the error-in-variables linearisation). ReLU loses ``z``
    where ``a = 0`` (it is only known to be <= 0): weight 0 there, and also where
    ``a <= dead_zone * max|a|`` when ``dead_zone`` (static) is given. GELU/SiLU are
    inverted on their monotone branch z > 0 (weight 0 elsewhere).
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {', '.join(ACTIVATIONS)}")
    return ACTIVATIONS[name].inverse(a, dead_zone)


# ----------------------------------------------------------------------------- forward order


@functools.lru_cache(maxsize=64)
def _forward_layout(victim: Victim) -> GradientLayout:
    box: dict[str, GradientLayout] = {}

    def init(key):
        variables = victim.module.init(key, jnp.zeros((1, *victim.input_shape), jnp.float32))
        # Inside the trace the dict still has creation order; the returned one would be sorted.
        box["layout"] = GradientLayout.from_params(variables["params"])
        return jnp.zeros(())

    jax.eval_shape(init, jax.random.PRNGKey(0))
    return box["layout"]


def forward_layout(victim: Victim) -> GradientLayout:
    """The victim's gradient layout in forward (module creation) order (pure; memoised per victim)."""
    return _memo(_forward_layout, victim)


def forward_order(victim: Victim) -> tuple[tuple[str, ...], ...]:
    """Paths of the victim's parameter leaves in forward order, for ``GradientLayout.from_params(order=)``."""
    return forward_layout(victim).leaf_paths()


# ----------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One layer block of the victim, as the trace sees it.

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
    head_is_output: bool = True  # the last layer's output is the model's output (the logits)

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


@dataclasses.dataclass(frozen=True, eq=False)
class ModuleCall:
    """One recorded module ``__call__``.

    Attributes:
      path: the module's path in the params dict (() for the top-level module).
      module: the module (read its attributes only: its scope is gone after the run).
      params: the module's own "params" collection at call time.
      x, out: its first argument and its output (traced or concrete, as in the run).
    """

    path: tuple[str, ...]
    module: nn.Module
    params: Any
    x: Any
    out: Any


def record_calls(run: Callable[[], Any], select: Callable[[nn.Module], bool] = lambda m: True
                 ) -> tuple[Any, list[ModuleCall]]:
    """Runs ``run()`` (a victim forward pass) under Flax's method interceptor.

    Returns run's result and every ``__call__`` of a module accepted by ``select``
    whose first argument and output are arrays, in call order. Pure in the values
    it records: use it inside jit or a loss function.
    """
    calls: list[ModuleCall] = []

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        mod = context.module
        if (context.method_name == "__call__" and args and hasattr(args[0], "shape") and hasattr(out, "shape")
                and select(mod)):
            calls.append(ModuleCall(tuple(mod.path), mod, mod.variables.get("params", {}), args[0], out))
        return out

    with nn.intercept_methods(interceptor):
        result = run()
    return result, calls


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


def _affine(call: ModuleCall) -> Array | None:
    """``f(x, kernel) + bias`` with the recorded geometry for a plain Dense/Conv call, else None."""
    own = call.params
    kern = own.get("kernel") if hasattr(own, "get") else None
    if kern is None or kern.ndim not in (2, 4) or any(isinstance(v, Mapping) for v in own.values()):
        return None
    if kern.ndim == 2:
        return jnp.einsum("...i,io->...o", call.x, kern) + own.get("bias", 0.0)
    strides, padding = _conv_geometry(call.module)
    y = jax.lax.conv_general_dilated(call.x, kern, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + own.get("bias", 0.0)


def _record_calls(victim: Victim, params: Params, state: Any, x: np.ndarray
                  ) -> tuple[list[_Call], dict[tuple[str, ...], float]]:
    """Runs the victim once under jit and records every module call.

    The wiring is read from the identity of the traced arrays (a layer that receives
    the very array another layer returned reads it directly), the values from the
    jitted outputs. Every Dense/Conv call is also recomputed as ``f(x, kernel) + bias``
    with the recorded geometry; the returned dict holds the maximum relative deviation
    per layer path. One compilation, no op-by-op dispatch.
    """
    meta: list[ModuleCall] = []
    check_paths: list[tuple[str, ...]] = []

    def run(params, state, x):
        _, calls = record_calls(lambda: victim.module.apply({"params": params, **(state or {})}, x))
        meta.extend(calls)
        devs = []
        for call in calls:
            y = _affine(call)
            if y is not None:
                devs.append(jnp.max(jnp.abs(y - call.out)) / (jnp.max(jnp.abs(call.out)) + 1e-6))
                check_paths.append(call.path)
        return [c.x for c in calls], [c.out for c in calls], devs

    xs, outs, devs = jax.jit(run)(params, state, x)
    # The tracers in `meta` stay alive until here, so their ids are unique.
    calls = [_Call(c.path, type(c.module).__name__, c.module, np.asarray(xv), np.asarray(ov), id(c.x), id(c.out))
             for c, xv, ov in zip(meta, xs, outs)]
    meta.clear()
    return calls, {p_: float(d) for p_, d in zip(check_paths, devs)}


def _conv_geometry(module: nn.Module) -> tuple[tuple[int, int], Any]:
    strides = module.strides if module.strides is not None else 1
    strides = (strides, strides) if isinstance(strides, int) else tuple(strides)
    pad = module.padding
    if isinstance(pad, str):
        if pad.upper() not in ("SAME", "VALID"):
            raise NotImplementedError(f"conv padding {pad!r} is not supported by the victim trace")
        padding: Any = pad.upper()
    elif isinstance(pad, int):
        padding = ((pad, pad), (pad, pad))
    else:
        padding = tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)
    for attr in ("input_dilation", "kernel_dilation"):
        d = getattr(module, attr, None)
        if d not in (None, 1, (1, 1)):
            raise NotImplementedError(f"dilated convs ({attr}={d}) are not supported by the victim trace")
    if getattr(module, "feature_group_count", 1) != 1:
        raise NotImplementedError("grouped convs are not supported by the victim trace")
    return strides, padding


def _relation(out: np.ndarray, succ: np.ndarray) -> str:
    """Which op turns a layer's recorded output into the (different) array its reader receives."""
    o = np.asarray(out, np.float64).reshape(-1)
    s = np.asarray(succ, np.float64).reshape(-1)
    tol = 1e-4 * (np.abs(s).max() + 1e-6)
    if o.size == s.size:
        for name, act in ACTIVATIONS.items():
            if np.allclose(act.host_fn(o), s, atol=tol, rtol=1e-4):
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
    """Traces the victim once (random weights and input) and derives its plan (``trace_victim`` memoises it).

    Args:
      victim: the victim model (its architecture is what the attacker knows).
      layout: its forward-order layout (``forward_layout(victim)`` if None).

    Returns:
      The plan. Raises NotImplementedError for wiring the plan cannot describe
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
                                      "the victim trace (GIT generators, R-GAP) maps each layer once")
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
                                      "f(x, kernel) + bias); the victim trace cannot map it")

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

    last = layers[units[-1].main[-1][0]]
    head_is_output = () in by_path and last.op != "embed" and by_path[last.block.path].out_id == by_path[()].out_id
    return VictimPlan(layout, layers, tuple(units), (h, w, c), first, perm,
                      tuple(float(m) for m in victim.mean), tuple(float(s) for s in victim.std), head_is_output)


@functools.lru_cache(maxsize=32)
def _trace_victim(victim: Victim) -> VictimPlan:
    return build_plan(victim, forward_layout(victim))


def trace_victim(victim: Victim) -> VictimPlan:
    """The victim's plan (``build_plan``), memoised per victim: tracing takes a compile (victims hash by value)."""
    return _memo(_trace_victim, victim)


def _memo(fn, victim: Victim):
    try:
        hash(victim)
    except TypeError:  # e.g. a module built with a list attribute: trace it every time
        return fn.__wrapped__(victim)
    return fn(victim)

