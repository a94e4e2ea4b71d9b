"""Image priors from BatchNorm statistics (Yin et al., CVPR 2021, "See Through Gradients").

A BatchNorm layer's running mean/variance summarise what the layer's input looks
like on natural data. For a dummy batch x the BN-statistics regulariser

    R_bn(x) = sum_l || mu_l(x) - running_mean_l ||_2 + || var_l(x) - running_var_l ||_2

(mu_l, var_l: per-channel mean and biased variance of the l-th BN layer's input
over batch and space) pulls reconstructions toward those statistics. The inputs of
the BN layers are captured with ``flax.linen.intercept_methods`` around the
victim's own forward pass, so any victim with ``nn.BatchNorm`` works unchanged.

The group-consistency term of the same paper is offered in its simplest form:
restarts are run independently, their mean becomes a registration target, and a
second round pulls every restart toward it with weight ``group_weight``.

Registers 'ig+bn': Inverting Gradients (``gitjax.attacks.ig``) with ``bn_weight * R_bn``
added to its objective.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from gitjax.attacks.base import AttackProblem, AttackResult
from gitjax.attacks.ig import IGConfig, ig_reconstruct
from gitjax.attacks.iterative import run_iterative
from gitjax.losses import ExtraLoss
from gitjax.refine import select_best
from gitjax.trace import record_calls
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class BNStats:
    """One BatchNorm layer's input statistics and its running statistics (per channel)."""

    path: tuple[str, ...]
    mean: Array
    var: Array
    running_mean: Array
    running_var: Array


def bn_statistics(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array,
                  train: bool = False, targets: ModelState | None = None) -> list[BNStats]:
    """Runs the victim on x and returns every BatchNorm layer's input mean/var with its reference stats.

    ``train`` selects the forward mode (eval: earlier BN layers normalise with running
    statistics; train: with the batch's own), matching how the leaked gradient was computed.
    The reference statistics are the running ones in ``state``, or those in ``targets``
    (a state of the same structure) when given.
    """
    ref = (state or {}).get("batch_stats") if targets is None else targets["batch_stats"]
    _, calls = record_calls(lambda: victim.apply(params, state, x_BxHxWxC, train=train),
                            select=lambda m: isinstance(m, nn.BatchNorm))
    found = []
    for call in calls:
        h = call.x
        axes = tuple(range(h.ndim - 1))  # all but the feature axis, as nn.BatchNorm's default
        mean = jnp.mean(h, axis=axes)
        var = jnp.mean(jnp.square(h), axis=axes) - jnp.square(mean)  # biased, as Flax computes it
        node = ref
        for k in call.path:
            node = node[k]
        found.append(BNStats(call.path, mean, var, node["mean"], node["var"]))
    return found


def bn_stats_loss(victim: Victim, params: Params, state: ModelState, train: bool = False,
                  targets: ModelState | None = None) -> Callable[[Array], Array]:
    """x_BxHxWxC -> sum over BN layers of ||mu - ref_mean||_2 + ||var - ref_var||_2 (pure).

    The reference statistics are the running ones of ``state`` unless ``targets`` is given.
    """
    if not (state or {}).get("batch_stats"):
        raise GitjaxError(f"the BN-statistics prior needs a victim with BatchNorm running statistics; "
                          f"victim {victim.name!r} has none (state keys: {sorted(state or {})})")

    def loss(x_BxHxWxC: Array) -> Array:
        stats = bn_statistics(victim, params, state, x_BxHxWxC, train, targets)
        return sum(jnp.linalg.norm(s.mean - s.running_mean) + jnp.linalg.norm(s.var - s.running_var)
                   for s in stats)

    return loss


def client_running_stats(victim: Victim, params: Params, state: ModelState, x_BxHxWxC: Array) -> ModelState:
    """The state a FedAvg client shares after one train-mode forward on its private batch x.

    Its BatchNorm layers update ``running = m * running + (1 - m) * batch`` (Flax's
    ``momentum`` m); other collections are unchanged. Feed the result to
    ``batch_stats_from_update`` to recover the batch statistics.
    """
    _, updated = victim.module.apply({"params": params, **state}, victim.normalize(x_BxHxWxC), train=True,
                                     mutable=["batch_stats"])
    return {**state, **updated}


def batch_stats_from_update(old_state: ModelState, new_state: ModelState, momentum: float = 0.9) -> ModelState:
    """The client's batch statistics from a shared running-statistics update.

    FedAvg clients that train in train mode update ``running = m * running + (1 - m) * batch``
    and usually share the new running statistics with the weights; the server then
    knows ``batch = (new - m * old) / (1 - m)`` exactly (for one local step).
    """
    return jax.tree_util.tree_map(lambda o, n: (n - momentum * o) / (1.0 - momentum), old_state, new_state)


def calibrate_batch_stats(victim: Victim, params: Params, state: ModelState, x_NxHxWxC: Array) -> ModelState:
    """State whose running statistics are the exact BN-input statistics of the images x.

    Stands in for a trained victim's running averages: layer by layer in a train-mode
    pass over x (each BN normalising with x's own statistics, as in training).
    """
    stats = bn_statistics(victim, params, state, x_NxHxWxC, train=True)

    def put(tree, path, mean, var):
        if len(path) == 1:
            return {**tree, path[0]: {**tree[path[0]], "mean": mean, "var": var}}
        return {**tree, path[0]: put(tree[path[0]], path[1:], mean, var)}

    bs = state["batch_stats"]
    for s in stats:
        bs = put(bs, s.path, s.mean, s.var)
    return {**state, "batch_stats": bs}


def group_consistency(x_RxBxHxWxC: Array) -> Array:
    """Mean squared distance of R restarts to their mean (the group-consistency registration target)."""
    return jnp.mean(jnp.square(x_RxBxHxWxC - jnp.mean(x_RxBxHxWxC, axis=0, keepdims=True)))


# ----------------------------------------------------------------------------- IG + BN


@dataclasses.dataclass(frozen=True)
class IGBNConfig(IGConfig):
    """Inverting Gradients settings plus the BN prior.

    bn_weight: weight of the BN-statistics regulariser (1e-2: best of 1e-3..1e-1 with leaked
      batch statistics on ResNet-8, 16x16, B = 4, 300 steps; tests/test_bn_prior.py).
    bn_train: compute the dummy's BN-input statistics in a train-mode forward (each BN
      normalising with the dummy batch's own statistics). None (default): train mode when
      ``bn_targets`` are given (a batch's own statistics, which the client computed in a
      train-mode forward: only then is the private batch a zero of the term), else eval mode
      (population running statistics, as the eval-mode forward uses them).
    group_weight: > 0 runs the restarts twice: the second round starts from the first
      round's results and adds group_weight * mean((x - mean over restarts)^2).
    """

    bn_weight: float = 1e-2
    bn_train: bool | None = None
    group_weight: float = 0.0


@functools.partial(jax.jit, static_argnames=("victim", "config", "extra_loss", "batch_size"))
def ig_bn_reconstruct(victim: Victim, params: Params, state: ModelState, target_grads: Grads,
                      labels: Array | None, key: PRNGKey, config: IGBNConfig, x_init: Array | None = None,
                      x_prior: Array | None = None, extra_loss: ExtraLoss | None = None,
                      x_true: Array | None = None, batch_size: int | None = None,
                      bn_targets: ModelState | None = None) -> tuple[Array, dict[str, Array]]:
    """IG with ``bn_weight * R_bn`` added (pure, jitted; same signature and info as ``ig_reconstruct``).

    bn_targets: reference BN statistics (a state like ``state``); default: ``state``'s running ones.
    """
    # Built inside the trace, so params/state stay arguments and the compilation is reused.
    train = config.bn_train if config.bn_train is not None else bn_targets is not None
    bn = bn_stats_loss(victim, params, state, train, bn_targets)

    def extra(x_BxHxWxC: Array) -> Array:
        r = config.bn_weight * bn(x_BxHxWxC)
        return r if extra_loss is None else r + extra_loss(x_BxHxWxC)

    run = functools.partial(ig_reconstruct, victim, params, state, target_grads, labels, extra_loss=extra,
                            x_true=x_true, batch_size=batch_size)
    if not config.group_weight:
        return run(key, config, x_init=x_init, x_prior=x_prior)
    one = dataclasses.replace(config, restarts=1)
    keys = jax.random.split(key, config.restarts)
    xs, _ = jax.vmap(lambda k: run(k, one, x_init=x_init, x_prior=x_prior))(keys)
    target = jnp.mean(xs, axis=0)
    second = dataclasses.replace(one, prior_weight=config.group_weight)
    xs, infos = jax.vmap(lambda k, x0: run(k, second, x_init=x0, x_prior=target))(keys, xs)
    i, (x, info) = select_best(infos["grad_distance"], (xs, infos))
    info = {**info, "restart_grad_distance": infos["grad_distance"], "restart_index": i}
    return x, info


def run_ig_bn(problem: AttackProblem, key: PRNGKey, config: IGBNConfig, x_init: Array | None = None,
              x_prior: Array | None = None, x_true: Array | None = None,
              extra_loss: ExtraLoss | None = None, bn_targets: ModelState | None = None) -> AttackResult:
    """Registry entry 'ig+bn'; ``bn_targets`` overrides the reference statistics (e.g. leaked batch stats)."""
    problem.validate()
    bn_stats_loss(problem.victim, problem.params, problem.state)  # clear error for victims without BN
    if bn_targets is not None:
        want = jax.tree_util.tree_structure(problem.state)
        if jax.tree_util.tree_structure(bn_targets) != want:
            raise GitjaxError("bn_targets must have the structure of the victim state (a 'batch_stats' tree)")
    if config.group_weight and (x_prior is not None or config.prior_weight):
        raise GitjaxError("group consistency uses the prior slot for the restarts' mean; drop x_prior/prior_weight")
    if config.group_weight and config.restarts < 2:
        raise GitjaxError(f"group consistency needs restarts >= 2, got {config.restarts}")
    reconstruct = ig_bn_reconstruct if bn_targets is None else functools.partial(ig_bn_reconstruct,
                                                                                  bn_targets=bn_targets)
    return run_iterative(reconstruct, problem, key, config, x_init=x_init, x_prior=x_prior, x_true=x_true,
                         extra_loss=extra_loss)
