"""``gitjax demo``: the whole story on the embedded dataset, offline, in a few CPU minutes.

1. Train a GIT prior (Coarse-GIT by default, the paper's main variant) for the victim on auxiliary patches
   (train split: photographs disjoint from the test split's).
2. Leak the gradients of held-out test images (batch size 1, FedSGD).
3. Attack them with GIT one-shot, Inverting Gradients from random init, and
   GIT+IG (IG started from GIT's output, same budget).
4. Write a PNG grid (truth / GIT / IG / GIT+IG), a metrics JSON and a table.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from gitjax import leakage, metrics, viz
from gitjax.attacks import AttackProblem, get_attack
from gitjax.attacks import git as git_attack


def demo_config(victim: str, prior_steps: int, seed: int, generator: str = "coarse"):
    """The prior-training config the demo uses (small enough for 2 CPU cores)."""
    from gitjax.configs import TrainConfig
    from gitjax.generators import GeneratorConfig

    return TrainConfig(
        victim=victim, dataset="patches", generator=GeneratorConfig(kind=generator, batch_size=1),
        victim_batch=1, global_batch=32, steps=prior_steps, lr=1e-3, warmup=min(50, prior_steps // 10),
        seed=seed, eval_gradients=32, checkpoint_every=max(100, prior_steps // 2), log_every=50,
        eval_every=max(50, prior_steps // 4),
    )


def run_demo(out: str | Path = "outputs/demo", victim: str = "lenet", prior_steps: int = 400, ig_steps: int = 200,
             num_images: int = 8, seed: int = 0, generator: str = "coarse", progress: bool = True) -> dict[str, Any]:
    """Runs the demo and returns the summary rows; see the module docstring."""
    from gitjax.data import load_dataset
    from gitjax.train import train_prior

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    print(f"[1/3] training a {generator}-GIT prior for {victim} on embedded patches ({prior_steps} steps)")
    train_prior(demo_config(victim, prior_steps, seed, generator), out / "prior", resume=True, progress=progress)
    loaded = git_attack.load(str(out / "prior"))
    vic, params, state = loaded.victim, loaded.prior.victim_params, loaded.victim_state
    train_s = time.perf_counter() - t0

    print(f"[2/3] leaking gradients of {num_images} held-out test images")
    test = load_dataset("patches", "test", image_size=vic.input_shape[0], channels=vic.input_shape[2])
    idx = np.random.default_rng(seed).choice(len(test), num_images, replace=False)
    grad_fn = jax.jit(lambda x, y: leakage.batch_grad(vic, params, state, x, y))

    print(f"[3/3] attacking: git (one-shot), ig ({ig_steps} steps), git+ig ({ig_steps} steps)")
    ig_cfg = dataclasses.replace(get_attack("ig").config_cls(), steps=ig_steps)
    methods = {
        "git": (get_attack("git"), git_attack.GITConfig(checkpoint=str(out / "prior"))),
        "ig": (get_attack("ig"), ig_cfg),
        "git+ig": (get_attack("git+ig"), git_attack.GITConfig(checkpoint=str(out / "prior"),
                                                                 refine_config=dataclasses.replace(ig_cfg, lr=0.05))),
    }
    recon = {m: [] for m in methods}
    info = {m: [] for m in methods}
    labels_ok = []
    key = jax.random.key(seed)
    truth = test.images[idx]
    for i in tqdm(range(num_images), desc="attacks", disable=not progress):
        x, y = jnp.asarray(truth[i:i + 1]), jnp.asarray(test.labels[idx[i]:idx[i] + 1])
        problem = AttackProblem(vic, params, state, grad_fn(x, y), batch_size=1)
        for m, (spec, cfg) in methods.items():
            key, sub = jax.random.split(key)
            res = spec.run(problem, sub, cfg)
            recon[m].append(np.asarray(res.images))
            info[m].append(res.info)
            if m == "ig":
                labels_ok.append(float(np.asarray(res.labels)[0] == int(y[0])))
    rows = []
    for m in methods:
        r = np.concatenate(recon[m])
        ev = metrics.evaluate(r, truth, match=False)
        rows.append({"method": m, "psnr": ev["psnr"], "ssim": ev["ssim"], "mse": ev["mse"],
                     "seconds/image": float(np.mean([d.get("seconds", np.nan) for d in info[m]])),
                     "iterations": info[m][0].get("iterations", 0)})
    viz.save_grid(out / "reconstruction.png", [truth] + [np.concatenate(recon[m]) for m in methods],
                  ["truth", *methods])
    summary = {"victim": vic.name, "images": num_images, "prior_train_seconds": train_s,
               "label_accuracy_idlg": float(np.mean(labels_ok)), "results": rows,
               "total_seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(viz.format_table(rows))
    print(f"label accuracy (iDLG rule): {summary['label_accuracy_idlg']:.0%}")
    print(f"wrote {out / 'reconstruction.png'} and {out / 'metrics.json'} ({summary['total_seconds']:.0f} s)")
    return summary
