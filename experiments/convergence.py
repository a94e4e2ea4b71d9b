"""Does GIT speed up and improve Inverting Gradients? PSNR vs iteration, same loop, same budget.

    python -m experiments.convergence                                  # lenet + resnet8
    python -m experiments.convergence --victims lenet --steps 300 --prior-steps 600   # quicker
    python -m experiments.convergence --checkpoint runs/lenet_coarse gitjax/priors/lenet_exact  # trained priors

For each victim: train (or reuse) a prior (``--generator``, the presets' recipe) on the
'patches' train stream, or load each ``--checkpoint``; leak the batch-1 gradients of
held-out test images, and run IG four ways with the same number of steps:
  ig        random init (the baseline)
  git-init  IG started from GIT's one-shot output: GIT+IG's refinement as ``gitjax attack
            git+ig`` runs it (the start as one restart, its step scaled to its gradient
            distance, one random restart, held-out selection; ``--holdout 0``: without),
            or a fixed step with ``--prior-lr``                        (prior mode a)
  git-reg   random init + ``prior_weight * mean((x - x_git)^2)``  (mode b)
  git-both  both                                           (mode c)
All N images are attacked at once with ``batched_attack`` (vmap over N).
Prints a table: final PSNR at equal budget and the iterations each run needs to
reach IG's final PSNR; writes results.json, table.md and convergence_<victim>.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks.batched import batched_attack
from gitjax.attacks.ig import IGConfig
from gitjax.configs import TrainConfig, prior_generator, stream_for
from gitjax.data import load_dataset
from gitjax.attacks.git import refine_setup
from gitjax.pipeline import attacker_from_prior, leak, method_config, reconstruct, score
from gitjax.prior import load_prior
from gitjax.train import train_prior
from gitjax.viz import format_table, save_curve_plot


def iterations_to_reach(psnr_R: np.ndarray, iters_R: np.ndarray, target: float) -> float:
    """First recorded iteration whose PSNR >= target (NaN if never)."""
    hit = np.nonzero(psnr_R >= target)[0]
    return float(iters_R[hit[0]]) if hit.size else float("nan")


def trained_prior(victim: str, args: argparse.Namespace, out: Path) -> Path:
    """Trains (or resumes) a ``--generator`` prior of ``victim`` with the presets' recipe."""
    workdir = out / f"prior-{victim}-{args.generator}"
    config = TrainConfig(victim=victim, dataset="patches", stream=stream_for("patches"),
                         generator=prior_generator(args.generator, 1),
                         victim_batch=1, global_batch=32, steps=args.prior_steps,
                         warmup=min(100, args.prior_steps // 10), seed=args.seed,
                         checkpoint_every=max(250, args.prior_steps // 4), eval_every=max(100, args.prior_steps // 5))
    train_prior(config, workdir, resume=True, progress=not args.quiet)
    return workdir


def run_prior(workdir: str | Path, args: argparse.Namespace, out: Path) -> tuple[list[dict], dict]:
    prior = load_prior(workdir)
    attacker = attacker_from_prior(prior)
    victim = attacker.victim.name
    kind = prior.config.generator.kind if prior.config is not None else "?"
    vic, params, state = attacker.victim, attacker.params, attacker.state
    test = load_dataset("patches", "test", image_size=vic.input_shape[0], channels=vic.input_shape[2])
    idx = np.random.default_rng(args.seed).choice(len(test), args.num_images, replace=False)
    x_Nx1 = jnp.asarray(test.images[idx])[:, None]
    y_Nx1 = jnp.asarray(test.labels[idx])[:, None]
    grads_N = leak(vic, params, state, x_Nx1, y_Nx1, jax.random.key(args.seed))
    x_git_N = jnp.asarray(reconstruct("git", attacker, grads_N, jax.random.key(0), batch_size=1).images)

    base = IGConfig(steps=args.steps, lr=args.lr, record_every=args.record_every)
    if args.prior_lr > 0:
        init_cfg = dataclasses.replace(base, lr=args.prior_lr)
    else:  # exactly GIT+IG's refinement
        _, init_cfg = refine_setup(method_config("git+ig", checkpoint=str(workdir), steps=args.steps,
                                                 holdout=args.holdout))
        init_cfg = dataclasses.replace(init_cfg, record_every=args.record_every)
    variants = {
        "ig": (base, {}),
        "git-init": (init_cfg, {"x_init_N": x_git_N}),
        "git-reg": (dataclasses.replace(base, prior_weight=args.prior_weight), {"x_prior_N": x_git_N}),
        "git-both": (dataclasses.replace(init_cfg, prior_weight=args.prior_weight),
                     {"x_init_N": x_git_N, "x_prior_N": x_git_N}),
    }
    curves, finals, secs = {}, {}, {}
    for name, (cfg, extra) in variants.items():
        t0 = time.perf_counter()
        x_hat, info = batched_attack("ig", vic, params, state, grads_N, y_Nx1, jax.random.key(args.seed), cfg,
                                     x_true_N=x_Nx1, **extra)
        jax.block_until_ready(x_hat)
        secs[name] = time.perf_counter() - t0
        psnr_NxR = np.asarray(info["psnr"])
        curves[name] = psnr_NxR.mean(0)
        mse = np.mean((np.asarray(x_hat) - np.asarray(x_Nx1)) ** 2, axis=(1, 2, 3, 4))
        finals[name] = float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-10))))
    n_rec = len(curves["ig"])
    iters = np.arange(n_rec) * args.record_every
    git_one_shot = float(np.mean(10 * np.log10(1.0 / np.maximum(
        np.mean((np.asarray(x_git_N) - np.asarray(x_Nx1)) ** 2, axis=(1, 2, 3, 4)), 1e-10))))
    target = finals["ig"]
    rows = [{"victim": victim, "prior": kind, "run": name, "final_psnr": finals[name],
             "iters_to_ig_final": iterations_to_reach(curves[name], iters, target), "ig_final_psnr": target,
             "seconds": secs[name]} for name in variants]
    rows.append({"victim": victim, "prior": kind, "run": "git one-shot", "final_psnr": git_one_shot,
                 "iters_to_ig_final": 0.0 if git_one_shot >= target else float("nan"), "ig_final_psnr": target,
                 "seconds": float("nan")})
    rows += [{"victim": victim, "prior": kind, "run": o["method"], "final_psnr": o["psnr"], "iters_to_ig_final": float("nan"),
              "ig_final_psnr": target, "seconds": float("nan")}
             for o in score(np.asarray(x_git_N), np.asarray(x_Nx1), mean_image=attacker.mean_image)["oracles"]]
    save_curve_plot(out / f"convergence_{victim}_{kind}.png", {n: (iters, c) for n, c in curves.items()},
                    "IG iteration", "mean PSNR (dB)", f"IG vs {kind}-GIT-prior IG on {victim} ({args.num_images} images)")
    return rows, {n: c.tolist() for n, c in curves.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--victims", nargs="+", default=["lenet", "resnet8"])
    p.add_argument("--generator", default="exact", choices=("exact", "coarse", "lti"))
    p.add_argument("--prior-steps", type=int, default=1500)
    p.add_argument("--steps", type=int, default=500, help="IG iterations (the equal budget)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--checkpoint", nargs="+", default=[], help="trained priors to use instead of training one")
    p.add_argument("--prior-lr", type=float, default=0.0,
                   help="fixed IG step for git-init (0: GIT+IG's refinement, step scaled to the start)")
    p.add_argument("--holdout", type=float, default=None,
                   help="git-init's held-out fraction (default GIT+IG's, 0.2; 0: select by the full gradient distance)")
    p.add_argument("--prior-weight", type=float, default=0.1)
    p.add_argument("--record-every", type=int, default=10)
    p.add_argument("--num-images", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="outputs/convergence")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, curves = [], {}
    workdirs = args.checkpoint or [trained_prior(victim, args, out) for victim in args.victims]
    for workdir in workdirs:
        r, c = run_prior(workdir, args, out)
        rows += r
        curves[f"{r[0]['victim']}/{r[0]['prior']}"] = c
        print(format_table(r))
    table = format_table(rows)
    print(table)
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows, "curves": curves}, indent=2))
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    raise SystemExit(main())
