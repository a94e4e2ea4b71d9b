"""The compiled step of the prior trainer: state, optimiser, gradient augmentation, init/train/eval.

One training step (GIT, Chen & Liu 2025, arXiv 2505.20026): leak the N batch-mean
gradients of the step's images inside jit (``vmap(batch_grad)`` over N) at the
attacker's copy of the victim params, optionally perturbed (parameter discrepancy) and
augmented with defences (noise, pruning, ...); regress the generator's output to the
images (MSE + optional TV) with AdamW on a warm-up/cosine schedule and global-norm
clipping; keep an EMA of the generator params. ``compiled_step_fns`` jits init/step/eval
once per (math-relevant config, victim, mesh) with the state replicated and the N axis
of the batch sharded; ``gitjax.train`` runs the loop around them.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from gitjax import parallel
from gitjax.configs import Perturbation, TrainConfig
from gitjax.leakage import leaked_group_grads
from gitjax.losses import total_variation
from gitjax.metrics import psnr
from gitjax.stream import StreamSources, make_draw, stream_key
from gitjax.train_input import sort_groups
from gitjax.types import Array, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


@struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree; replicated on the mesh).

    step: int32 scalar, completed steps. params / ema_params: generator params and
    their EMA. opt_state: optax state. rng: uint32[2] key, split once per step.
    """

    step: Array
    params: Params
    ema_params: Params
    opt_state: optax.OptState
    rng: Array


# ----------------------------------------------------------------------------- pure pieces


def make_schedule(config: TrainConfig) -> optax.Schedule:
    """Linear warm-up to ``lr`` then cosine decay to ``lr * end_lr_ratio`` at ``steps`` (or constant, or step)."""
    if config.schedule == "step":
        boundary, warm, lr, ratio = int(config.decay_at * config.steps), max(config.warmup, 1), config.lr, config.end_lr_ratio

        def step_schedule(count: Array) -> Array:
            ramp = jnp.minimum(1.0, count / warm) if config.warmup else 1.0
            return lr * ramp * jnp.where(count < boundary, 1.0, ratio)

        return step_schedule
    if config.schedule == "constant":
        return optax.join_schedules(
            [optax.linear_schedule(0.0, config.lr, max(config.warmup, 1)), optax.constant_schedule(config.lr)],
            [max(config.warmup, 1)],
        ) if config.warmup else optax.constant_schedule(config.lr)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.lr, warmup_steps=config.warmup,
        decay_steps=config.steps, end_value=config.lr * config.end_lr_ratio,
    )


def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm (if grad_clip > 0) then AdamW on the schedule."""
    adamw = optax.adamw(make_schedule(config), weight_decay=config.weight_decay)
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw) if config.grad_clip > 0 else adamw


def leak_gradients(victim: Victim, params: Params, state: ModelState, x_NxBxHxWxC: Array, y_NxB: Array,
                   mesh: Mesh | None = None) -> Grads:
    """N leaked gradients, each the batch-mean gradient of its B images (FedSGD); leaves (N, *param).

    With a multi-device mesh the N axis is split by ``shard_map`` (see leakage.leaked_group_grads).
    """
    return leaked_group_grads(victim, params, state, x_NxBxHxWxC, y_NxB, mesh)


def _switch(index: Array, fns: Sequence[Callable[..., Any]], *args: Any) -> Any:
    return fns[0](*args) if len(fns) == 1 else jax.lax.switch(index, list(fns), *args)


def make_augment(perturbations: Sequence[Perturbation]) -> Callable[[PRNGKey, Grads], Grads] | None:
    """Gradient augmentation: ``augment(key, grads_N) -> grads_N`` applying each Perturbation in order.

    Per perturbation and step, one level of its ranged hyper-parameters is drawn
    (``lax.switch`` over pre-built defences, only the chosen branch runs); the
    defence is vmapped over N with one key per gradient, and each gradient keeps
    the perturbed value with probability ``prob``. None when there is nothing to do.
    """
    from gitjax.defenses import make_defense

    stages = [(p, [make_defense(p.defense, **kw) for kw in p.level_values()]) for p in perturbations]
    if not stages:
        return None

    def augment(key: PRNGKey, grads_N: Grads) -> Grads:
        n = jax.tree_util.tree_leaves(grads_N)[0].shape[0]
        for k, (p, transforms) in zip(jax.random.split(key, len(stages)), stages):
            k_level, k_apply, k_keep = jax.random.split(k, 3)
            level = jax.random.randint(k_level, (), 0, len(transforms))
            keys_N = jax.random.split(k_apply, n)
            perturbed = jax.vmap(lambda kk, g: _switch(level, transforms, kk, g))(keys_N, grads_N)
            if p.prob >= 1.0:
                grads_N = perturbed
            else:
                keep_N = jax.random.bernoulli(k_keep, p.prob, (n,))
                grads_N = jax.tree_util.tree_map(
                    lambda a, b: jnp.where(keep_N.reshape((n,) + (1,) * (a.ndim - 1)), a, b), perturbed, grads_N)
        return grads_N

    return augment


def make_param_discrepancy(config: TrainConfig) -> Callable[[PRNGKey, Params], Params] | None:
    """``perturb(key, victim_params)``: one relative perturbation per step from ``param_discrepancy``."""
    from gitjax.discrepancy import perturb_params

    lo, hi = config.param_discrepancy
    if hi <= 0:
        return None
    values = [lo] if lo == hi else list(np.linspace(lo, hi, config.discrepancy_levels))
    branches = [functools.partial(lambda r, k, p: perturb_params(k, p, r), float(r)) for r in values]

    def perturb(key: PRNGKey, params: Params) -> Params:
        k_level, k_noise = jax.random.split(key)
        level = jax.random.randint(k_level, (), 0, len(branches))
        return _switch(level, branches, k_noise, params)

    return perturb


def make_stream_step(config: TrainConfig, victim: Victim, train_step: Callable[..., Any], mesh: Mesh | None):
    """``step(state, victim_params, victim_state, sources)``: draws the step's N*B stream images
    from ``stream_key(state.rng)`` (the state's key is a pure function of (seed, step): exact
    resume, and the compiled step does not depend on the seed), then runs ``train_step``."""
    n, b = config.global_batch, config.victim_batch
    draw = make_draw(config.stream, tuple(victim.input_shape), victim.num_classes)

    def stream_step(state: TrainState, victim_params: Params, victim_state: ModelState,
                    sources: StreamSources) -> tuple[TrainState, dict[str, Array]]:
        x, y = draw(sources, stream_key(state.rng), n * b)
        x, y = x.reshape(n, b, *victim.input_shape), y.reshape(n, b)
        if config.sort_by_label and b > 1:
            x, y = sort_groups(x, y)
        if mesh is not None:  # generated whole, then laid out like a fed batch
            x = jax.lax.with_sharding_constraint(x, parallel.batch_sharding(mesh))
            y = jax.lax.with_sharding_constraint(y, parallel.batch_sharding(mesh))
        return train_step(state, victim_params, victim_state, x, y)

    return stream_step


def _build_generator(config: TrainConfig, victim: Victim, victim_params: Params) -> nn.Module:
    from gitjax.generators import build_generator

    return build_generator(config.generator, victim, victim_params)


# ----------------------------------------------------------------------------- step / eval (compiled once per config+mesh)


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    generator: nn.Module
    init: Callable[..., TrainState]
    train_step: Callable[..., tuple[TrainState, dict[str, Array]]]
    stream_step: Callable[..., tuple[TrainState, dict[str, Array]]] | None
    eval_step: Callable[..., dict[str, Array]]
    state_sharding: Any
    abstract_state: Any


EVAL_AUGMENT_SEED = 0xE7A5  # the held-out gradients' augmentation draws (fixed for a run)


def _make_fns(config: TrainConfig, victim: Victim, generator: nn.Module, abstract_victim_params: Params,
              mesh: Mesh | None = None):
    tx = make_optimizer(config)
    augment = make_augment(config.perturbations)
    discrepancy = make_param_discrepancy(config)

    schedule = make_schedule(config)

    def init(seed: Array, victim_params: Params) -> TrainState:
        # The generator's initialisers draw with an "rbg" key: XLA:CPU compiles the partitionable
        # threefry of 4-D (conv-kernel) shapes very slowly (~5 s each), rbg in a fraction of that.
        # The per-step key stays threefry, whose values do not depend on the sharding.
        k_gen = jax.random.fold_in(jax.random.key(seed, impl="rbg"), 0x6E4)
        k_rng = jax.random.fold_in(jax.random.PRNGKey(seed), 0x5A7E)
        grads_1 = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape, p.dtype), victim_params)
        params = generator.init(k_gen, grads_1, victim_params)["params"]
        # EMA starts as a copy (a separate buffer, so both can be donated).
        ema = jax.tree_util.tree_map(jnp.copy, params)
        return TrainState(jnp.zeros((), jnp.int32), params, ema, tx.init(params), k_rng)

    def train_step(state: TrainState, victim_params: Params, victim_state: ModelState,
                   x_NxBxHxWxC: Array, y_NxB: Array) -> tuple[TrainState, dict[str, Array]]:
        rng, k_disc, k_aug = jax.random.split(state.rng, 3)
        leak_params = victim_params if discrepancy is None else discrepancy(k_disc, victim_params)
        grads_N = leak_gradients(victim, leak_params, victim_state, x_NxBxHxWxC, y_NxB, mesh)
        if augment is not None:
            grads_N = augment(k_aug, grads_N)
        grads_N = jax.lax.stop_gradient(grads_N)

        def loss_fn(params: Params) -> tuple[Array, dict[str, Array]]:
            # The generator sees the unperturbed copy of the victim, as at attack time.
            x_hat = generator.apply({"params": params}, grads_N, victim_params)
            mse = jnp.mean(jnp.square(x_hat - x_NxBxHxWxC))
            tv = total_variation(x_hat)
            return config.mse_weight * mse + config.tv_weight * tv, {"mse": mse, "tv": tv}

        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(g, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        d = config.ema_decay
        ema = jax.tree_util.tree_map(lambda e, p: d * e + (1.0 - d) * p, state.ema_params, params)
        metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(g), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, ema, opt_state, rng), metrics

    def eval_step(ema_params: Params, victim_params: Params, victim_state: ModelState,
                  x_NxBxHxWxC: Array, y_NxB: Array) -> dict[str, Array]:
        grads_N = leak_gradients(victim, victim_params, victim_state, x_NxBxHxWxC, y_NxB, mesh)
        if augment is not None:
            # Score what the run trains for: a fine-tune under a defence trades clean quality
            # away, so clean held-out gradients would pick its start as the best checkpoint.
            # Each held-out gradient gets its own draw of the augmentation (level included),
            # from a fixed key: the same draws at every evaluation, so evaluations compare.
            keys_N = jax.random.split(jax.random.PRNGKey(EVAL_AUGMENT_SEED), x_NxBxHxWxC.shape[0])
            one = lambda k, g: jax.tree_util.tree_map(lambda a: a[0], augment(
                k, jax.tree_util.tree_map(lambda a: a[None], g)))
            grads_N = jax.vmap(one)(keys_N, grads_N)
        x_hat = jnp.clip(generator.apply({"params": ema_params}, grads_N, victim_params), 0.0, 1.0)
        return {"loss": jnp.mean(jnp.square(x_hat - x_NxBxHxWxC)),
                "psnr": jnp.mean(psnr(x_hat.reshape(-1, *x_hat.shape[2:]),
                                      x_NxBxHxWxC.reshape(-1, *x_NxBxHxWxC.shape[2:])))}

    return init, train_step, eval_step


@functools.lru_cache(maxsize=16)
def compiled_step_fns(config: TrainConfig, victim: Victim, mesh: Mesh, abstract_victim: Any) -> CompiledStep:
    """Jitted init/step/eval for one (math-relevant config, victim, mesh): later train_prior calls reuse them."""
    abstract_params = abstract_victim.tree["params"]
    generator = _build_generator(config, victim, abstract_params)
    init, train_step, eval_step = _make_fns(config, victim, generator, abstract_params, mesh)
    repl, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)

    # ---- shard: state created directly with replicated shardings.
    abstract_state = jax.eval_shape(init, jnp.int32(0), abstract_params)
    state_sharding = jax.tree_util.tree_map(lambda _: repl, abstract_state)
    init_jit = jax.jit(init, in_shardings=(repl, repl), out_shardings=state_sharding)
    step_jit = jax.jit(train_step, in_shardings=(state_sharding, repl, repl, batch, batch),
                       out_shardings=(state_sharding, repl), donate_argnums=(0,))
    stream_jit = None
    if config.stream.enabled:
        stream_jit = jax.jit(make_stream_step(config, victim, train_step, mesh),
                             in_shardings=(state_sharding, repl, repl, repl),
                             out_shardings=(state_sharding, repl), donate_argnums=(0,))
    eval_jit = jax.jit(eval_step, in_shardings=(repl, repl, repl, batch, batch), out_shardings=repl)
    abstract_state = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract_state)
    return CompiledStep(generator, init_jit, step_jit, stream_jit, eval_jit, state_sharding, abstract_state)


class HashableShapes:
    """Wraps a pytree of ShapeDtypeStructs so it can be an lru_cache key."""

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self._key = (treedef, tuple((tuple(l.shape), str(l.dtype)) for l in leaves))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashableShapes) and self._key == other._key


def math_config(config: TrainConfig) -> TrainConfig:
    # Runtime-only fields do not change the compiled functions; normalise them for the cache key.
    # The seed only enters through init's argument, the state's key and host-side indices.
    return dataclasses.replace(config, checkpoint_every=0, keep_checkpoints=0, log_every=0, eval_every=0, seed=0)
