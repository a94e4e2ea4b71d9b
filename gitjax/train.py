"""The offline prior trainer of GIT: regress a generator from leaked gradients to the images behind them.

GIT (Chen & Liu 2025, arXiv 2505.20026) trains a generator G offline on public
(auxiliary) images x: compute the gradient g(x) the victim would leak, and fit
G(g(x)) ~ x with a pixel MSE. This module is that one trainer, read top to
bottom: mesh / input / model / shard / checkpoint / step / eval / loop.

Each step:
  1. draws N*B auxiliary images: fixed examples of the dataset's train split
     (minus its validation part) at indices that are a pure function of (seed,
     step), each process materialising only its own rows; or, with
     ``config.stream``, fresh images generated inside the jitted step from the
     step's key (gitjax.stream). Either way a resumed run sees exactly the data
     of an uninterrupted one, whatever the number of hosts;
  2. computes the N leaked gradients inside the jitted step, each the batch mean
     over its group of B images (``vmap(batch_grad)`` over N), at the
     attacker's copy of the victim params, optionally perturbed (parameter
     discrepancy) and then augmented with defences (noise, pruning, ...);
  3. regresses G's output to the images (MSE + optional TV), AdamW with
     warmup-cosine and global-norm clipping, and keeps an EMA of G's params.

Evaluation: the EMA generator on fixed validation pairs (held-out train photographs,
gitjax.data.split_validation) every ``eval_every`` steps; the step with the best
validation PSNR is also saved to ``workdir/best/`` (``best.json`` names it, and
``load_prior`` loads it by default); the test split is evaluated at step 0 and at the
end only (final EMA params and best params: ``test_*`` and ``best_test_*``).

Data parallel: one ``jax.jit`` over a 1-D ("data",) mesh; the N axis of the batch
is sharded, params and optimiser state replicated, XLA adds the all-reduce.

Public API::

    result = train_prior(config, workdir)                 # -> TrainResult
    prior = load_prior(workdir)                            # -> gitjax.prior.Prior (EMA gen params, victim, ...)

The attacker's victim params are drawn from ``config.seed`` (optionally trained
``victim_pretrain_steps`` SGD steps on the auxiliary train split) and saved with
every checkpoint; ``load_prior`` returns those exact params for the attack side.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import Mesh

from gitjax import parallel
from gitjax.checkpoint import (
    BEST_FILE,
    BEST_SUBDIR,
    CHECKPOINT_SUBDIR,
    CheckpointError,
    ConfigMismatchError,
    PriorCheckpointer,
    quiet_orbax_logs,
)
from gitjax.configs import (
    ConfigError,
    Perturbation,
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    get_preset,
)
from gitjax.leakage import batch_grad, leaked_group_grads
from gitjax.metrics import psnr
from gitjax.losses import total_variation  # noqa: F401 - the generator's TV term; re-exported
from gitjax.prior import Prior, load_prior  # noqa: F401 - re-exported for compatibility
from gitjax.stream import StreamSources, make_draw, make_sources, stream_key
from gitjax.types import Array, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim, make_victim

METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- state


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


@dataclasses.dataclass
class TrainResult:
    """What ``train_prior`` returns. ``params`` are the EMA generator params (what attacks use)."""

    state: TrainState
    params: Params
    generator: nn.Module
    victim: Victim
    victim_params: Params
    victim_state: ModelState
    history: list[dict[str, Any]]
    config: TrainConfig
    workdir: Path
    best_step: int | None = None  # the step with the best validation PSNR (None: never evaluated)
    best_params: Params | None = None  # its EMA params

    @property
    def prior(self) -> Prior:
        """The trained prior as attacks take it, without reloading from disk: the best-by-validation
        EMA params when the run evaluated (as ``load_prior(workdir)`` returns), else the final ones."""
        params = self.params if self.best_params is None else self.best_params
        return Prior(params, self.victim_params, self.victim_state, self.generator, self.victim, self.config)


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


# ----------------------------------------------------------------------------- input


def step_indices(seed: int, step: int, num_examples: int, count: int) -> np.ndarray:
    """The ``count`` example indices of one step: a pure function of (seed, step) (exact resume).

    Without replacement within a step when the dataset is large enough.
    """
    rng = np.random.default_rng([int(seed), 0x5EED, int(step)])
    return rng.choice(num_examples, size=count, replace=count > num_examples)


def gather_groups(images: np.ndarray, labels: np.ndarray, idx_NxB: np.ndarray,
                  sort_by_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, B, H, W, C) and labels (N, B) at ``idx``; optionally each group ordered by (label, brightness)."""
    x = images[idx_NxB]
    y = labels[idx_NxB].astype(np.int32)
    if sort_by_label and idx_NxB.shape[1] > 1:
        key_NxB = y + 0.5 * x.mean(axis=(2, 3, 4))  # mean in [0, 1]: ties in label broken by brightness
        order = np.argsort(key_NxB, axis=1, kind="stable")
        x = np.take_along_axis(x, order[:, :, None, None, None], axis=1)
        y = np.take_along_axis(y, order, axis=1)
    return x, y


def _local_batch(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, config: TrainConfig, n: int,
                 mesh: Mesh) -> tuple[Array, Array]:
    """This process's rows of a global (N, B, ...) batch, assembled into global sharded arrays."""
    rows = parallel.local_batch_slice(n, mesh)
    x, y = gather_groups(images, labels, idx.reshape(n, config.victim_batch)[rows], config.sort_by_label)
    return parallel.global_batch_from_local(x, mesh, n), parallel.global_batch_from_local(y, mesh, n)


def sort_groups(x_NxBxHxWxC: Array, y_NxB: Array) -> tuple[Array, Array]:
    """``gather_groups``' order inside jit: each group of B sorted by (label, brightness)."""
    key_NxB = y_NxB + 0.5 * jnp.mean(x_NxBxHxWxC, axis=(2, 3, 4))
    order = jnp.argsort(key_NxB, axis=1, stable=True)
    return (jnp.take_along_axis(x_NxBxHxWxC, order[:, :, None, None, None], axis=1),
            jnp.take_along_axis(y_NxB, order, axis=1))


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


# ----------------------------------------------------------------------------- model


def build_victim(config: TrainConfig, input_shape: Sequence[int], num_classes: int,
                 mean: Sequence[float], std: Sequence[float]) -> Victim:
    return make_victim(config.victim, input_shape=tuple(input_shape), num_classes=int(num_classes),
                       mean=tuple(mean), std=tuple(std), **dict(config.victim_kwargs))


def init_victim(config: TrainConfig, victim: Victim, images: np.ndarray, labels: np.ndarray
                ) -> tuple[Params, ModelState]:
    """The attacker's copy: init from ``seed``, then ``victim_pretrain_steps`` SGD steps on the aux data."""
    k_init, k_train = _victim_keys(config.seed)
    params, state = _jitted_victim_init(victim)(k_init)
    if config.victim_pretrain_steps > 0:
        from gitjax.discrepancy import train_params_further

        params = train_params_further(
            victim, params, state, images, labels, steps=config.victim_pretrain_steps,
            lr=config.victim_pretrain_lr, batch_size=min(config.victim_pretrain_batch, len(images)), key=k_train,
        )
    return params, state


@functools.lru_cache(maxsize=16)
def _jitted_victim_init(victim: Victim) -> Callable[[PRNGKey], tuple[Params, ModelState]]:
    # One compilation instead of one per eager op of the Flax init.
    return jax.jit(victim.init)


@jax.jit
def _victim_keys(seed: Array) -> tuple[PRNGKey, PRNGKey]:
    # rbg for the initialiser (compiles fast on CPU, see _make_fns.init); threefry for SGD batches.
    k_init = jax.random.fold_in(jax.random.key(seed, impl="rbg"), 0x71C7)
    k_train = jax.random.fold_in(jax.random.PRNGKey(seed), 0x71C8)
    return k_init, k_train


def _abstract_victim(victim: Victim) -> dict[str, Any]:
    """{"params": ..., "state": ...} as ShapeDtypeStructs (no computation)."""
    return jax.eval_shape(lambda: dict(zip(("params", "state"), victim.init(jax.random.PRNGKey(0)))))


def _build_generator(config: TrainConfig, victim: Victim, victim_params: Params) -> nn.Module:
    from gitjax.generators import build_generator

    return build_generator(config.generator, victim, victim_params)


# ----------------------------------------------------------------------------- step / eval (compiled once per config+mesh)


@dataclasses.dataclass(frozen=True)
class _Compiled:
    generator: nn.Module
    init: Callable[..., TrainState]
    train_step: Callable[..., tuple[TrainState, dict[str, Array]]]
    stream_step: Callable[..., tuple[TrainState, dict[str, Array]]] | None
    eval_step: Callable[..., dict[str, Array]]
    state_sharding: Any
    abstract_state: Any


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
        x_hat = jnp.clip(generator.apply({"params": ema_params}, grads_N, victim_params), 0.0, 1.0)
        return {"loss": jnp.mean(jnp.square(x_hat - x_NxBxHxWxC)),
                "psnr": jnp.mean(psnr(x_hat.reshape(-1, *x_hat.shape[2:]),
                                      x_NxBxHxWxC.reshape(-1, *x_NxBxHxWxC.shape[2:])))}

    return init, train_step, eval_step


@functools.lru_cache(maxsize=16)
def _compiled(config: TrainConfig, victim: Victim, mesh: Mesh, abstract_victim: Any) -> _Compiled:
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
    return _Compiled(generator, init_jit, step_jit, stream_jit, eval_jit, state_sharding, abstract_state)


class _Hashable:
    """Wraps a pytree of ShapeDtypeStructs so it can be an lru_cache key."""

    def __init__(self, tree: Any):
        self.tree = tree
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        self._key = (treedef, tuple((tuple(l.shape), str(l.dtype)) for l in leaves))

    def __hash__(self) -> int:
        return hash(self._key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Hashable) and self._key == other._key


def _math_config(config: TrainConfig) -> TrainConfig:
    # Runtime-only fields do not change the compiled functions; normalise them for the cache key.
    # The seed only enters through init's argument, the state's key and host-side indices.
    return dataclasses.replace(config, checkpoint_every=0, keep_checkpoints=0, log_every=0, eval_every=0, seed=0)


# ----------------------------------------------------------------------------- metrics file


def _read_metrics(path: Path, upto_step: int | None) -> list[dict[str, Any]]:
    """Records of ``metrics.jsonl`` with step <= upto_step (those after a checkpoint are dropped on resume)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if upto_step is None or rec.get("step", 0) <= upto_step:
            out.append(rec)
    return out


def _write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    # Atomic replace: other processes of a multi-host job may be reading the file.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _victim_meta(victim: Victim) -> dict[str, Any]:
    return {"input_shape": list(victim.input_shape), "num_classes": victim.num_classes,
            "mean": list(victim.mean), "std": list(victim.std)}


# ----------------------------------------------------------------------------- train


def train_prior(config: TrainConfig, workdir: str | Path, *, resume: bool = True, progress: bool = True,
                until_step: int | None = None, mesh: Mesh | None = None) -> TrainResult:
    """Trains a GIT prior; checkpoints, ``metrics.jsonl`` and the config go to ``workdir``.

    Args:
      config: the run (validated here).
      workdir: run directory; ``workdir/checkpoints/<step>/`` and ``workdir/metrics.jsonl``.
      resume: continue from the latest checkpoint in ``workdir`` if there is one
        (its config must match ``config`` except runtime fields and ``steps``).
        With resume=False an existing checkpoint is an error (use a fresh workdir).
      progress: show a tqdm bar (process 0 only).
      until_step: stop after this many completed steps (< config.steps), saving a
        checkpoint there: a time-sliced job, or a pre-emption in tests. The
        schedule still follows ``config.steps``.
      mesh: a 1-D ("data",) mesh; default all devices of all processes.

    Returns:
      TrainResult with the final state, EMA params, generator, the attacker's
      victim params/state and the metric records of the whole run.

    Raises:
      ConfigError: invalid config, or a global batch that does not split over the devices.
      CheckpointError / ConfigMismatchError: unreadable checkpoint or a resume with another config.
    """
    config.validate()
    parallel.maybe_initialize_distributed()  # a no-op unless the environment asks for it (docs/multihost.md)
    quiet_orbax_logs()
    workdir = Path(workdir).expanduser().resolve()
    is_main = jax.process_index() == 0
    stop = config.steps if until_step is None else min(int(until_step), config.steps)

    # ---- mesh: all devices of all hosts; N and the eval set split evenly over them.
    mesh = parallel.make_mesh() if mesh is None else mesh
    n_dev = parallel.num_data_shards(mesh)
    n = config.global_batch
    if n % n_dev:
        raise ConfigError(f"global_batch={n} does not split over the {n_dev} devices of the mesh; "
                          f"use a multiple of {n_dev}")
    n_eval = -(-config.eval_gradients // n_dev) * n_dev

    # ---- input: whole splits in host memory; every step only gathers this process's rows
    # (fixed examples) or draws its images inside the jitted step (stream).
    from gitjax.data import load_dataset, source_photos, split_validation

    train_ds = load_dataset(config.dataset, "train")
    fit_ds, val_ds = split_validation(train_ds)  # validation: never trained on (docs/data.md)
    test_ds = load_dataset(config.dataset, "test")
    b = config.victim_batch
    val_x, val_y = _eval_batch(val_ds, [config.seed, 0x7A11], config, n_eval, mesh)
    test_x, test_y = _eval_batch(test_ds, [config.seed, 0xE7A1], config, n_eval, mesh)

    # ---- model: the victim (the attacker's copy) and the generator mirroring it.
    victim = build_victim(config, train_ds.image_shape, train_ds.num_classes, train_ds.mean, train_ds.std)
    abstract_victim = _abstract_victim(victim)
    repl = parallel.replicated(mesh)
    abstract_victim_sharded = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract_victim)

    # ---- shard: compiled init/step/eval, state shardings (cached across calls).
    fns = _compiled(_math_config(config), victim, mesh, _Hashable(abstract_victim))
    sources = None
    if config.stream.enabled:  # the stream's photos / dataset images, replicated on the mesh
        photos = (source_photos(config.dataset, "train", channels=train_ds.image_shape[-1])
                  if config.stream.photos > 0 else None)
        sources = parallel.replicate(make_sources(config.stream, photos, fit_ds.images, fit_ds.labels,
                                                  out_side=min(train_ds.image_shape[:2])), mesh)

    # ---- checkpoint: restore (state, victim) or create them. Everything from here runs
    # under the mesh, so jitted functions see one context (and compile once).
    workdir.mkdir(parents=True, exist_ok=True)
    metrics_path = workdir / METRICS_FILE
    ckpt = PriorCheckpointer(workdir / CHECKPOINT_SUBDIR, max_to_keep=config.keep_checkpoints or None)
    best_ckpt = None
    try:
        with jax.set_mesh(mesh):
            state, victim_tree, start, history = _restore_or_init(
                ckpt, config, resume, fns, victim, abstract_victim_sharded, fit_ds, mesh, metrics_path)
            victim_params, victim_state = victim_tree["params"], victim_tree["state"]
            if is_main:
                _write_metrics(metrics_path, history)  # drops records written after the restored checkpoint
            save_args = (victim_tree, config_to_dict(config), {"victim": _victim_meta(victim)})
            best = _read_best(workdir, start, is_main)  # before the manager lists the directory
            best_ckpt = PriorCheckpointer(workdir / BEST_SUBDIR, max_to_keep=1)
            best_params = None
            if best is not None:
                best_params = best_ckpt.restore(best["step"], fns.abstract_state, abstract_victim_sharded)[0].ema_params

            # ---- eval: MSE / PSNR of the EMA generator on held-out (gradient, images) pairs:
            # validation during training (model selection), test at step 0 and at the end.
            def evaluate(params: Params, x: Array, y: Array, prefix: str) -> dict[str, float]:
                out = jax.device_get(fns.eval_step(params, victim_params, victim_state, x, y))
                return {f"{prefix}_{k}": float(v) for k, v in out.items()}

            def due(every: int, done: int) -> bool:
                return done == stop or (every > 0 and done % every == 0)

            def emit(record: dict[str, Any]) -> None:
                history.append(record)
                if is_main:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(record) + "\n")

            def validate(st: TrainState, done: int) -> dict[str, float]:
                nonlocal best, best_params
                rec = evaluate(st.ema_params, val_x, val_y, "val")
                if best is None or rec["val_psnr"] > best["val_psnr"]:
                    # A copy: the state's buffers are donated to the next step.
                    best_params = jax.tree_util.tree_map(jnp.copy, st.ema_params)
                    best = {"step": done, "val_psnr": rec["val_psnr"], "val_loss": rec["val_loss"]}
                    best_ckpt.save(done, st, *save_args)
                    if is_main:
                        _write_json(workdir / BEST_FILE, best)
                return rec

            # ---- loop
            if start == 0 and stop > 0 and config.eval_every > 0:
                # The untrained baseline.
                emit({"step": 0, **validate(state, 0), **evaluate(state.ema_params, test_x, test_y, "test")})
            pbar = None
            if progress and is_main and start < stop:
                from tqdm.auto import tqdm

                pbar = tqdm(total=stop, initial=start, desc="prior", unit="step", dynamic_ncols=True)
            t_last, steps_since = time.perf_counter(), 0
            for step in range(start, stop):
                if sources is not None:
                    state, metrics = fns.stream_step(state, victim_params, victim_state, sources)
                else:
                    idx = step_indices(config.seed, step, len(fit_ds), n * b)
                    x, y = _local_batch(fit_ds.images, fit_ds.labels, idx, config, n, mesh)
                    state, metrics = fns.train_step(state, victim_params, victim_state, x, y)
                done, steps_since = step + 1, steps_since + 1
                record: dict[str, Any] = {}
                if due(config.log_every, done):
                    m = jax.device_get(metrics)  # the only host sync between evals
                    dt = time.perf_counter() - t_last
                    record = {"step": done, **{k: float(v) for k, v in m.items()},
                              "examples_per_s": steps_since * n / dt, "images_per_s": steps_since * n * b / dt}
                    if pbar is not None:
                        pbar.set_postfix(loss=f"{record['loss']:.4f}", ex_s=f"{record['examples_per_s']:.0f}")
                if due(config.eval_every, done):
                    record = {"step": done, **record, **validate(state, done)}
                if done == config.steps:  # final numbers: the last EMA params and the best-by-validation ones
                    record.update(evaluate(state.ema_params, test_x, test_y, "test"))
                    if best is not None:
                        best_test = evaluate(best_params, test_x, test_y, "test")
                        best.update(test_psnr=best_test["test_psnr"], test_loss=best_test["test_loss"])
                        record.update(best_step=best["step"], best_val_psnr=best["val_psnr"],
                                      best_test_psnr=best["test_psnr"], best_test_loss=best["test_loss"])
                        if is_main:
                            _write_json(workdir / BEST_FILE, best)
                if record:
                    emit(record)
                if due(config.checkpoint_every, done):
                    ckpt.save(done, state, *save_args)
                if pbar is not None:
                    pbar.update(1)
                if record:
                    t_last, steps_since = time.perf_counter(), 0
            if pbar is not None:
                pbar.close()
            if start >= stop and ckpt.latest_step() is None:  # until_step=0 on a fresh run: leave a loadable checkpoint
                ckpt.save(start, state, *save_args)
    finally:
        ckpt.close()  # waits for the last async save
        if best_ckpt is not None:
            best_ckpt.close()
    return TrainResult(state, state.ema_params, fns.generator, victim, victim_params, victim_state,
                       history, config, workdir, None if best is None else best["step"], best_params)


def _eval_batch(ds: Any, seed: list[int], config: TrainConfig, n_eval: int, mesh: Mesh) -> tuple[Array, Array]:
    """A fixed set of n_eval held-out groups of B images of ``ds`` (drawn once from ``seed``)."""
    b = config.victim_batch
    idx = np.random.default_rng(seed).choice(len(ds), size=n_eval * b, replace=n_eval * b > len(ds))
    return _local_batch(ds.images, ds.labels, idx, config, n_eval, mesh)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def _read_best(workdir: Path, start: int, is_main: bool) -> dict[str, Any] | None:
    """The best-by-validation record of an earlier part of this run, or None (then stale files go).

    A best step beyond the restored step belongs to steps about to be redone (a kill
    after the best save, before the next checkpoint): it is dropped and found again.
    """
    path, directory = workdir / BEST_FILE, workdir / BEST_SUBDIR
    best = None
    if start > 0 and path.exists():
        try:
            best = json.loads(path.read_text())
        except json.JSONDecodeError:
            best = None
        if not isinstance(best, dict) or not isinstance(best.get("step"), int) or best["step"] > start \
                or not (directory / str(best["step"])).is_dir():
            best = None
    if best is None and is_main:
        path.unlink(missing_ok=True)
        shutil.rmtree(directory, ignore_errors=True)
    return best


def _restore_or_init(ckpt: PriorCheckpointer, config: TrainConfig, resume: bool, fns: _Compiled, victim: Victim,
                     abstract_victim: Any, train_ds: Any, mesh: Mesh, metrics_path: Path
                     ) -> tuple[TrainState, dict[str, Any], int, list[dict[str, Any]]]:
    """(state, {"params", "state"} of the victim, start step, metric records so far)."""
    latest = ckpt.latest_step()
    if latest is None:
        params, vstate = init_victim(config, victim, train_ds.images, train_ds.labels)
        victim_tree = parallel.replicate({"params": params, "state": vstate}, mesh)
        state = fns.init(jnp.int32(config.seed), victim_tree["params"])
        return state, victim_tree, 0, []
    if not resume:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); "
                              "pass resume=True to continue, or use a fresh workdir")
    try:
        saved = config_from_dict(ckpt.restore_config(latest))
    except ConfigError as e:
        raise CheckpointError(f"checkpoint {ckpt.step_dir(latest)} holds an unreadable config: {e}") from e
    diff = config_diff(saved, config, ignore=TrainConfig.RUNTIME_FIELDS + ("steps",))
    if diff:
        shown = "; ".join(f"{k}: saved {a!r} vs now {v!r}" for k, (a, v) in diff.items())
        raise ConfigMismatchError(f"cannot resume from {ckpt.directory}: the config differs in {shown}")
    # None: the newest step that restores (a broken newer one is skipped with a warning).
    state, victim_tree, start = ckpt.restore(None, fns.abstract_state, abstract_victim)
    return state, victim_tree, start, _read_metrics(metrics_path, start)


# ----------------------------------------------------------------------------- attack side


# ``load_prior`` and ``Prior`` live in gitjax.prior (the attack side needs no trainer); re-exported here.


# ----------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gitjax.train --preset tiny --workdir runs/tiny [--steps N] [--no-resume]``."""
    p = argparse.ArgumentParser(prog="python -m gitjax.train", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--workdir", required=True)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--until-step", type=int, default=None)
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    import gitjax

    gitjax.configure_xla_cpu()  # an entry point, like the gitjax CLI (import gitjax does not set it)
    parallel.maybe_initialize_distributed()  # before any JAX computation
    overrides = {} if args.steps is None else {"steps": args.steps}
    result = train_prior(get_preset(args.preset, **overrides), args.workdir, resume=not args.no_resume,
                         progress=not args.quiet, until_step=args.until_step)
    last = {k: v for r in result.history for k, v in r.items()}
    if jax.process_index() == 0:
        print(json.dumps({"workdir": str(result.workdir), **last}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
