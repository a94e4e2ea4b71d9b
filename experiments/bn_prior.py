"""IG vs IG + BatchNorm-statistics prior (See Through Gradients) on ResNet-8, equal budget.

    python -m experiments.bn_prior                      # 4 batches of 4, 16x16, 300 steps

The victim's running statistics are calibrated on 256 'patches' train images (a
random-init ResNet has none worth matching). Three attackers per batch, same init:
IG; IG + the batch's own statistics, leaked through the client's shared running
statistics (``batch_stats_from_update``; matched in a train-mode forward); IG + the
population running statistics (eval-mode forward). Prints one markdown table.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks.base import AttackProblem, get_attack
from gitjax.attacks.bn_prior import (IGBNConfig, batch_stats_from_update, calibrate_batch_stats,
                                     client_running_stats)
from gitjax.attacks.ig import IGConfig
from gitjax.data import load_dataset
from gitjax.leakage import batch_grad
from gitjax.metrics import evaluate
from gitjax.viz import format_table
from gitjax.victims import make_victim


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--image-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--leaked-weight", type=float, default=1e-2)
    p.add_argument("--population-weight", type=float, default=1e-3)
    args = p.parse_args(argv)
    s, b = args.image_size, args.batch_size
    victim = make_victim("resnet8", input_shape=(s, s, 3))
    params, state = jax.jit(victim.init)(jax.random.key(0))
    train = load_dataset("patches", "train", image_size=s)
    test = load_dataset("patches", "test", image_size=s)
    state = jax.jit(lambda x: calibrate_batch_stats(victim, params, state, x))(jnp.asarray(train.images[:256]))
    rows = []
    for i in range(args.batches):
        idx = np.random.default_rng(i).choice(len(test), b, replace=False)
        x, y = jnp.asarray(test.images[idx]), jnp.asarray(test.labels[idx])
        problem = AttackProblem(victim, params, state, batch_grad(victim, params, state, x, y), b, labels=y)
        # The client's train-mode step updates the running statistics it then shares.
        leaked = batch_stats_from_update(state, client_running_stats(victim, params, state, x), momentum=0.9)
        key = jax.random.key(i)
        runs = {
            "IG": get_attack("ig").run(problem, key, IGConfig(steps=args.steps, record_every=0)),
            f"IG+BN leaked (w {args.leaked_weight:g})": get_attack("ig+bn").run(
                problem, key, IGBNConfig(steps=args.steps, record_every=0, bn_weight=args.leaked_weight),
                bn_targets=leaked),
            f"IG+BN population (w {args.population_weight:g})": get_attack("ig+bn").run(
                problem, key, IGBNConfig(steps=args.steps, record_every=0, bn_weight=args.population_weight)),
        }
        row = {"batch": i}
        for name, res in runs.items():
            ev = evaluate(np.asarray(res.images), np.asarray(x), match=True)
            row[f"{name} PSNR"] = round(ev["psnr"], 2)
            row[f"{name} MSE"] = round(ev["mse"], 4)
        rows.append(row)
        print(format_table(rows[-1:]), flush=True)
    mean = {"batch": "mean"}
    for k in rows[0]:
        if k != "batch":
            mean[k] = round(float(np.mean([r[k] for r in rows])), 4 if "MSE" in k else 2)
    print(format_table(rows + [mean]))
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    raise SystemExit(main())
