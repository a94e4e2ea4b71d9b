"""One-shot PSNR of an Exact-GIT prior against its conjugate-gradient steps at attack time.

CG steps are not parameters, so one trained prior runs with any number of them. For each
K, the prior's generator is rebuilt with ``exact_cg_iters=K`` and attacks N batch-1
gradients of the ``patches`` split (images drawn with ``--seed``, as compare_generators
draws them), one-shot:

    python -m experiments.exact_cg_iters --checkpoint gitjax/priors/lenet_exact --iters 256 512 1024 \\
        [--split test] [--num-images 32] [--seed 0] [--noise-std 1e-3] [--layers]

With ``--noise-std`` the leaked gradients carry Gaussian noise of that absolute std (the
``gaussian`` defence): CG run to convergence fits the noise, fewer steps regularise.

``--layers`` adds, per K, where the error enters: for every dense/conv layer, the relative
L2 error of Exact-GIT's estimate of that layer's input (recorded by the generator in its
``diagnostics`` collection) against the true input (the victim's forward, intercepted),
mean over images (for a conv that skips input entries, a 1x1 stride-2 projection, also over the
entries it reads: ``layer_rel_error_read``), and the leaked gradient's per-layer RMS (the signal
the noise meets).

Prints one JSON line per K: PSNR, SSIM, seconds (compilation included) and the oracle rows.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from gitjax.data import load_dataset
from gitjax.pipeline import attacker_from_prior, leak, reconstruct, score
from gitjax.prior import load_prior


def _read_masks(prior) -> dict[str, np.ndarray]:
    """(*in_shape) boolean masks of the input entries a conv reads, for convs that skip some (stride > kernel).

    A 1x1 stride-2 projection never reads three quarters of its input: no solve can recover
    those entries from its gradient, so its error is also reported over the read ones.
    """
    from gitjax.generators.linalg import LinearOps, conv_patch_counts

    masks = {}
    for lp in prior.generator.plan.layers:
        if lp.op != "conv":
            continue
        mask = np.broadcast_to(np.asarray(conv_patch_counts(LinearOps(lp, (1, *lp.in_shape)))) > 0, lp.in_shape)
        if not mask.all():
            masks[lp.name.replace("/", "_")] = mask
    return masks


def layer_errors(prior, grads_N, x_Nx1: np.ndarray, oracle: dict | None = None) -> tuple[dict[str, float], dict[str, float]]:
    """Mean over the N images of |estimate - truth| / |truth| of each dense/conv layer's input.

    ``oracle``: the generator's optional ``oracle`` collection (``experiments.exact_oracle``).
    Returns (all entries, read entries only): the second only for convs that skip input entries.
    """
    from gitjax.per_example import _forward

    vic = prior.victim
    extra = {"oracle": oracle} if oracle else {}
    _, diag = prior.generator.apply({"params": prior.gen_params, **extra}, grads_N, prior.victim_params,
                                    mutable=["diagnostics"])
    est = {k.removesuffix("_input"): v[0] for k, v in diag["diagnostics"]["core"].items()}
    masks = _read_masks(prior)
    rel = lambda e, t: float(np.linalg.norm(e - t) / max(np.linalg.norm(t), 1e-12))
    out: dict[str, list[float]] = {}
    read: dict[str, list[float]] = {}
    for n in range(x_Nx1.shape[0]):
        _, inputs, _ = _forward(vic, prior.victim_params, prior.victim_state, x_Nx1[n], None, None)
        for key, truth in inputs.items():
            name = key.split("#")[0].replace("/", "_")
            if name in est:
                t = np.asarray(truth).reshape(-1)
                e = np.asarray(est[name][n]).reshape(-1)
                out.setdefault(name, []).append(rel(e, t))
                if name in masks:
                    m = masks[name].reshape(-1)
                    read.setdefault(name, []).append(rel(e[m], t[m]))
    mean = lambda d: {k: round(float(np.mean(v)), 4) for k, v in d.items()}
    return mean(out), mean(read)


def exact_prior_and_images(checkpoint: str, split: str, num_images: int, seed: int):
    """The Exact-GIT prior at ``checkpoint`` and N batch-1 images of the ``patches`` split drawn with ``seed``
    (as compare_generators draws them): (prior, x (N, 1, H, W, C), y (N, 1))."""
    prior = load_prior(checkpoint)
    if prior.config is None or prior.config.generator.kind != "exact":
        raise SystemExit("--checkpoint must hold an Exact-GIT prior")
    vic = prior.victim
    ds = load_dataset("patches", split, image_size=vic.input_shape[0], channels=vic.input_shape[2])
    idx = np.random.default_rng(seed).choice(len(ds), num_images, replace=False)
    return prior, ds.images[idx][:, None], np.asarray(ds.labels[idx], np.int32)[:, None]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an Exact-GIT prior (run dir)")
    ap.add_argument("--iters", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--split", default="test")
    ap.add_argument("--num-images", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise-std", type=float, default=0.0, help="Gaussian noise on the leaked gradients")
    ap.add_argument("--layers", action="store_true", help="also the per-layer relative error of the inversion")
    args = ap.parse_args(argv)
    prior, x_Nx1, y_Nx1 = exact_prior_and_images(args.checkpoint, args.split, args.num_images, args.seed)
    vic = prior.victim
    # The same leaked gradients for every K: the CG steps change the generator, not the victim.
    noise = {"defense": "gaussian", "defense_args": {"std": args.noise_std}} if args.noise_std > 0 else {}
    base = attacker_from_prior(prior)
    grads_N = leak(vic, base.params, base.state, x_Nx1, y_Nx1, jax.random.key(args.seed), **noise)
    clean_N = leak(vic, base.params, base.state, x_Nx1, y_Nx1, jax.random.key(args.seed)) if args.layers else None
    rows = []
    for k in args.iters:
        att = attacker_from_prior(prior.with_generator_config(exact_cg_iters=k))
        t0 = time.perf_counter()
        rec = reconstruct("git", att, grads_N, jax.random.key(0), batch_size=1)
        sc = score(rec.images, x_Nx1, mean_image=att.mean_image)
        row = {"cg_iters": k, "noise_std": args.noise_std, "split": args.split, "n": args.num_images, "psnr": round(sc["psnr"], 2),
               "ssim": round(sc["ssim"], 3), "seconds": round(time.perf_counter() - t0, 1),
               "oracles": {o["method"]: round(o["psnr"], 2) for o in sc["oracles"]}}
        if args.layers:
            row["layer_rel_error"], read = layer_errors(att.prior, grads_N, x_Nx1)
            if read:  # strided convs that skip input entries: the error over the entries they read
                row["layer_rel_error_read"] = read
            row["grad_rms"] = {"/".join(str(getattr(k, "key", k)) for k in path): float(np.sqrt(np.mean(
                np.square(np.asarray(g))))) for path, g in jax.tree_util.tree_flatten_with_path(clean_N)[0]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    main()
