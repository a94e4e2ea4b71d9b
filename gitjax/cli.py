"""The ``gitjax`` command line: a thin layer over the library (all logic is importable).

  gitjax models                      list victim models with parameter counts
  gitjax datasets                    list datasets (embedded ones work offline)
  gitjax demo                        full offline demo on embedded data
  gitjax train-prior ...             train a GIT prior (generator) offline
  gitjax attack --method M ...       reconstruct held-out images from their gradients
  gitjax experiment NAME ...         robustness study (gitjax.study; 'gitjax experiment list')
  gitjax bench NAME                  run a benchmark script from benchmarks/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence


def _parse_kv(items: Sequence[str] | None) -> dict[str, Any]:
    """['std=0.01', 'per_layer=true'] -> {'std': 0.01, 'per_layer': True}."""
    out: dict[str, Any] = {}
    for item in items or ():
        if "=" not in item:
            raise SystemExit(f"expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


# ----------------------------------------------------------------------------- models / datasets


def cmd_models(args: argparse.Namespace) -> int:
    import jax

    from gitjax.layout import GradientLayout
    from gitjax.victims import count_params, list_victims, make_victim
    from gitjax.viz import format_table

    rows = []
    for name, desc in list_victims().items():
        victim = make_victim(name, input_shape=tuple(args.input_shape))
        params, _ = jax.eval_shape(victim.init, jax.random.key(0))
        rows.append({"model": name, "params": count_params(params),
                     "layer blocks": len(GradientLayout.from_params(params)), "description": desc})
    print(format_table(rows, floatfmt=".0f"))
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from gitjax.data import list_datasets

    for name, desc in list_datasets().items():
        print(f"{name:<12} {desc}")
    return 0


# ----------------------------------------------------------------------------- train-prior


def train_config_from_args(args: argparse.Namespace):
    """A TrainConfig from a preset (or the defaults) with the flags given on the command line."""
    from gitjax.configs import TrainConfig, get_preset, perturb

    config = get_preset(args.preset) if args.preset else TrainConfig()
    changes: dict[str, Any] = {}
    for flag, field in (("victim", "victim"), ("data", "dataset"), ("steps", "steps"), ("lr", "lr"),
                        ("seed", "seed"), ("global_batch", "global_batch")):
        if getattr(args, flag) is not None:
            changes[field] = getattr(args, flag)
    gen = config.generator
    if args.generator is not None:
        gen = dataclasses.replace(gen, kind=args.generator)
    if args.batch_size is not None:
        gen = dataclasses.replace(gen, batch_size=args.batch_size)
        changes["victim_batch"] = args.batch_size
    changes["generator"] = gen
    perts = list(config.perturbations)
    if args.noise_std:  # sampled up to the given std, clean half of the time
        perts.append(perturb("gaussian", std=(0.0, args.noise_std), prob=0.5))
    if args.prune_ratio:
        perts.append(perturb("prune", ratio=(0.0, args.prune_ratio), prob=0.5))
    changes["perturbations"] = tuple(perts)
    if args.param_perturb:
        changes["param_discrepancy"] = (0.0, args.param_perturb)
    if "steps" in changes and config.warmup >= changes["steps"]:
        changes["warmup"] = changes["steps"] // 10
    return dataclasses.replace(config, **changes).validate()


def cmd_train_prior(args: argparse.Namespace) -> int:
    from gitjax.train import train_prior

    config = train_config_from_args(args)
    result = train_prior(config, args.workdir, resume=not args.no_resume, progress=not args.quiet)
    last = {k: v for r in result.history for k, v in r.items() if isinstance(v, (int, float))}
    print(json.dumps({"workdir": str(args.workdir), **last}))
    return 0


# ----------------------------------------------------------------------------- attack


@dataclasses.dataclass(frozen=True)
class AttackJob:
    """One ``gitjax attack`` invocation, resolved from the command line."""

    method: str
    victim: str
    data: str
    split: str
    num_images: int
    batch_size: int
    seed: int
    steps: int | None
    checkpoint: str
    defense: str
    defense_args: dict
    out: str
    plot: bool


def attack_config(job: AttackJob) -> Any:
    """The method's config for ``job``: defaults, ``--steps`` for iterative methods (the refinement of git+*)."""
    from gitjax.attacks import get_attack
    from gitjax.pipeline import default_refine_config

    spec = get_attack(job.method)
    config = spec.config_cls()
    if spec.family == "learned":
        config = dataclasses.replace(config, checkpoint=job.checkpoint)
        if spec.refine:
            sub = default_refine_config(spec.refine)
            if job.steps is not None:
                sub = dataclasses.replace(sub, steps=job.steps)
            config = dataclasses.replace(config, refine_config=sub)
    elif job.steps is not None and hasattr(config, "steps"):
        config = dataclasses.replace(config, steps=job.steps)
    return config


def run_attack_job(job: AttackJob, progress: bool = True) -> dict[str, Any]:
    """Attacks ``num_images // batch_size`` leaked gradients of held-out images (``gitjax.pipeline``);
    writes reconstruction.png, metrics.json and table.md (the method and the oracle rows)."""
    import jax
    import numpy as np

    from gitjax import viz
    from gitjax.attacks import get_attack
    from gitjax.data import load_dataset
    from gitjax.pipeline import attacker_from_dataset, attacker_from_prior, run_pipeline
    from gitjax.prior import load_prior

    spec = get_attack(job.method)
    if spec.family == "learned":
        if not job.checkpoint:
            raise SystemExit(f"--method {job.method} needs --checkpoint <prior run dir> (from gitjax train-prior)")
        attacker = attacker_from_prior(load_prior(job.checkpoint))
    else:
        attacker = attacker_from_dataset(job.victim, job.data, job.seed)
    config = attack_config(job)
    victim = attacker.victim
    ds = load_dataset(job.data, job.split, image_size=victim.input_shape[0], channels=victim.input_shape[2])
    b = job.batch_size
    n = max(1, job.num_images // b)
    if n * b > len(ds):
        raise SystemExit(f"{job.data}/{job.split} has {len(ds)} images; asked for {n * b}")
    x_NxB = ds.images[: n * b].reshape(n, b, *ds.image_shape)
    y_NxB = (np.asarray(ds.labels[: n * b]) % victim.num_classes).astype(np.int32).reshape(n, b)
    if progress:
        print(f"attacking {n} leaked gradient(s) of {b} image(s) with {job.method}", file=sys.stderr)
    res = run_pipeline(job.method, attacker, x_NxB, y_NxB, jax.random.key(job.seed), config=config,
                       defense=job.defense, defense_args=job.defense_args, record_truth=job.plot)
    rec, sc = res.reconstruction, res.scores
    truth = x_NxB.reshape(-1, *ds.image_shape)
    perm = sc["permutation_NxB"]
    recon_matched = np.concatenate([r[np.asarray(p)] for r, p in zip(rec.images, perm)])
    grad_distance = rec.info.get("grad_distance")
    summary = {
        "method": job.method, "victim": victim.name, "data": f"{job.data}/{job.split}", "images": len(truth),
        "batch_size": b, "defense": job.defense, **{f"defense_{k}": v for k, v in job.defense_args.items()},
        "psnr": sc["psnr"], "ssim": sc["ssim"], "mse": sc["mse"], "label_acc": sc["label_acc"],
        "seconds_per_batch": rec.info["seconds"] / n, "iterations": rec.info["iterations"],
        "grad_distance": float(np.mean(np.asarray(grad_distance, np.float64))) if grad_distance is not None
        else float("nan"),
    }
    out = Path(job.out)
    out.mkdir(parents=True, exist_ok=True)
    viz.save_grid(out / "reconstruction.png", [truth[:16], recon_matched[:16]], ["truth", job.method])
    curves = rec.info.get("psnr")
    if job.plot and curves is not None and np.ndim(curves) == 2 and np.shape(curves)[1] > 0:
        every = max(1, summary["iterations"] // np.shape(curves)[1])
        viz.save_curve_plot(out / "convergence.png", {job.method: (np.arange(np.shape(curves)[1]) * every,
                                                                    np.mean(curves, axis=0))},
                            "iteration", "PSNR (dB)", f"{job.method} on {victim.name}")
    table = viz.format_table(res.rows(job.method), ["method", "psnr", "ssim", "mse"])
    (out / "table.md").write_text(table + "\n")
    per_image = {k: sc[k] for k in ("psnr_per_image", "ssim_per_image", "mse_per_image", "permutation_NxB")}
    detail = {"summary": summary, "oracles": sc["oracles"], "per_image": per_image,
              "info": {k: v for k, v in rec.info.items() if k not in ("psnr", "loss")}}
    (out / "metrics.json").write_text(json.dumps(detail, indent=2, default=_json_default))
    summary["table"] = table
    return summary


def _json_default(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return str(v)


def cmd_attack(args: argparse.Namespace) -> int:
    from gitjax.viz import format_table

    out = args.out or os.path.join("outputs", f"attack-{args.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    job = AttackJob(args.method, args.victim, args.data, args.split, args.num_images, args.batch_size, args.seed,
                    args.steps, args.checkpoint or "", args.defense, _parse_kv(args.defense_arg), out, args.plot)
    summary = run_attack_job(job, progress=not args.quiet)
    table = summary.pop("table")
    print(format_table([summary]))
    print(table)
    print(f"wrote {out}/reconstruction.png and {out}/metrics.json")
    return 0


# ----------------------------------------------------------------------------- demo / experiment / bench


def cmd_demo(args: argparse.Namespace) -> int:
    from gitjax.demo import run_demo

    run_demo(args.out, victim=args.victim, prior_steps=args.prior_steps, ig_steps=args.ig_steps,
             num_images=args.num_images, seed=args.seed, generator=args.generator, progress=not args.quiet)
    return 0


def cmd_experiment(args: argparse.Namespace, rest: list[str]) -> int:
    """``gitjax.study.main``: exit status 1 when any run of the experiment failed."""
    from gitjax.study import main as study_main

    return study_main([args.name, *rest, *(["--quiet"] if args.quiet and "--quiet" not in rest else [])])


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import runpy

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"{args.name}.py"
    if not script.exists():
        names = sorted(p.stem for p in root.glob("*.py")) if root.exists() else []
        raise SystemExit(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none (run from a checkout)'}")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gitjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list victim models with parameter counts")
    s.add_argument("--input-shape", type=int, nargs=3, default=(32, 32, 3), metavar=("H", "W", "C"))
    s.set_defaults(fn=cmd_models)

    s = sub.add_parser("datasets", help="list datasets")
    s.set_defaults(fn=cmd_datasets)

    s = sub.add_parser("demo", help="offline end-to-end demo on the embedded dataset")
    s.add_argument("--out", default="outputs/demo")
    s.add_argument("--victim", default="lenet")
    s.add_argument("--generator", default="coarse", choices=("exact", "coarse", "lti"),
                   help="coarse trains in ~1 min on CPU; exact is slower per step (closed-form inversions inside)")
    s.add_argument("--prior-steps", type=int, default=400)
    s.add_argument("--ig-steps", type=int, default=200)
    s.add_argument("--num-images", type=int, default=8)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("train-prior", help="train a GIT prior offline on auxiliary data")
    s.add_argument("--workdir", required=True, help="run directory (checkpoints, config, metrics.jsonl)")
    s.add_argument("--preset", default=None, help="named TrainConfig preset (see gitjax.configs.PRESETS)")
    s.add_argument("--victim", default=None)
    s.add_argument("--data", default=None)
    s.add_argument("--generator", default=None, choices=("exact", "coarse", "lti"))
    s.add_argument("--batch-size", type=int, default=None, help="victim batch B behind each gradient")
    s.add_argument("--steps", type=int, default=None)
    s.add_argument("--global-batch", type=int, default=None, help="gradients per training step (N)")
    s.add_argument("--lr", type=float, default=None)
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--noise-std", type=float, default=None, help="train with Gaussian gradient noise (augmentation)")
    s.add_argument("--prune-ratio", type=float, default=None, help="train with top-k pruned gradients")
    s.add_argument("--param-perturb", type=float, default=None, help="train with relative victim-param perturbation")
    s.add_argument("--no-resume", action="store_true")
    s.set_defaults(fn=cmd_train_prior)

    s = sub.add_parser("attack", help="reconstruct held-out images from their leaked gradients")
    s.add_argument("--method", required=True, help="dlg, idlg, ig, git, git+ig, git+dlg, analytic, rgap, april, ig+bn")
    s.add_argument("--victim", default="lenet", help="victim model (ignored for git*: taken from the prior)")
    s.add_argument("--data", default="patches")
    s.add_argument("--split", default="test")
    s.add_argument("--checkpoint", default=None, help="prior run dir for git, git+ig, git+dlg")
    s.add_argument("--num-images", type=int, default=8)
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--steps", type=int, default=None, help="iterations of optimisation attacks")
    s.add_argument("--defense", default="none", help="none, gaussian, laplace, prune, quantize, sign")
    s.add_argument("--defense-arg", action="append", metavar="K=V", help="e.g. std=0.01 or ratio=0.9")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default=None)
    s.add_argument("--plot", action="store_true", help="record PSNR per iteration and save convergence.png")
    s.set_defaults(fn=cmd_attack)

    s = sub.add_parser("experiment", help="robustness study; extra args go to experiments' runner")
    s.add_argument("name")
    s.set_defaults(fn=cmd_experiment, passthrough=True)

    s = sub.add_parser("bench", help="run a benchmark from benchmarks/ (extra args are passed on)")
    s.add_argument("name")
    s.set_defaults(fn=cmd_bench, passthrough=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from gitjax.data import DatasetUnavailableError
    from gitjax.types import GitjaxError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if getattr(args, "passthrough", False):
            return args.fn(args, rest)
        return args.fn(args)
    except (GitjaxError, DatasetUnavailableError) as e:  # bad input: one clear line, no traceback
        print(f"gitjax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
