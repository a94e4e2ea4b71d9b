"""GIT+IG against the better of GIT one-shot and IG, per image set and budget.

For N images (batch 1) of a data set, leaks each gradient of the prior's victim,
then compares GIT one-shot, IG (the ``ig`` attack's default config at ``--steps``)
and GIT+IG variants, all vmapped over the N gradients (``batched_attack``):

  * ``git+ig``: the default refinement (``gitjax.attacks.git.refine_setup``): the run
    from GIT's output with a step scaled to its gradient distance, plus one random restart,
    both fitting 80 % of the sent gradient entries; the iterate (or GIT's start) with the
    lowest gradient distance on the held-out 20 % wins (``GITConfig.holdout``, default 0.2
    since 2026-12-07).
  * ``start=LR``: one run from GIT's output only, fixed signed-Adam step LR.
  * ``auto``: one run from GIT's output only, step scaled to its gradient distance.
  * ``holdout=F``: the default refinement with held-out fraction F (``GITConfig.holdout``);
    ``holdout=0``: without held-out selection (the default before 2026-12-07: every run fits
    all sent entries and the lowest gradient distance wins).

    python -m experiments.git_ig_refine --checkpoint runs/lenet-exact --data patches --split test \\
        --num-images 16 --steps 200 [--variants git+ig,auto,start=0.05,holdout=0] [--out result.json]

Prints one JSON line: mean PSNR per method, ``margin`` = git+ig - max(git, ig) (the
target is >= -0.2 dB), the oracle rows of the same images (mean image of the prior's
auxiliary data, mean colour, blur 1 and 2 px), and per-image PSNRs and start distances.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks import git
from gitjax.attacks.batched import batched_attack
from gitjax.attacks.ig import IGConfig
from gitjax.data import load_dataset
from gitjax.leakage import batch_grad
from gitjax.losses import cosine_distance
from gitjax.metrics import oracle_rows, psnr
from gitjax.pipeline import dataset_mean_image
from gitjax.prior import load_prior


def variant_config(name: str, steps: int) -> IGConfig:
    base = IGConfig(steps=steps, record_every=0)
    if name == "ig":
        return base
    if name == "git+ig" or name.startswith("holdout="):  # the default refinement, optionally another held-out fraction
        held = {"holdout": float(name.split("=", 1)[1])} if name != "git+ig" else {}
        return git.refine_setup(git.GITConfig(refine="ig", refine_config=base, **held))[1]
    if name == "auto":
        return dataclasses.replace(base, start_lr=0.0)
    if name.startswith("start="):
        return dataclasses.replace(base, start_lr=float(name.split("=", 1)[1]))
    raise SystemExit(f"unknown variant {name!r}; use git+ig, auto, start=LR or holdout=F")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="prior run dir (gitjax train-prior --workdir)")
    ap.add_argument("--data", default="patches")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num-images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="git+ig")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    prior = load_prior(args.checkpoint)
    victim, params, state = prior.victim, prior.victim_params, prior.victim_state
    ds = load_dataset(args.data, args.split, image_size=victim.input_shape[0], channels=victim.input_shape[2])
    n = min(args.num_images, len(ds))
    idx = np.sort(np.random.default_rng(args.seed).choice(len(ds), n, replace=False))
    x_NxB = jnp.asarray(ds.images[idx])[:, None]
    y_NxB = jnp.asarray(ds.labels[idx])[:, None] % victim.num_classes
    grads_N = jax.jit(jax.vmap(lambda x, y: batch_grad(victim, params, state, x, y)))(x_NxB, y_NxB)
    x_git = jnp.clip(jax.jit(jax.vmap(git.attack, in_axes=(None, 0)))(prior, grads_N), 0.0, 1.0)

    def score(x_N):
        return np.asarray(jax.vmap(lambda a, b: psnr(a, b)[0])(x_N, x_NxB))

    d0 = jax.jit(jax.vmap(lambda x, y, g: cosine_distance(batch_grad(victim, params, state, x, y), g)))(
        x_git, y_NxB, grads_N)
    per = {"git": score(x_git)}
    seconds = {}
    key = jax.random.key(args.seed)
    for name in ["ig"] + [v for v in args.variants.split(",") if v]:
        cfg = variant_config(name, args.steps)
        t0 = time.perf_counter()
        x_N, info = batched_attack("ig", victim, params, state, grads_N, y_NxB, key, cfg,
                                   x_init_N=None if name == "ig" else x_git)
        per[name] = score(jax.block_until_ready(x_N))
        seconds[name] = round(time.perf_counter() - t0, 1)
    mean = {k: round(float(np.mean(v)), 2) for k, v in per.items()}
    out = {"checkpoint": args.checkpoint, "data": f"{args.data}/{args.split}", "n": n, "steps": args.steps,
           "mean_psnr": mean, "seconds": seconds,
           "margin": {k: round(mean[k] - max(mean["git"], mean["ig"]), 2) for k in mean if k not in ("git", "ig")},
           "oracles": {o["method"]: round(float(o["psnr"]), 2) for o in oracle_rows(
               np.asarray(x_NxB[:, 0]), dataset_mean_image(prior.config.dataset, victim)
               if prior.config is not None else None)},
           "start_distance": np.round(np.asarray(d0), 4).tolist(),
           "per_image": {k: np.round(v, 2).tolist() for k, v in per.items()}}
    print(json.dumps(out))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    main()
