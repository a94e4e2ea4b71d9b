"""Hungarian matching of reconstructions to ground truths: optax (jittable) against scipy (host).

gitjax.metrics matches each group of B reconstructions to its B ground truths by the
assignment with the largest total PSNR. It uses ``optax.assignment.hungarian_algorithm``
(pure JAX: ``jit(vmap(...))`` matches all N groups of a run in one program); before,
it used ``scipy.optimize.linear_sum_assignment`` on the host, one group at a time.
Measured per B:

  * ``solver``: the assignment alone on one (B, B) cost matrix: scipy on a numpy array
    against ``jit(hungarian_algorithm)`` on a device array;
  * ``groups``: the whole matching of N groups of B images (H, W, C): pairwise PSNR
    (float64 numpy) + scipy in a Python loop over groups (the old path) against
    ``jit(vmap(metrics.match_permutation))`` (the new one), outputs on the host.

Compilation and one warm-up call are excluded; the repeats of the two sides are
interleaved so load on a shared machine hits them alike; medians are reported.

    python benchmarks/matching.py [--batches 8,64] [--groups 16] [--repeats 5]

Prints one JSON line per B with the seconds and ``optax_over_scipy`` ratios (< 1: optax faster).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from per_example_grads import interleaved_medians  # noqa: E402

from gitjax import metrics  # noqa: E402


def _scipy_groups(recon_NxBxHxWxC: np.ndarray, truth_NxBxHxWxC: np.ndarray) -> np.ndarray:
    """The old host path: float64 pairwise PSNR and linear_sum_assignment, group by group."""
    out = []
    for recon, truth in zip(recon_NxBxHxWxC, truth_NxBxHxWxC):
        b = len(truth)
        r_BxD, t_BxD = recon.reshape(b, -1).astype(np.float64), truth.reshape(b, -1).astype(np.float64)
        mse_BxB = np.stack([np.mean(np.square(r_BxD - t_D[None]), axis=1) for t_D in t_BxD])
        psnr_BxB = 10.0 * np.log10(1.0 / np.maximum(mse_BxB, 1e-10))
        rows, cols = linear_sum_assignment(psnr_BxB, maximize=True)
        perm = np.empty(b, np.int64)
        perm[rows] = cols
        out.append(perm)
    return np.stack(out)


def bench(b: int, groups: int, repeats: int, image_shape: tuple[int, int, int] = (32, 32, 3)) -> dict:
    rng = np.random.default_rng(b)
    cost_np = rng.random((b, b))
    cost_dev = jax.device_put(cost_np.astype(np.float32))
    solver = jax.jit(optax.assignment.hungarian_algorithm)
    truth = rng.random((groups, b, *image_shape)).astype(np.float32)
    recon = np.clip(truth + 0.2 * rng.standard_normal(truth.shape), 0, 1).astype(np.float32)
    recon = np.stack([r[rng.permutation(b)] for r in recon])
    match_all = jax.jit(jax.vmap(metrics.match_permutation))
    # Same answer before timing anything.
    np.testing.assert_array_equal(np.asarray(match_all(recon, truth)), _scipy_groups(recon, truth))
    t = interleaved_medians({
        "solver_scipy": lambda: linear_sum_assignment(cost_np),
        "solver_optax": lambda: solver(cost_dev),
        "groups_scipy": lambda: _scipy_groups(recon, truth),
        "groups_optax": lambda: np.asarray(match_all(recon, truth)),
    }, repeats)
    return {"B": b, "N": groups, "image": list(image_shape), **{f"{k}_s": v for k, v in t.items()},
            "solver_optax_over_scipy": t["solver_optax"] / t["solver_scipy"],
            "groups_optax_over_scipy": t["groups_optax"] / t["groups_scipy"],
            "device": jax.devices()[0].device_kind}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", default="8,64")
    p.add_argument("--groups", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    for b in (int(x) for x in args.batches.split(",")):
        print(json.dumps(bench(b, args.groups, args.repeats)), flush=True)
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    sys.exit(main())
