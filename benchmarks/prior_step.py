"""A GIT prior-training step against its floor: computing that step's leaked gradients alone.

Each step of ``gitjax.train`` computes N leaked gradients (the victim's batch-mean
gradient of each group of B auxiliary images) and then regresses the generator's
output to the images. The leak is work the step cannot skip, so the floor of a
step is the leak alone; the target (issue 12) is step <= 2x leak for Coarse-GIT
on LeNet. The generator's forward + backward and update (timed alone on gradients
leaked beforehand) is the other part a step cannot skip; ``step_over_parts`` =
step / (leak + generator update) says whether the fused step adds anything to its
parts (1.0: nothing), ``step_over_leak`` how heavy the generator is next to the victim.

The step is rebuilt here from the trainer's public pieces (``leak_gradients``,
``make_optimizer``, ``total_variation``, ``build_generator``) with the preset's
loss weights, AdamW and EMA, single device, no checkpointing or input pipeline,
so it times the compiled math of one step. Compilation and a warm-up call are
excluded; the two sides are timed interleaved; medians of ``--repeats``.

    python benchmarks/prior_step.py [--preset lenet_coarse] [--global-batch 64] [--repeats 5]

Prints one JSON line {"name": "prior_step", "step_s", "leak_s", "generator_update_s",
"step_over_leak", "step_over_parts", ...}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
from per_example_grads import device_name, interleaved_medians  # noqa: E402

from gitjax.configs import get_preset  # noqa: E402
from gitjax.generators import build_generator  # noqa: E402
from gitjax.losses import total_variation  # noqa: E402
from gitjax.train_step import leak_gradients, make_optimizer  # noqa: E402
from gitjax.victims import make_victim  # noqa: E402


def bench_prior_step(preset: str = "lenet_coarse", global_batch: int | None = None, repeats: int = 5,
                     generator: str | None = None, victim_name: str | None = None) -> dict:
    """Times one step and its leak alone; ``generator``/``victim`` override the preset's kinds."""
    config = get_preset(preset)
    if global_batch is not None:
        config = dataclasses.replace(config, global_batch=global_batch)
    if generator is not None:
        config = dataclasses.replace(config, generator=dataclasses.replace(config.generator, kind=generator))
    if victim_name is not None:
        config = dataclasses.replace(config, victim=victim_name)
    n, b = config.global_batch, config.victim_batch
    victim = make_victim(config.victim, **dict(config.victim_kwargs))
    vparams, vstate = jax.jit(victim.init)(jax.random.key(0))
    generator = build_generator(config.generator, victim, vparams)
    x_NxBxHxWxC = jax.random.uniform(jax.random.key(1), (n, b, *victim.input_shape))
    y_NxB = jax.random.randint(jax.random.key(2), (n, b), 0, victim.num_classes)
    grads_1 = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape, p.dtype), vparams)
    gen_params = jax.jit(generator.init)(jax.random.key(3), grads_1, vparams)["params"]
    tx = make_optimizer(config)
    opt_state = tx.init(gen_params)

    @jax.jit
    def leak(vp, x, y):
        return leak_gradients(victim, vp, vstate, x, y)

    def generator_loss(p, grads_N, vp, x):
        x_hat = generator.apply({"params": p}, grads_N, vp)
        return config.mse_weight * jnp.mean(jnp.square(x_hat - x)) + config.tv_weight * total_variation(x_hat)

    @jax.jit
    def step(params, ema, opt_state, vp, x, y):
        grads_N = jax.lax.stop_gradient(leak_gradients(victim, vp, vstate, x, y))
        loss, g = jax.value_and_grad(generator_loss)(params, grads_N, vp, x)
        updates, opt_state = tx.update(g, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema = jax.tree_util.tree_map(lambda e, p: config.ema_decay * e + (1 - config.ema_decay) * p, ema, params)
        return params, ema, opt_state, loss

    @jax.jit
    def generator_update(params, opt_state, grads_N, vp, x):
        # The other part a step cannot skip: the generator's forward + backward and the update,
        # on gradients leaked beforehand.
        g = jax.grad(generator_loss)(params, grads_N, vp, x)
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    grads_N = leak(vparams, x_NxBxHxWxC, y_NxB)
    t = interleaved_medians({
        "leak": lambda: leak(vparams, x_NxBxHxWxC, y_NxB),
        "generator": lambda: generator_update(gen_params, opt_state, grads_N, vparams, x_NxBxHxWxC),
        "step": lambda: step(gen_params, gen_params, opt_state, vparams, x_NxBxHxWxC, y_NxB),
    }, repeats)
    n_gen = sum(int(a.size) for a in jax.tree_util.tree_leaves(gen_params))
    return {"name": "prior_step", "device": device_name(), "preset": preset, "victim": config.victim,
            "generator": config.generator.kind, "global_batch": n, "victim_batch": b,
            "generator_params": n_gen, "step_s": round(t["step"], 4), "leak_s": round(t["leak"], 4),
            "generator_update_s": round(t["generator"], 4),
            "step_over_leak": round(t["step"] / t["leak"], 3),
            "step_over_parts": round(t["step"] / (t["leak"] + t["generator"]), 3),
            "examples_per_s": round(n / t["step"], 1)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="lenet_coarse")
    p.add_argument("--global-batch", type=int, default=None, help="N gradients per step (default: the preset's)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--generator", default=None, help="override the preset's generator kind (coarse, exact, ...)")
    p.add_argument("--victim", default=None, help="override the preset's victim")
    args = p.parse_args(argv)
    r = bench_prior_step(args.preset, args.global_batch, args.repeats, args.generator, args.victim)
    print(f"prior step {r['preset']} N={r['global_batch']} B={r['victim_batch']}: step {r['step_s']:.4f} s, "
          f"leak alone {r['leak_s']:.4f} s, generator update alone {r['generator_update_s']:.4f} s; "
          f"step/leak {r['step_over_leak']:.2f}x, step/(leak + generator) {r['step_over_parts']:.2f}x "
          f"({r['device']})")
    print(json.dumps(r))
    return r


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    main()
