"""Prior-training throughput (examples/s) vs number of devices, at a fixed global batch.

    python benchmarks/train_throughput.py                       # tiny preset, N=32, 1/2/4/8 devices
    python benchmarks/train_throughput.py --preset lenet_coarse --devices 1 8 --steps 30

Each device count runs in its own subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=D`` (the device count is fixed
when JAX starts), through the real ``train_prior`` loop (sharded batch,
replicated state, host input pipeline, checkpoint at the end). Throughput is the
median examples/s of the logging intervals after the first one (which holds the
compilation). An "example" is one leaked gradient (of B images) regressed to its images.

On a CPU host the simulated devices share the same physical cores, so this
measures the overhead and mechanics of data parallelism (partitioning, the
all-reduce, per-device replicated optimiser updates), not a real speed-up; the
target there is "no collapse" (ratio >= 0.3 at 8 devices). On a machine with
D real accelerators the expected ratio is close to D.

Output: a table, then one JSON line per device count
{"name", "device", "devices", "global_batch", "examples_per_s", "ratio_vs_1", "first_interval_s"}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = textwrap.dedent(
    """
    import json, sys, tempfile, time
    import jax
    devices, preset, n, steps, every = (int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4]),
                                        int(sys.argv[5]))
    jax.config.update("jax_num_cpu_devices", devices)
    from gitjax.configs import get_preset
    from gitjax.train import train_prior
    cfg = get_preset(preset, global_batch=n, steps=steps, warmup=1, log_every=every, eval_every=0,
                     checkpoint_every=0)
    t0 = time.perf_counter()
    r = train_prior(cfg, tempfile.mkdtemp(), progress=False)
    total = time.perf_counter() - t0
    rates = [h["examples_per_s"] for h in r.history if "examples_per_s" in h]
    print("RESULT " + json.dumps({"devices": jax.device_count(), "platform": jax.devices()[0].platform,
                                  "rates": rates, "total_s": total}), flush=True)
    """
)


def run_one(devices: int, preset: str, global_batch: int, steps: int, every: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "child.py"
        script.write_text(CHILD)
        out = subprocess.run([sys.executable, str(script), str(devices), preset, str(global_batch), str(steps),
                              str(every)], env=env, capture_output=True, text=True, timeout=3600)
    lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{devices}-device run failed (rc {out.returncode}):\n{out.stderr[-3000:]}")
    res = json.loads(lines[-1][len("RESULT "):])
    steady = res["rates"][1:] or res["rates"]
    return {"devices": res["devices"], "platform": res["platform"], "examples_per_s": statistics.median(steady),
            "first_interval_s": every * global_batch / res["rates"][0], "total_s": res["total_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--global-batch", type=int, default=32, help="N gradients per step (fixed for all counts)")
    p.add_argument("--devices", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--log-every", type=int, default=10, help="measurement interval in steps")
    args = p.parse_args(argv)
    for d in args.devices:
        if args.global_batch % d:
            p.error(f"--global-batch {args.global_batch} must be divisible by every device count ({d})")

    rows = [run_one(d, args.preset, args.global_batch, args.steps, args.log_every) for d in args.devices]
    base = next((r["examples_per_s"] for r in rows if r["devices"] == 1), rows[0]["examples_per_s"])
    print(f"prior training, preset {args.preset}, global batch {args.global_batch} (simulated CPU devices share "
          f"{os.cpu_count()} cores: overhead, not speed-up)")
    print(f"{'devices':>7} {'examples/s':>11} {'ratio vs 1':>11} {'1st interval s':>15} {'total s':>8}")
    for r in rows:
        print(f"{r['devices']:>7} {r['examples_per_s']:>11.1f} {r['examples_per_s'] / base:>11.2f} "
              f"{r['first_interval_s']:>15.1f} {r['total_s']:>8.1f}")
    for r in rows:
        print(json.dumps({
            "name": "train_throughput", "device": f"{r['platform']} (simulated x{r['devices']})",
            "preset": args.preset, "devices": r["devices"], "global_batch": args.global_batch,
            "examples_per_s": round(r["examples_per_s"], 2), "ratio_vs_1": round(r["examples_per_s"] / base, 3),
            "first_interval_s": round(r["first_interval_s"], 2),
        }))
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    sys.exit(main())
