"""What Exact-GIT misses on a residual victim: oracle masks at the block exits, and each layer's identifiability.

Exact-GIT recovers a layer's input from its weight gradient ``dK = P(a)^T delta`` given
the error ``delta`` at its output. In a ResNet the error entering a basic block passes the
block's exit ReLU, whose mask the recursion does not know: after the global pool only
the per-channel mean of the last block's output is known, and the trace labels an
add + ReLU a learned affine ("mixed"). This experiment measures two things for batch-1
gradients of the ``patches`` split (images drawn with ``--seed``):

* **Oracle masks.** The prior's one-shot PSNR and per-layer input error (as
  ``experiments.exact_cg_iters --layers``) with and without the true exit-ReLU masks
  of every residual unit handed to the generator (its ``oracle`` collection): the gain
  an attacker would have from a perfect mask estimate.
* **Identifiability of each conv/dense layer** from its gradient with the *true* output
  error: unknowns (input entries), an upper bound on the rank of the gradient equations
  (patch size x rank of delta, positions x channels: the count in patch space; overlapping
  patches and all-zero error rows can lower the rank in input space) and rank(delta).
  ``equations_bound < unknowns`` means the layer's input cannot come from its gradient
  alone and rests on the forward equations of the estimate above it; a larger bound does
  not prove the converse.

    python -m experiments.exact_oracle --checkpoint runs/compare_resnet8/resnet8-exact \\
        [--iters 8] [--num-images 8] [--split train] [--seed 0]

Prints one JSON line per (K, variant) and one with the identifiability table (the first
four images). A victim without residual ReLU units (LeNet) gets the identifiability table only.
"""

from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.exact_cg_iters import exact_prior_and_images, layer_errors
from gitjax.metrics import psnr
from gitjax.pipeline import attacker_from_prior, leak


def exit_masks(plan, vic, params, state, x_NxBxHxWxC: np.ndarray) -> dict[str, np.ndarray]:
    """``{unit}_exit_mask`` (N, B, *out) for every residual unit whose output is a ReLU's (>= 0 everywhere).

    The unit's output is positive exactly where its exit ReLU passes the error. One eval-mode
    forward of all N x B images (per-image in eval mode, so batching them changes nothing).
    """
    from gitjax.trace import record_calls

    names = {u.name for u in plan.units if u.composite}
    n, b = x_NxBxHxWxC.shape[:2]
    x = jnp.asarray(x_NxBxHxWxC).reshape(n * b, *x_NxBxHxWxC.shape[2:])
    _, calls = record_calls(lambda: vic.apply(params, state, x, train=False),
                            select=lambda m: "/".join(m.path) in names)
    outs = {"/".join(c.path): np.asarray(c.out) for c in calls}
    return {f"{k.replace('/', '_')}_exit_mask": (v > 0).astype(np.float32).reshape(n, b, *v.shape[1:])
            for k, v in outs.items() if v.min() >= 0.0}


def identifiability(vic, params, state, x_1xHxWxC: np.ndarray, y_1: np.ndarray, rcond: float = 1e-6) -> list[dict]:
    """Per conv/dense layer, with the true output error of one image: unknowns, the bound on the gradient
    equations' rank (fan-in x rank(delta)), rank(delta) (float64 SVD)."""
    from gitjax.per_example import _forward

    x = jnp.asarray(x_1xHxWxC)
    _, ins, outs = _forward(vic, params, state, x, None, None)

    def loss(taps):
        logits, _, _ = _forward(vic, params, state, x, taps, None)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y_1)).mean()

    deltas = jax.grad(loss)({k: jnp.zeros_like(v) for k, v in outs.items()})
    kernels = {"/".join(str(getattr(p, "key", p)) for p in path[:-1]): leaf.shape for path, leaf in
               jax.tree_util.tree_flatten_with_path(params)[0] if str(getattr(path[-1], "key", "")) == "kernel"}
    rows = []
    for key, d in deltas.items():
        name = key.split("#")[0]
        kshape = kernels.get(name)  # params paths are the module paths (no 'params' prefix)
        if kshape is None:
            continue
        d_PxC = np.asarray(d).reshape(-1, d.shape[-1])
        s = np.linalg.svd(d_PxC.astype(np.float64), compute_uv=False)
        rank = int((s > rcond * s[0]).sum()) if s[0] > 0 else 0
        fan_in = math.prod(kshape[:-1])
        rows.append({"layer": name, "unknowns": int(np.prod(ins[key].shape[1:])), "equations_bound": fan_in * rank,
                     "delta_rank": rank, "delta_shape": list(d_PxC.shape)})
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", required=True, help="an Exact-GIT prior of a residual victim (run dir)")
    ap.add_argument("--iters", type=int, nargs="+", default=[8], help="CG steps at attack time")
    ap.add_argument("--split", default="train")
    ap.add_argument("--num-images", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    prior, x_Nx1, y_Nx1 = exact_prior_and_images(args.checkpoint, args.split, args.num_images, args.seed)
    vic = prior.victim
    base = attacker_from_prior(prior)
    grads_N = leak(vic, base.params, base.state, x_Nx1, y_Nx1, jax.random.key(args.seed))
    masks = exit_masks(prior.generator.plan, vic, prior.victim_params, prior.victim_state, x_Nx1)
    rows = []
    for k in args.iters if masks else []:  # no residual unit with a ReLU exit: identifiability only
        p = prior.with_generator_config(exact_cg_iters=k)
        for variant, oracle in (("none", None), ("true exit masks", {"core": masks})):
            extra = {"oracle": oracle} if oracle else {}
            rec = np.asarray(jax.jit(lambda g: p.generator.apply({"params": p.gen_params, **extra}, g,
                                                                  p.victim_params))(grads_N))
            psnr_N = np.asarray(psnr(rec.reshape(-1, *rec.shape[2:]), x_Nx1.reshape(-1, *x_Nx1.shape[2:])))
            if not np.all(np.isfinite(rec)):
                raise SystemExit(f"non-finite reconstruction at {k} CG steps ({variant})")
            err, _ = layer_errors(p, grads_N, x_Nx1, oracle)
            row = {"cg_iters": k, "variant": variant, "n": args.num_images, "split": args.split,
                   "psnr": round(float(np.mean(psnr_N)), 2), "layer_rel_error": err}
            print(json.dumps(row), flush=True)
            rows.append(row)
    ident = [identifiability(vic, prior.victim_params, prior.victim_state, x_Nx1[n], y_Nx1[n]) for n in range(min(args.num_images, 4))]
    table = [{**r, "delta_rank": [im[i]["delta_rank"] for im in ident], "equations_bound": [im[i]["equations_bound"] for im in ident]}
             for i, r in enumerate(ident[0])]
    print(json.dumps({"identifiability": table}), flush=True)
    rows.append({"identifiability": table})
    return rows


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    main()
