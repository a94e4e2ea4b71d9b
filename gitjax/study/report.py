"""Study reports: ``table.md`` (methods and oracle columns per setting) and PSNR plots, from the run JSONs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from gitjax.study.execute import read_record
from gitjax.study.spec import Budget, Experiment, Run, run_key


def _cell(rec: dict[str, Any]) -> str:
    if rec.get("status") != "ok":
        reason = str(rec.get("reason") or "unknown")
        return "failed: " + (reason if len(reason) <= 80 else reason[:77] + "...")
    m = rec["metrics"]
    return f"{m['psnr']:.2f} / {m['ssim']:.3f}"


def _ordered(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _pivot(runs: Sequence[Run], records: Mapping[str, dict[str, Any]], cell: Callable[[dict], Any],
           floatfmt: str = ".2f", oracles: bool = False) -> str:
    """Markdown table: rows = (victim, setting), columns = method columns; only runs with a record.

    ``oracles``: append the oracle columns (``oracle: mean image`` ...) of each row's images,
    read from any successful record of that row (every run of a row attacks the same images).
    """
    from gitjax.viz import format_table

    done = [r for r in runs if run_key(r) in records]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    oracle_columns: list[str] = []
    for r in done:
        rec = records[run_key(r)]
        row = rows.setdefault((r.victim, r.setting), {"victim": r.victim, "setting": r.setting})
        row[r.column] = cell(rec)
        if oracles and rec.get("status") == "ok":
            for o in rec.get("oracles", ()):
                row.setdefault(o["method"], f"{o['psnr']:.2f} / {o['ssim']:.3f}")
                oracle_columns.append(o["method"])
    columns = ["victim", "setting", *_ordered(r.column for r in done), *_ordered(oracle_columns)]
    return format_table(list(rows.values()), columns, floatfmt)


def build_table(runs: Sequence[Run], records: Mapping[str, dict[str, Any]]) -> str:
    """Cells 'PSNR / SSIM', or 'failed: reason'; then the oracle columns of the same images."""
    return _pivot(runs, records, _cell, oracles=True)


def build_time_table(runs: Sequence[Run], records: Mapping[str, dict[str, Any]]) -> str:
    """Cells: attack seconds per leaked gradient without compilation."""
    return _pivot(runs, records, lambda rec: rec["metrics"]["seconds_per_gradient"] if rec.get("status") == "ok"
                  else None)


def write_report(exp: Experiment, runs: Sequence[Run], out_dir: str | Path, scale: str) -> dict[str, Any]:
    """Writes ``table.md`` and the plots of one experiment from the run JSONs on disk; returns their paths."""
    out = Path(out_dir) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for r in runs:
        rec = read_record(out_dir, r)
        if rec is not None:
            records[run_key(r)] = rec
    done = [r for r in runs if run_key(r) in records]
    failed = [(r, records[run_key(r)]) for r in done if records[run_key(r)].get("status") != "ok"]
    priors = {}
    for rec in records.values():
        if rec.get("status") == "ok" and "prior" in rec:
            p = rec["prior"]
            priors[p["key"]] = {"prior": Path(p["workdir"]).name, "train s": p.get("train_seconds"),
                                **{f"final {k}": v for k, v in p.get("final", {}).items()}}
    b = runs[0].budget if runs else Budget()
    bases = sorted({(r.victim, r.base_prior) for r in runs if r.base_prior})
    base_note = ("Base priors (converged, used as is by clean rows; matched rows fine-tune them "
                 f"{b.prior_steps} steps): " + ", ".join(f"{v} `{p}`" for v, p in bases) + ". ") if bases else ""
    lines = [
        f"# {exp.name}: {exp.description}",
        "",
        f"Scale `{scale}`: {b.num_images} test images per row, {b.image_size}x{b.image_size}, priors "
        f"{b.prior_steps} steps x {b.prior_batch} gradients, IG {b.attack_steps} steps. {base_note}"
        f"{len(done)} of {len(runs)} runs have results ({len(failed)} failed).",
        "",
        "Cells: PSNR (dB) / SSIM, mean over the test images after Hungarian matching within each batch. "
        "Columns are methods; `(matched prior)` = the prior was trained under the same defence. "
        "`oracle:` columns score references that know the truth: the dataset-mean image, each image's true "
        "mean colour, and the truth blurred by a Gaussian of 1 / 2 px (a method above a blur column recovers "
        "finer structure; below the mean-colour column, less than colour).",
        "",
        build_table(runs, records),
        "",
        "## Attack seconds per leaked gradient (wall time minus JAX tracing and compilation)",
        "",
        build_time_table(runs, records),
    ]
    if priors:
        from gitjax.viz import format_table

        lines += ["", "## Priors used", "", format_table(list(priors.values()), floatfmt=".3g")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{run_key(r)}` {r.victim} / {r.column} / {r.setting}: {rec.get('reason')}" for r, rec in failed]
    table_path = out / "table.md"
    table_path.write_text("\n".join(lines) + "\n")
    plots = write_plots(exp, runs, records, out)
    return {"table": str(table_path), "plots": plots}


def write_plots(exp: Experiment, runs: Sequence[Run], records: Mapping[str, dict[str, Any]], out: Path) -> list[str]:
    """PSNR vs ``Run.x`` per (victim, panel); only successful runs are drawn."""
    from gitjax.viz import save_curve_plot

    spec = exp.plot
    if spec is None:
        return []
    paths = []
    for victim in _ordered(r.victim for r in runs):
        for panel in _ordered(r.panel for r in runs if r.victim == victim):
            curves: dict[str, tuple[list[float], list[float]]] = {}
            for r in runs:
                rec = records.get(run_key(r))
                if r.victim != victim or r.panel != panel or r.x is None or rec is None or rec.get("status") != "ok":
                    continue
                x = float(r.x)
                if spec.logx and x <= 0 and spec.zero_at is not None:
                    x = spec.zero_at
                xs, ys = curves.setdefault(r.column, ([], []))
                xs.append(x)
                ys.append(rec["metrics"]["psnr"])
            curves = {k: (list(np.asarray(xs)[np.argsort(xs)]), list(np.asarray(ys)[np.argsort(xs)]))
                      for k, (xs, ys) in curves.items() if xs}
            if not curves:
                continue
            xlabel = dict(spec.panel_xlabels).get(panel, spec.xlabel)
            xlabel += f" (0 drawn at {spec.zero_at:g})" if spec.logx and spec.zero_at else ""
            suffix = f"_{panel}" if panel else ""
            path = out / f"psnr_vs_{spec.name}_{victim}{suffix}.png"
            title = f"{exp.name}: {victim}" + (f" ({panel})" if panel else "")
            paths.append(save_curve_plot(path, curves, xlabel, "PSNR (dB)", title, logx=spec.logx))
    return paths
