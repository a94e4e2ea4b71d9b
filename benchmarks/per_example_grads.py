"""Per-example gradients against their floor (one batch-mean gradient) and against a Python loop.

Per-example gradients are what a leakage study computes over and over (one
leaked gradient per image, DP-SGD clipping, GIT's training set of gradients).
They cannot be cheaper than one batched backward pass, so the floor is the
batch-mean gradient of the same B images. Measured per victim:

  * ``per_example``: ``gitjax.leakage.per_example_grads`` with ``--method``
    (default "auto": tap-based patches+einsum where it wins, else vmap);
  * ``vmap``: the same with method="vmap" (``jax.vmap(jax.grad)``, the old default);
  * ``batch``: ``jax.grad`` of the batch-mean loss (the floor);
  * ``loop``: a Python loop of jitted single-example gradients.

All sides are jitted; compilation and one warm-up call are excluded; each timing
ends with ``block_until_ready``; the median over ``--repeats`` is reported, with
the repeats of the batch, per-example and vmap sides interleaved so that load
on a shared machine hits them alike; the loop is timed after them (its many small
outputs slow the allocator for the next large-output call).

    python benchmarks/per_example_grads.py [--batch 64] [--repeats 3] [--models lenet,resnet8,resnet18]
        [--method auto|vmap|patches]

Prints a table, then one JSON line per model with
``per_example_over_batch`` (target <= 1.5) and ``loop_over_vmap`` (loop time over
per-example time; target >= 1, i.e. never slower than the loop).
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


def device_name() -> str:
    dev = jax.devices()[0]
    return f"cpu ({os.cpu_count()} cores)" if dev.platform == "cpu" else dev.device_kind


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Median seconds per function; one warm-up each, then rounds that run every function once."""
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name: str, batch: int, repeats: int, method: str = "auto", loop: bool = True,
                input_shape: tuple[int, int, int] = (32, 32, 3)) -> dict:
    victim = make_victim(name, input_shape=input_shape)
    params, state = jax.jit(victim.init)(jax.random.key(0))
    x_BxHxWxC = jax.random.uniform(jax.random.key(1), (batch, *victim.input_shape))
    y_B = jax.random.randint(jax.random.key(2), (batch,), 0, victim.num_classes)

    per_ex = jax.jit(functools.partial(per_example_grads, victim, method=method))
    vmapped = jax.jit(functools.partial(per_example_grads, victim, method="vmap"))
    batch_fn = jax.jit(jax.grad(make_loss(victim)))
    # Slices made up front so the loop times only the per-example gradient calls.
    examples = [(x_BxHxWxC[i : i + 1], y_B[i : i + 1]) for i in range(batch)]

    fns = {
        "batch": lambda: batch_fn(params, state, x_BxHxWxC, y_B),
        "per_example": lambda: per_ex(params, state, x_BxHxWxC, y_B),
        "vmap": lambda: vmapped(params, state, x_BxHxWxC, y_B),
    }
    t = interleaved_medians(fns, repeats)
    if loop:
        # Timed after the others, not interleaved: the loop's B small output trees leave
        # glibc's allocator in a state where the next call that returns large buffers runs
        # slower (ResNet-18, B = 64: per-example 2.2 s alone, 3.4 s right after the loop).
        t.update(interleaved_medians({"loop": lambda: [batch_fn(params, state, x, y) for x, y in examples]},
                                     repeats))
    row = {
        "name": name, "device": device_name(), "batch": batch, "method": method,
        "batch_s": round(t["batch"], 4), "per_example_s": round(t["per_example"], 4), "vmap_s": round(t["vmap"], 4),
        "per_example_over_batch": round(t["per_example"] / t["batch"], 3),
        "vmap_over_batch": round(t["vmap"] / t["batch"], 3),
    }
    if loop:
        row.update(loop_s=round(t["loop"], 4), loop_over_vmap=round(t["loop"] / t["per_example"], 3),
                   loop_over_plain_vmap=round(t["loop"] / t["vmap"], 3))
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64, help="examples per batch (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    parser.add_argument("--models", default="lenet,resnet8,resnet18", help="comma-separated victim names")
    parser.add_argument("--method", default="auto", choices=("auto", "vmap", "patches"),
                        help="per_example_grads method under test (default auto)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")

    results = [bench_model(m.strip(), args.batch, args.repeats, args.method)
               for m in args.models.split(",") if m.strip()]

    print(f"per-example gradients, batch {args.batch}, 32x32x3 images, median of {args.repeats}, method "
          f"{args.method} (jax {jax.__version__}, {results[0]['device'] if results else '?'})")
    print(f"{'model':<10} {'batch s':>9} {'per-ex s':>9} {'vmap s':>9} {'loop s':>9} {'pe/batch':>9} "
          f"{'vmap/batch':>11} {'loop/pe':>8}")
    for r in results:
        print(f"{r['name']:<10} {r['batch_s']:>9.3f} {r['per_example_s']:>9.3f} {r['vmap_s']:>9.3f} "
              f"{r['loop_s']:>9.3f} {r['per_example_over_batch']:>8.2f}x {r['vmap_over_batch']:>10.2f}x "
              f"{r['loop_over_vmap']:>7.2f}x")
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    main()
