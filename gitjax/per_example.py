"""Per-group weight gradients from one forward and one batched backward pass.

``group_grads(victim, params, state, x_NxBxHxWxC, y_NxB)`` returns, for each of N
groups of B images, the gradient of that group's mean cross-entropy: leaves
(N, *param). B = 1 gives per-example gradients, N = 1 the batch-mean gradient.

Why not ``vmap(grad)``: vmapping a conv's weight gradient over examples turns it
into a grouped convolution, which XLA:CPU runs several times slower than the
batched backward pass. A layer's weight gradient is a contraction of its input
with its output error, so here:

  1. the victim runs once on all N*B images with every parameterised leaf module
     (Dense, Conv, norms, ...) intercepted (``flax.linen.intercept_methods``):
     its input is recorded and a zero "tap" is added to its output;
  2. one backward pass differentiates the summed group losses w.r.t. the taps,
     which gives every leaf module's per-example output error;
  3. each leaf module's per-group parameter gradient is then contracted locally:
     Dense: input^T error; Conv: the same with the input pixels each kernel offset
     meets (one stacked patches tensor or one contraction per offset, see
     ``STACK_RATIO``); biases: errors summed over positions; any other leaf
     module (LayerNorm, GroupNorm, eval-mode BatchNorm): ``vmap`` of that module's
     own VJP, which is elementwise and cheap.

Parameters owned by no leaf module (a ViT's positional embedding and CLS token)
get ``vmap(grad)`` restricted to them. The examples must not interact: this holds
for every zoo victim in eval mode, not for train-mode BatchNorm (callers fall
back to ``vmap(grad)`` there).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gitjax.types import Array, Grads, ModelState, Params
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call of a parameterised leaf module during the forward pass."""

    key: str  # "<module path>#<call index>": the tap's name
    path: tuple[str, ...]  # the module's path in the params tree
    module: nn.Module  # an unbound clone, for the local VJP rule
    rule: str  # "dense", "conv" or "local"


def _own_params(module: nn.Module) -> dict | None:
    """The module's params if it is a leaf (all its params are arrays, no submodules); else None."""
    if module.scope is None:
        return None
    params = module.variables.get("params", {})
    if not params or any(isinstance(v, dict) or hasattr(v, "items") for v in params.values()):
        return None
    return params


def _conv_padding(module: nn.Conv, n_spatial: int):
    """lax padding for a flax Conv, or None where the fast rule does not apply (CIRCULAR, CAUSAL)."""
    pad = module.padding
    if isinstance(pad, str):
        return pad if pad in ("SAME", "VALID") else None
    if isinstance(pad, int):
        return [(pad, pad)] * n_spatial
    pad = list(pad)
    if len(pad) != n_spatial:
        return None
    return [(p, p) if isinstance(p, int) else tuple(p) for p in pad]


def _tuple(v, n: int) -> tuple[int, ...]:
    if v is None:
        return (1,) * n
    return (v,) * n if isinstance(v, int) else tuple(v)


def _rule(module: nn.Module, x: Any) -> str:
    if type(module) is nn.Dense and getattr(module, "dot_general", None) is None:
        return "dense"
    if type(module) is nn.Conv and isinstance(x, jax.Array | jax.core.Tracer):
        n = len(module.kernel_size)
        if (x.ndim == n + 2 and module.mask is None and _conv_padding(module, n) is not None
                and _tuple(module.input_dilation, n) == (1,) * n
                and getattr(module, "conv_general_dilated", None) is None):
            return "conv"
    return "local"


def _forward(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array, taps: dict | None,
             calls: list[_Call] | None, train: bool = False):
    """Logits with leaf modules intercepted: (logits, {tap key: input}, {tap key: output before tap})."""
    inputs: dict[str, Any] = {}
    outputs: dict[str, Any] = {}
    counts: dict[tuple, int] = {}

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not args or _own_params(module) is None:
            return next_fun(*args, **kwargs)
        path = tuple(module.path)
        i = counts.get(path, 0)
        counts[path] = i + 1
        key = "/".join(path) + f"#{i}"
        out = next_fun(*args, **kwargs)
        if not isinstance(out, jax.Array | jax.core.Tracer):
            return out  # multi-output leaf: its params are left to the fallback
        if calls is not None:
            calls.append(_Call(key, path, module.clone(parent=None), _rule(module, args[0])))
        inputs[key], outputs[key] = args[0], out
        if taps is not None:
            out = out + taps[key]
        return out

    with nn.intercept_methods(interceptor):
        logits = victim.apply(params, state, x_BxHxWxC, train=train)
    return logits, inputs, outputs


def _contract(a_NxRxI: Array, b_NxRxO: Array) -> Array:
    """sum_r a[n, r, i] * b[n, r, o] -> (N, I, O), written in that layout.

    An explicit ``dot_general`` with the input as left operand: ``jnp.einsum`` here
    let XLA:CPU compute the (N, O, I) product and transpose it, a full extra pass
    over per-example gradients that can be larger than the model (ResNet-18, B = 64:
    2.9 GB, 4.7 s vs 2.4 s).
    """
    return jax.lax.dot_general(a_NxRxI, b_NxRxO, (((1,), (1,)), ((0,), (0,))))


def _dense_grads(x_NxBxTxI: Array, e_NxBxTxO: Array, n: int) -> dict:
    i, o = x_NxBxTxI.shape[-1], e_NxBxTxO.shape[-1]
    x_NxRxI = x_NxBxTxI.reshape(n, -1, i)
    e_NxRxO = e_NxBxTxO.reshape(n, -1, o)
    return {"kernel": _contract(x_NxRxI, e_NxRxO), "bias": e_NxRxO.sum(1)}


def _shifted(module: nn.Conv, x_BxHxWxC: Array, out_spatial: tuple[int, ...]) -> list[Array]:
    """For each kernel offset (row-major), the input pixels it meets: (B, *out_spatial, C) each.

    Strided slices of the padded input, pure data movement. Why not
    ``lax.conv_general_dilated_patches``: it builds the patches as a depthwise
    convolution, several times slower on XLA:CPU. Whether the slices are stacked into
    one patches tensor or contracted one by one is decided per layer in ``_conv_grads``.
    """
    nsp = len(module.kernel_size)
    ks, st = tuple(module.kernel_size), _tuple(module.strides, nsp)
    dil = _tuple(module.kernel_dilation, nsp)
    pad = _conv_padding(module, nsp)
    if isinstance(pad, str):
        eff = tuple((k - 1) * d + 1 for k, d in zip(ks, dil))
        pad = jax.lax.padtype_to_pads(x_BxHxWxC.shape[1:-1], eff, st, pad)
    x_pad = jnp.pad(x_BxHxWxC, [(0, 0), *pad, (0, 0)])
    slices = []
    for offs in itertools.product(*(range(k) for k in ks)):
        start = (0, *(o * d for o, d in zip(offs, dil)), 0)
        limit = (x_pad.shape[0], *(o * d + s * (n - 1) + 1 for o, d, s, n in zip(offs, dil, st, out_spatial)),
                 x_pad.shape[-1])
        slices.append(jax.lax.slice(x_pad, start, limit, (1, *st, 1)))
    return slices


# A conv's kernel gradient is contracted from one stacked patches tensor when that
# tensor is small (at most STACK_MAX_PATCH entries per group) or its positions per
# group are at most STACK_RATIO x the output channels per feature group (then the
# kernel gradient is at least as large as the patches); otherwise one contraction
# per kernel offset, which never holds K copies of a large input.
STACK_RATIO = 4
STACK_MAX_PATCH = 65536


def _conv_grads(module: nn.Conv, x_BxHxWxC: Array, e_BxHoxWoxO: Array, n: int) -> dict:
    nsp = len(module.kernel_size)
    g = module.feature_group_count
    c_in, c_out = x_BxHxWxC.shape[-1], e_BxHoxWoxO.shape[-1]
    e_NxRxGxO = e_BxHoxWoxO.reshape(n, -1, g, c_out // g)
    shifted = [x_s.reshape(n, -1, g, c_in // g)
               for x_s in _shifted(module, x_BxHxWxC, e_BxHoxWoxO.shape[1 : 1 + nsp])]
    # kernel[offset] = sum over positions of (input at offset) x error, per group of the
    # feature groups (whose output channels are contiguous): offsets in row-major order
    # and (C_in / groups, groups x C_out / groups) match the flax kernel layout.
    def contract(a_NxRxGxC):
        if g == 1:
            return _contract(a_NxRxGxC[:, :, 0], e_NxRxGxO[:, :, 0])[:, :, None]
        return jnp.einsum("nrgc,nrgo->ncgo", a_NxRxGxC, e_NxRxGxO)

    # Measured at B = 64 on CPU: stacking ResNet-18's late stages (few positions, many
    # channels) took it from 1.43x to 1.16x the batch gradient, LeNet's small 5x5
    # layers (25 offsets) from 1.80x to 1.48x.
    r = e_NxRxGxO.shape[1]
    if r <= STACK_RATIO * (c_out // g) or r * len(shifted) * (c_in // g) <= STACK_MAX_PATCH:
        w_NxKxCxGxO = contract(jnp.concatenate(shifted, axis=-1))
    else:
        w_NxKxCxGxO = jnp.stack([contract(x_s) for x_s in shifted], axis=1)
    kernel = w_NxKxCxGxO.reshape(n, *module.kernel_size, c_in // g, c_out)
    return {"kernel": kernel, "bias": e_NxRxGxO.reshape(n, -1, c_out).sum(1)}


def _local_grads(module: nn.Module, variables: dict, x_BxD: Array, e_BxD: Array, n: int) -> dict:
    """vmap over groups of the module's own VJP w.r.t. its params (cheap for elementwise norms)."""
    rest = {c: v for c, v in variables.items() if c != "params"}

    def one(x_b, e_b):
        _, vjp = jax.vjp(lambda p: module.apply({"params": p, **rest}, x_b), variables["params"])
        return vjp(e_b)[0]

    split = lambda a: a.reshape(n, -1, *a.shape[1:])
    return jax.vmap(one)(split(x_BxD), split(e_BxD))


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def _sub_variables(params: Params, state: ModelState, path: tuple[str, ...]) -> dict:
    out = {"params": _get(params, path)}
    for col, tree in (state or {}).items():
        try:
            out[col] = _get(tree, path)
        except (KeyError, TypeError):
            pass
    return out


def _group_loss(victim: Victim, logits: Array, y_probs: Array, b: int) -> Array:
    # Sum over groups of each group's mean loss: the gradient of group n w.r.t. its own
    # examples' taps is then exactly its per-group gradient (examples do not interact).
    return jnp.sum(optax.softmax_cross_entropy(logits, y_probs)) / b


_COVERAGE: dict = {}


def covered_fraction(victim: Victim, params: Params, state: ModelState) -> float:
    """Fraction of parameter entries handled by the tap rules (the rest fall back to vmap(grad)).

    Cached per victim and parameter shapes (it costs one abstract trace).
    """
    sig = lambda t: (jax.tree_util.tree_structure(t),
                     tuple((a.shape, str(a.dtype)) for a in jax.tree_util.tree_leaves(t)))
    key = (victim, sig(params), sig(state))
    if key not in _COVERAGE:
        _COVERAGE[key] = _covered_fraction(victim, params, state)
    return _COVERAGE[key]


def _covered_fraction(victim: Victim, params: Params, state: ModelState) -> float:
    calls: list[_Call] = []
    x = jnp.zeros((1, *victim.input_shape), jnp.float32)
    jax.eval_shape(lambda p, s: _forward(victim, p, s, x, None, calls)[0], params, state)
    paths = {c.path for c in calls}
    total = covered = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        names = tuple(k.key for k in path)
        total += leaf.size
        covered += leaf.size if names[:-1] in paths else 0
    return covered / max(total, 1)


def group_grads(victim: Victim, params: Params, state: ModelState, x_NxBxHxWxC: Array, y_NxB: Array) -> Grads:
    """Per-group gradients of the mean eval-mode cross-entropy; leaves (N, *param).

    Args:
      x_NxBxHxWxC: N groups of B images in [0, 1].
      y_NxB: integer labels (N, B) or probability vectors (N, B, K).
    Equal to ``vmap(lambda x, y: grad(mean loss)(params, state, x, y))`` up to float
    summation order. Shapes are not checked here (leakage.py does that).
    """
    from gitjax.leakage import as_probs  # leakage imports this module

    n, b = x_NxBxHxWxC.shape[:2]
    x_MxHxWxC = x_NxBxHxWxC.reshape(n * b, *x_NxBxHxWxC.shape[2:])
    y_probs_MxK = as_probs(jnp.asarray(y_NxB).reshape(n * b, *jnp.shape(y_NxB)[2:]), victim.num_classes)

    # 1. Discover the leaf-module calls and their output shapes (abstract trace, no compute).
    calls: list[_Call] = []
    shapes = jax.eval_shape(lambda p, s, x: _forward(victim, p, s, x, None, calls)[2], params, state, x_MxHxWxC)
    # Zeros derived from x so that inside shard_map they are device-varying like x: the
    # gradient w.r.t. a replicated (invariant) tap would be psum-med over the mesh.
    zero = jnp.zeros_like(x_MxHxWxC.reshape(-1)[0])
    taps = {k: jnp.broadcast_to(zero.astype(s.dtype), s.shape) for k, s in shapes.items()}

    # 2. One forward + one backward pass: errors at every tap, inputs recorded as aux.
    def total(t):
        logits, inputs, _ = _forward(victim, params, state, x_MxHxWxC, t, None)
        return _group_loss(victim, logits, y_probs_MxK, b), inputs

    errors, inputs = jax.grad(total, has_aux=True)(taps)

    # 3. Local contractions, accumulated per module (a module may be called more than once).
    grads: dict[tuple, dict] = {}
    for c in calls:
        x_in, e_out = inputs[c.key], errors[c.key]
        if c.rule == "dense":
            g = _dense_grads(x_in, e_out, n)
        elif c.rule == "conv":
            g = _conv_grads(c.module, x_in, e_out, n)
        else:
            g = _local_grads(c.module, _sub_variables(params, state, c.path), x_in, e_out, n)
        own = _get(params, c.path)
        g = {name: g[name].reshape(n, *own[name].shape) for name in own}
        prev = grads.get(c.path)
        grads[c.path] = g if prev is None else jax.tree_util.tree_map(jnp.add, prev, g)

    # 4. Params owned by no leaf module: vmap(grad) restricted to them.
    leftover = {}
    for path, _ in jax.tree_util.tree_leaves_with_path(params):
        names = tuple(k.key for k in path)
        if names[:-1] not in grads:
            leftover[names] = None
    if leftover:
        def loss_rest(rest, x_b, y_b):
            p = _set_leaves(params, rest)
            logits = victim.apply(p, state, x_b)
            return jnp.mean(optax.softmax_cross_entropy(logits, y_b))

        rest0 = {k: _get(params, k) for k in leftover}
        y_NxBxK = y_probs_MxK.reshape(n, b, -1)
        g_rest = jax.vmap(lambda x_b, y_b: jax.grad(loss_rest)(rest0, x_b, y_b))(x_NxBxHxWxC, y_NxBxK)
    else:
        g_rest = {}

    def leaf(path, _):
        names = tuple(k.key for k in path)
        if names in g_rest:
            return g_rest[names]
        return grads[names[:-1]][names[-1]]

    return jax.tree_util.tree_map_with_path(leaf, params)


def _set_leaves(tree: Params, updates: dict) -> Params:
    def leaf(path, a):
        return updates.get(tuple(k.key for k in path), a)

    return jax.tree_util.tree_map_with_path(leaf, tree)
