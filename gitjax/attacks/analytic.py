"""Analytic attack on a victim whose first layer is dense over the flattened image.

For one example and a dense layer ``z = a K + b`` (Flax kernel K of shape (E, U)),
``dL/dK = a delta^T`` and ``dL/db = delta``, so every unit j with ``delta_j != 0``
gives the layer input exactly: ``a = dK[:, j] / db[j]`` (Phong et al. 2018,
"Privacy-preserving deep learning via additively homomorphic encryption";
the analytic attack of Geiping et al.'s "breaching"). Over all units the least
squares combination is ``a = dK db / |db|^2``.

For a batch-mean gradient ``dK = (1/B) sum_i a_i delta_i^T`` the ratio of unit j
is ``sum_i delta_ij a_i / sum_i delta_ij``: the input of one example when only
that example reaches unit j (with ReLU, units inactive for the others), else a
mixture. Exact ratios of one example coincide across many units while mixtures
do not, so this module

  1. clusters the unit ratios (agreeing to ``same_tol``) and forms each cluster's
     least-squares candidate,
  2. accepts a candidate only if its own forward/backward pass reproduces the
     first-layer bias gradient on the cluster's units for some label (that label
     is the inferred one). This rejects mixtures, including stable ones (two
     same-label examples whose deltas are nearly proportional agree across units);
     a lone unit (support 1) is accepted under a much tighter tolerance,
  3. takes the largest accepted cluster as one example, subtracts its exact
     per-example gradient ``(a delta^T, delta)`` from the summed leaked gradient
     and repeats ("peeling"): units it shared with one other example now isolate
     that example.

Slots left after peeling get the ratios of the strongest remaining units,
flagged ``mixture``. The head layer offers a weaker variant (for a label that
occurs once, the head's kernel/bias gradient ratio approximates that example's
*penultimate features*, mixed with the small softmax terms of the others);
it does not give pixels, so it is not used here.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.layout import GradientLayout, LayerBlock
from gitjax.types import Array, GitjaxError, ModelState, Params
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class AnalyticConfig:
    """Analytic attack settings.

    same_tol: relative L2 distance under which two unit ratios count as the same example.
    min_support: units that must agree before a ratio counts as one example (not a mixture).
    active_tol: units with |db_j| below active_tol * max|db| are treated as inactive.
    peel_noise: after peeling, a unit is inactive unless its residual exceeds
      peel_noise times the bias gradient already removed from it (float32 cancellation).
    verify_single: also accept a lone unit's ratio (support 1) when it reproduces that
      unit's bias gradient for some label to verify_tol (relative).
    cluster_tol: a cluster's candidate must reproduce its units' bias gradient to this
      relative L2 error (reported as "fit"); rejects stable mixtures.
    """

    same_tol: float = 1e-3
    min_support: int = 2
    active_tol: float = 1e-6
    peel_noise: float = 1e-4
    verify_single: bool = True
    verify_tol: float = 1e-5
    cluster_tol: float = 1e-3


def first_dense_block(victim: Victim, layout: GradientLayout) -> LayerBlock:
    """The victim's first layer if it is dense over the flattened image; raises GitjaxError otherwise."""
    first = layout.blocks[0]
    e = math.prod(victim.input_shape)
    kshape = first.kernel_shape
    if first.kind != "dense" or kshape is None or kshape[0] != e or first.bias_shape is None:
        hint = " (for a ViT's patch embedding use the 'april' attack)" if first.kind == "dense" else ""
        raise GitjaxError(
            f"the analytic attack needs a victim whose first layer is a dense layer with bias over the "
            f"flattened image ({e} inputs), e.g. 'mlp'; victim {victim.name!r} starts with "
            f"{first.kind} layer {first.name!r} with leaves {dict(first.leaves)}{hint}"
        )
    return first


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def unit_ratios(dk_ExU: Array, db_U: Array, valid_U: Array) -> Array:
    """Per-unit input candidates r_UxE = dK[:, j] / db[j] (zeros for invalid units)."""
    safe_U = jnp.where(valid_U, db_U, 1.0)
    return jnp.where(valid_U[:, None], (dk_ExU / safe_U).T, 0.0)


def _same_matrix(r_UxE: Array, valid_U: Array, tol: float) -> Array:
    """same_UxU[a, b]: ratios a and b agree to relative L2 distance < tol."""
    sq_U = jnp.sum(r_UxE**2, axis=1)
    d2_UxU = jnp.maximum(sq_U[:, None] + sq_U[None, :] - 2.0 * r_UxE @ r_UxE.T, 0.0)
    # Rounding in the Gram form is ~eps * |r|^2, far under tol^2 * |r|^2 for tol >= 1e-3.
    scale_UxU = jnp.maximum(sq_U[:, None], sq_U[None, :])
    return (d2_UxU < tol**2 * scale_UxU) & valid_U[:, None] & valid_U[None, :]


def _replace(tree, path, value):
    """Copy of a nested dict with the leaf at ``path`` replaced."""
    if not path:
        return value
    return {**tree, path[0]: _replace(tree[path[0]], path[1:], value)}


def _bias_grad_fn(victim: Victim, block: LayerBlock):
    """Returns gb(params, state, a_E) -> (K, U): the first layer's per-example bias gradient for every label."""
    eye_KxK = jnp.eye(victim.num_classes)

    def bias_grads(params: Params, state: ModelState, a_E: Array) -> Array:
        x_1xHxWxC = victim.denormalize(a_E.reshape((1, *victim.input_shape)))
        bias_path = block.path + ("bias",)

        def logits_of(b_U: Array) -> Array:
            return victim.apply(_replace(params, bias_path, b_U), state, x_1xHxWxC)[0]

        logits_K, vjp = jax.vjp(logits_of, _get(params, bias_path))
        # Cross-entropy of one example: dL/dlogits = softmax - onehot(y), for each y at once.
        cot_KxK = jax.nn.softmax(logits_K)[None, :] - eye_KxK
        return jax.vmap(vjp)(cot_KxK)[0]

    return bias_grads


@functools.partial(jax.jit, static_argnames=("victim", "block", "batch_size", "config"))
def analytic_reconstruct(victim: Victim, block: LayerBlock, params: Params, state: ModelState,
                         dk_ExU: Array, db_U: Array, batch_size: int, config: AnalyticConfig):
    """Peeling analytic attack on the first dense layer (pure, jitted).

    Args:
      dk_ExU, db_U: the leaked batch-mean kernel/bias gradient of the first layer.
      batch_size: B.

    Returns:
      a_BxE: recovered normalised inputs (single examples first, then mixtures),
      labels_B: inferred labels (-1 for mixtures), support_B: agreeing units per slot,
      unique_B: bool, whether the slot was recovered as a single example.
    """
    b = batch_size
    bias_grads = _bias_grad_fn(victim, block)
    dk_sum, db_sum = dk_ExU * b, db_U * b  # the sum of per-example gradients
    scale = jnp.max(jnp.abs(db_sum))

    def active(db_r_U: Array, mass_U: Array) -> Array:
        return jnp.abs(db_r_U) > config.active_tol * scale + config.peel_noise * mass_U

    def peel(carry, _):
        dk_r, db_r, mass_U, done = carry
        valid_U = active(db_r, mass_U)
        same_UxU = _same_matrix(unit_ratios(dk_r, db_r, valid_U), valid_U, config.same_tol)
        support_U = jnp.sum(same_UxU, axis=1)
        # Every unit's cluster gives a least-squares candidate a = dK_J db_J / |db_J|^2 ...
        w_UxU = jnp.where(same_UxU, db_r[None, :], 0.0)
        wsq_U = jnp.maximum(jnp.sum(w_UxU**2, axis=1), 1e-30)
        a_UxE = (w_UxU @ dk_r.T) / wsq_U[:, None]
        # ... which is accepted only if its own forward/backward pass reproduces the bias
        # gradient on the cluster's units for some label. A single unit's ratio is checked
        # tightly; a cluster of agreeing units more loosely. This rejects mixtures, including
        # stable ones (same-label examples whose deltas are nearly proportional).
        gb_UxKxU = jax.vmap(lambda a: bias_grads(params, state, a))(a_UxE)
        err_UxK = jnp.einsum("ju,jku->jk", same_UxU, (gb_UxKxU - db_r[None, None, :]) ** 2)
        fit_U = jnp.sqrt(jnp.min(err_UxK, axis=1) / wsq_U)
        single_tol = config.verify_tol if config.verify_single else -1.0
        tol_U = jnp.where(support_U >= config.min_support, config.cluster_tol, single_tol)
        ok_U = valid_U & (fit_U < tol_U)
        # Largest accepted cluster; ties go to the unit with the largest |db| (least rounding).
        best = jnp.argmax(jnp.where(ok_U, support_U * (1.0 + scale) + jnp.abs(db_r), -1.0))
        found = ok_U[best] & ~done
        a_E = a_UxE[best]
        label = jnp.argmin(err_UxK[best])
        gb_U = gb_UxKxU[best, label]
        keep = found.astype(dk_r.dtype)
        dk_r = dk_r - keep * jnp.outer(a_E, gb_U)  # a dense layer's per-example dK = a delta^T
        db_r = db_r - keep * gb_U
        mass_U = mass_U + keep * jnp.abs(gb_U)
        out = (a_E, jnp.where(found, label, -1), support_U[best], found, fit_U[best])
        return (dk_r, db_r, mass_U, done | ~found), out

    init = (dk_sum, db_sum, jnp.zeros_like(db_sum), jnp.asarray(False))
    (dk_r, db_r, mass_U, _), (a_BxE, labels_B, support_B, unique_B, fit_B) = jax.lax.scan(peel, init, None, length=b)

    # Fill the slots that peeling left with the strongest remaining unit ratios (mixtures).
    valid_U = active(db_r, mass_U)
    r_UxE = unit_ratios(dk_r, db_r, valid_U)
    order_U = jnp.argsort(-jnp.where(valid_U, jnp.abs(db_r), -1.0))
    n_unique = jnp.sum(unique_B)
    slot_B = jnp.clip(jnp.arange(b) - n_unique, 0, order_U.shape[0] - 1)
    mix_BxE = r_UxE[order_U[slot_B]]
    a_BxE = jnp.where(unique_B[:, None], a_BxE, mix_BxE)
    support_B = jnp.where(unique_B, support_B, 1)
    return a_BxE, labels_B, support_B, unique_B, fit_B


def _fill_mixture_labels(labels: np.ndarray, unique: np.ndarray, known: np.ndarray | None,
                         head_db_K: np.ndarray, probs_found_BxK: np.ndarray, batch_size: int) -> np.ndarray:
    """Labels of the mixture slots: the known multiset minus the recovered labels, or else the most
    negative classes of the head-bias gradient left after removing the recovered examples' terms."""
    labels = labels.copy()
    missing = np.flatnonzero(~unique)
    if missing.size == 0:
        return labels
    if known is not None:
        pool = list(np.asarray(known).tolist())
        for y in labels[unique]:
            if y in pool:
                pool.remove(int(y))
        pool += [int(known[0])] * len(missing)  # never runs dry
        labels[missing] = pool[: len(missing)]
        return labels
    # sum_i (p_i - onehot(y_i)) = B * db_head; the unrecovered examples' share is what is left.
    onehot = np.eye(head_db_K.shape[0])[labels[unique]]
    rest_K = batch_size * head_db_K - np.sum(probs_found_BxK - onehot, axis=0)
    labels[missing] = np.resize(np.argsort(rest_K), len(missing))
    return labels


def run(problem: AttackProblem, key, config: AnalyticConfig, **_) -> AttackResult:
    """Registry entry: validate, run the jitted peeling attack, denormalise, report per-slot flags."""
    del key  # deterministic
    t0 = time.perf_counter()
    layout = problem.validate()
    victim = problem.victim
    block = first_dense_block(victim, layout)
    g = _get(problem.grads, block.path)
    a_BxE, labels_B, support_B, unique_B, fit_B = analytic_reconstruct(
        victim, block, problem.params, problem.state, g["kernel"], g["bias"], problem.batch_size, config)
    x_BxHxWxC = victim.denormalize(a_BxE.reshape((problem.batch_size, *victim.input_shape)))
    images = jnp.clip(x_BxHxWxC, 0.0, 1.0)
    unique = np.asarray(unique_B)
    labels = np.asarray(labels_B)
    head = layout.blocks[-1]
    head_db = np.asarray(_get(problem.grads, head.path)["bias"])
    probs = np.asarray(jax.nn.softmax(victim.apply(problem.params, problem.state, x_BxHxWxC)))[unique]
    known = None if problem.labels is None else np.asarray(problem.labels)
    labels = _fill_mixture_labels(labels, unique, known, head_db, probs, problem.batch_size)
    images.block_until_ready()
    info = {
        "seconds": time.perf_counter() - t0,
        "layer": block.name,
        "recovered": ["unique" if u else "mixture" for u in unique],
        "support": [int(s) for s in np.asarray(support_B)],
        "n_unique": int(unique.sum()),
        "fit": [float(f) if u else None for f, u in zip(np.asarray(fit_B), unique)],
        "out_of_range": float(jnp.mean((x_BxHxWxC < -0.01) | (x_BxHxWxC > 1.01))),
    }
    return AttackResult(images=images, labels=jnp.asarray(labels, jnp.int32), info=info)
