"""Exact-GIT: the victim's backward pass, inverted layer by layer in reverse order.

Gradient Inversion Transcript (Chen & Liu, arXiv 2505.20026) derives a recursion
that recovers each layer's input from that layer's weight gradient, its bias
gradient and the error recovered at the layer above, running from the logits
down to the image; "Exact-GIT" keeps that recursion (pseudo-inverses and
elementwise ops) and learns only what the attacker does not know. This module
builds it generically from the victim's plan (``gitjax.trace.trace_victim``): one
generator block per victim layer block, visited from the last layer to the first.

The carried state is a triple at a point of the victim's forward graph, with a
leading B axis (one slot per victim image):

* ``a``: the activation estimate there (for a layer output: the pre-activation z),
* ``e``: the estimate of dL/d(that activation) per image,
* ``m``: a mask of the entries of ``a`` that are trusted (ReLU hides z < 0).

Blocks (derivations in docs/theory.md):

* connector (the op between a layer and its reader): activation inverse
  ``z = f^{-1}(a)`` and error ``e * f'(z)``; global-pool backward ``e / HW``; token
  select; learned per-channel affine for ops that mix (residual adds, attention).
* dense / conv: project the error onto the bias-gradient constraint
  ``sum_{i,p} delta_i[p] = B db``, then the ridge pseudo-inverse
  ``X = B dK D^T (D D^T)^{-1}`` (at B = 1: ``a = dK db / |db|^2``, exact), refined,
  when the gradient equations alone are underdetermined (convs, token layers),
  by unrolled CG on R-GAP's system (forward equations ``f(a, W) + b = z`` plus
  weight-gradient equations). The error below is ``W^T delta`` (a transposed conv
  with the victim's geometry).
* norm: project onto ``d beta`` and ``d gamma``, invert the affine map, learned
  per-channel statistics (BatchNorm running stats are not in the leaked gradient).
* embed: additive embeddings (ViT ``pos_embed``) give the per-token error sum
  exactly (``d pos = mean_i delta_i``), which makes the patch embedding invertible
  (APRIL); prepended tokens (``cls``) are stripped.
* composite units (ResNet/transformer blocks) mirror the skip: errors add
  (``e_in = e_branch + e_skip``), activations are blended by a learned gate.

The first layer's input estimate goes back to pixels through the traced index map,
is denormalised, corrected by a zero-initialised residual refiner and clipped with
a straight-through clip, so the exact path passes through unchanged at init.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from gitjax.generators.config import GeneratorConfig
from gitjax.generators.features import rms
from gitjax.generators.io import block_value, check_grads_n, check_victim_params, ste_clip01, to_image
from gitjax.generators.linalg import (
    TINY,
    LinearOps,
    cg_refine,
    conv_coverage,
    low_rank_noise_var,
    noise_to_signal,
    project_sum,
    ridge_invert,
)
from gitjax.trace import ACTIVATIONS, LayerPlan, UnitPlan, VictimPlan, act_inverse
from gitjax.types import Array, GitjaxError, Grads, Params

State = tuple[Array, Array, Array]  # (a, e, m), each (B, *shape)


def _pname(lp_or_name) -> str:
    name = lp_or_name.name if isinstance(lp_or_name, (LayerPlan, UnitPlan)) else str(lp_or_name)
    return name.replace("/", "_")


def _after(state: State, dep: Array | None) -> State:
    """``state`` with a data dependency on ``dep``: parallel branches (fan-outs, skip chains) run in turn.

    XLA:CPU (jax 0.10) was seen to deadlock when the backward passes of two
    independent CG solves (``lax.custom_linear_solve``) are scheduled concurrently;
    chaining the branches through an optimisation barrier serialises them (and their
    transposes) at no cost on a CPU that has no spare cores anyway. CPU only: on an
    accelerator the barrier would only forbid overlapping independent branches.
    """
    if dep is None or jax.default_backend() != "cpu":
        return state
    state, _ = jax.lax.optimization_barrier((state, dep))
    return state


class ExactGIT(nn.Module):
    """Exact-GIT generator. ``apply({"params": p}, grads_N, victim_params) -> (N, B, H, W, C)`` in [0, 1].

    Attributes:
      config: generator hyper-parameters (``kind == "exact"``).
      plan: the victim's plan (``gitjax.trace.trace_victim``).

    Collections besides ``params`` (diagnostics, never used in training or attacks):
    ``diagnostics`` (mutable) records each dense/conv layer's input estimate;
    ``oracle`` (given) may hold ``core/{unit}_exit_mask`` (N, B, *unit out shape), the
    true 0/1 mask of a residual unit's exit ReLU, applied to the error there
    (``experiments.exact_oracle``: what Exact-GIT would gain by knowing it).
    """

    config: GeneratorConfig
    plan: VictimPlan

    @nn.compact
    def __call__(self, grads_N: Grads, victim_params: Params | None = None) -> Array:
        check_grads_n(self.plan.layout, grads_N)
        if self.config.use_victim_params:
            if victim_params is None:
                raise GitjaxError("Exact-GIT with use_victim_params=True needs the victim's params "
                                  "(pass them to apply, or build it with use_victim_params=False)")
            check_victim_params(self.plan.layout, victim_params)
        core = nn.vmap(_ExactCore, in_axes=(0, None), out_axes=0,
                       variable_axes={"params": None, "diagnostics": 0, "oracle": 0}, split_rngs={"params": False})
        return core(self.config, self.plan, name="core")(grads_N, victim_params)


class _ExactCore(nn.Module):
    """Exact-GIT on one leaked gradient (no N axis); vmapped over N by ExactGIT."""

    config: GeneratorConfig
    plan: VictimPlan

    # ------------------------------------------------------------------ values the attacker may know
    def _value(self, vp: Params | None, lp: LayerPlan, leaf: str) -> Array | None:
        shape = lp.block.shape(leaf)
        if shape is None:
            return None
        if self.config.use_victim_params:
            return block_value(vp, lp.block, leaf)
        init = {"kernel": nn.initializers.lecun_normal(), "scale": nn.initializers.ones,
                "value": nn.initializers.normal(0.02)}.get(leaf, nn.initializers.zeros)
        return self.param(f"{_pname(lp)}_{leaf}", init, shape)

    # ------------------------------------------------------------------ connectors
    def _connect(self, state: State, post: str, out_shape: tuple[int, ...], name: str) -> State:
        """Maps the state at a layer's reader to the state at the layer's output (``post`` inverted)."""
        a, e, m = state
        b = a.shape[0]
        n_out = math.prod(out_shape)
        if post in ("top", "embed"):
            return a, e, m
        if post in ACTIVATIONS and a[0].size == n_out:
            z, dz, mz = act_inverse(post, a)
            shape = (b, *out_shape)
            return z.reshape(shape), (e * dz).reshape(shape), (m * mz).reshape(shape)
        if post == "pool":  # mean over positions: every position gets a/HW of the error
            npos = n_out // out_shape[-1]
            bshape = (b,) + (1,) * (len(out_shape) - 1) + (out_shape[-1],)
            tile = lambda x: jnp.broadcast_to(x.reshape(bshape), (b, *out_shape))
            # Only the mean is known: the tiled values are a start, not a forward target (m = 0),
            # else CG pulls the layer below towards a constant map per channel.
            return tile(a), tile(e) / npos, jnp.zeros((b, *out_shape), a.dtype)
        if post.startswith("select:"):  # one token read; the others get no error
            t = int(post.split(":")[1])
            c = out_shape[-1]
            rest = self.param(f"{name}_select_fill", nn.initializers.zeros, (n_out // c, c))
            put = lambda base, x: base.reshape(b, -1, c).at[:, t].set(x.reshape(b, c)).reshape(b, *out_shape)
            a_o = put(jnp.broadcast_to(rest, (b, n_out // c, c)), a)
            return a_o, put(jnp.zeros((b, n_out), a.dtype), e), put(jnp.zeros((b, n_out), a.dtype), m)
        # "mixed" (residual add, attention) or an unidentified activation
        if a[0].size == n_out:
            c = out_shape[-1]
            s = self.param(f"{name}_mix_scale", nn.initializers.ones, (c,))
            t = self.param(f"{name}_mix_shift", nn.initializers.zeros, (c,))
            shape = (b, *out_shape)
            return a.reshape(shape) * s + t, e.reshape(shape), m.reshape(shape)
        return self._resample(state, out_shape, name)

    def _resample(self, state: State, out_shape: tuple[int, ...], name: str) -> State:
        """Learned linear map between mismatched shapes (rare: no identified relation, no equal size)."""
        a, e, m = state
        b = a.shape[0]
        if a.ndim == 4 and len(out_shape) == 3:
            h, w, _ = out_shape
            res = lambda x: jax.image.resize(x, (b, h, w, x.shape[-1]), "linear")
            dense = nn.Dense(out_shape[-1], use_bias=False, name=f"{name}_resample")
            return dense(res(a)), dense(res(e)), jnp.zeros((b, *out_shape), a.dtype)
        rank = min(64, math.prod(out_shape))
        down = nn.Dense(rank, use_bias=False, name=f"{name}_resample_down")
        up = nn.Dense(math.prod(out_shape), use_bias=False, name=f"{name}_resample_up")
        f = lambda x: up(down(x.reshape(b, -1))).reshape(b, *out_shape)
        return f(a), f(e), jnp.zeros((b, *out_shape), a.dtype)

    # ------------------------------------------------------------------ layer blocks
    def _param_layer(self, lp: LayerPlan, state: State, g: dict[str, Array], vp: Params | None,
                     noise_var: Array | None) -> State:
        """Dense/conv: input from the ridge pseudo-inverse (+ R-GAP CG when underdetermined).

        With ``noise_var`` (the estimated per-entry noise variance of the leaked gradient),
        the underdetermined solves become noise-aware: the layer's noise-to-signal ratio
        times a learned scale ``exp(log_noise)`` is added to the ridge of the closed-form
        inverse (shrinking it towards the prior) and down-weights the weight-gradient
        equations against the forward equations in CG (Tikhonov / Wiener weighting).
        """
        z, e, m = state
        bsz = self.config.batch_size
        name = _pname(lp)
        kernel, bias = self._value(vp, lp, "kernel"), self._value(vp, lp, "bias")
        dk_sum = bsz * g["kernel"]
        axes = tuple(range(e.ndim - 1))
        if "bias" in g:
            e = project_sum(e, bsz * g["bias"], axes)
        n_out = e.shape[-1]
        m_rows = bsz * math.prod(lp.out_shape[:-1])
        determined = lp.op == "dense" and m_rows <= n_out
        ops = LinearOps(lp, (bsz, *lp.in_shape))
        a0 = jnp.zeros((bsz, *lp.in_shape), e.dtype)
        cov = conv_coverage(ops) if lp.op == "conv" else None
        nsr = None
        if noise_var is not None and not determined:
            log_noise = self.param(f"{name}_log_noise", nn.initializers.zeros, ())
            nsr = jnp.exp(log_noise) * noise_to_signal(bsz**2 * noise_var, dk_sum)
        if determined:  # exact pseudo-inverse, no trainable ridge
            a = ridge_invert(ops, dk_sum, e, a0, jnp.zeros(()), cov, rtol=self.config.exact_ridge)
        else:
            log_eps = self.param(f"{name}_log_ridge", nn.initializers.constant(
                math.log(max(self.config.exact_ridge, 1e-4))), ())
            a = ridge_invert(ops, dk_sum, e, a0, jnp.exp(log_eps) + (0.0 if nsr is None else nsr), cov)
        if not determined and self.config.exact_cg_iters > 0:
            log_w = self.param(f"{name}_log_cg_weights", lambda k: jnp.array([0.0, 3.0, math.log(1e-6)]))
            a = cg_refine(ops, kernel, bias, dk_sum, e, z, m, a, log_w, self.config.exact_cg_iters, noise=nsr,
                          grad_iters=self.config.exact_cg_grad_iters)
        e_in = ops.fold(ops.back(e, kernel))  # W^T delta: the transposed layer
        self.sow("diagnostics", f"{name}_input", a)  # the layer-input estimate (a no-op unless asked for)
        return a, e_in, jnp.ones_like(a)

    def _norm_layer(self, lp: LayerPlan, state: State, g: dict[str, Array], vp: Params | None) -> State:
        """Norm: project onto d beta / d gamma, invert the affine map, learned statistics."""
        y, e, m = state
        bsz = self.config.batch_size
        name = _pname(lp)
        c = lp.out_shape[-1]
        gamma, beta = self._value(vp, lp, "scale"), self._value(vp, lp, "bias")
        gamma = 1.0 if gamma is None else gamma
        beta = 0.0 if beta is None else beta
        axes = tuple(range(e.ndim - 1))
        if "bias" in g:
            e = project_sum(e, bsz * g["bias"], axes)
        safe_gamma = jnp.where(jnp.abs(gamma) > 1e-6, gamma, 1e-6)
        xh = (y - beta) / safe_gamma
        if "scale" in g:  # min-norm correction so that sum delta * x_hat = B d gamma
            ee = jnp.sum(e * e, axes)
            corr = (bsz * g["scale"] - jnp.sum(e * xh, axes)) / (ee + 1e-2 * jnp.max(ee) + TINY)
            xh = xh + e * corr
        s = self.param(f"{name}_stat_scale", nn.initializers.ones, (c,))
        t = self.param(f"{name}_stat_shift", nn.initializers.zeros, (c,))
        inv_sigma = self.param(f"{name}_inv_sigma", nn.initializers.ones, (c,))
        a_in = xh * s + t
        gy = gamma * e
        if lp.norm_type == "layer":  # Jacobian of normalising over the feature axis
            gy = gy - gy.mean(-1, keepdims=True) - xh * (gy * xh).mean(-1, keepdims=True)
        return a_in, gy * inv_sigma, m

    def _embed(self, lp: LayerPlan, state: State, g: dict[str, Array], vp: Params | None) -> State:
        """Embeds: additive (pos_embed) -> exact per-token error sum; prepended (cls) -> stripped."""
        a, e, m = state
        val_shape = lp.out_shape
        if a.ndim != 3 or len(val_shape) != 2 or a.shape[-1] != val_shape[-1]:
            return state
        t_c, t_v = a.shape[1], val_shape[0]
        if t_c == t_v:
            dv = g["value"].reshape(val_shape)
            e = project_sum(e, self.config.batch_size * dv, (0,))
            value = self._value(vp, lp, "value")
            return a - value.reshape(val_shape), e, m
        if t_c > t_v:
            return a[:, t_v:], e[:, t_v:], m[:, t_v:]
        return state

    def _layer(self, lp: LayerPlan, state: State, g: dict[str, Array], vp: Params | None,
               noise_var: Array | None) -> State:
        if lp.op in ("dense", "conv"):
            return self._param_layer(lp, state, g, vp, noise_var)
        if lp.op == "norm":
            return self._norm_layer(lp, state, g, vp)
        return self._embed(lp, state, g, vp)

    # ------------------------------------------------------------------ the reversed walk
    def _items(self, items, state: State, gb, vp, noise_var) -> State:
        plan = self.plan
        for item in reversed(items):
            outs = []
            for i in item:
                lp = plan.layers[i]
                s = self._connect(state, lp.post, lp.out_shape, _pname(lp))
                outs.append(self._layer(lp, _after(s, outs[-1][0] if outs else None), gb[i], vp, noise_var))
            if len(outs) == 1:
                state = outs[0]
            else:  # fan-out: the input feeds every branch; estimates average, errors add
                state = (sum(o[0] for o in outs) / len(outs), sum(o[1] for o in outs),
                         jnp.ones_like(outs[0][0]))
        return state

    def _top(self, lp: LayerPlan, g: dict[str, Array]) -> State:
        """Initial state at the logits: the per-image errors ``p_i - y_i`` of softmax cross-entropy.

        Their mean is the head's bias gradient db. Assuming the B images share one
        softmax output p and have distinct labels (iDLG's observation: a label's
        entry of db is the only negative one per image), the labels are the B most
        negative entries c_j of db and ``delta_i = db + mean_j e_{c_j} - e_{c_i}``,
        which satisfies the mean constraint. Learned per-slot offsets (zero at init)
        correct the assumption; at B = 1 the bias projection makes all of it exact.
        """
        bsz = self.config.batch_size
        k = lp.out_shape[-1]
        db = g.get("bias", jnp.zeros((k,), jnp.float32))
        kcol = jnp.sqrt(jnp.sum(g["kernel"].reshape(-1, k) ** 2, 0)) if "kernel" in g else jnp.zeros_like(db)
        feats = jnp.concatenate([db / rms(db), kcol / rms(kcol)])
        h = nn.gelu(nn.Dense(self.config.width, name="top_dense")(feats))
        off = nn.Dense(bsz * k, kernel_init=nn.initializers.zeros, name="top_offsets")(h).reshape(bsz, k)
        labels_B = jax.lax.top_k(-db, min(bsz, k))[1]
        if bsz > k:
            labels_B = jnp.resize(labels_B, (bsz,))
        onehot_BxK = jax.nn.one_hot(labels_B, k, dtype=db.dtype)
        e = db[None] + onehot_BxK.mean(0, keepdims=True) - onehot_BxK + off * rms(db)
        shape = (bsz, *lp.out_shape)
        return jnp.zeros(shape, db.dtype), e.reshape(shape), jnp.zeros(shape, db.dtype)

    @nn.compact
    def __call__(self, grads: Grads, vp: Params | None) -> Array:
        plan = self.plan
        gb = plan.layout.to_blocks(grads)
        last = plan.units[-1].main[-1][0]
        state = self._top(plan.layers[last], gb[last])
        noise_var = None
        if self.config.exact_noise_aware and "kernel" in gb[last]:
            k_top = gb[last]["kernel"]
            noise_var = low_rank_noise_var(k_top.reshape(-1, k_top.shape[-1]), self.config.batch_size)
        for unit in reversed(plan.units):
            if not unit.composite:
                state = self._items(unit.main, state, gb, vp, noise_var)
                continue
            name = _pname(unit)
            exit_state = self._connect(state, unit.post, unit.out_shape, f"{name}_exit")
            if self.has_variable("oracle", f"{name}_exit_mask"):  # diagnostics only: the true output mask
                a, e, m = exit_state
                exit_state = (a, e * self.get_variable("oracle", f"{name}_exit_mask"), m)
            main = self._items(unit.main, exit_state, gb, vp, noise_var)
            if unit.side:
                side = self._items(unit.side, _after(exit_state, main[0]), gb, vp, noise_var)
                gate0 = 0.5
            else:  # identity skip (or a learned resample when the shapes differ)
                side = self._connect(exit_state, "mixed", unit.in_shape, f"{name}_skip")
                gate0 = 0.0
            gate = self.param(f"{name}_skip_gate", nn.initializers.constant(gate0), (unit.in_shape[-1],))
            state = (main[0] + gate * (side[0] - main[0]), main[1] + side[1], main[2])

        a_first = state[0]
        x = to_image(plan, a_first)
        if x is None:
            hwc = plan.image_shape
            x = self._resample(state, hwc, "image")[0] * jnp.asarray(plan.std) + jnp.asarray(plan.mean)
        if self.config.refine_channels > 0:
            h = nn.gelu(nn.Conv(self.config.refine_channels, (3, 3), name="refine_in")(x))
            for i in range(self.config.refine_depth):  # dilated: the receptive field doubles per layer
                d = 2 ** (i + 1)
                h = h + nn.gelu(nn.Conv(self.config.refine_channels, (3, 3), kernel_dilation=d,
                                        name=f"refine_mid{i}")(h))
            x = x + nn.Conv(x.shape[-1], (3, 3), kernel_init=nn.initializers.zeros, name="refine_out")(h)
        return ste_clip01(x)
