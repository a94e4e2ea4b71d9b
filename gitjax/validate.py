"""Checks of user input that run before any work: each raises one ``GitjaxError`` line naming the problem and the fix.

Pure functions of their arguments (plus, for paths, the file system), cheap, and
free of JAX: the command line calls them at the top of each command so that a
typo costs nothing (no compilation, no training step, no output folder).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

from gitjax.types import GitjaxError, NonFiniteGradientError


def _flag(flag: str) -> str:
    return flag if flag.startswith("-") else f"--{flag}"


def positive_int(value: Any, flag: str) -> int:
    """``value`` as an int >= 1, else GitjaxError naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise GitjaxError(f"{_flag(flag)} must be a whole number >= 1, got {value!r}")
    return value


def number_in(value: Any, flag: str, lo: float = -math.inf, hi: float = math.inf, *, lo_open: bool = False,
              hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval [lo, hi] (ends open as asked), else GitjaxError."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise GitjaxError(f"{_flag(flag)} must be a number, got {value!r}") from None
    ok = math.isfinite(x) and (x > lo if lo_open else x >= lo) and (x < hi if hi_open else x <= hi)
    if not ok:
        if math.isinf(hi):
            want = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            want = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        raise GitjaxError(f"{_flag(flag)} must be a finite number {want}, got {value!r}")
    return x


def choice(value: str, choices: Iterable[str], flag: str, what: str) -> str:
    """``value`` if it is one of ``choices``, else GitjaxError listing them."""
    names = list(choices)
    if value not in names:
        raise GitjaxError(f"unknown {what} {value!r} ({_flag(flag)}); available: {', '.join(names)}")
    return value


def victim_name(name: str, flag: str = "--victim") -> str:
    from gitjax.victims import list_victims

    return choice(name, list_victims(), flag, "victim model")


def dataset_name(name: str, flag: str = "--data") -> str:
    from gitjax.data import list_datasets

    return choice(name, list_datasets(), flag, "dataset")


def split_name(split: str, flag: str = "--split") -> str:
    from gitjax.data import SPLITS

    return choice(split, SPLITS, flag, "split")


def output_dir(path: str | os.PathLike[str], flag: str) -> Path:
    """A folder that can be created or reused: not an existing file, no file on the way to it.

    Creates nothing (a rejected command leaves no folder behind).
    """
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            where = "" if q == p else f" (its parent {q} is a file)"
            raise GitjaxError(f"{_flag(flag)} {path} is not a folder{where}; pass a folder path, new or existing")
        if q.exists():
            break
    return p


def checkpoint_for_method(method: str, checkpoint: str | None, uses_checkpoint: bool) -> None:
    """A method that needs a prior gets an existing ``--checkpoint``; the others get none."""
    if uses_checkpoint and not checkpoint:
        raise GitjaxError(f"--method {method} needs --checkpoint <prior run dir> (from gitjax train-prior --workdir)")
    if not uses_checkpoint and checkpoint:
        raise GitjaxError(f"--method {method} does not use a prior, so --checkpoint {checkpoint} would be ignored; "
                          "drop --checkpoint or use --method git, git+ig or git+dlg")
    if checkpoint:
        from gitjax.checkpoint import resolve_checkpoint_dir

        resolve_checkpoint_dir(checkpoint)  # CheckpointError: missing path / no checkpoint there


def prior_batch_size(checkpoint: str, batch_size: int) -> None:
    """The prior at ``checkpoint`` reconstructs batches of its training B: ``--batch-size`` must match.

    Reads only the saved config (JSON), no arrays.
    """
    from gitjax.checkpoint import PriorCheckpointer, resolve_checkpoint_dir

    directory, step = resolve_checkpoint_dir(checkpoint)
    with PriorCheckpointer(directory, read_only=True) as ckpt:
        saved = ckpt.restore_config(step)
    trained_b = (saved.get("generator") or {}).get("batch_size", saved.get("victim_batch"))
    if trained_b is not None and int(trained_b) != batch_size:
        raise GitjaxError(f"the prior at {checkpoint} reconstructs batches of {trained_b} images, but --batch-size "
                          f"is {batch_size}; pass --batch-size {trained_b} (or train a prior with --batch-size "
                          f"{batch_size})")


def defense_spec(name: str, kwargs: Mapping[str, Any]) -> None:
    """Builds the defence once (cheap, no JAX work) so that bad names and arguments fail first."""
    from gitjax.defenses import DEFENSES, make_defense

    try:
        make_defense(name, **dict(kwargs))
    except GitjaxError as e:
        if name not in DEFENSES:
            raise GitjaxError(f"{e} (--defense)") from None
        raise GitjaxError(f"--defense {name}: {e} (set with --defense-arg KEY=VALUE)") from None


def finite_gradients(grads: Any, where: str) -> None:
    """Raises NonFiniteGradientError (one line, with the fix) if any gradient entry is NaN or inf."""
    import jax
    import numpy as np

    bad = [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(grads)
           if not np.all(np.isfinite(np.asarray(leaf)))]
    if bad:
        raise NonFiniteGradientError(
            f"the gradient of {where} has NaN/inf entries in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}; "
            "attacks need finite gradients: check the defence arguments and the victim's inputs")


def parse_key_values(items: Iterable[str] | None, flag: str) -> dict[str, Any]:
    """['std=0.01', 'per_layer=true'] -> {'std': 0.01, 'per_layer': True}; values parse as JSON, else stay strings."""
    import json

    out: dict[str, Any] = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise GitjaxError(f"{_flag(flag)} expects KEY=VALUE, got {item!r} (e.g. {_flag(flag)} std=0.01)")
        if k in out:
            raise GitjaxError(f"{_flag(flag)} {k} is given twice; give each key once")
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
