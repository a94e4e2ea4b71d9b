"""Backward-pass algebra of the generators: a layer's linear maps, their pseudo-inverse and CG solves.

Pure functions (derivations in docs/theory.md): the layer map ``f(a, K)`` and its
adjoints (``LinearOps``, built on explicit conv patches), the ridge (pseudo-inverse)
solve that recovers a layer's input from its weight gradient and output error, a
fixed-iteration conjugate-gradient least-squares refinement (R-GAP's linear system),
the bias-constraint projection, and the noise-level estimate of a leaked gradient.

Shape letters: B victim batch, M = B x positions (pixels or tokens) at a layer output,
I/O the input/output features of a layer.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from gitjax.trace import LayerPlan
from gitjax.types import Array

TINY = 1e-30


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

    # Each map is one matmul over flattened (positions, features) views, written as an
    # explicit dot_general: as einsums, XLA:CPU transposed the patches and the results around
    # the dots inside every CG iteration (extra passes over the K-times-larger patch tensors).
    @property
    def _nf(self) -> int:
        """Trailing feature axes of an unfolded input: (kh, kw, C) for a conv, (I,) for a dense layer."""
        return 1 if self.lp.op == "dense" else 3

    def forward(self, p: Array, k: Array) -> Array:
        """``P . K``: unfolded input (..., *F) x kernel (*F, O) -> (..., O)."""
        lead = p.shape[: p.ndim - self._nf]
        out = jnp.dot(p.reshape(-1, math.prod(k.shape[:-1])), k.reshape(-1, k.shape[-1]))
        return out.reshape(*lead, k.shape[-1])

    def weight_grad(self, p: Array, delta: Array) -> Array:
        """``P^T . delta`` summed over batch and positions: kernel-shaped (*F, O)."""
        f_shape = p.shape[p.ndim - self._nf:]
        o = delta.shape[-1]
        out = jax.lax.dot_general(p.reshape(-1, math.prod(f_shape)), delta.reshape(-1, o), (((0,), (0,)), ((), ())))
        return out.reshape(*f_shape, o)

    def back(self, r: Array, k: Array) -> Array:
        """``r . K^T`` in unfolded input space (fold it to get the input-space adjoint)."""
        f = math.prod(k.shape[:-1])
        out = jax.lax.dot_general(r.reshape(-1, k.shape[-1]), k.reshape(f, -1), (((1,), (1,)), ((), ())))
        return out.reshape(*r.shape[:-1], *k.shape[:-1])

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


def conv_patch_counts(ops: LinearOps) -> Array:
    """(*in_shape[:-1], 1) for a conv: how many output positions' patches cover each input pixel
    (0 where the conv never reads it, e.g. the odd positions of a 1x1 stride-2 projection)."""
    lp = ops.lp
    kh, kw = lp.block.kernel_shape[:2]
    one = LinearOps(lp, (1, *lp.in_shape[:-1], 1))
    patches = one.back(jnp.ones((1, *lp.out_shape[:-1], 1), jnp.float32), jnp.ones((kh, kw, 1, 1), jnp.float32))
    return one.fold(patches)[0]


def conv_coverage(ops: LinearOps) -> Array:
    """``conv_patch_counts`` floored at 1: the divisor that averages overlapping patches."""
    return jnp.maximum(conv_patch_counts(ops), 1.0)


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
    # No trusted entry (e.g. below a global pool): no forward term, and no 0/TINY in its gradient.
    zz = jnp.sum(w2 * zb**2)
    w_f = jnp.where(zz > 0, jnp.exp(log_w[0]) / jnp.where(zz > 0, zz, 1.0), 0.0)
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
    grad_iters = iters if not grad_iters else min(grad_iters, iters)  # never more than the forward solve
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

