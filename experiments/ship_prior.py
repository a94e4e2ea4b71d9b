"""Copies a trained prior into the package (``gitjax/priors/NAME``) for ``gitjax demo``.

    gitjax train-prior --preset lenet_exact --workdir runs/lenet_exact
    python -m experiments.ship_prior runs/lenet_exact gitjax/priors/lenet_exact --made-by COMMAND

(COMMAND: the train-prior command line, quoted, recorded in made_by.json.) ``--exact-cg-iters K``
sets Exact-GIT's CG steps for attacks: they are not parameters, so a prior trained with fewer
steps runs with more at attack time (the shipped LeNet prior: trained at 256, shipped at 512,
docs/results.md).

Keeps only what attacks and fine-tunes need (the best-by-validation EMA generator params, the
victim's params and state, the config; ``save_prior(..., ema_only=True)`` adds a fresh
optimiser state and zeros for the raw params, so the folder is a loadable run directory half
the size; ``--full-state`` keeps the EMA as the raw params too) and writes ``made_by.json``: the command, the best step and its
validation/test PSNR, and the training time from the run's metrics file.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from gitjax.prior import load_prior, save_prior


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="the training run directory (train-prior's --workdir)")
    p.add_argument("dest", help="the folder to write (replaced)")
    p.add_argument("--made-by", required=True, help="the command that trained the run")
    p.add_argument("--exact-cg-iters", type=int, default=None, help="Exact-GIT CG steps for attacks (default: as trained)")
    p.add_argument("--full-state", action="store_true", help="store the EMA as the raw params too (twice the size)")
    args = p.parse_args(argv)
    run, dest = Path(args.run), Path(args.dest)
    prior = load_prior(run)  # the best-by-validation checkpoint when the run recorded one
    if args.exact_cg_iters:
        prior = prior.with_generator_config(exact_cg_iters=args.exact_cg_iters)
    if dest.exists():
        shutil.rmtree(dest)
    save_prior(prior, dest, ema_only=not args.full_state)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rate = [r["examples_per_s"] for r in records if "examples_per_s" in r]
    best = json.loads((run / "best.json").read_text()) if (run / "best.json").is_file() else {}
    last = records[-1] if records else {}
    info = {"made_by": args.made_by, "exact_cg_iters_at_attack": args.exact_cg_iters, "best": best, "last_step": last.get("step"),
            "last_test_psnr": last.get("test_psnr"), "mean_examples_per_s": sum(rate) / len(rate) if rate else None,
            "bytes": sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())}
    (dest / "made_by.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    import gitjax

    gitjax.configure_xla_cpu()  # as the gitjax CLI: without it an Exact-GIT ResNet step can hang on XLA:CPU
    sys.exit(main())
