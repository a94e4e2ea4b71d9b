"""Checkpoints of prior training: orbax's CheckpointManager with four items per step.

A step directory ``<dir>/<step>/`` holds

  * ``state``:  the TrainState pytree (generator params, EMA params, optimiser state, rng, step);
  * ``victim``: the attacker's copy of the victim, {"params": ..., "state": ...},
    saved so that attack time uses exactly the parameters the prior was trained against;
  * ``config``: the TrainConfig as JSON (``gitjax.configs.config_to_dict``);
  * ``meta``:   JSON with a SHA-256 fingerprint of ``state`` and ``victim``, the
    victim's input spec, and library versions.

Orbax does not checksum array data (a garbled data chunk restores silently with
wrong values), so ``restore`` recomputes the fingerprint and refuses a mismatch.
Every failure (missing directory, no step, unreadable or altered files) raises
:class:`CheckpointError` naming the path and what is wrong.

A broken NEWEST step (an empty step folder, a missing item, garbled JSON or
array files, e.g. from a crash mid-write) does not stop a run: ``latest_step``
skips step folders that are visibly incomplete, and ``restore(None, ...)`` falls
back from the newest step to the newest good one, each with a one-line warning.
A writable checkpointer moves the broken step folders aside (``<step>.corrupt``)
so that training can save that step again. An explicitly named step is strict.

Multi-host: every process calls ``save``/``restore`` (orbax coordinates the
writes); the arrays are replicated, so every process computes the same fingerprint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from gitjax.types import GitjaxError

CHECKPOINT_SUBDIR = "checkpoints"
# The checkpoint of the step with the best validation PSNR lives apart from the rolling
# ones (which keep_checkpoints prunes); BEST_FILE records its step and numbers.
BEST_SUBDIR = "best"
BEST_FILE = "best.json"
ITEMS = ("state", "victim", "config", "meta")
_WARNED: set[tuple[str, int]] = set()  # (directory, step) already reported as broken in this process


class CheckpointError(GitjaxError):
    """A checkpoint is missing, unreadable, altered, or does not fit the run."""


class ConfigMismatchError(CheckpointError):
    """Resuming with a config that differs from the saved one in a field that changes the run."""


class CheckpointFallbackWarning(UserWarning):
    """The newest checkpoint step is unusable; an older good step is used instead."""


# ----------------------------------------------------------------------------- fingerprint


def _host_copy(leaf: Any) -> np.ndarray:
    # Replicated (possibly multi-host) arrays: every process holds the whole value in its shards.
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
        return np.asarray(leaf.addressable_shards[0].data)
    return np.asarray(leaf)


def fingerprint(tree: Any) -> str:
    """SHA-256 over (path, dtype, shape, bytes) of every leaf: identical trees give identical strings."""
    h = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        arr = np.ascontiguousarray(_host_copy(leaf))
        h.update(f"{jax.tree_util.keystr(path)}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {msg[:300]}"


# ----------------------------------------------------------------------------- locating


def _is_step_dir(p: Path) -> bool:
    return p.is_dir() and p.name.isdigit()


def resolve_checkpoint_dir(path: str | os.PathLike[str]) -> tuple[Path, int | None]:
    """Accepts a run directory, its ``checkpoints/`` directory, or one step directory.

    Returns (checkpoint directory, step or None for "latest"). Raises CheckpointError
    when none of these is found.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist; pass the --workdir of a gitjax train-prior run")
    if (p / CHECKPOINT_SUBDIR).is_dir():
        return (p / CHECKPOINT_SUBDIR).resolve(), None
    if _is_step_dir(p) and any((p / item).exists() for item in ITEMS):
        return p.parent.resolve(), int(p.name)
    if any(_is_step_dir(c) for c in p.iterdir()):
        return p.resolve(), None
    raise CheckpointError(
        f"no checkpoint found at {p}: expected a run directory with {CHECKPOINT_SUBDIR}/, "
        "a checkpoint directory with numbered step folders, or one step folder"
    )


# ----------------------------------------------------------------------------- manager


class PriorCheckpointer:
    """Saves and restores (state, victim, config, meta) per step; wraps ``ocp.CheckpointManager``.

    Args:
      directory: the checkpoint directory (created unless ``read_only``).
      max_to_keep: keep the newest this many steps (None: all).
      save_interval_steps: orbax's own interval; the trainer decides when to
        save, so the default 1 accepts every requested step.
      read_only: open an existing directory without creating or deleting anything.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_to_keep: int | None = 3,
                 save_interval_steps: int = 1, read_only: bool = False):
        self.directory = Path(directory).expanduser().resolve()
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        self.read_only = read_only
        if read_only:  # what orbax forces for read-only managers anyway (it would log a warning for each)
            max_to_keep, save_interval_steps = None, 0
        # orbax names its multi-process barriers after the step folder only ("...commit_complete.3"):
        # two managers saving the same step at once (rolling and best/) would share one barrier and
        # deadlock across hosts. A prefix per directory name (the same on every host) keeps them apart.
        prefix = "gitjax_" + "".join(c if c.isalnum() else "_" for c in self.directory.name)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
            create=not read_only, read_only=read_only,
            multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=prefix),
        )
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - any orbax failure becomes one clear error
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {_short(e)}") from e

    # ------------------------------------------------------------------ queries
    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        """The newest step whose folder is complete (see ``step_problem``); None if there is none.

        Newer step folders that are visibly broken are skipped with a one-line warning.
        """
        skipped = []
        for step in reversed(self.all_steps()):
            problem = self.step_problem(step)
            if problem is None:
                self._warn_skip(skipped, step)
                return step
            skipped.append((step, problem))
        return None

    def step_problem(self, step: int) -> str | None:
        """None if ``step``'s folder looks complete (every item present, meta readable), else what is wrong.

        Cheap (no array is read): garbled array data is only found by ``restore``.
        """
        d = self.step_dir(step)
        missing = [item for item in ITEMS if not (d / item).is_dir()]
        if missing:
            return "an empty step folder" if len(missing) == len(ITEMS) else f"missing item(s) {', '.join(missing)}"
        try:
            meta = self._restore_json(step, "meta")
        except CheckpointError as e:
            return str(e)
        if "fingerprint" not in meta:
            return "its meta item has no fingerprint"
        return None

    def _warn_skip(self, skipped: list[tuple[int, str]], used: int) -> None:
        """One warning line per broken step passed over on the way to step ``used`` (once per process)."""
        for step, problem in skipped:
            if (str(self.directory), step) not in _WARNED:
                _WARNED.add((str(self.directory), step))
                warnings.warn(f"checkpoint step {step} in {self.directory} is unusable ({problem}); "
                              f"using step {used}", CheckpointFallbackWarning, stacklevel=4)

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _require_step(self, step: int | None) -> int:
        if step is None:
            step = self.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint found in {self.directory} (no completed step folders)")
        elif step not in self.all_steps():
            raise CheckpointError(f"no checkpoint for step {step} in {self.directory}; steps: {self.all_steps()}")
        return int(step)

    # ------------------------------------------------------------------ save
    def save(self, step: int, state: Any, victim: Any, config: dict[str, Any], meta: dict[str, Any] | None = None,
             *, force: bool = True) -> bool:
        """Saves one step: copies to host now, writes asynchronously (``wait_until_finished``/``close``).

        Args:
          step: the number of completed training steps.
          state: TrainState pytree; victim: {"params": ..., "state": ...}; both replicated
            (every process holds the whole value; process 0's copy is written).
          config: JSON-able config dict; meta: extra JSON-able facts (victim input spec, ...).
          force: save even if orbax's save_interval_steps would skip this step.

        Returns:
          True if a checkpoint was started.
        """
        # The trainer's state is replicated, so one host copy is the whole checkpoint. Saving
        # host arrays (restored onto the abstract shardings) skips orbax's replica-parallel
        # path, which compiles a slicing program per array shape on the first save.
        state, victim = jax.tree_util.tree_map(_host_copy, (state, victim))
        meta = dict(meta or {})
        meta.update(
            step=int(step), fingerprint=fingerprint({"state": state, "victim": victim}),
            jax_version=jax.__version__, process_count=jax.process_count(), device_count=jax.device_count(),
        )
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            victim=ocp.args.StandardSave(victim),
            config=ocp.args.JsonSave(config),
            meta=ocp.args.JsonSave(meta),
        )
        return bool(self._manager.save(int(step), args=args, force=force))

    # ------------------------------------------------------------------ restore
    def _restore_json(self, step: int, item: str) -> dict[str, Any]:
        path = self.step_dir(step) / item
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"checkpoint {path} is unreadable: {_short(e)}") from e
        if not isinstance(out, dict):
            raise CheckpointError(f"checkpoint {path} does not hold a JSON object (got {type(out).__name__})")
        return out

    def restore_config(self, step: int | None = None) -> dict[str, Any]:
        """The config dict saved with ``step`` (default: the latest)."""
        return self._restore_json(self._require_step(step), "config")

    def restore_meta(self, step: int | None = None) -> dict[str, Any]:
        return self._restore_json(self._require_step(step), "meta")

    def restore(self, step: int | None, abstract_state: Any, abstract_victim: Any) -> tuple[Any, Any, int]:
        """Restores (state, victim, step) onto the shardings of the abstract pytrees.

        Args:
          step: a saved step (strict: it must restore), or None for the newest GOOD
            step: a newer step that fails to restore is skipped with a one-line
            warning (and, if writable, moved aside to ``<step>.corrupt``).
          abstract_state, abstract_victim: ``jax.ShapeDtypeStruct`` pytrees (with
            ``sharding``) of the same structure as what was saved.

        Raises:
          CheckpointError: no such step, unreadable/garbled files, or contents
            whose fingerprint differs from the one recorded at save time; for
            step=None, when no step restores (naming each step's problem).
        """
        if step is not None:
            return self._restore_step(self._require_step(step), abstract_state, abstract_victim)
        problems = []
        for s in reversed(self.all_steps()):
            problem = self.step_problem(s)
            if problem is None:
                try:
                    out = self._restore_step(s, abstract_state, abstract_victim)
                except CheckpointError as e:
                    problem = str(e)
                else:
                    self._warn_skip(problems, s)
                    self._quarantine(problems)
                    return out
            problems.append((s, problem))
        if not problems:
            raise CheckpointError(f"no checkpoint found in {self.directory} (no completed step folders)")
        shown = "; ".join(f"step {s}: {p}" for s, p in problems)
        raise CheckpointError(f"no usable checkpoint in {self.directory}: {shown}")

    def _quarantine(self, broken: list[tuple[int, str]]) -> None:
        """Moves broken step folders newer than the restored one aside, so training can save those steps again."""
        if self.read_only or not broken or jax.process_index() != 0:
            return
        for s, _ in broken:
            src = self.step_dir(s)
            dst = src.with_name(f"{s}.corrupt")
            n = 1
            while dst.exists():
                dst, n = src.with_name(f"{s}.corrupt{n}"), n + 1
            src.rename(dst)
        self._manager.reload()

    def _restore_step(self, step: int, abstract_state: Any, abstract_victim: Any) -> tuple[Any, Any, int]:
        meta = self.restore_meta(step)
        path = self.step_dir(step)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state),
                victim=ocp.args.StandardRestore(abstract_victim),
            ))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(
                f"checkpoint {path} could not be restored (corrupt, incomplete, or written for a different "
                f"model): {_short(e)}"
            ) from e
        state, victim = restored["state"], restored["victim"]
        want = meta.get("fingerprint")
        got = fingerprint({"state": state, "victim": victim})
        if want is None:
            raise CheckpointError(f"checkpoint {path} has no fingerprint in its meta item; it was not written by gitjax")
        if got != want:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: the restored arrays' fingerprint {got[:12]}... differs from "
                f"the one recorded at save time {want[:12]}... (a data file was altered or truncated)"
            )
        return state, victim, step

    # ------------------------------------------------------------------ lifecycle
    def wait_until_finished(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "PriorCheckpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def quiet_orbax_logs() -> None:
    """Orbax logs every save at INFO through absl; keep the progress bar readable.

    Only raises the threshold to WARNING if it is lower: the CLI sets ERROR by
    default (``--verbose`` keeps everything) and a library call must not undo it.
    """
    logger = logging.getLogger("absl")
    if logger.getEffectiveLevel() < logging.WARNING:
        logger.setLevel(logging.WARNING)
