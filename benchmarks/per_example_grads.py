"""Per-example gradients: jit(vmap(grad)) against a Python loop of jit(grad), one example at a time.

Per-example gradients are what a leakage study computes over and over (one
leaked gradient per image, DP-SGD clipping, GIT's training set of gradients).
This measures how much vectorising them with ``jax.vmap`` buys over the
obvious loop, for LeNet (DLG's victim) and the CIFAR ResNet-18.

Both sides materialise all B per-example gradients; compilation and one
warm-up call are excluded; each timing ends with ``block_until_ready``; the
reported number is the median over ``--repeats`` runs.

    python benchmarks/per_example_grads.py [--batch 64] [--repeats 3] [--models lenet,resnet18]

Prints a table, then one JSON line per model:
{"name", "device", "batch", "vmap_ex_per_s", "loop_ex_per_s", "ratio"}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
from typing import Callable

import jax

from gitjax.leakage import make_loss, per_example_grads
from gitjax.victims import make_victim


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compile and first run are excluded
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_model(name: str, batch: int, repeats: int) -> dict:
    victim = make_victim(name)
    params, state = jax.jit(victim.init)(jax.random.key(0))
    x_BxHxWxC = jax.random.uniform(jax.random.key(1), (batch, *victim.input_shape))
    y_B = jax.random.randint(jax.random.key(2), (batch,), 0, victim.num_classes)

    vmapped = jax.jit(functools.partial(per_example_grads, victim))
    single = jax.jit(jax.grad(make_loss(victim)))
    # Slices made up front so the loop times only the per-example gradient calls.
    examples = [(x_BxHxWxC[i : i + 1], y_B[i : i + 1]) for i in range(batch)]

    def run_vmap():
        return vmapped(params, state, x_BxHxWxC, y_B)

    def run_loop():
        return [single(params, state, x, y) for x, y in examples]

    t_vmap = _median_seconds(run_vmap, repeats)
    t_loop = _median_seconds(run_loop, repeats)
    dev = jax.devices()[0]
    return {
        "name": name,
        "device": f"cpu ({os.cpu_count()} cores)" if dev.platform == "cpu" else dev.device_kind,
        "batch": batch,
        "vmap_ex_per_s": round(batch / t_vmap, 2),
        "loop_ex_per_s": round(batch / t_loop, 2),
        "ratio": round(t_loop / t_vmap, 3),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    parser.add_argument("--models", default="lenet,resnet18", help="comma-separated victim names")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")

    results = [bench_model(m.strip(), args.batch, args.repeats) for m in args.models.split(",") if m.strip()]

    print(f"per-example gradients, batch {args.batch}, 32x32x3 images, median of {args.repeats} "
          f"(jax {jax.__version__}, {results[0]['device'] if results else '?'})")
    print(f"{'model':<10} {'vmap ex/s':>12} {'loop ex/s':>12} {'vmap/loop':>10}")
    for r in results:
        print(f"{r['name']:<10} {r['vmap_ex_per_s']:>12.1f} {r['loop_ex_per_s']:>12.1f} {r['ratio']:>9.2f}x")
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
