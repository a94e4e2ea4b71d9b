"""The robustness experiments of GIT (Chen & Liu 2025, arXiv 2505.20026, Sec. "robustness"), as run grids.

Run one with::

    gitjax experiment noise --scale small            # or: python -m experiments.run noise --scale small
    gitjax experiment noise --scale small --only victim=lenet
    gitjax experiment list

Every experiment crosses victims x settings x methods. Methods: ``lti`` (Learning
to Invert, Wu et al. 2023), ``coarse`` / ``exact`` (GIT), ``ig`` (Inverting
Gradients, Geiping et al. 2020), ``git+ig`` (IG started at Coarse-GIT's output)
and ``exact+ig`` (IG started at Exact-GIT's). Where the trainer can, a ``coarse
(matched prior)`` column adds a prior trained under the same defence as the attack.
Base priors (``Scale.base_priors``, ``--base-prior VICTIM:KIND=PATH``): converged
priors that clean rows use as is and matched rows fine-tune, instead of priors
trained at the budget.

Scales (see ``SCALES``):
  * ``small``: embedded offline data (prior on ``patches``), 32x32, CPU budgets
    (priors 400 steps x 32 gradients, IG 200 steps, 8 test images; Exact-GIT on the MLP; on
    LeNet at B = 1 the shipped converged priors ``gitjax/priors/lenet_exact`` and
    ``lenet_coarse`` are the base priors of Exact-GIT and Coarse-GIT / GIT+IG);
  * ``full``: TFDS data (prior on CIFAR-10), the paper's budgets (priors 20k steps x
    64 gradients over the 50k CIFAR-10 train images, IG 24k steps as in Geiping
    et al.'s ImageNet setting, 64 test images); meant for a GPU.
``smoke=True`` shrinks any grid to 2 victims, 2 settings, 20 prior steps, 5 IG
steps and 2 images (what ``tests/test_study.py`` runs).

Measured (small scale, LeNet only: ``--only victim=lenet``; a 2-core machine shared with
other jobs, so wall times are ~2x a dedicated one; CPU time in brackets):
  * noise (before 2026-11-30): 19 runs, 5 priors, 13.6 min (5.7 CPU-min). PSNR dB at std 0 / 1e-3 / 1e-2 / 1e-1:
    Coarse-GIT 17.3 / 16.2 / 11.3 / 9.9, IG 22.0 / 21.7 / 16.3 / 8.6, GIT+IG 27.2 / 25.6 / 17.5 / 8.6,
    matched Coarse-GIT - / 16.9 / 15.2 / 9.7, LTI 9.7 throughout (the mean image).
  * prune (2026-12-07, a dedicated machine): 19 runs, 3 new priors, 4.4 min. At ratio 0 / 0.5 / 0.9 / 0.99:
    Coarse-GIT 18.6 / 18.6 / 17.3 / 10.4, matched 18.5 / 17.8 / 17.6 (0.5-0.99), IG 21.8 / 21.7 / 18.0 / 8.3,
    GIT+IG 26.3 / 25.9 / 24.3 / 11.5 (docs/results.md).
  * all eight with the converged LeNet priors as bases (2026-12-07, ``--base-prior
    lenet:coarse=runs/lenet_coarse --base-prior lenet:lti=runs/lenet_lti``; the matched priors
    fine-tune the base 400 steps): noise 19 runs in 9 min, all eight ~48 min sharing the CPU.
    Noise std 0 / 1e-3 / 1e-2: Coarse-GIT 24.2 / 22.6 / 12.7, Exact-GIT 48.2 / 11.2 / 9.6, exact+ig
    48.2 / 25.3 / 16.3, GIT+IG 28.4 / 26.6 / 18.4, IG 21.8 / 21.3 / 15.4 (docs/results.md).
  The MLP's priors train ~3x slower than LeNet's (an 800k-entry first-layer gradient);
  all four victims should take ~25-40 min per experiment on a dedicated 2-core machine (estimated from
  the CPU times above, not measured).

Decisions the paper leaves open (PAPER.md sec. 8 says its grids were not found):
  * Gaussian noise std is ABSOLUTE (added to every gradient entry), as in DLG
    (Zhu et al. 2019) and the GIT paper's "std 0.1"; each row's JSON records the
    clean gradient RMS and the noise-to-signal ratio so it can be read relatively.
  * Defence experiments use B = 1 (the paper's main setting); ``batch`` sweeps B and
    ``fedavg`` uses B = 4.
  * Distribution shift attacks test images of another dataset with the prior and
    victim of the training dataset; their labels are taken modulo the victim's classes.
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Sequence

from gitjax.study.spec import Budget, Defense, Experiment, PlotSpec, Run
from gitjax.prior import SHIPPED_PRIORS
from gitjax.types import GitjaxError


@dataclasses.dataclass(frozen=True)
class Scale:
    """What ``--scale`` selects: victims, datasets and the compute budget."""

    victims: tuple[str, ...]
    exact_victims: tuple[str, ...]
    train_dataset: str
    shift_targets: tuple[str, ...]
    budget: Budget
    # (victim, prior kind, path): converged priors used instead of training one at the budget
    # (relative paths are under the package, e.g. the shipped "priors/lenet_exact").
    base_priors: tuple[tuple[str, str, str], ...] = ()


SCALES: dict[str, Scale] = {
    "small": Scale(
        victims=("mlp", "lenet", "resnet8", "vit"),
        exact_victims=("mlp",),
        train_dataset="patches",
        shift_targets=("patches", "textures", "faces", "digits"),
        budget=Budget(image_size=32, prior_steps=400, prior_batch=32, prior_lr=1e-3, prior_warmup=50,
                      prior_eval=32, attack_steps=200, num_images=8, local_data=256),
        base_priors=tuple((v, k, f"priors/{name}") for (v, k), name in SHIPPED_PRIORS.items()),
    ),
    "full": Scale(
        victims=("mlp", "lenet", "resnet18", "vit"),
        exact_victims=("mlp", "lenet"),
        train_dataset="cifar10",
        shift_targets=("cifar10", "cifar100", "imagenet", "celeb_a"),
        budget=Budget(image_size=32, prior_steps=20_000, prior_batch=64, prior_lr=1e-3, prior_warmup=500,
                      prior_eval=256, attack_steps=24_000, num_images=64, attack_chunk=16, local_data=10_000),
    ),
}

SMOKE_BUDGET = Budget(image_size=32, prior_steps=20, prior_batch=8, prior_lr=3e-3, prior_warmup=2, prior_eval=8,
                      generator_width=32, attack_steps=5, num_images=2, local_data=32)
SMOKE_VICTIMS = 2

# ResNets use GroupNorm: per-example gradients stay per-example (see gitjax/victims.py).
VICTIM_KWARGS: dict[str, tuple[tuple[str, Any], ...]] = {
    "resnet8": (("norm", "group"),),
    "resnet18": (("norm", "group"),),
}
GRID_METHODS = ("lti", "coarse", "exact", "ig", "git+ig", "exact+ig")
MATCHED_METHODS = ("coarse",)  # methods that also get a prior trained under the attack's defence


@dataclasses.dataclass(frozen=True)
class Setting:
    """One row of an experiment: Run field overrides, a label, a plot x and panel, and matched-prior variants."""

    label: str
    fields: tuple[tuple[str, Any], ...] = ()
    x: float | None = None
    panel: str = ""
    matched: bool = False


def _setting(label: str, x: float | None = None, panel: str = "", matched: bool = False, **fields: Any) -> Setting:
    return Setting(label, tuple(fields.items()), x, panel, matched)


def _thin(settings: Sequence[Setting], smoke: bool) -> list[Setting]:
    """Smoke grids keep the first and the last setting of every panel."""
    if not smoke:
        return list(settings)
    out: list[Setting] = []
    for panel in dict.fromkeys(s.panel for s in settings):
        group = [s for s in settings if s.panel == panel]
        out += [group[0]] + ([group[-1]] if len(group) > 1 else [])
    return out


def methods_for(victim: str, scale: str) -> tuple[str, ...]:
    """Exact-GIT where it trains in the scale's budget or a base prior can serve it: its conv
    inversions train at ~12 examples/s for LeNet on a CPU (the paper, too, ran it on a tiny
    model only); rows that no base prior covers are dropped by :func:`apply_base_priors`."""
    sc = SCALES[scale]
    exact_ok = victim in sc.exact_victims or any(v == victim and k == "exact" for v, k, _ in sc.base_priors)
    return tuple(m for m in GRID_METHODS if m not in ("exact", "exact+ig") or exact_ok)


def matrix(experiment: str, scale: str, smoke: bool, settings: Sequence[Setting]) -> list[Run]:
    """victims x settings x methods (+ matched-prior variants) at one scale."""
    sc = SCALES[scale]
    budget = SMOKE_BUDGET if smoke else sc.budget
    victims = sc.victims[:SMOKE_VICTIMS] if smoke else sc.victims
    runs = []
    for victim in victims:
        for s in _thin(settings, smoke):
            common = dict(experiment=experiment, victim=victim, victim_kwargs=VICTIM_KWARGS.get(victim, ()),
                          train_dataset=sc.train_dataset, attack_dataset=sc.train_dataset, budget=budget,
                          setting=s.label, x=s.x, panel=s.panel)
            common.update(dict(s.fields))
            methods = methods_for(victim, scale)
            runs += [Run(method=m, **common) for m in methods]
            if s.matched:
                runs += [Run(method=m, prior_training="matched", **common) for m in MATCHED_METHODS if m in methods]
    return runs


# ----------------------------------------------------------------------------- base priors


def package_path(path: str) -> str:
    """``path`` itself when it exists (or is absolute), else under the package (``priors/NAME``)."""
    p = Path(path).expanduser()
    return str(p if p.is_absolute() or p.exists() else Path(__file__).resolve().parent.parent / p)


@functools.lru_cache(maxsize=32)
def load_base_prior(path: str):
    """The base prior at ``path`` (a resolved path), loaded once per process: grids read its
    config, the study's rows its params."""
    from gitjax.prior import load_prior

    prior = load_prior(path)
    if prior.config is None:
        raise GitjaxError(f"base prior {path} holds no training config; pass a gitjax train-prior --workdir")
    return prior


def _base_config(path: str):
    return load_base_prior(path).config


def base_prior_mismatch(run: Run, config) -> dict[str, tuple[Any, Any]]:
    """{field: (prior's, row's)} where a prior trained with ``config`` differs from what ``run``
    attacks (victim, victim params, B, generator kind); empty when it can attack ``run``. The
    attacker's victim copy is rebuilt from these fields, so equal fields mean equal params."""
    from gitjax.study.execute import method_of

    want = {"victim": run.victim, "victim_kwargs": dict(run.victim_kwargs), "dataset": run.train_dataset,
            "seed": run.seed, "victim_pretrain_steps": run.budget.victim_pretrain_steps,
            "victim_batch": run.batch_size, "generator kind": method_of(run).prior_kind}
    have = {"victim": config.victim, "victim_kwargs": dict(config.victim_kwargs), "dataset": config.dataset,
            "seed": config.seed, "victim_pretrain_steps": config.victim_pretrain_steps,
            "victim_batch": config.victim_batch, "generator kind": config.generator.kind}
    return {k: (have[k], want[k]) for k in want if have[k] != want[k]}


def _describe(diff: dict[str, tuple[Any, Any]]) -> str | None:
    return "; ".join(f"{k} {a!r} (row: {b!r})" for k, (a, b) in diff.items()) or None


def base_prior_fits(run: Run, config) -> str | None:
    """None when a prior trained with ``config`` can attack ``run``, else what differs (one line)."""
    return _describe(base_prior_mismatch(run, config))


def parse_base_priors(items: Sequence[str]) -> dict[tuple[str, str], str]:
    """``["lenet:coarse=runs/lenet_coarse", ...]`` -> {(victim, kind): path} (``--base-prior``)."""
    out = {}
    for item in items:
        head, sep, path = item.partition("=")
        victim, colon, kind = head.partition(":")
        if not (sep and colon and victim and kind and path):
            raise GitjaxError(f"--base-prior expects VICTIM:KIND=PATH (e.g. lenet:coarse=runs/lenet_coarse), "
                              f"got {item!r}")
        out[(victim.strip(), kind.strip())] = path.strip()
    return out


def apply_base_priors(runs: Sequence[Run], scale: str, extra: dict[tuple[str, str], str] | None = None,
                      use: bool = True) -> list[Run]:
    """Points every row whose method's prior a base prior can serve at it (``Run.base_prior``).

    Bases: the scale's ``base_priors``, then ``extra`` ({(victim, kind): path}, the
    ``--base-prior`` flags; a later one wins). A base serves the clean rows of its victim
    and generator kind that share its victim copy (same data, seed, B); matched rows
    fine-tune from it. Exact-GIT rows of victims outside ``exact_victims`` that no base
    serves are dropped (their prior would not train in the budget). ``use=False`` (smoke
    grids) applies no base and only drops those rows.
    """
    from gitjax.study.execute import method_of

    bases = {(v, k): p for v, k, p in SCALES[scale].base_priors} if use else {}
    bases.update(extra or {})
    for (victim, kind), path in bases.items():
        if not Path(package_path(path)).exists():
            raise GitjaxError(f"base prior for {victim}:{kind} not found at {path}; train it with gitjax "
                              "train-prior (docs/results.md names the presets) or drop the --base-prior flag")
    out, served, misfit = [], set(), {}
    for run in runs:
        kind = method_of(run).prior_kind
        path = bases.get((run.victim, kind))  # kept as given: a run's key must not depend on the checkout's place
        diff = {} if path is None else base_prior_mismatch(run, _base_config(package_path(path)))
        if path is not None and not diff:
            run = dataclasses.replace(run, base_prior=path)
            served.add((run.victim, kind))
        elif path is not None and set(diff) != {"victim_batch"}:  # rows of another B are expected not to fit
            misfit.setdefault((run.victim, kind), _describe(diff))
        if kind == "exact" and not run.base_prior and run.victim not in SCALES[scale].exact_victims:
            continue
        out.append(run)
    for vk in (extra or {}):
        if vk in misfit and vk not in served:  # a flag that fits no row for another reason than B is a mistake
            raise GitjaxError(f"--base-prior {vk[0]}:{vk[1]}={extra[vk]} fits none of the experiment's "
                              f"{vk[0]} {vk[1]} rows: it differs in {misfit[vk]}")
    return out


# ----------------------------------------------------------------------------- the experiments


def noise(scale: str, smoke: bool) -> list[Run]:
    """Additive Gaussian gradient noise, absolute std in {0, 1e-3, 1e-2, 1e-1} (DLG's range; GIT claims MSE ~0.01 at 0.1)."""
    stds = (0.0, 1e-3, 1e-2, 1e-1)
    return matrix("noise", scale, smoke, [
        _setting(f"std={s:g}", x=s, matched=s > 0, defense=Defense.of("gaussian", std=s) if s > 0 else Defense())
        for s in stds])


def prune(scale: str, smoke: bool) -> list[Run]:
    """Top-k gradient pruning: the smallest-magnitude fraction {0, 0.5, 0.9, 0.99} of every layer's entries zeroed."""
    ratios = (0.0, 0.5, 0.9, 0.99)
    return matrix("prune", scale, smoke, [
        _setting(f"prune={r:g}", x=r, matched=r > 0, defense=Defense.of("prune", ratio=r) if r > 0 else Defense())
        for r in ratios])


def dpsgd(scale: str, smoke: bool) -> list[Run]:
    """DP-SGD (Abadi et al. 2016): per-example clipping to norm 1, Gaussian noise multiplier {0, 0.01, 0.1, 1}.

    With B = 1 the per-entry noise std is the multiplier itself. No matched prior:
    the trainer augments batch gradients, DP-SGD needs per-example ones.
    """
    sigmas = (0.0, 1e-2, 1e-1, 1.0)
    return matrix("dpsgd", scale, smoke, [
        _setting(f"C=1, sigma={s:g}", x=s, defense=Defense.of("dpsgd", clip_norm=1.0, noise_multiplier=s))
        for s in sigmas])


def compression(scale: str, smoke: bool) -> list[Run]:
    """Gradient compression: none, 8-bit and 4-bit uniform quantisation, scaled signSGD."""
    return matrix("compression", scale, smoke, [
        _setting("none"),
        _setting("quantize 8 bit", matched=True, defense=Defense.of("quantize", bits=8)),
        _setting("quantize 4 bit", matched=True, defense=Defense.of("quantize", bits=4)),
        _setting("sign", matched=True, defense=Defense.of("sign")),
    ])


def shift(scale: str, smoke: bool) -> list[Run]:
    """Distribution shift: prior and victim from the training dataset, private images from another.

    small: patches -> patches / textures / faces (LFW) / digits; full: CIFAR-10 ->
    CIFAR-10 / CIFAR-100 / ImageNet (32x32) / CelebA.
    """
    sc = SCALES[scale]
    return matrix("shift", scale, smoke, [
        _setting(f"{sc.train_dataset} -> {t}", attack_dataset=t) for t in sc.shift_targets])


def discrepancy(scale: str, smoke: bool) -> list[Run]:
    """Parameter discrepancy: the client's params drift from the attacker's copy the prior was trained on.

    Panel 'steps': the client trained K in {0, 10, 100} more SGD steps (lr 0.1) on its
    own data; panel 'relative': params + noise of relative L2 size {0, 0.01, 0.1}
    (with a matched prior trained under random discrepancy up to that size).
    Every method attacks with the attacker's (stale) params.
    """
    steps = [_setting(f"steps K={k}", x=k, panel="steps", discrepancy="steps", discrepancy_amount=float(k))
             for k in (0, 10, 100)]
    rel = [_setting(f"relative {r:g}", x=r, panel="relative", matched=r > 0, discrepancy="relative",
                    discrepancy_amount=r) for r in (0.0, 0.01, 0.1)]
    return matrix("discrepancy", scale, smoke, steps + rel)


def batch(scale: str, smoke: bool) -> list[Run]:
    """Victim batch size B in {1, 4, 16}: one prior per B (N = max(1, images // B) leaked gradients)."""
    return matrix("batch", scale, smoke, [_setting(f"B={b}", x=b, batch_size=b) for b in (1, 4, 16)])


def fedavg(scale: str, smoke: bool) -> list[Run]:
    """FedAvg: the client shares (params - params after K local full-batch SGD steps) / (K lr), K in {1, 2, 5}, B = 4.

    K = 1 is FedSGD's batch gradient, what the priors are trained on.
    """
    return matrix("fedavg", scale, smoke, [
        _setting(f"K={k}", x=k, batch_size=4, local_steps=k) for k in (1, 2, 5)])


EXPERIMENTS: dict[str, Experiment] = {
    "noise": Experiment("noise", "additive Gaussian noise on the leaked gradient (absolute std)", noise,
                        PlotSpec("noise_std", "Gaussian noise std (absolute)", logx=True, zero_at=1e-4)),
    "prune": Experiment("prune", "top-k gradient pruning", prune,
                        PlotSpec("prune_ratio", "pruned fraction of gradient entries")),
    "dpsgd": Experiment("dpsgd", "DP-SGD clipping + noise", dpsgd,
                        PlotSpec("noise_multiplier", "DP-SGD noise multiplier (clip norm 1)", logx=True, zero_at=1e-3)),
    "compression": Experiment("compression", "quantised and sign-compressed gradients", compression),
    "shift": Experiment("shift", "distribution shift between the prior's data and the private data", shift),
    "discrepancy": Experiment("discrepancy", "victim params drifted from the prior's", discrepancy,
                              PlotSpec("discrepancy", "discrepancy", panel_xlabels=(
                                  ("steps", "client's extra SGD steps K"),
                                  ("relative", "relative L2 size of the parameter noise")))),
    "batch": Experiment("batch", "images per leaked gradient", batch,
                        PlotSpec("batch_size", "victim batch size B", logx=True)),
    "fedavg": Experiment("fedavg", "FedAvg local steps", fedavg, PlotSpec("local_steps", "FedAvg local steps K")),
}
