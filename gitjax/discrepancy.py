"""Parameter discrepancy: the attacker's copy of the victim differs from the one that leaked.

GIT's generator is trained offline on gradients of one set of victim parameters
and then inverts gradients leaked at another (Chen & Liu 2025, arXiv 2505.20026,
robustness to "parameter discrepancy"). Two ways to produce the victim's
parameters from the attacker's:

  * ``perturb_params``: isotropic noise with a chosen relative L2 size;
  * ``train_params_further``: K more SGD steps on data, as after further FL rounds.

``relative_distance`` measures the gap either way.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from gitjax.leakage import check_batch, make_loss
from gitjax.types import Array, GradientMismatchError, ModelState, Params, PRNGKey
from gitjax.victims import Victim


def _global_sq_norm(tree: Params) -> Array:
    return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree_util.tree_leaves(tree)),
               jnp.float32(0.0))


def perturb_params(key: PRNGKey, params: Params, relative: float) -> Params:
    """Each leaf += relative * rms(leaf) * N(0, I), so ||delta|| / ||params|| ~= relative.

    Per leaf E||delta||^2 = relative^2 * n * rms^2 = relative^2 * ||leaf||^2, hence
    the global relative L2 change is ``relative`` up to sampling noise; all-zero
    leaves (fresh biases) stay unchanged.
    """
    if isinstance(relative, (int, float)) and not relative >= 0:  # traced values are not checked
        raise ValueError(f"relative perturbation size must be >= 0, got {relative}")
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = []
    for p, k in zip(leaves, keys):
        rms = jnp.sqrt(jnp.mean(jnp.square(p)))
        out.append(p + relative * rms * jax.random.normal(k, p.shape, p.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


@functools.lru_cache(maxsize=None)
def _further_training_fn(victim: Victim, steps: int, batch_size: int, train: bool):
    grad_fn = jax.grad(make_loss(victim, train))

    @jax.jit
    def run(params: Params, state: ModelState, x_NxHxWxC: Array, y: Array, lr: Array, key: PRNGKey) -> Params:
        n = x_NxHxWxC.shape[0]

        def step(p: Params, k: PRNGKey) -> tuple[Params, None]:
            idx_M = jax.random.choice(k, n, (batch_size,), replace=False)  # a fresh mini-batch per step
            g = grad_fn(p, state, x_NxHxWxC[idx_M], y[idx_M])
            return jax.tree_util.tree_map(lambda a, d: a - lr * d, p, g), None

        final, _ = jax.lax.scan(step, params, jax.random.split(key, steps))
        return final

    return run


def train_params_further(victim: Victim, params: Params, state: ModelState, x_NxHxWxC: Array, y: Array,
                         steps: int, lr: float, batch_size: int, key: PRNGKey, train: bool = False) -> Params:
    """``steps`` plain SGD steps on random mini-batches of (x, y) (without replacement within a batch).

    Runs as one jitted ``lax.scan``; the BatchNorm state is not updated
    (``train=False`` uses the running statistics, as the leaked gradient does).
    Returns the new params.
    """
    check_batch(victim, x_NxHxWxC, y)
    n = x_NxHxWxC.shape[0]
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] for {n} examples, got {batch_size}")
    if steps == 0:
        return params
    fn = _further_training_fn(victim, int(steps), int(batch_size), bool(train))
    return fn(params, state, jnp.asarray(x_NxHxWxC), jnp.asarray(y), jnp.float32(lr), key)


def relative_distance(params_a: Params, params_b: Params) -> Array:
    """Global ||a - b|| / ||a|| over all leaves (a scalar; inf/nan if ||a|| = 0)."""
    sa, sb = jax.tree_util.tree_structure(params_a), jax.tree_util.tree_structure(params_b)
    if sa != sb:
        raise GradientMismatchError(f"parameter pytrees differ in structure: {sa} vs {sb}")
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params_a), jax.tree_util.tree_leaves(params_b)):
        if a.shape != b.shape:
            raise GradientMismatchError(f"{jax.tree_util.keystr(path)}: shapes {a.shape} and {b.shape} differ")
    diff = jax.tree_util.tree_map(lambda a, b: a - b, params_a, params_b)
    return jnp.sqrt(_global_sq_norm(diff) / _global_sq_norm(params_a))
