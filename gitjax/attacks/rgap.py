"""R-GAP: recursive closed-form gradient attack (Zhu & Blaschko, ICLR 2021).

"R-GAP: Recursive Gradient Attack on Privacy". For one example through a
sequential net ``a_{l+1} = act_l(z_l)``, ``z_l = W_l a_l + b_l`` (dense or conv,
``W_l`` the layer's linear map) and cross-entropy loss:

  * head (dense with bias): ``db_L = delta_L = p - onehot(y)`` and
    ``dK_L = a_L delta_L^T``, so ``a_L = dK_L delta_L / |delta_L|^2`` and ``y = argmin db_L``;
  * for l = L-1, ..., 0, with ``a_{l+1}`` known:
      - ``z_l = act_l^{-1}(a_{l+1})`` (activations must be invertible: sigmoid,
        tanh, leaky-relu; for ReLU only the active units give an equation),
      - ``delta_l = act_l'(z_l) * W_{l+1}^T delta_{l+1}``,
      - forward constraints ``W_l a_l = z_l - b_l`` and weight-gradient
        constraints ``dW_l = G_l(delta_l) a_l`` (linear in ``a_l``: for a conv
        ``dK = sum_positions patch(a) delta^T``), stacked and solved by least squares.

The matrices are materialised with ``jax.jacfwd`` of the layer's linear map with
the geometry read by ``gitjax.trace`` (strides and padding included), so this is
for small nets. For a dense layer the ``in*out`` gradient equations ``a delta^T = dK``
are replaced by their equivalent least-squares form ``|delta| a = dK delta / |delta|``.

Rank analysis (the paper's criterion for when R-GAP can work): per layer the
number of unknowns (input size), the equations (forward rows used + gradient
rows) and the numerical rank of the stacked system (singular values above
``rcond * s_max``); ``rank < unknowns`` flags an under-determined layer whose
least-squares solution is only the minimum-norm one.

Limits: batch 1; sequential dense/conv nets only (no normalisation layers, no
residual connections, no attention): the structure comes from ``gitjax.trace.trace_victim``
and every layer's input must be an elementwise activation (of the trace's table) of
the previous layer's output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from typing import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.trace import LayerPlan, act_inverse, trace_victim
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params
from gitjax.victims import Victim


# ----------------------------------------------------------------------------- test/demo network


class RGAPNet(nn.Module):
    """Small sequential conv net for R-GAP: [Conv k x k (stride s) -> act] per entry of ``channels``, dense head.

    With stride 1, 'SAME' padding and non-decreasing channels every layer's system
    is over-determined (forward rows alone match the unknowns), which is R-GAP's
    favourable case.
    """

    channels: Sequence[int] = (8, 8)
    strides: Sequence[int] = (1, 1)
    kernel: int = 3
    num_classes: int = 10
    activation: Callable[[Array], Array] = nn.sigmoid

    @nn.compact
    def __call__(self, x_BxHxWxC: Array, train: bool = False) -> Array:
        h = x_BxHxWxC
        for i, (c, s) in enumerate(zip(self.channels, self.strides)):
            h = self.activation(nn.Conv(c, (self.kernel, self.kernel), strides=s, padding="SAME", name=f"conv{i}")(h))
        return nn.Dense(self.num_classes, name="head")(h.reshape((h.shape[0], -1)))


def make_rgap_victim(input_shape: tuple[int, int, int] = (16, 16, 3), channels: Sequence[int] = (8, 8),
                     strides: Sequence[int] | None = None, kernel: int = 3, num_classes: int = 10,
                     activation: Callable[[Array], Array] = nn.sigmoid) -> Victim:
    """A Victim wrapping ``RGAPNet`` (not in the zoo registry; for R-GAP tests and demos)."""
    strides = tuple(strides) if strides is not None else (1,) * len(channels)
    module = RGAPNet(tuple(channels), strides, kernel, num_classes, activation)
    c = input_shape[-1]
    return Victim("rgapnet", module, tuple(input_shape), num_classes, (0.5,) * c, (0.5,) * c)


# ----------------------------------------------------------------------------- tracing the victim


# The table's activations R-GAP inverts: bijective ones, and ReLU (only its active units give an equation).
RGAP_ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu")
_RELU_DEAD_ZONE = 1e-6  # ReLU outputs below this fraction of the largest one count as zero


@dataclasses.dataclass(frozen=True)
class Layer:
    """One affine layer of a traced sequential victim.

    plan: the traced layer (path, op, conv geometry, per-example shapes).
    in_shape/out_shape: (1, ...) as the layer sees one example.
    activation: name (in ``gitjax.trace.ACTIVATIONS``) of the op between this layer's output and the
      next layer's input; "identity" for the head.
    """

    plan: LayerPlan
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    activation: str

    @property
    def path(self) -> tuple[str, ...]:
        return self.plan.block.path

    @property
    def name(self) -> str:
        return self.plan.name

    @property
    def has_bias(self) -> bool:
        return self.plan.has_bias

    @property
    def is_dense(self) -> bool:
        return self.plan.op == "dense"


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def trace_sequential(victim: Victim, params: Params, state: ModelState) -> tuple[Layer, ...]:
    """The victim's affine layers in order, with the activations between them (from ``trace_victim``).

    Raises GitjaxError unless the victim is a chain of Dense/Conv layers joined by
    elementwise activations R-GAP can invert, ending in a dense head with bias.
    """
    del state  # the wiring does not depend on values
    groups = params.items() if isinstance(params, Mapping) else []
    bad = [k for k, v in groups if not (isinstance(v, Mapping) and "kernel" in v)]
    if bad or not groups:
        raise GitjaxError(
            f"R-GAP needs a sequential dense/conv victim without normalisation, embeddings or nested blocks; "
            f"victim {victim.name!r} has parameter groups {bad[:4]} that are not plain dense/conv layers")
    plan = trace_victim(victim)
    lps = [lp for lp in plan.layers if lp.op in ("dense", "conv")]
    if not lps:
        raise GitjaxError(f"victim {victim.name!r} has no Dense/Conv layers for R-GAP to invert")
    if plan.first != lps[0].index or plan.image_perm != tuple(range(math.prod(plan.image_shape))):
        raise GitjaxError(f"R-GAP: the first layer {lps[0].block.path} of {victim.name!r} does not read the "
                          "image directly")
    layers = []
    for k, lp in enumerate(lps):
        if k + 1 < len(lps):
            act = lp.post
            if act not in RGAP_ACTIVATIONS:
                raise GitjaxError(
                    f"R-GAP needs a sequential net: the input of layer {lps[k + 1].name!r} is not an "
                    f"invertible elementwise activation ({', '.join(RGAP_ACTIVATIONS)}) of layer {lp.name!r}'s "
                    f"output (residual connection, pooling or normalisation?)")
        else:
            act = "identity"
            if not (lp.op == "dense" and lp.post == "top" and plan.head_is_output):
                raise GitjaxError(f"R-GAP needs a dense head producing the logits; {victim.name!r} ends with "
                                  f"{lp.block.path}")
        layers.append(Layer(lp, (1, *lp.in_shape), (1, *lp.out_shape), act))
    if not layers[-1].has_bias:
        raise GitjaxError("R-GAP reads the head's delta from its bias gradient; the head has no bias")
    return tuple(layers)


# ----------------------------------------------------------------------------- the recursion


@dataclasses.dataclass(frozen=True)
class RGAPConfig:
    """R-GAP settings.

    rcond: singular values below rcond * s_max count as zero (rank analysis and pseudo-inverse).
    """

    rcond: float = 1e-4


def _linear(layer: Layer, kernel: Array, a: Array) -> Array:
    """The layer's linear map (no bias) at input a of shape layer.in_shape, with the traced geometry."""
    if layer.is_dense:
        return jax.lax.dot_general(a, kernel, (((a.ndim - 1,), (0,)), ((), ())))
    return jax.lax.conv_general_dilated(a, kernel, layer.plan.strides, layer.plan.padding,
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.jit, static_argnames=("layer",))
def layer_system(layer: Layer, kernel: Array, bias: Array | None, dk: Array, a_next: Array,
                 back_next: Array) -> dict[str, Array]:
    """One R-GAP step's linear system for the layer's input (pure, jitted).

    Args:
      a_next: the layer's activated output (= next layer's input), any shape of out_shape's size.
      back_next: W_{l+1}^T delta_{l+1}, the gradient reaching the activated output.

    Returns dict(a_RxN, rhs_R: the stacked, block-normalised system; delta: this layer's output
    gradient (out_shape); forward_rows: forward equations used).
    """
    n = math.prod(layer.in_shape)
    z, dact, weight = act_inverse(layer.activation, a_next.reshape(layer.out_shape), _RELU_DEAD_ZONE)
    mask = weight > 0  # units whose output gives a forward equation
    delta = dact * back_next.reshape(layer.out_shape)
    lin = lambda a_n: _linear(layer, kernel, a_n.reshape(layer.in_shape)).reshape(-1)
    m_OxN = jax.jacfwd(lin)(jnp.zeros((n,), kernel.dtype))
    rhs_f = (z - (bias if bias is not None else 0.0)).reshape(-1)
    w_f = mask.reshape(-1).astype(kernel.dtype)
    m_OxN, rhs_f = m_OxN * w_f[:, None], rhs_f * w_f
    if layer.is_dense:
        # a delta^T = dK  <=>  (least squares) |delta| a = dK delta / |delta|
        dnorm = jnp.maximum(jnp.linalg.norm(delta), 1e-30)
        g_GxN = dnorm * jnp.eye(n, dtype=kernel.dtype)
        rhs_g = (dk @ delta.reshape(-1)) / dnorm
    else:
        def grad_of(a_n):
            _, vjp = jax.vjp(lambda k: _linear(layer, k, a_n.reshape(layer.in_shape)), kernel)
            return vjp(delta)[0].reshape(-1)

        g_GxN = jax.jacfwd(grad_of)(jnp.zeros((n,), kernel.dtype))
        rhs_g = dk.reshape(-1)
    # Put both blocks on a common scale (their raw scales differ by orders of magnitude).
    sf = jnp.maximum(jnp.linalg.norm(m_OxN) / jnp.sqrt(n), 1e-30)
    sg = jnp.maximum(jnp.linalg.norm(g_GxN) / jnp.sqrt(n), 1e-30)
    return {"a_RxN": jnp.concatenate([m_OxN / sf, g_GxN / sg]),
            "rhs_R": jnp.concatenate([rhs_f / sf, rhs_g / sg]),
            "delta": delta, "forward_rows": jnp.sum(w_f)}


def _one_blas_thread():
    """One BLAS thread for the host solves: these n <= ~3000 problems gain little from threads,
    and OpenBLAS threads spinning next to XLA's (or other processes') were measured 4-10x slower."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional (ships with scikit-learn)
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def solve_system(a_RxN: Array, rhs_R: Array, rcond: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Least squares through the normal equations in float64 (host).

    Returns (x_N, singular values of A descending, relative residual). Float64 keeps the
    squared condition number of A^T A harmless; the singular values come from the
    eigenvalues of A^T A, and a full-rank system is then solved by Cholesky (both far
    cheaper on CPU than an SVD of the tall A); a rank-deficient one gets the truncated
    pseudo-inverse (minimum-norm solution).
    """
    a = np.asarray(a_RxN, np.float64)
    rhs = np.asarray(rhs_R, np.float64)
    with _one_blas_thread():
        n_NxN, c_N = a.T @ a, a.T @ rhs
        s = np.sqrt(np.maximum(scipy.linalg.eigvalsh(n_NxN)[::-1], 0.0))
        if s[-1] > rcond * s[0]:
            x = scipy.linalg.cho_solve(scipy.linalg.cho_factor(n_NxN), c_N)
        else:
            w, v = scipy.linalg.eigh(n_NxN)
            keep = w > (rcond * s[0]) ** 2
            x = v[:, keep] @ ((v[:, keep].T @ c_N) / w[keep])
    residual = float(np.linalg.norm(a @ x - rhs) / max(np.linalg.norm(rhs), 1e-300))
    return x.astype(np.float32), s, residual


@functools.partial(jax.jit, static_argnames=("layer",))
def _backprop_delta(layer: Layer, kernel: Array, delta_out: Array) -> Array:
    """W^T delta: the gradient reaching this layer's input from its output gradient."""
    _, vjp = jax.vjp(lambda a: _linear(layer, kernel, a), jnp.zeros(layer.in_shape, kernel.dtype))
    return vjp(delta_out.reshape(layer.out_shape))[0]


def rgap_reconstruct(layers: Sequence[Layer], params: Params, grads: Grads, config: RGAPConfig):
    """Runs the recursion from the head down; returns (normalised input (1, ...), label, per-layer reports)."""
    head = layers[-1]
    hk, hb = _get(grads, head.path)["kernel"], _get(grads, head.path)["bias"]
    delta_K = hb
    label = jnp.argmin(delta_K)
    # Head: dK = a delta^T, one rank-1 ratio.
    a = (hk @ delta_K) / jnp.maximum(jnp.sum(delta_K**2), 1e-30)
    back = _backprop_delta(head, _get(params, head.path)["kernel"], delta_K)
    reports = [{
        "layer": head.name, "unknowns": int(math.prod(head.in_shape)), "equations": int(hk.size),
        "forward_rows": 0, "gradient_rows": int(hk.size), "rank": int(math.prod(head.in_shape)),
        "cond": 1.0, "underdetermined": False, "residual": 0.0,
    }]
    for layer in reversed(layers[:-1]):
        p, g = _get(params, layer.path), _get(grads, layer.path)
        sys_ = layer_system(layer, p["kernel"], p.get("bias"), g["kernel"], a, back)
        x_N, s, residual = solve_system(sys_["a_RxN"], sys_["rhs_R"], config.rcond)
        n = math.prod(layer.in_shape)
        rank = int(np.sum(s > config.rcond * s[0]))
        rep = {
            "layer": layer.name, "unknowns": int(n), "forward_rows": int(sys_["forward_rows"]),
            "gradient_rows": int(g["kernel"].size), "rank": rank,
            "cond": float(s[0] / s[max(rank, 1) - 1]),  # of the part that is solved for
            "underdetermined": bool(rank < n), "residual": residual,
        }
        rep["equations"] = rep["forward_rows"] + rep["gradient_rows"]
        if layer.has_bias:  # consistency of the recursed delta with the leaked bias gradient
            d = np.asarray(sys_["delta"]).reshape(-1, layer.out_shape[-1]).sum(0)
            gb = np.asarray(g["bias"])
            rep["delta_error"] = float(np.linalg.norm(d - gb) / max(np.linalg.norm(gb), 1e-30))
        reports.insert(0, rep)
        a = jnp.asarray(x_N).reshape(layer.in_shape)
        back = _backprop_delta(layer, p["kernel"], sys_["delta"])
    return a, label, reports


def rank_report(reports: Sequence[dict]) -> str:
    """The per-layer rank analysis as a table."""
    lines = [f"{'layer':<14}{'unknowns':>9}{'equations':>10}{'rank':>7}{'cond':>10}  status"]
    for r in reports:
        status = "UNDER-DETERMINED" if r["underdetermined"] else "ok"
        lines.append(f"{r['layer']:<14}{r['unknowns']:>9}{r['equations']:>10}{r['rank']:>7}"
                     f"{r['cond']:>10.2e}  {status}")
    return "\n".join(lines)


def run(problem: AttackProblem, key, config: RGAPConfig, **_) -> AttackResult:
    """Registry entry: validate, trace the victim, recurse, denormalise."""
    del key  # deterministic
    t0 = time.perf_counter()
    problem.validate()
    if problem.batch_size != 1:
        raise GitjaxError(f"R-GAP inverts the gradient of a single example; got batch_size={problem.batch_size}")
    victim = problem.victim
    layers = trace_sequential(victim, problem.params, problem.state)
    a, label, reports = rgap_reconstruct(layers, problem.params, problem.grads, config)
    x = victim.denormalize(a.reshape((1, *victim.input_shape)))
    images = jnp.clip(x, 0.0, 1.0).block_until_ready()
    info = {
        "seconds": time.perf_counter() - t0,
        "layers": reports,
        "underdetermined": [r["layer"] for r in reports if r["underdetermined"]],
        "rank_report": rank_report(reports),
    }
    return AttackResult(images=images, labels=jnp.asarray([label], jnp.int32), info=info)
