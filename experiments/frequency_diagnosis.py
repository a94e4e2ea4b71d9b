"""Where a one-shot prior's error lives: per-image colour vs low band vs high band.

    python -m experiments.frequency_diagnosis outputs/compare_generators/resnet8-exact --num-images 32

Loads a trained prior (a ``compare_generators`` workdir), reconstructs the same
held-out images as that script (same seed), and prints the PSNR of the raw output,
of the output blurred (Gaussian sigma 1, 2, 3 pixels), of its per-image mean colour
alone, of the true per-image mean colour (an oracle), and the error energy in the
low (sigma-2 blur) and high (the rest) bands next to the true images' high-band energy.
"""

from __future__ import annotations

import argparse

import numpy as np
from experiments.compare_generators import evaluate_prior
from gitjax.metrics import batch_psnr, gaussian_blur
from gitjax.prior import load_prior


def mean_psnr(a_NxHxWxC: np.ndarray, b_NxHxWxC: np.ndarray) -> float:
    return float(batch_psnr(a_NxHxWxC, b_NxHxWxC))


def blur(x_NxHxWxC: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(gaussian_blur(x_NxHxWxC, sigma), np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir")
    p.add_argument("--num-images", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    _, truth, recon, _ = evaluate_prior(load_prior(args.workdir), args.num_images, args.seed)
    truth, recon = np.asarray(truth, np.float64), np.asarray(recon, np.float64)
    colour = lambda x: np.broadcast_to(x.mean(axis=(1, 2), keepdims=True), x.shape)
    blurred = {s: blur(recon, s) for s in (1, 2, 3)}
    rows = [("raw output", mean_psnr(recon, truth))]
    rows += [(f"blurred, sigma {s}", mean_psnr(np.clip(b, 0, 1), truth)) for s, b in blurred.items()]
    rows += [("its per-image mean colour only", mean_psnr(colour(recon), truth)),
             ("true per-image mean colour (oracle)", mean_psnr(colour(truth), truth))]
    lo_r, lo_t = blurred[2], blur(truth, 2)
    print("| output | PSNR (dB) |\n| --- | ---: |")
    for name, v in rows:
        print(f"| {name} | {v:.2f} |")
    print(f"\nerror energy: low band {np.mean((lo_r - lo_t) ** 2):.4f}, high band "
          f"{np.mean(((recon - lo_r) - (truth - lo_t)) ** 2):.4f}; true images' high-band energy "
          f"{np.mean((truth - lo_t) ** 2):.4f}")
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    raise SystemExit(main())
