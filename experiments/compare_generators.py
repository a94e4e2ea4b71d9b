"""Exact-GIT vs Coarse-GIT vs LTI, one-shot, on held-out embedded images.

    python -m experiments.compare_generators                     # lenet + resnet8, default budget
    python -m experiments.compare_generators --steps 300 --victims lenet   # quicker
    python -m experiments.compare_generators --num-images 32 \
        --prior exact=gitjax/priors/lenet_exact --prior coarse=runs/lenet_coarse --prior lti=runs/lenet_lti

Trains one prior per (victim, generator) on the 'patches' train split (photos
disjoint from the test split), then reconstructs test images from their leaked
batch-1 gradients with one forward pass and prints PSNR / SSIM. Results go to
``outputs/compare_generators/results.json`` and ``table.md``; the priors are
kept under ``outputs/compare_generators/<victim>-<kind>`` (rerunning resumes). With
``--prior NAME=DIR`` (repeatable) nothing is trained: the given priors (e.g. the converged
presets' runs) are scored on the same test images of their victim, one row each.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import numpy as np

from gitjax.configs import TrainConfig, prior_generator, stream_for
from gitjax.data import load_dataset
from gitjax.pipeline import attacker_from_prior, leak, reconstruct, score
from gitjax.prior import Prior, load_prior
from gitjax.train import train_prior
from gitjax.viz import format_table, save_grid


def evaluate_prior(prior: Prior, num_images: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray, list[dict]]:
    """One-shot reconstructions of ``num_images`` test images: (metrics, truth, recon, oracle rows)."""
    attacker = attacker_from_prior(prior)
    vic = attacker.victim
    test = load_dataset("patches", "test", image_size=vic.input_shape[0], channels=vic.input_shape[2])
    idx = np.random.default_rng(seed).choice(len(test), num_images, replace=False)
    x_Nx1, y_Nx1 = test.images[idx][:, None], np.asarray(test.labels[idx], np.int32)[:, None]
    grads_N = leak(vic, attacker.params, attacker.state, x_Nx1, y_Nx1, jax.random.key(seed))
    reconstruct("git", attacker, grads_N, jax.random.key(0), batch_size=1)  # compile
    rec = reconstruct("git", attacker, grads_N, jax.random.key(0), batch_size=1)
    sc = score(rec.images, x_Nx1, mean_image=attacker.mean_image)
    ev = {"psnr": sc["psnr"], "ssim": sc["ssim"], "mse": sc["mse"],
          "ms_per_image": 1e3 * (rec.info["seconds"] - rec.info["compile_seconds"]) / num_images}
    return ev, test.images[idx], rec.images[:, 0], sc["oracles"]


def score_priors(args: argparse.Namespace, out: Path) -> int:
    """Scores already-trained priors (``--prior NAME=DIR``) on one set of test images per victim."""
    rows, grids, oracles_of, names = [], {}, {}, {}
    for item in args.prior:
        name, sep, workdir = item.partition("=")
        if not sep or not name or not workdir:
            raise SystemExit(f"--prior wants NAME=DIR, got {item!r}")
        prior = load_prior(workdir)
        victim = prior.config.victim if prior.config is not None else "?"
        ev, truth, recon, oracles = evaluate_prior(prior, args.num_images, args.seed)
        rows.append({"victim": victim, "generator": name, "prior": workdir,
                     "gen_params": int(sum(x.size for x in jax.tree_util.tree_leaves(prior.gen_params))),
                     **ev})
        grids.setdefault(victim, [truth[:12]]).append(recon[:12])
        names.setdefault(victim, []).append(name)
        oracles_of[victim] = oracles
        print(format_table(rows[-1:]), flush=True)
    for victim, oracles in oracles_of.items():
        rows += _oracle_rows(victim, oracles)
    return _write(out, args, rows, grids, names)


def _oracle_rows(victim: str, oracles: list[dict]) -> list[dict]:
    return [{"victim": victim, "generator": o["method"], **{k: o[k] for k in ("psnr", "ssim", "mse")}}
            for o in oracles]


def _write(out: Path, args: argparse.Namespace, rows: list[dict], grids: dict, names: dict) -> int:
    """Prints the table; writes results.json, table.md and one PNG grid per victim (truth, then each row)."""
    table = format_table(rows)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    (out / "table.md").write_text(table + "\n")
    for victim, g in grids.items():
        save_grid(out / f"{victim}.png", g, ["truth", *names[victim]])
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--victims", nargs="+", default=["lenet", "resnet8"])
    p.add_argument("--kinds", nargs="+", default=["exact", "coarse", "lti"])
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tv-weight", type=float, default=0.0, help="total-variation weight of the training loss")
    p.add_argument("--exact-cg-iters", type=int, default=None,
                   help="Exact-GIT's CG steps per underdetermined layer (default GeneratorConfig's 64; "
                        "LeNet presets use 256)")
    p.add_argument("--exact-refine-depth", type=int, default=0,
                   help="extra dilated conv layers in Exact-GIT's image refiner (GeneratorConfig.refine_depth)")
    p.add_argument("--prior", action="append", default=[], metavar="NAME=DIR",
                   help="score this trained prior instead of training (repeatable)")
    p.add_argument("--out", default="outputs/compare_generators")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.prior:
        return score_priors(args, out)
    rows, grids = [], {}
    for victim in args.victims:
        for kind in args.kinds:
            gen_kw = {"exact_cg_iters": args.exact_cg_iters} if kind == "exact" and args.exact_cg_iters else {}
            if kind == "exact" and args.exact_refine_depth:
                gen_kw["refine_depth"] = args.exact_refine_depth
            config = TrainConfig(victim=victim, dataset="patches", stream=stream_for("patches"),
                                 generator=prior_generator(kind, 1, **gen_kw),
                                 victim_batch=1, global_batch=args.global_batch, steps=args.steps,
                                 tv_weight=args.tv_weight,
                                 warmup=min(100, args.steps // 10), seed=args.seed,
                                 checkpoint_every=max(250, args.steps // 4), eval_every=max(100, args.steps // 5))
            t0 = time.perf_counter()
            res = train_prior(config, out / f"{victim}-{kind}", resume=True, progress=not args.quiet)
            train_s = time.perf_counter() - t0
            n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(res.params)))
            ev, truth, recon, oracles = evaluate_prior(load_prior(out / f"{victim}-{kind}"), args.num_images,
                                                       args.seed)
            rows.append({"victim": victim, "generator": kind, "gen_params": n_params, "steps": args.steps,
                         "train_s": train_s, **ev})
            grids.setdefault(victim, [truth[:12]]).append(recon[:12])
            print(format_table(rows[-1:]))
        # The same test images for every generator of this victim: one set of oracle rows.
        rows += _oracle_rows(victim, oracles)
    return _write(out, args, rows, grids, {victim: args.kinds for victim in grids})


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    raise SystemExit(main())
