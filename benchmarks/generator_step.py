"""Exact-GIT vs Coarse-GIT: seconds per prior-training step, same victim, N and B.

    python benchmarks/generator_step.py                       # LeNet and ResNet-8, N = 16, B = 1
    python benchmarks/generator_step.py --victims lenet --n 32 --repeats 5

The step is gitjax's own trainer step (``gitjax.train_step.compiled_step_fns``: leaked gradients
of N groups of B images, generator forward, MSE, backward, AdamW, EMA), jitted on a
one-device mesh. Each timing is the median of ``--repeats`` steps after one
warm-up step (compilation excluded). The floor Exact-GIT is compared with is
Coarse-GIT's step: the issue's target is exact/coarse <= 2 on LeNet and <= 3 on
ResNet-8. Both steps run in one process, so the ratio is meaningful on a shared
CPU even when the absolute times are not.

Output: one JSON line per victim
{"victim", "n", "b", "exact_step_s", "coarse_step_s", "exact_over_coarse", "exact_cg_iters", "device"}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from gitjax import parallel
from gitjax.configs import TrainConfig
from gitjax.generators import GeneratorConfig
from gitjax.prior import _abstract_victim
from gitjax.train_step import HashableShapes, compiled_step_fns
from gitjax.victims import make_victim


def step_seconds(victim_name: str, kind: str, n: int, b: int, repeats: int, **gen_kw) -> float:
    """Median seconds of one compiled training step of a ``kind`` generator (compile excluded)."""
    victim = make_victim(victim_name)
    config = TrainConfig(victim=victim_name, generator=GeneratorConfig(kind=kind, batch_size=b, **gen_kw),
                         victim_batch=b, global_batch=n, steps=100, warmup=1, checkpoint_every=0,
                         log_every=0, eval_every=0)
    mesh = parallel.make_mesh(jax.devices()[:1])
    fns = compiled_step_fns(config, victim, mesh, HashableShapes(_abstract_victim(victim)))
    params, vstate = jax.jit(victim.init)(jax.random.PRNGKey(0))
    state = fns.init(jnp.int32(0), params)
    k_x, k_y = jax.random.split(jax.random.PRNGKey(1))
    x = jax.random.uniform(k_x, (n, b, *victim.input_shape))
    y = jax.random.randint(k_y, (n, b), 0, victim.num_classes)
    times = []
    for r in range(repeats + 1):
        t0 = time.perf_counter()
        state, metrics = fns.train_step(state, params, vstate, x, y)
        jax.block_until_ready((state, metrics))
        if r:  # the first call compiles
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--victims", nargs="+", default=["lenet", "resnet8"])
    p.add_argument("--n", type=int, default=16, help="leaked gradients per step (same for both generators)")
    p.add_argument("--b", type=int, default=1, help="images behind each gradient")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cg-iters", type=int, default=None, help="override GeneratorConfig.exact_cg_iters")
    p.add_argument("--cg-grad-iters", type=int, default=None, help="override GeneratorConfig.exact_cg_grad_iters")
    args = p.parse_args(argv)
    if min(args.n, args.b, args.repeats) < 1:
        print("error: --n, --b and --repeats must be >= 1", file=sys.stderr)
        return 2
    exact_kw = {} if args.cg_iters is None else {"exact_cg_iters": args.cg_iters}
    if args.cg_grad_iters is not None:
        exact_kw["exact_cg_grad_iters"] = args.cg_grad_iters
    cg_iters = args.cg_iters if args.cg_iters is not None else GeneratorConfig().exact_cg_iters
    for name in args.victims:
        exact = step_seconds(name, "exact", args.n, args.b, args.repeats, **exact_kw)
        coarse = step_seconds(name, "coarse", args.n, args.b, args.repeats)
        print(json.dumps({"victim": name, "n": args.n, "b": args.b, "exact_step_s": round(exact, 4),
                          "coarse_step_s": round(coarse, 4), "exact_over_coarse": round(exact / coarse, 2),
                          "exact_cg_iters": cg_iters, **{k: v for k, v in exact_kw.items() if "grad" in k},
                          "device": jax.devices()[0].platform}), flush=True)
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    sys.exit(main())
