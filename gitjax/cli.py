"""The ``gitjax`` command line: a thin layer over the library (all logic is importable).

  gitjax models                      list victim models with parameter counts
  gitjax datasets                    list datasets (embedded ones work offline)
  gitjax demo                        full offline demo on embedded data
  gitjax train-prior --workdir W ... train a GIT prior (generator) offline
  gitjax attack --method M ...       reconstruct held-out images from their gradients
  gitjax experiment NAME ...         robustness study (gitjax.study; 'gitjax experiment list')
  gitjax bench NAME ...              run benchmarks/NAME.py (from a source checkout)

Bad input ends with one line, "gitjax: error: <problem and fix>", and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

from gitjax import validate
from gitjax.types import GitjaxError


def _parse_kv(items: Sequence[str] | None) -> dict[str, Any]:
    """['std=0.01', 'per_layer=true'] -> {'std': 0.01, 'per_layer': True}."""
    return validate.parse_key_values(items, "--defense-arg")


# ----------------------------------------------------------------------------- models / datasets


def validate_models(args: argparse.Namespace) -> None:
    for v in args.input_shape:
        validate.positive_int(v, "--input-shape (H W C)")


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
    if args.init_from is not None:
        changes["init_from"] = args.init_from
    if "steps" in changes and config.warmup >= changes["steps"]:
        changes["warmup"] = changes["steps"] // 10
    return dataclasses.replace(config, **changes).validate()


def validate_train_prior(args: argparse.Namespace) -> None:
    """Flags, the config they make, the workdir and what resuming would do; before any data or JAX work."""
    validate.output_dir(args.workdir, "--workdir")
    if args.victim is not None:
        validate.victim_name(args.victim)
    if args.data is not None:
        validate.dataset_name(args.data)
    for flag in ("batch_size", "steps", "global_batch"):
        if getattr(args, flag) is not None:
            validate.positive_int(getattr(args, flag), flag.replace("_", "-"))
    if args.lr is not None:
        validate.number_in(args.lr, "--lr", 0.0, lo_open=True)
    if args.noise_std is not None:
        validate.number_in(args.noise_std, "--noise-std", 0.0)
    if args.prune_ratio is not None:
        validate.number_in(args.prune_ratio, "--prune-ratio", 0.0, 1.0, hi_open=True)
    if args.param_perturb is not None:
        validate.number_in(args.param_perturb, "--param-perturb", 0.0)
    _use_data_dir(args, set_env=True)
    args.config = train_config_from_args(args)  # ConfigError: unknown preset, inconsistent fields
    if args.config.init_from and not Path(args.config.init_from).is_dir():
        raise GitjaxError(f"--init-from {args.config.init_from} is not a folder; pass a train-prior --workdir "
                          "(the lenet_robust preset starts from runs/lenet_coarse: train lenet_coarse first)")
    _announce_resume(args, args.config)


def _use_data_dir(args: argparse.Namespace, *, set_env: bool = False) -> None:
    """``--data-dir`` must be a folder. ``set_env``: pass it on as $TFDS_DATA_DIR.

    train-prior's loader reads the dataset by name from the config, so the folder
    reaches it through the environment variable tfds itself reads.
    """
    if getattr(args, "data_dir", None) is None:
        return
    if not Path(args.data_dir).expanduser().is_dir():
        raise GitjaxError(f"--data-dir {args.data_dir} is not a folder; pass the TFDS data folder "
                          "(the --data_dir given to `tfds build`)")
    if set_env:
        os.environ["TFDS_DATA_DIR"] = str(Path(args.data_dir).expanduser().resolve())


def _announce_resume(args: argparse.Namespace, config: Any) -> None:
    """Existing checkpoints in --workdir: say that training continues (or refuse), before any work.

    Rerunning a run with more --steps continues it from its newest checkpoint; one
    line on stderr says so. With --no-resume an existing checkpoint is an error.
    """
    from gitjax.checkpoint import CHECKPOINT_SUBDIR, PriorCheckpointer
    from gitjax.configs import TrainConfig, config_diff, config_from_dict

    ckpt_dir = Path(args.workdir).expanduser() / CHECKPOINT_SUBDIR
    if not ckpt_dir.is_dir() or not any(c.name.isdigit() for c in ckpt_dir.iterdir()):
        return
    with PriorCheckpointer(ckpt_dir, read_only=True) as ckpt:
        step = ckpt.latest_step()
        if step is None:
            return
        if args.no_resume:
            raise GitjaxError(f"--workdir {args.workdir} already holds a run (checkpoint at step {step}); "
                              "drop --no-resume to continue it, or pass a fresh --workdir")
        saved = config_from_dict(ckpt.restore_config(step))
    diff = config_diff(saved, config, ignore=TrainConfig.RUNTIME_FIELDS + ("steps",))
    if diff:
        shown = "; ".join(f"{k}: saved {a!r}, now {v!r}" for k, (a, v) in list(diff.items())[:3])
        raise GitjaxError(f"--workdir {args.workdir} holds a run with another config ({shown}); "
                          "pass the flags it was trained with, or a fresh --workdir")
    if step >= config.steps:
        print(f"gitjax: {args.workdir} is already trained to step {step} (>= --steps {config.steps}); "
              "nothing to train (pass a larger --steps to continue it)", file=sys.stderr)
    else:
        print(f"gitjax: continuing {args.workdir} from step {step} to step {config.steps}", file=sys.stderr)


def cmd_train_prior(args: argparse.Namespace) -> int:
    from gitjax.train import train_prior

    config = getattr(args, "config", None) or train_config_from_args(args)
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
    data_dir: str | None = None
    known_noise: bool = False
    holdout: float | None = None  # None: the method's default (held-out selection 0.2 for git+ig)


def attack_config(job: AttackJob) -> Any:
    """The method's config for ``job``: defaults, ``--steps`` for iterative methods (the refinement of git+*),
    with ``known_noise`` the gaussian defence's std as IG's known noise level, and ``holdout``."""
    from gitjax.pipeline import method_config

    noise_std = float(job.defense_args.get("std", 0.0)) if job.known_noise else 0.0
    return method_config(job.method, checkpoint=job.checkpoint, steps=job.steps, noise_std=noise_std,
                         holdout=job.holdout)


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
            raise GitjaxError(f"--method {job.method} needs --checkpoint <prior run dir> (from gitjax train-prior)")
        attacker = attacker_from_prior(load_prior(job.checkpoint))
    else:
        attacker = attacker_from_dataset(job.victim, job.data, job.seed, data_dir=job.data_dir)
    config = attack_config(job)
    victim = attacker.victim
    ds = load_dataset(job.data, job.split, image_size=victim.input_shape[0], channels=victim.input_shape[2],
                      data_dir=job.data_dir)
    b = job.batch_size
    n = job.num_images // b  # validate_attack: num_images is a positive multiple of b
    if n * b > len(ds):
        raise GitjaxError(f"{job.data}/{job.split} has {len(ds)} images; --num-images {n * b} asks for "
                          f"more: pass --num-images <= {len(ds) // b * b}")
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


def validate_attack(args: argparse.Namespace) -> None:
    """Every flag of ``gitjax attack`` (names, numbers, defence, checkpoint, --out) before any data or JAX work."""
    from gitjax.attacks import get_attack

    spec = get_attack(args.method)  # GitjaxError: unknown attack, listing the registered ones
    uses_checkpoint = "checkpoint" in {f.name for f in dataclasses.fields(spec.config_cls)}
    validate.victim_name(args.victim)
    validate.dataset_name(args.data)
    validate.split_name(args.split)
    validate.positive_int(args.num_images, "--num-images")
    validate.positive_int(args.batch_size, "--batch-size")
    if args.num_images % args.batch_size:
        raise GitjaxError(f"--num-images {args.num_images} is not a multiple of --batch-size {args.batch_size}; "
                          f"pass e.g. --num-images {max(1, args.num_images // args.batch_size) * args.batch_size}")
    if args.steps is not None:
        validate.positive_int(args.steps, "--steps")
    args.defense_kwargs = _parse_kv(args.defense_arg)
    validate.defense_spec(args.defense, args.defense_kwargs)
    if args.defense == "dpsgd":
        raise GitjaxError("--defense dpsgd needs per-example gradients, but gitjax attack leaks batch gradients; "
                          "use gaussian, laplace, prune, quantize or sign")
    if getattr(args, "known_noise", False):
        if args.defense != "gaussian" or "std" not in args.defense_kwargs:
            raise GitjaxError("--known-noise tells the attack the std of gaussian noise on the gradient: pass "
                              "--defense gaussian --defense-arg std=S, or drop --known-noise")
        from gitjax.pipeline import method_config

        method_config(args.method, checkpoint=args.checkpoint, noise_std=float(args.defense_kwargs["std"]))
    if getattr(args, "holdout", None) is not None:
        validate.number_in(args.holdout, "--holdout", 0.0, 1.0, hi_open=True)
        if args.holdout > 0 and getattr(args, "known_noise", False):
            raise GitjaxError("--holdout and --known-noise are two ways to pick the refinement's result: use one")
        from gitjax.pipeline import method_config

        method_config(args.method, checkpoint=args.checkpoint, holdout=float(args.holdout))
    if args.out is not None:
        validate.output_dir(args.out, "--out")
    _use_data_dir(args)
    validate.checkpoint_for_method(args.method, args.checkpoint, uses_checkpoint)
    if uses_checkpoint:
        validate.prior_batch_size(args.checkpoint, args.batch_size)


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
    kwargs = getattr(args, "defense_kwargs", None)
    job = AttackJob(args.method, args.victim, args.data, args.split, args.num_images, args.batch_size, args.seed,
                    args.steps, args.checkpoint or "", args.defense,
                    _parse_kv(args.defense_arg) if kwargs is None else kwargs, out, args.plot, args.data_dir,
                    getattr(args, "known_noise", False), getattr(args, "holdout", None))
    summary = run_attack_job(job, progress=not args.quiet)
    table = summary.pop("table")
    print(format_table([summary]))
    print(table)
    print(f"wrote {out}/reconstruction.png and {out}/metrics.json")
    return 0


# ----------------------------------------------------------------------------- demo / experiment / bench


def validate_demo(args: argparse.Namespace) -> None:
    from gitjax.demo import check_prior_choice, default_generator

    validate.victim_name(args.victim)
    for flag in ("prior_steps", "ig_steps", "num_images"):
        validate.positive_int(getattr(args, flag), flag.replace("_", "-"))
    check_prior_choice(args.prior, args.victim, args.generator or default_generator(args.victim))
    validate.output_dir(args.out, "--out")


def cmd_demo(args: argparse.Namespace) -> int:
    from gitjax.demo import run_demo

    run_demo(args.out, victim=args.victim, prior_steps=args.prior_steps, ig_steps=args.ig_steps,
             num_images=args.num_images, seed=args.seed, generator=args.generator, progress=not args.quiet,
             prior=args.prior)
    return 0


def experiment_exit_code(result: Any) -> int:
    """The exit code of ``gitjax experiment`` from what the study's main returned.

    An int is passed on; a sequence of run records (dicts with "status") gives 1
    when any run failed (recorded, but the command must not report success).
    """
    if result is None:
        return 0
    if isinstance(result, int):
        return result
    records = list(result)
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        print(f"gitjax: error: {len(failed)} of {len(records)} experiment runs failed (see their JSON records "
              "for the error; rerun to retry them)", file=sys.stderr)
        return 1
    return 0


def cmd_experiment(args: argparse.Namespace, rest: list[str]) -> int:
    """``gitjax.study.main``: exit status 1 when any run of the experiment failed."""
    from gitjax.study import main as study_main

    return experiment_exit_code(study_main([args.name, *rest]))


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import runpy

    root = Path(__file__).resolve().parent.parent / "benchmarks"
    script = root / f"{args.name}.py"
    if not script.exists():
        names = sorted(p.stem for p in root.glob("*.py")) if root.exists() else []
        raise GitjaxError(f"unknown benchmark {args.name!r}; available: {', '.join(names) or 'none (run from a checkout)'}")
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gitjax", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quiet", action="store_true", help="no progress bars (shown by default)")
    p.add_argument("--verbose", action="store_true",
                   help="show library log messages (orbax/absl) and Python warnings in full; quiet by default")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("models", help="list victim models with parameter counts")
    s.add_argument("--input-shape", type=int, nargs=3, default=(32, 32, 3), metavar=("H", "W", "C"),
                   help="image shape the models are built for (each >= 1; default 32 32 3)")
    s.set_defaults(fn=cmd_models, check=validate_models)

    s = sub.add_parser("datasets", help="list datasets (embedded ones work offline)")
    s.set_defaults(fn=cmd_datasets)

    s = sub.add_parser("demo", help="offline end-to-end demo on the embedded dataset",
                       description="Loads the GIT prior shipped for the victim (LeNet, Exact-GIT) or trains a "
                                   "small one on the embedded patches, attacks held-out test images with GIT, "
                                   "IG and GIT+IG, and writes reconstruction.png, metrics.json and a table with "
                                   "oracle rows to --out.")
    s.add_argument("--out", default="outputs/demo", help="output folder (created; default outputs/demo)")
    s.add_argument("--victim", default="lenet", help="victim model (see gitjax models; default lenet)")
    s.add_argument("--generator", default=None, choices=("exact", "coarse", "lti"),
                   help="generator kind (default exact where a prior is shipped for the victim, i.e. lenet, "
                        "else coarse: trains in ~1 min on a 2-core CPU)")
    s.add_argument("--prior", default="auto", choices=("auto", "shipped", "train"),
                   help="auto: the shipped prior if there is one for victim and generator, else train; "
                        "shipped: only the shipped one; train: --prior-steps steps now (default auto)")
    s.add_argument("--prior-steps", type=int, default=400,
                   help="prior training steps when training (>= 1; default 400)")
    s.add_argument("--ig-steps", type=int, default=200, help="IG iterations (>= 1; default 200)")
    s.add_argument("--num-images", type=int, default=8, help="held-out images attacked (>= 1; default 8)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.set_defaults(fn=cmd_demo, check=validate_demo)

    s = sub.add_parser("train-prior", help="train a GIT prior offline on auxiliary data",
                       description="Train a GIT prior. A flag left out takes the preset's value, or without "
                                   "--preset TrainConfig's default (shown as 'else ...'). Rerunning with the "
                                   "same --workdir continues the run from its newest checkpoint (one line on "
                                   "stderr says from which step to which); --no-resume refuses a --workdir "
                                   "that already holds a run.")
    s.add_argument("--workdir", required=True, help="run directory (checkpoints, config, metrics.jsonl), "
                   "e.g. runs/tiny")
    s.add_argument("--preset", default=None, help="named TrainConfig preset, e.g. tiny or lenet_coarse (all in "
                   "gitjax.configs.PRESETS; default none: TrainConfig's defaults)")
    s.add_argument("--victim", default=None, help="victim model (see gitjax models; default the preset's, "
                   "else lenet)")
    s.add_argument("--data", default=None, help="auxiliary dataset (see gitjax datasets; default the preset's, "
                   "else patches)")
    s.add_argument("--data-dir", default=None,
                   help="TFDS data folder for mnist, cifar10, cifar100, celeb_a, imagenet (the --data_dir of "
                        "`tfds build`; passed on as $TFDS_DATA_DIR; never downloads)")
    s.add_argument("--generator", default=None, choices=("exact", "coarse", "lti"),
                   help="generator kind (default the preset's, else coarse)")
    s.add_argument("--batch-size", type=int, default=None, help="victim batch B behind each gradient (>= 1; "
                   "default the preset's, else 1)")
    s.add_argument("--steps", type=int, default=None, help="total training steps (>= 1; default the preset's, "
                   "else 2000); more than a saved run's continues it")
    s.add_argument("--global-batch", type=int, default=None, help="gradients per training step (N, >= 1; "
                   "default the preset's, else 64)")
    s.add_argument("--lr", type=float, default=None, help="learning rate (> 0; default the preset's, else 0.001)")
    s.add_argument("--seed", type=int, default=None, help="random seed (default the preset's, else 0)")
    s.add_argument("--noise-std", type=float, default=None,
                   help="also train on gradients with Gaussian noise of std up to this, each gradient with "
                        "probability 0.5 (>= 0; default: none added)")
    s.add_argument("--prune-ratio", type=float, default=None,
                   help="also train on top-k pruned gradients, ratio up to this, each gradient with "
                        "probability 0.5 (in [0, 1); default: none added)")
    s.add_argument("--param-perturb", type=float, default=None,
                   help="train with relative victim-parameter perturbation up to this (>= 0; default the "
                        "preset's, else 0)")
    s.add_argument("--init-from", default=None, metavar="DIR",
                   help="start from this trained prior's generator and victim copy (a fine-tune; same victim and "
                        "generator config; default the preset's, else a fresh init)")
    s.add_argument("--no-resume", action="store_true", help="refuse a --workdir that already holds checkpoints")
    s.set_defaults(fn=cmd_train_prior, check=validate_train_prior)

    s = sub.add_parser("attack", help="reconstruct held-out images from their leaked gradients")
    s.add_argument("--method", required=True,
                   help="dlg, idlg, ig, git, git+ig, git+dlg, analytic, rgap, april, april-opt, ig+bn")
    s.add_argument("--victim", default="lenet", help="victim model (see gitjax models; default lenet; "
                   "git*: taken from the prior)")
    s.add_argument("--data", default="patches", help="dataset of the held-out images (see gitjax datasets; "
                   "default patches)")
    s.add_argument("--data-dir", default=None,
                   help="TFDS data folder for mnist, cifar10, cifar100, celeb_a, imagenet (the --data_dir of "
                        "`tfds build`; never downloads)")
    s.add_argument("--split", default="test", help="train or test (default test)")
    s.add_argument("--checkpoint", default=None,
                   help="prior run dir for git, git+ig, git+dlg (an error for the other methods)")
    s.add_argument("--num-images", type=int, default=8, help="images attacked, a multiple of --batch-size "
                   "(default 8)")
    s.add_argument("--batch-size", type=int, default=1, help="images behind each leaked gradient (>= 1; "
                   "default 1)")
    s.add_argument("--steps", type=int, default=None, help="iterations of an optimisation attack, or of the "
                   "refinement of git+ig / git+dlg (>= 1; default the method's)")
    s.add_argument("--defense", default="none", help="defence applied to each leaked gradient: none (default), "
                   "gaussian, laplace, prune, quantize, sign")
    s.add_argument("--defense-arg", action="append", metavar="K=V",
                   help="defence hyper-parameter, e.g. std=0.01 (gaussian) or ratio=0.9 (prune); repeat for "
                        "several")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--out", default=None, help="output folder (default outputs/attack-<method>-<time>)")
    s.add_argument("--plot", action="store_true", help="record PSNR per iteration and save convergence.png")
    s.add_argument("--known-noise", action="store_true",
                   help="ig, git+ig: the attacker knows the gaussian defence's std and stops fitting the "
                        "gradient at the noise floor (IGConfig.noise_std)")
    s.add_argument("--holdout", type=float, default=None, metavar="F",
                   help="ig, git+ig: fit on the other sent gradient entries and keep the iterate (or GIT's "
                        "start) best on a held-out fraction F of them (IGConfig.holdout; helps under heavy "
                        "noise). Default: 0.2 for git+ig (without --known-noise), off for ig; 0 turns it off")
    s.set_defaults(fn=cmd_attack, check=validate_attack)

    s = sub.add_parser("experiment", help="robustness study (gitjax.study); exit code 1 if a run failed",
                       description="Runs an experiment of the robustness study (gitjax.study). Flags after "
                                   "NAME go to the study: --scale small|full (default small), --smoke, "
                                   "--out DIR (default results), --victims A,B, --methods A,B, --only FILTER, "
                                   "--dry-run, --report, --no-retry, --quiet. Exit code 1 if a run failed.")
    s.add_argument("name", help="an experiment (gitjax experiment list), all, or list")
    s.set_defaults(fn=cmd_experiment, passthrough=True)

    s = sub.add_parser("bench", help="run a benchmark from benchmarks/ (extra args are passed on)",
                       description="Runs benchmarks/NAME.py from a source checkout and passes the flags after "
                                   "NAME on to it (PYTHONPATH=. python benchmarks/NAME.py --help lists them).")
    s.add_argument("name", help="per_example_grads, prior_step, generator_step, attack_throughput, "
                   "train_throughput, matching or device_suite (docs/benchmarks.md)")
    s.set_defaults(fn=cmd_bench, passthrough=True)
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    print(f"gitjax: warning: {_one_line(message) if isinstance(message, Warning) else message}", file=sys.stderr)


def _quiet_libraries(verbose: bool) -> int:
    """Library chatter (orbax's read-only and metadata notes through absl) is hidden unless --verbose.

    Returns the absl logger's previous level, which ``main`` restores when the command ends.
    """
    logger = logging.getLogger("absl")
    previous = logger.level
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    return previous


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; bad input is ``gitjax: error: <one line>`` on stderr and exit code 2, before any work."""
    import gitjax

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    gitjax.configure_xla_cpu()  # before JAX starts its backend (warns if it already has)
    absl_level = _quiet_libraries(args.verbose)
    from gitjax.data import DatasetUnavailableError

    with warnings.catch_warnings():
        if not args.verbose:
            warnings.showwarning = _show_warning  # restored on exit: one line per warning
        try:
            if getattr(args, "check", None) is not None:
                args.check(args)  # validation: names, numbers, paths, before any data or JAX work
            if getattr(args, "passthrough", False):
                return args.fn(args, rest)
            return args.fn(args)
        except (GitjaxError, DatasetUnavailableError) as e:  # bad input: one clear line, no traceback
            print(f"gitjax: error: {_one_line(e)}", file=sys.stderr)
            return 2
        finally:
            logging.getLogger("absl").setLevel(absl_level)


if __name__ == "__main__":
    sys.exit(main())
