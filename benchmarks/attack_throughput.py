"""Attack throughput: iterative attacks one problem at a time against ``vmap`` over M problems.

An auditor runs the same attack on many leaked gradients. This measures
reconstructions per second of Inverting Gradients (and DLG with Adam) on M
single-image problems, (a) one at a time through the jitted single-problem
function, (b) all M at once through ``gitjax.attacks.batched.batched_attack``
(``jax.vmap`` over the problems), and (c) GIT one-shot (one generator forward
pass per gradient), one at a time and vmapped, for scale.

Compilation and one warm-up call are excluded; each timing ends with
``block_until_ready``; the median over ``--repeats`` runs is reported.

    python benchmarks/attack_throughput.py [--steps 50] [--m 8] [--victim mlp] [--methods ig,dlg]
        [--git-checkpoint RUN_DIR]

Prints a table, then one JSON line per method:
{"method", "victim", "device", "steps", "m", "single_rec_per_s", "batched_rec_per_s", "ratio"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import jax

from gitjax.attacks.batched import batched_attack
from gitjax.attacks.dlg import DLGConfig, _dlg_jit
from gitjax.attacks.ig import IGConfig, _ig_jit
from gitjax.leakage import batch_grad
from gitjax.victims import make_victim


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: compilation and the first run are excluded
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _device() -> str:
    dev = jax.devices()[0]
    return f"cpu ({os.cpu_count()} cores)" if dev.platform == "cpu" else dev.device_kind


def _problems(victim_name: str, m: int):
    """M single-image problems: random images/labels, their exact gradients (leading M axis)."""
    victim = make_victim(victim_name)
    params, state = jax.jit(victim.init)(jax.random.key(0))
    x_MxBxHxWxC = jax.random.uniform(jax.random.key(1), (m, 1, *victim.input_shape))
    y_MxB = jax.random.randint(jax.random.key(2), (m, 1), 0, victim.num_classes)
    grad_fn = jax.jit(jax.vmap(lambda x, y: batch_grad(victim, params, state, x, y)))
    return victim, params, state, grad_fn(x_MxBxHxWxC, y_MxB), y_MxB


def bench_iterative(method: str, victim_name: str, steps: int, m: int, repeats: int) -> dict:
    victim, params, state, g_M, y_MxB = _problems(victim_name, m)
    if method == "ig":
        config, single = IGConfig(steps=steps), _ig_jit
    else:
        config, single = DLGConfig(steps=steps, optimizer="adam", lr=0.03, lr_decay=True), _dlg_jit
    keys = jax.random.split(jax.random.key(3), m)
    # Per-problem slices made up front so the loop times only the attack calls.
    slices = [(jax.tree.map(lambda a: a[i], g_M), y_MxB[i]) for i in range(m)]

    def run_single():
        return [single(victim, params, state, g, y, k, config)[0] for (g, y), k in zip(slices, keys)]

    def run_batched():
        return batched_attack(method, victim, params, state, g_M, y_MxB, jax.random.key(3), config)[0]

    t_single = _median_seconds(run_single, repeats)
    t_batched = _median_seconds(run_batched, repeats)
    return {"method": method, "victim": victim_name, "device": _device(), "steps": steps, "m": m,
            "single_rec_per_s": round(m / t_single, 3), "batched_rec_per_s": round(m / t_batched, 3),
            "ratio": round(t_single / t_batched, 3)}


# ----------------------------------------------------------------------------- GIT one-shot
# GIT timing hook: one generator forward pass per leaked gradient. With
# --git-checkpoint it times the trained prior through the registry
# (run_attack('git', ...)); without it, an untrained Coarse-GIT generator of the
# same architecture (the weights do not change the cost).


def bench_git_one_shot(victim_name: str, m: int, repeats: int, checkpoint: str = "") -> dict | None:
    try:
        from gitjax.attacks import git
        from gitjax.attacks.base import AttackProblem, Hints, run_attack
        from gitjax.generators import GeneratorConfig, build_generator
        from gitjax.prior import Prior, load_prior
    except ImportError as e:  # GIT not available in this checkout
        print(f"# GIT one-shot timing skipped: {e}")
        return None
    victim, params, state, g_M, y_MxB = _problems(victim_name, m)
    slices = [jax.tree.map(lambda a: a[i], g_M) for i in range(m)]
    if checkpoint:
        prior = load_prior(checkpoint)
        cfg = git.GITConfig(checkpoint=checkpoint)
        git_hints = Hints(prior=prior)  # load once, not once per problem
        problems = [AttackProblem(victim, prior.victim_params, state, g, 1, y_MxB[i])
                    for i, g in enumerate(slices)]
        run_one = lambda p: run_attack("git", p, jax.random.key(0), cfg, git_hints).images
    else:
        gen = build_generator(GeneratorConfig(kind="coarse", batch_size=1), victim, params)
        gen_params = jax.jit(gen.init)(jax.random.key(4), g_M, params)["params"]
        prior = Prior(gen_params, params, state, gen, victim)
        problems = [AttackProblem(victim, params, state, g, 1, y_MxB[i]) for i, g in enumerate(slices)]
        run_one = lambda p: git.run(p, jax.random.key(0), git.GITConfig(), prior=prior).images
    batched = jax.jit(jax.vmap(git.attack, in_axes=(None, 0)))

    t_single = _median_seconds(lambda: [run_one(p) for p in problems], repeats)
    t_batched = _median_seconds(lambda: batched(prior, g_M), repeats)
    return {"method": "git" + ("" if checkpoint else " (untrained coarse)"), "victim": victim_name,
            "device": _device(), "steps": 0, "m": m, "single_rec_per_s": round(m / t_single, 3),
            "batched_rec_per_s": round(m / t_batched, 3), "ratio": round(t_single / t_batched, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="iterations per attack (default 50)")
    parser.add_argument("--m", type=int, default=8, help="problems per batched call (default 8)")
    parser.add_argument("--victim", default="mlp", help="victim model (default mlp)")
    parser.add_argument("--methods", default="ig,dlg", help="comma-separated: ig, dlg, git (default ig,dlg)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported (default 3)")
    parser.add_argument("--git-checkpoint", default="", help="trained GIT prior run dir for the 'git' method")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.m < 1 or args.repeats < 1:
        parser.error("--steps, --m and --repeats must be >= 1")
    methods = [s.strip() for s in args.methods.split(",") if s.strip()]
    unknown = set(methods) - {"ig", "dlg", "git"}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; expected ig, dlg, git")

    results = []
    for method in methods:
        if method == "git":
            r = bench_git_one_shot(args.victim, args.m, args.repeats, args.git_checkpoint)
        else:
            r = bench_iterative(method, args.victim, args.steps, args.m, args.repeats)
        if r is not None:
            results.append(r)

    print(f"attack throughput, victim {args.victim}, batch 1, {args.steps} iterations, M={args.m}, "
          f"median of {args.repeats} (jax {jax.__version__}, {_device()})")
    print(f"{'method':<26} {'one-at-a-time rec/s':>20} {'vmap over M rec/s':>18} {'vmap/single':>12}")
    for r in results:
        print(f"{r['method']:<26} {r['single_rec_per_s']:>20.2f} {r['batched_rec_per_s']:>18.2f} {r['ratio']:>11.2f}x")
    for r in results:
        print(json.dumps(r))
    return results


if __name__ == "__main__":
    main()
