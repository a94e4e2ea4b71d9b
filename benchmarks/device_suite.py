"""The GPU run: every throughput benchmark at accelerator sizes, then a LeNet prior for the time left.

    PYTHONPATH=. python benchmarks/device_suite.py [--out outputs/device_suite] [--budget-s 290]
    PYTHONPATH=. python benchmarks/device_suite.py --small     # CPU sizes, under 5 minutes
    PYTHONPATH=. python benchmarks/device_suite.py --tiny      # smoke test sizes (the test suite)

Parts, in order (each catches its own failure and records it, so one broken
part does not lose the others; ``suite.json`` is rewritten after every part):

  1. per_example: per-example gradients over the batch-mean gradient (the floor)
     and the Python loop over them (benchmarks/per_example_grads.py);
  2. attacks: IG seconds per iteration over one objective gradient, GIT one-shot
     over one generator forward (benchmarks/attack_throughput.py's ``run``);
  3. exact_vs_coarse: an Exact-GIT training step over a Coarse-GIT one, and each
     step over its leaked gradients alone (benchmarks/prior_step.py);
  4. train: ``train_prior`` on preset lenet_coarse for the time left; examples/s
     and the test PSNR reached.

At the end ``suite.md`` holds a markdown table of the headline ratios. It runs
from the source tree with nothing installed beyond jax/flax/optax/orbax/chex: a
finder refuses ``tensorflow_datasets`` imports (the GPU host lacks it), so a
part that needs it fails here exactly as it would there.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.abc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))


class _NoTfds(importlib.abc.MetaPathFinder):
    """Makes ``import tensorflow_datasets`` fail as on the GPU host."""

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow_datasets" or name.startswith("tensorflow_datasets."):
            raise ImportError("tensorflow_datasets is blocked by device_suite.py (absent on the GPU host)")
        return None


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Problem sizes of one suite mode."""

    pe_models: tuple[str, ...]
    pe_batch: int
    pe_loop: bool
    repeats: int
    attack_runs: tuple[tuple[str, int, int, tuple[str, ...]], ...]  # (victim, n, ig steps, parts)
    step_runs: tuple[tuple[str, int], ...]  # (victim, global batch) for exact vs coarse
    train_batch: int
    train_min_steps: int
    train_max_steps: int


SIZES = {
    "gpu": Sizes(("lenet", "resnet18", "vit"), 256, True, 3,
                 (("lenet", 256, 50, ("batched", "iteration", "git")), ("resnet18", 16, 20, ("iteration", "git"))),
                 (("lenet", 64), ("resnet8", 16)), 256, 50, 100_000),
    "small": Sizes(("lenet", "resnet8"), 16, True, 3, (("lenet", 8, 20, ("iteration", "git")),),
                   (("lenet", 8),), 64, 20, 200),
    "tiny": Sizes(("lenet",), 2, True, 1, (("mlp", 2, 2, ("iteration", "git")),), (("mlp", 2),), 4, 2, 2),
}


# ----------------------------------------------------------------------------- parts


def part_per_example(s: Sizes) -> dict:
    from per_example_grads import bench_model

    rows = [bench_model(m, s.pe_batch, s.repeats, loop=s.pe_loop) for m in s.pe_models]
    return {"rows": rows}


def part_attacks(s: Sizes) -> dict:
    from attack_throughput import run

    runs = []
    for victim, n, steps, parts in s.attack_runs:
        r = run(victim=victim, n=n, steps=steps, repeats=s.repeats, parts=parts)
        r["source"] = "attack_throughput.run"
        r["victim"] = victim
        runs.append(r)
    return {"runs": runs}


def part_exact_vs_coarse(s: Sizes) -> dict:
    from prior_step import bench_prior_step

    rows = []
    for victim, n in s.step_runs:
        row: dict[str, Any] = {"victim": victim, "global_batch": n}
        try:
            coarse = bench_prior_step("lenet_coarse", n, s.repeats, "coarse", victim)
            exact = bench_prior_step("lenet_coarse", n, s.repeats, "exact", victim)
            row.update(coarse_step_s=coarse["step_s"], exact_step_s=exact["step_s"], leak_s=coarse["leak_s"],
                       exact_over_coarse=round(exact["step_s"] / coarse["step_s"], 3),
                       coarse_step_over_leak=coarse["step_over_leak"],
                       coarse_step_over_parts=coarse["step_over_parts"],
                       exact_step_over_leak=exact["step_over_leak"])
        except Exception as e:  # noqa: BLE001 - one victim's failure must not lose the other's row
            row["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        rows.append(row)
    return {"rows": rows}


def part_train(s: Sizes, seconds_left: float, step_s_hint: float | None) -> dict:
    from gitjax.configs import get_preset
    from gitjax.train import train_prior

    # Steps that fit ~70% of the time left (the rest: compilation, evaluation, checkpoint).
    step_s = step_s_hint or 0.5
    steps = int(max(s.train_min_steps, min(s.train_max_steps, 0.7 * seconds_left / max(step_s, 1e-4))))
    log_every = max(1, steps // 10)
    cfg = get_preset("lenet_coarse", global_batch=s.train_batch, steps=steps, warmup=min(50, steps // 10),
                     log_every=log_every, eval_every=steps, checkpoint_every=0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        result = train_prior(cfg, workdir, progress=False)
    total = time.perf_counter() - t0
    rates = [h["examples_per_s"] for h in result.history if "examples_per_s" in h]
    psnrs = [h["test_psnr"] for h in result.history if "test_psnr" in h]
    steady = rates[1:] or rates
    return {"preset": "lenet_coarse", "steps": steps, "global_batch": s.train_batch, "seconds": round(total, 1),
            "examples_per_s": round(sorted(steady)[len(steady) // 2], 1) if steady else None,
            "examples_seen": steps * s.train_batch,
            "test_psnr": round(float(psnrs[-1]), 2) if psnrs else None}


# ----------------------------------------------------------------------------- report


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def markdown(results: dict) -> str:
    lines = [f"# device suite ({results['mode']}, {results.get('device', '?')}, jax {results.get('jax', '?')})", "",
             "| part | case | figure | value | floor / target |", "|---|---|---|---|---|"]
    parts = results["parts"]
    pe = parts.get("per_example", {})
    for r in pe.get("rows", []):
        lines.append(f"| per-example grads | {r['name']} B={r['batch']} | per-example / batch-mean | "
                     f"{_fmt(r['per_example_over_batch'])}x | 1 / <= 1.5 |")
        if "loop_over_vmap" in r:
            lines.append(f"| per-example grads | {r['name']} B={r['batch']} | loop / per-example | "
                         f"{_fmt(r['loop_over_vmap'])}x | >= 1 |")
    for r in parts.get("attacks", {}).get("runs", []):
        if "ig_iter_over_objective_grad" in r:
            lines.append(f"| attacks | IG {r['victim']} | IG iteration / objective gradient | "
                         f"{_fmt(r['ig_iter_over_objective_grad'])}x | 1 / <= 1.2 |")
        if "one_shot_over_forward" in r:
            lines.append(f"| attacks | GIT {r['victim']} | one-shot / generator forward | "
                         f"{_fmt(r['one_shot_over_forward'])}x | 1 |")
        if "batched_over_sequential" in r:
            lines.append(f"| attacks | IG {r['victim']} | batched / one at a time (throughput) | "
                         f"{_fmt(r['batched_over_sequential'])}x | >= 3 |")
    for r in parts.get("exact_vs_coarse", {}).get("rows", []):
        if "exact_over_coarse" in r:
            lines.append(f"| prior step | {r['victim']} N={r['global_batch']} | Exact / Coarse step | "
                         f"{_fmt(r['exact_over_coarse'])}x | <= 2 (LeNet), <= 3 (ResNet-8) |")
            lines.append(f"| prior step | {r['victim']} N={r['global_batch']} | Coarse step / its leak | "
                         f"{_fmt(r['coarse_step_over_leak'])}x | <= 2 |")
            lines.append(f"| prior step | {r['victim']} N={r['global_batch']} | Coarse step / (leak + generator "
                         f"update) | {_fmt(r['coarse_step_over_parts'])}x | 1 |")
        else:
            lines.append(f"| prior step | {r['victim']} | error | {r.get('error', '?')[:80]} | |")
    tr = parts.get("train", {})
    if "examples_per_s" in tr:
        lines.append(f"| train | lenet_coarse, {tr['steps']} steps x N={tr['global_batch']} | examples/s | "
                     f"{_fmt(tr['examples_per_s'])} | |")
        lines.append(f"| train | lenet_coarse | test PSNR reached (dB) | {_fmt(tr['test_psnr'])} | |")
    for name, p in parts.items():
        if "error" in p:
            lines.append(f"| {name} | | FAILED | {p['error'].splitlines()[0][:100]} | |")
    lines.append("")
    lines.append(f"Total wall time {results['wall_s']:.0f} s.")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="outputs/device_suite", help="output folder (suite.json, suite.md)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--small", action="store_true", help="CPU sizes (under 5 minutes on a CPU)")
    mode.add_argument("--tiny", action="store_true", help="smoke-test sizes (the test suite)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="total seconds; the training part gets what is left (default 290 on a GPU, 280 with --small, 40 with --tiny)")
    p.add_argument("--parts", default="per_example,attacks,exact_vs_coarse,train",
                   help="comma-separated subset of the parts")
    args = p.parse_args(argv)
    mode_name = "tiny" if args.tiny else "small" if args.small else "gpu"
    budget = args.budget_s if args.budget_s is not None else (40.0 if args.tiny else 280.0 if args.small else 290.0)
    if budget <= 0:
        p.error("--budget-s must be > 0")
    wanted = [x.strip() for x in args.parts.split(",") if x.strip()]
    known = ("per_example", "attacks", "exact_vs_coarse", "train")
    bad = sorted(set(wanted) - set(known))
    if bad:
        p.error(f"unknown parts {bad}; expected a subset of {','.join(known)}")

    sys.meta_path.insert(0, _NoTfds())
    import jax

    s = SIZES[mode_name]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = jax.devices()[0]
    results: dict[str, Any] = {
        "mode": mode_name, "jax": jax.__version__, "budget_s": budget, "parts": {},
        "device": f"cpu ({os.cpu_count()} cores)" if dev.platform == "cpu" else f"{dev.device_kind} x{jax.device_count()}",
    }
    t_start = time.perf_counter()

    def save():
        results["wall_s"] = time.perf_counter() - t_start
        (out / "suite.json").write_text(json.dumps(results, indent=1, default=str))

    parts: dict[str, Callable[[], dict]] = {
        "per_example": lambda: part_per_example(s),
        "attacks": lambda: part_attacks(s),
        "exact_vs_coarse": lambda: part_exact_vs_coarse(s),
    }
    for name in [n for n in known if n in wanted and n != "train"]:
        t0 = time.perf_counter()
        try:
            results["parts"][name] = parts[name]()
        except Exception as e:  # noqa: BLE001 - recorded, the next part still runs
            results["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results["parts"][name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[device_suite] {name}: {results['parts'][name]['seconds']} s"
              + (" FAILED" if "error" in results["parts"][name] else ""), flush=True)
        save()
    if "train" in wanted:
        t0 = time.perf_counter()
        rows = results["parts"].get("exact_vs_coarse", {}).get("rows", [])
        hint = next((r["coarse_step_s"] * s.train_batch / r["global_batch"] for r in rows
                     if r.get("victim") == "lenet" and "coarse_step_s" in r), None)
        try:
            results["parts"]["train"] = part_train(s, budget - (time.perf_counter() - t_start), hint)
        except Exception as e:  # noqa: BLE001
            results["parts"]["train"] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results["parts"]["train"]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[device_suite] train: {results['parts']['train']['seconds']} s", flush=True)
    save()
    (out / "suite.md").write_text(markdown(results))
    print(markdown(results))
    return results


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    main()
