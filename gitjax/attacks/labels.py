"""Label recovery from the last dense layer's gradient.

With softmax cross-entropy the head's bias gradient for one example is
``p - onehot(y)``: every entry is positive except the true class's.

  * ``idlg_label``: iDLG (Zhao et al. 2020, "iDLG: Improved Deep Leakage from
    Gradients"): the label of a single example is the one negative entry, i.e. the
    argmin of the head bias gradient. For a head without bias (or whose bias gradient a
    pruning defence zeroed), iDLG's rule uses the kernel gradient ``h (p - y)^T``: with
    non-negative features h (ReLU/sigmoid), the true class's column is the one with
    negative sum.
  * ``batch_labels``: counting, in the spirit of LLG (Wainakh et al. 2022, "User-Level
    Label Leakage from Gradients in Federated Learning") and Geng et al. 2021. For a
    batch-mean gradient ``g_b[k] = mean_p[k] - count[k] / B``, so
    ``count[k] = B * (mean_p[k] - g_b[k])``. Classes with a negative entry surely
    occur (LLG's first rule); the remaining counts go greedily to the largest
    residual of that estimate (LLG's impact rule). ``mean_p`` (the mean softmax of
    the batch, unknown to the attacker) defaults to uniform 1/K, which is close for
    untrained victims; pass an estimate (e.g. ``estimate_mean_probs``) otherwise.

Both functions are pure and jittable (``batch_size`` static); the head is found
through the GradientLayout as the last block of kind "dense".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gitjax.layout import GradientLayout, LayerBlock
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


def head_block(layout: GradientLayout) -> tuple[int, LayerBlock]:
    """(index, block) of the victim's last dense layer, the classifier head."""
    for i in range(len(layout.blocks) - 1, -1, -1):
        if layout.blocks[i].kind == "dense":
            return i, layout.blocks[i]
    raise GitjaxError("label recovery needs a dense classifier head; the victim has no dense layer")


def head_signal(grads: Grads, layout: GradientLayout) -> Array:
    """(K,) per-class signal whose sign marks the present classes (negative = present).

    The head bias gradient when the head has a bias and it shows a present class (exactly
    ``mean p - counts / B``); otherwise the column sums of the head kernel gradient (K last),
    rescaled so that the absent classes' entries sum to about the uniform ``(K - n_neg) / K``
    as a bias gradient's would (the unknown feature scale cancels). A bias with no negative
    entry cannot be a softmax cross-entropy gradient: a top-k pruned update (99 %: 0 of 10
    entries sent) has zeroed it, while the kernel's sent entries, dominated by the present
    classes' columns (``|p_y - 1| = sum of the others``), still carry the sign.
    """
    i, blk = head_block(layout)
    vals = layout.to_blocks(grads)[i]
    kernel = vals["kernel"].astype(jnp.float32)
    s_K = jnp.sum(kernel.reshape(-1, kernel.shape[-1]), axis=0)
    k = s_K.shape[0]
    pos = s_K > 0
    scale = jnp.sum(jnp.where(pos, s_K, 0.0)) / jnp.maximum(jnp.sum(pos) / k, 1.0 / k)
    from_kernel = s_K / jnp.maximum(scale, 1e-30)
    if blk.bias_shape is None:
        return from_kernel
    bias = vals["bias"].astype(jnp.float32)
    return jnp.where(jnp.any(bias < 0), bias, from_kernel)


def idlg_label(grads: Grads, layout: GradientLayout) -> Array:
    """iDLG: the label (int scalar) of the single example behind ``grads``."""
    return jnp.argmin(head_signal(grads, layout)).astype(jnp.int32)


def label_counts(grads: Grads, layout: GradientLayout, batch_size: int, mean_probs: Array | None = None) -> Array:
    """(K,) int32 estimated label counts summing to ``batch_size`` (see module doc)."""
    g_K = head_signal(grads, layout)
    k = g_K.shape[0]
    p_K = jnp.full((k,), 1.0 / k, jnp.float32) if mean_probs is None else jnp.asarray(mean_probs, jnp.float32)
    est_K = batch_size * (p_K - g_K)
    # A negative entry can only come from a present class: give those one each first
    # (most negative first), then hand out the rest by the largest residual estimate.
    bonus_K = jnp.where(g_K < 0, 1e6 - g_K, 0.0)

    def give(_, counts_K):
        first = jnp.where(counts_K == 0, bonus_K, 0.0)
        return counts_K.at[jnp.argmax(est_K - counts_K + first)].add(1)

    return jax.lax.fori_loop(0, batch_size, give, jnp.zeros((k,), jnp.int32))


def batch_labels(grads: Grads, layout: GradientLayout, batch_size: int, mean_probs: Array | None = None) -> Array:
    """(B,) int32 recovered labels, sorted ascending (the order is not recoverable)."""
    counts_K = label_counts(grads, layout, batch_size, mean_probs)
    return jnp.repeat(jnp.arange(counts_K.shape[0], dtype=jnp.int32), counts_K, total_repeat_length=batch_size)


def estimate_mean_probs(victim: Victim, params: Params, state: ModelState, key: PRNGKey, n: int = 32) -> Array:
    """(K,) mean softmax of the victim over ``n`` uniform-noise images: a data-free impact estimate."""
    x_NxHxWxC = jax.random.uniform(key, (n, *victim.input_shape))
    return jnp.mean(jax.nn.softmax(victim.apply(params, state, x_NxHxWxC), axis=-1), axis=0)


def recover_labels(grads: Grads, layout: GradientLayout, batch_size: int, mean_probs: Array | None = None) -> Array:
    """iDLG for a single example, counting for a batch: (B,) int32."""
    if batch_size == 1:
        return idlg_label(grads, layout)[None]
    return batch_labels(grads, layout, batch_size, mean_probs)
