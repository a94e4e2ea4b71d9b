"""The robustness study: the experiment matrix of GIT's robustness section, as reproducible runs.

Chen & Liu 2025 (arXiv 2505.20026) claim GIT stays accurate under inaccurate
gradients (noise, pruning), distribution shift and parameter discrepancy. This
package turns such a claim into a grid of independent runs:

  * ``spec``: what a run is (:class:`Run`, :class:`Defense`, :class:`Budget`,
    :class:`Experiment`), content-addressed by :func:`run_key`;
  * ``grids``: the experiments (noise, prune, dpsgd, compression, shift,
    discrepancy, batch, fedavg) at scales ``small`` / ``full``;
  * ``execute``: priors trained once and shared, each row through ``gitjax.pipeline``;
  * ``report``: ``table.md`` (methods and oracle columns) and PSNR plots.

Entry points: :func:`run_experiment` (library), :func:`main` (``gitjax experiment``
and ``python -m experiments.run``). Nothing here imports ``experiments``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from gitjax.study.execute import (METHODS, PRIOR_DIR, _PRIOR_DONE, BasePrior, Method, PriorCache, attack_config,
                                  execute, prior_config, prior_dir, prior_key, read_record, run_path, run_runs)
from gitjax.study.grids import EXPERIMENTS, apply_base_priors, parse_base_priors
from gitjax.study.report import build_table, build_time_table, write_plots, write_report
from gitjax.study.spec import (Budget, Defense, Experiment, PlotSpec, Run, parse_filter, run_key,
                               run_to_dict)
from gitjax.types import GitjaxError

SCALES = ("small", "full")

__all__ = ["BasePrior", "Budget", "Defense", "EXPERIMENTS", "Experiment", "METHODS", "Method", "PRIOR_DIR", "PlotSpec",
           "PriorCache", "Run", "SCALES", "attack_config", "build_table", "build_time_table", "execute",
           "experiment_runs", "get_experiment", "load_experiments", "main", "parse_base_priors", "parse_filter", "prior_config",
           "prior_dir", "prior_key", "read_record", "run_experiment", "run_key", "run_path", "run_runs",
           "run_to_dict", "write_plots", "write_report"]


def load_experiments() -> dict[str, Experiment]:
    """The experiment grids (``gitjax.study.grids.EXPERIMENTS``)."""
    return EXPERIMENTS


def get_experiment(name: str) -> Experiment:
    exps = load_experiments()
    if name not in exps:
        raise GitjaxError(f"unknown experiment {name!r}; available: {', '.join(exps)}")
    return exps[name]


def experiment_runs(name: str, scale: str = "small", smoke: bool = False, only: str | None = None,
                    victims: Sequence[str] | None = None, methods: Sequence[str] | None = None,
                    base_priors: dict[tuple[str, str], str] | None = None) -> list[Run]:
    """The runs of one experiment at one scale, filtered; ``base_priors`` ({(victim, kind): path})
    adds converged priors to the scale's own (``grids.apply_base_priors``; smoke grids use none)."""
    if scale not in SCALES:
        raise GitjaxError(f"scale must be one of {SCALES}, got {scale!r}")
    runs = get_experiment(name).build(scale, smoke)
    runs = apply_base_priors(runs, scale, base_priors, use=not smoke)
    keep = parse_filter(only)
    return [r for r in runs if keep(r) and (victims is None or r.victim in victims)
            and (methods is None or r.method in methods)]


def run_experiment(name: str, scale: str = "small", out_dir: str | Path = "results", smoke: bool = False, *,
                   only: str | None = None, victims: Sequence[str] | None = None,
                   methods: Sequence[str] | None = None, retry_failed: bool = True, progress: bool = True,
                   extra_runs: Sequence[Run] = (),
                   base_priors: dict[tuple[str, str], str] | None = None) -> list[dict[str, Any]]:
    """Runs one experiment (skipping finished runs) and writes its table and plots.

    Args:
      name: a key of ``gitjax.study.grids.EXPERIMENTS``.
      scale: 'small' (embedded data, CPU minutes) or 'full' (TFDS data, paper budgets).
      out_dir: results root; ``out_dir/<name>/`` and the shared ``out_dir/priors/``.
      smoke: the shrunken grid used by tests.
      only: a ``--only`` filter (see :func:`parse_filter`).
      victims, methods: further restrict the grid.
      retry_failed: rerun rows recorded as failed (else keep their record).
      extra_runs: rows appended to the grid (tests use it to inject a failing method).
      base_priors: {(victim, kind): path} converged priors beyond the scale's (``--base-prior``).

    Returns:
      one record per run (its JSON plus ``executed``), in grid order.
    """
    exp = get_experiment(name)
    runs = experiment_runs(name, scale, smoke, only, victims, methods, base_priors) + list(extra_runs)
    records = run_runs(runs, out_dir, retry_failed=retry_failed, progress=progress)
    # The report covers the whole (unfiltered) grid, so partial reruns still give complete tables.
    full = experiment_runs(name, scale, smoke, None, victims, methods, base_priors) + list(extra_runs)
    write_report(exp, full, out_dir, scale)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``gitjax experiment <name> --scale small|full [--out DIR] [--only FILTER] ...``.

    Returns 0 when every run is ok, 1 when any run failed (its reason is in the table).
    """
    p = argparse.ArgumentParser(prog="gitjax experiment", description="GIT robustness study (gitjax.study.grids)")
    p.add_argument("name", help="experiment name, 'all', or 'list'")
    p.add_argument("--scale", choices=SCALES, default="small")
    p.add_argument("--out", default="results", help="results root (default: results)")
    p.add_argument("--only", default=None, help="row filter, e.g. 'victim=lenet,method=ig|coarse'")
    p.add_argument("--victims", default=None, help="comma-separated victims to keep")
    p.add_argument("--methods", default=None, help="comma-separated methods to keep")
    p.add_argument("--base-prior", action="append", default=[], metavar="VICTIM:KIND=PATH",
                   help="a converged prior (train-prior --workdir) for that victim's KIND rows: clean rows use "
                        "it as is, matched rows fine-tune it (repeatable; e.g. lenet:coarse=runs/lenet_coarse)")
    p.add_argument("--smoke", action="store_true", help="the tiny grid the tests run")
    p.add_argument("--no-retry", action="store_true", help="keep failed rows instead of retrying them")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their keys, run nothing")
    p.add_argument("--report", action="store_true", help="only rewrite table.md and the plots from the run JSONs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    exps = load_experiments()
    if args.name == "list":
        for n, e in exps.items():
            print(f"{n:<12} {e.description}")
        return 0
    names = list(exps) if args.name == "all" else [get_experiment(args.name).name]
    bases = parse_base_priors(args.base_prior)
    failed = 0
    split = lambda s: None if s is None else [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    for name in names:
        if args.dry_run:
            for r in experiment_runs(name, args.scale, args.smoke, args.only, split(args.victims), split(args.methods),
                                     bases):
                print(run_key(r), r.victim, r.column, r.setting, sep="\t")
            continue
        if args.report:
            runs = experiment_runs(name, args.scale, args.smoke, None, split(args.victims), split(args.methods), bases)
            print(write_report(get_experiment(name), runs, args.out, args.scale))
            continue
        t0 = time.perf_counter()
        recs = run_experiment(name, args.scale, args.out, args.smoke, only=args.only, victims=split(args.victims),
                              methods=split(args.methods), retry_failed=not args.no_retry, progress=not args.quiet,
                              base_priors=bases)
        n_ok = sum(r["status"] == "ok" for r in recs)
        failed += len(recs) - n_ok
        print(f"{name}: {len(recs)} runs ({sum(r['executed'] for r in recs)} executed, {n_ok} ok, "
              f"{len(recs) - n_ok} failed) in {time.perf_counter() - t0:.0f} s; "
              f"table: {Path(args.out) / name / 'table.md'}")
    if failed:
        print(f"{failed} run(s) failed; see the Failures section of table.md", file=sys.stderr)
        return 1
    return 0
