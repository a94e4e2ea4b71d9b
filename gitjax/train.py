"""The offline prior trainer of GIT: regress a generator from leaked gradients to the images behind them.

GIT (Chen & Liu 2025, arXiv 2505.20026) trains a generator G offline on public
(auxiliary) images x: compute the gradient g(x) the victim would leak, and fit
G(g(x)) ~ x with a pixel MSE. This module is the trainer's loop, read top to
bottom: mesh / input / model / shard / checkpoint / step / eval / loop. The compiled
step (state, optimiser, augmentation, init/train/eval) is ``gitjax.train_step``; the
fixed-example input (indices, groups, local rows) is ``gitjax.train_input``.

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
gitjax.data.split_validation) every ``eval_every`` steps, their gradients perturbed like the
training ones when the run has ``perturbations`` (one fixed draw per held-out gradient, so a
fine-tune under a defence is scored on what it trains for); the step with the best
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
    TrainConfig,
    config_diff,
    config_from_dict,
    config_to_dict,
    get_preset,
)
from gitjax.prior import Prior, _abstract_victim, load_prior  # noqa: F401 - Prior/load_prior re-exported
from gitjax.stream import make_sources
from gitjax.train_input import eval_batch, local_batch, step_indices
from gitjax.train_step import CompiledStep, HashableShapes, TrainState, compiled_step_fns, math_config
from gitjax.types import Array, ModelState, Params, PRNGKey
from gitjax.victims import Victim, make_victim

METRICS_FILE = "metrics.jsonl"


# ----------------------------------------------------------------------------- result


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
    # rbg for the initialiser (compiles fast on CPU, see gitjax.train_step._make_fns); threefry for SGD batches.
    k_init = jax.random.fold_in(jax.random.key(seed, impl="rbg"), 0x71C7)
    k_train = jax.random.fold_in(jax.random.PRNGKey(seed), 0x71C8)
    return k_init, k_train


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
    val_x, val_y = eval_batch(val_ds, [config.seed, 0x7A11], config, n_eval, mesh)
    test_x, test_y = eval_batch(test_ds, [config.seed, 0xE7A1], config, n_eval, mesh)

    # ---- model: the victim (the attacker's copy) and the generator mirroring it.
    victim = build_victim(config, train_ds.image_shape, train_ds.num_classes, train_ds.mean, train_ds.std)
    abstract_victim = _abstract_victim(victim)
    repl = parallel.replicated(mesh)
    abstract_victim_sharded = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=repl), abstract_victim)

    # ---- shard: compiled init/step/eval, state shardings (cached across calls).
    fns = compiled_step_fns(math_config(config), victim, mesh, HashableShapes(abstract_victim))
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
                    x, y = local_batch(fit_ds.images, fit_ds.labels, idx, config, n, mesh)
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


def _init_from_prior(config: TrainConfig, fns: CompiledStep, mesh: Mesh) -> tuple[TrainState, dict[str, Any]]:
    """Start state of a fine-tune: ``config.init_from``'s generator params (and EMA) and victim copy."""
    prior = load_prior(config.init_from)
    if prior.config is None:
        raise ConfigError(f"init_from={config.init_from!r} holds no config; start from a train-prior run dir")
    diff = {k: v for k, v in config_diff(prior.config, config).items()
            if k in ("victim", "victim_kwargs", "generator", "victim_batch")}
    if diff:
        shown = "; ".join(f"{k}: prior {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ConfigError(f"init_from={config.init_from!r} was trained with another model: {shown}")
    victim_tree = parallel.replicate({"params": prior.victim_params, "state": prior.victim_state}, mesh)
    state = fns.init(jnp.int32(config.seed), victim_tree["params"])
    params = jax.tree_util.tree_map(lambda new, old: jax.device_put(jnp.asarray(new, old.dtype), old.sharding),
                                    prior.gen_params, state.params)
    ema = jax.tree_util.tree_map(jnp.copy, params)
    return state.replace(params=params, ema_params=ema), victim_tree


def _restore_or_init(ckpt: PriorCheckpointer, config: TrainConfig, resume: bool, fns: CompiledStep, victim: Victim,
                     abstract_victim: Any, train_ds: Any, mesh: Mesh, metrics_path: Path
                     ) -> tuple[TrainState, dict[str, Any], int, list[dict[str, Any]]]:
    """(state, {"params", "state"} of the victim, start step, metric records so far)."""
    latest = ckpt.latest_step()
    if latest is None:
        if config.init_from:
            return (*_init_from_prior(config, fns, mesh), 0, [])
        params, vstate = init_victim(config, victim, train_ds.images, train_ds.labels)
        victim_tree = parallel.replicate({"params": params, "state": vstate}, mesh)
        state = fns.init(jnp.int32(config.seed), victim_tree["params"])
        return state, victim_tree, 0, []
    if not resume:
        raise CheckpointError(f"{ckpt.directory} already holds checkpoints (latest step {latest}); "
                              "pass resume=True to continue, or use a fresh workdir")
    if ckpt.restore_meta(latest).get("ema_only"):
        raise CheckpointError(f"{ckpt.directory} is a shipped prior (EMA params only) and cannot be resumed; "
                              f"fine-tune it in a fresh workdir with init_from={str(ckpt.directory.parent)!r}")
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
