"""``gitjax demo``: the whole story on the embedded dataset, offline, in a few CPU minutes.

1. Get a GIT prior for the victim: the one shipped with the package (LeNet, Exact-GIT, trained on
   the auxiliary image stream; ``gitjax/priors/<name>/made_by.json`` names the commands that made it),
   or, for other victims/generators or with ``prior="train"``, train one on auxiliary patches
   (train split: photographs disjoint from the test split's).
2. Leak the gradients of held-out test images (batch size 1, FedSGD).
3. Attack them with GIT one-shot, Inverting Gradients from random init, and
   GIT+IG (IG started from GIT's output and from a random init, same budget; the iterate that
   best explains held-out gradient entries wins).
4. Write a PNG grid (truth / GIT / IG / GIT+IG), a metrics JSON and a table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from gitjax import metrics, viz
from gitjax.pipeline import attacker_from_prior, leak, reconstruct, score
from gitjax.prior import SHIPPED_PRIORS, shipped_prior_dir
from gitjax.types import GitjaxError

PRIOR_CHOICES = ("auto", "shipped", "train")


def default_generator(victim: str) -> str:
    """Exact-GIT where a prior is shipped for the victim (it recovers structure), else Coarse-GIT (fast to train)."""
    return "exact" if shipped_prior_dir(victim, "exact") is not None else "coarse"


def check_prior_choice(prior: str, victim: str, generator: str) -> None:
    """Raises GitjaxError (one line) for an unknown choice or ``shipped`` where none is shipped."""
    if prior not in PRIOR_CHOICES:
        raise GitjaxError(f"unknown --prior {prior!r}; choose one of {', '.join(PRIOR_CHOICES)}")
    if prior == "shipped" and shipped_prior_dir(victim, generator) is None:
        have = ", ".join(f"{v} with {g}" for v, g in SHIPPED_PRIORS) or "none"
        raise GitjaxError(f"no prior is shipped for victim {victim!r} with generator {generator!r} "
                          f"(shipped: {have}); use --prior train")


def demo_config(victim: str, prior_steps: int, seed: int, generator: str = "coarse"):
    """The prior-training config the demo uses (small enough for 2 CPU cores).

    The same data and decoder as the converged presets (``lenet_coarse``): the streamed mix
    of photo crops and procedural images, and for Coarse-GIT the mirror decoder; only the
    number of steps is the demo's.
    """
    from gitjax.configs import TrainConfig, prior_generator, stream_for

    # Exact-GIT: 256 CG steps make LeNet's conv inversions converge (64 give 22 dB, 256 give 40 dB).
    extra = {"exact_cg_iters": 256} if generator == "exact" else {}
    return TrainConfig(
        victim=victim, dataset="patches", stream=stream_for("patches"),
        generator=prior_generator(generator, 1, **extra),
        victim_batch=1, global_batch=32, steps=prior_steps, lr=1e-3, warmup=min(50, prior_steps // 10),
        seed=seed, eval_gradients=32, checkpoint_every=max(100, prior_steps // 2), log_every=50,
        eval_every=max(50, prior_steps // 4),
    )


def run_demo(out: str | Path = "outputs/demo", victim: str = "lenet", prior_steps: int = 400, ig_steps: int = 200,
             num_images: int = 8, seed: int = 0, generator: str | None = None, progress: bool = True,
             prior: str = "auto") -> dict[str, Any]:
    """Runs the demo and returns the summary rows; see the module docstring.

    Args:
      generator: None picks ``default_generator(victim)``.
      prior: 'auto' (the shipped prior when there is one for (victim, generator), else train),
        'shipped' (error if none) or 'train' (``prior_steps`` steps on the embedded patches).
    """
    from gitjax.attacks.git import GITConfig
    from gitjax.attacks.ig import IGConfig
    from gitjax.data import load_dataset
    from gitjax.prior import load_prior
    from gitjax.train import train_prior

    generator = generator or default_generator(victim)
    check_prior_choice(prior, victim, generator)
    shipped = shipped_prior_dir(victim, generator) if prior != "train" else None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if shipped is not None:
        print(f"[1/3] loading the shipped {generator}-GIT prior for {victim} ({shipped.name}; "
              f"made_by.json says how it was trained)")
        attacker = attacker_from_prior(load_prior(shipped))
    else:
        print(f"[1/3] training a {generator}-GIT prior for {victim} on embedded patches ({prior_steps} steps)")
        train_prior(demo_config(victim, prior_steps, seed, generator), out / "prior", resume=True,
                    progress=progress)
        attacker = attacker_from_prior(load_prior(out / "prior"))
    vic = attacker.victim
    train_s = time.perf_counter() - t0

    print(f"[2/3] leaking gradients of {num_images} held-out test images")
    test = load_dataset("patches", "test", image_size=vic.input_shape[0], channels=vic.input_shape[2])
    idx = np.random.default_rng(seed).choice(len(test), num_images, replace=False)
    truth = test.images[idx]
    x_Nx1, y_Nx1 = truth[:, None], np.asarray(test.labels[idx], np.int32)[:, None]
    k_leak, k_attack = jax.random.split(jax.random.key(seed))
    grads_N = leak(vic, attacker.params, attacker.state, x_Nx1, y_Nx1, k_leak)

    print(f"[3/3] attacking: git (one-shot), ig ({ig_steps} steps), git+ig ({ig_steps} steps)")
    ig_cfg = IGConfig(steps=ig_steps)
    methods = {
        "git": GITConfig(),
        "ig": ig_cfg,
        "git+ig": GITConfig(refine_config=ig_cfg),
    }
    rows, recon, label_acc = [], {}, None
    for m, cfg in methods.items():
        # One key for all: GIT+IG's random restart is then the IG row's run, except that it fits
        # 80 % of the gradient entries and is judged on the rest (GITConfig.holdout).
        rec = reconstruct(m, attacker, grads_N, k_attack, batch_size=1, config=cfg)
        sc = score(rec.images, x_Nx1, rec.labels, y_Nx1)
        recon[m] = rec.images[:, 0]
        if m == "ig":
            label_acc = sc["label_acc"]
        rows.append({"method": m, "psnr": sc["psnr"], "ssim": sc["ssim"], "mse": sc["mse"],
                     "seconds/image": rec.info["seconds"] / num_images, "iterations": rec.info["iterations"]})
    rows += metrics.oracle_rows(truth, attacker.mean_image)  # what structure vs colour looks like in dB
    viz.save_grid(out / "reconstruction.png", [truth] + list(recon.values()), ["truth", *methods])
    summary = {"victim": vic.name, "generator": generator, "prior": "shipped" if shipped is not None else "trained",
               "images": num_images, "prior_seconds": train_s,
               "label_accuracy_idlg": label_acc, "results": rows, "total_seconds": time.perf_counter() - t0}
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    print(viz.format_table(rows, ["method", "psnr", "ssim", "mse", "seconds/image", "iterations"]))
    print(f"label accuracy (iDLG rule): {summary['label_accuracy_idlg']:.0%}")
    print(f"wrote {out / 'reconstruction.png'} and {out / 'metrics.json'} ({summary['total_seconds']:.0f} s)")
    return summary
