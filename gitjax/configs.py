"""Configs of the offline prior trainer (``gitjax.train``): one frozen dataclass and named presets.

Every preset below starts with the command that runs it, how long it takes and
the number it should reach (measured; see the docstrings). ``tiny`` is what the
tests use.

Configs are plain data: ``config_to_dict``/``config_from_dict`` round-trip them
through JSON (tuples become lists and back), which is how a config is saved
next to each checkpoint and checked on resume.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Callable, Mapping

import numpy as np

from gitjax.generators import GeneratorConfig
from gitjax.stream import StreamConfig
from gitjax.types import GitjaxError


class ConfigError(GitjaxError):
    """A training config is inconsistent or names something that does not exist."""


# ----------------------------------------------------------------------------- perturbations


@dataclasses.dataclass(frozen=True)
class Perturbation:
    """One augmentation of the leaked gradients during prior training (a defence from gitjax.defenses).

    GIT claims robustness to noisy and pruned gradients (Chen & Liu 2025, arXiv
    2505.20026, robustness section); the trainer gets it by showing the generator
    defended gradients. Build with :func:`perturb`.

    Attributes:
      defense: a name in ``gitjax.defenses.DEFENSES`` ("gaussian", "prune", ...);
        per-example defences ("dpsgd") are not supported (the trainer leaks batch gradients).
      params: fixed hyper-parameters, ((name, value), ...).
      ranges: sampled hyper-parameters, ((name, low, high), ...). Each step picks
        one of ``levels`` evenly spaced values in [low, high] (the same level
        index for every ranged name); the defences close over Python numbers, so
        the trainer compiles one branch per level and ``lax.switch``es between them.
      levels: number of values a range is discretised into (>= 2 when ranges are given).
      prob: probability that one of the N gradients of a step is perturbed at
        all (independently per gradient), so the generator also keeps seeing clean ones.
    """

    defense: str
    params: tuple[tuple[str, Any], ...] = ()
    ranges: tuple[tuple[str, float, float], ...] = ()
    levels: int = 8
    prob: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple((str(k), freeze(v)) for k, v in self.params))
        object.__setattr__(self, "ranges", tuple((str(k), float(lo), float(hi)) for k, lo, hi in self.ranges))

    def level_values(self) -> list[dict[str, Any]]:
        """Hyper-parameters of each level: [{name: value, ...}] (one entry when no ranges)."""
        fixed = dict(self.params)
        if not self.ranges:
            return [fixed]
        out = []
        for i in range(self.levels):
            t = i / (self.levels - 1)
            out.append({**fixed, **{k: lo + t * (hi - lo) for k, lo, hi in self.ranges}})
        return out


def perturb(defense: str, prob: float = 1.0, levels: int = 8, **kwargs: Any) -> Perturbation:
    """``perturb("gaussian", std=(0.0, 1e-2), prob=0.5)``: a (low, high) tuple makes a sampled range."""
    params, ranges = [], []
    for k, v in kwargs.items():
        if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(x, (int, float)) for x in v):
            ranges.append((k, float(v[0]), float(v[1])))
        else:
            params.append((k, v))
    return Perturbation(defense, tuple(params), tuple(ranges), levels, prob)


# ----------------------------------------------------------------------------- train config


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a prior-training run (frozen; hashable; JSON round-trip).

    Attributes:
      victim: victim model name (gitjax.victims.make_victim); victim_kwargs go to
        its factory as ((name, value), ...), e.g. (("norm", "group"),).
      victim_pretrain_steps, victim_pretrain_lr, victim_pretrain_batch: the
        attacker's copy of the victim starts from ``seed`` and may be trained this
        many SGD steps on the auxiliary train split first (0: a freshly
        initialised model, round 0 of FL, as in DLG). The resulting parameters
        are saved with every checkpoint and used again at attack time.
      dataset: auxiliary (public) data, gitjax.data.load_dataset name. Its "train"
        split minus the validation part (gitjax.data.split_validation: held-out
        train photographs, or every 10th example) feeds training; the validation
        part is evaluated during training and picks the best checkpoint; the
        "test" split is evaluated at step 0 and at the end only (final numbers).
      stream: the streaming training source (gitjax.stream.StreamConfig): with any
        positive weight, every step draws fresh images (photo crops, dead leaves,
        1/f noise, augmented dataset images) inside the jitted step from a key of
        (seed, step); all weights 0 (the default) trains on the fixed examples of
        the dataset's train split, indexed by (seed, step).
      generator: the generator (gitjax.generators.GeneratorConfig); its
        batch_size must equal ``victim_batch``.
      victim_batch: B, images behind one leaked gradient (the batch mean over B).
      global_batch: N, leaked gradients per training step over all devices and hosts.
      steps, lr, warmup, schedule, end_lr_ratio, decay_at: AdamW learning rate; "warmup_cosine"
        ramps linearly over ``warmup`` steps to lr and decays by cosine to
        lr * end_lr_ratio at ``steps``; "constant" keeps lr after the warm-up;
        "step" keeps lr and multiplies it by end_lr_ratio from step
        ``decay_at * steps`` on (LTI's recipe: /10 at 75 %).
      weight_decay, grad_clip: AdamW decoupled weight decay; global-norm clipping (0: off).
      ema_decay: EMA of the generator params (0: EMA = current params); eval and
        ``load_prior`` use the EMA params.
      mse_weight, tv_weight: loss = mse_weight * MSE(G(g), x) + tv_weight * TV(G(g)).
      perturbations: gradient augmentations applied in order (see Perturbation).
      param_discrepancy: (low, high) relative size of the noise added to the
        victim params before the step's gradients are computed (one draw per
        step from ``discrepancy_levels`` values, gitjax.discrepancy.perturb_params);
        the generator still sees the unperturbed copy, as at attack time.
      sort_by_label: order the B images of every group by (label, mean intensity)
        before regressing. A batch-mean gradient is invariant to the order of its
        B images, so without a canonical order the best fixed-order regressor
        outputs their average; this order is recoverable from the gradient (labels
        from the head's gradient). No effect for B = 1.
      seed: everything random derives from it (victim init, generator init,
        per-step data indices, augmentation keys).
      eval_gradients: held-out (gradient, images) pairs from the validation part
        (val loss / PSNR) and from the test split (test loss / PSNR), each (rounded
        up to a multiple of the device count).
      init_from: a trained prior (a run dir) to start from instead of a fresh init: its
        generator params (also as the EMA) and its victim copy; the optimiser and the
        schedule start fresh. Its victim and generator config must equal this run's (a
        fine-tune, e.g. under a defence: lenet_robust). "" (default): fresh init.
      checkpoint_every, keep_checkpoints, log_every, eval_every: in steps (0: never;
        the last step always checkpoints, logs and evaluates).
    """

    victim: str = "lenet"
    victim_kwargs: tuple[tuple[str, Any], ...] = ()
    victim_pretrain_steps: int = 0
    victim_pretrain_lr: float = 0.1
    victim_pretrain_batch: int = 64
    dataset: str = "patches"
    generator: GeneratorConfig = dataclasses.field(default_factory=lambda: GeneratorConfig(kind="coarse"))
    stream: StreamConfig = dataclasses.field(default_factory=StreamConfig)
    victim_batch: int = 1
    global_batch: int = 64
    steps: int = 2000
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "warmup_cosine"
    end_lr_ratio: float = 0.01
    decay_at: float = 0.75
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    mse_weight: float = 1.0
    tv_weight: float = 0.0
    perturbations: tuple[Perturbation, ...] = ()
    param_discrepancy: tuple[float, float] = (0.0, 0.0)
    discrepancy_levels: int = 8
    sort_by_label: bool = True
    seed: int = 0
    init_from: str = ""
    eval_gradients: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50
    eval_every: int = 250

    # Fields that may change between a run and its resumption (they do not change the math).
    RUNTIME_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "checkpoint_every", "keep_checkpoints", "log_every", "eval_every",
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "victim_kwargs", tuple((str(k), freeze(v)) for k, v in dict(self.victim_kwargs).items()))
        object.__setattr__(self, "perturbations", tuple(self.perturbations))
        object.__setattr__(self, "param_discrepancy", tuple(float(x) for x in self.param_discrepancy))

    def validate(self) -> "TrainConfig":
        """Raises ConfigError naming every inconsistent field; returns self."""
        problems = []
        for name in ("victim_batch", "global_batch", "steps", "eval_gradients", "victim_pretrain_batch"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "victim_pretrain_steps", "checkpoint_every", "log_every", "eval_every"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        gen_b = getattr(self.generator, "batch_size", self.victim_batch)
        if gen_b != self.victim_batch:
            problems.append(f"generator.batch_size={gen_b} must equal victim_batch={self.victim_batch}")
        if self.schedule not in ("warmup_cosine", "constant", "step"):
            problems.append(f"schedule must be 'warmup_cosine', 'constant' or 'step', got {self.schedule!r}")
        if not 0.0 < self.decay_at <= 1.0:
            problems.append(f"decay_at must be in (0, 1], got {self.decay_at}")
        if not isinstance(self.stream, StreamConfig):
            problems.append(f"stream must be a StreamConfig, got {type(self.stream).__name__}")
        else:
            problems += self.stream.problems()
            from gitjax.data import VALIDATION_SOURCES

            if self.stream.photos > 0 and self.dataset not in VALIDATION_SOURCES:
                problems.append(f"stream.photos > 0 crops the source photos of a photo dataset "
                                f"({', '.join(VALIDATION_SOURCES)}), not of {self.dataset!r}; "
                                "use stream.dataset for other datasets")
        if self.warmup >= self.steps and self.schedule == "warmup_cosine":
            problems.append(f"warmup={self.warmup} must be < steps={self.steps}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0 or self.weight_decay < 0 or self.grad_clip < 0:
            problems.append(f"need lr > 0, weight_decay >= 0, grad_clip >= 0; got {self.lr}, "
                            f"{self.weight_decay}, {self.grad_clip}")
        lo, hi = (self.param_discrepancy + (0.0, 0.0))[:2]
        if len(self.param_discrepancy) != 2 or not 0.0 <= lo <= hi:
            problems.append(f"param_discrepancy must be (low, high) with 0 <= low <= high, got {self.param_discrepancy}")
        if hi > 0 and lo < hi and self.discrepancy_levels < 2:
            problems.append(f"discrepancy_levels must be >= 2 for a range, got {self.discrepancy_levels}")
        problems += _perturbation_problems(self.perturbations)
        if problems:
            raise ConfigError("invalid TrainConfig: " + "; ".join(problems))
        return self

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


def _perturbation_problems(perturbations: tuple[Perturbation, ...]) -> list[str]:
    from gitjax.defenses import DEFENSES, make_defense

    problems = []
    for i, p in enumerate(perturbations):
        if not isinstance(p, Perturbation):
            problems.append(f"perturbations[{i}] must be a Perturbation, got {type(p).__name__}")
            continue
        if p.defense not in DEFENSES:
            problems.append(f"perturbations[{i}]: unknown defence {p.defense!r}; available: {', '.join(DEFENSES)}")
            continue
        if not 0.0 <= p.prob <= 1.0:
            problems.append(f"perturbations[{i}].prob must be in [0, 1], got {p.prob}")
        if p.ranges and p.levels < 2:
            problems.append(f"perturbations[{i}].levels must be >= 2 for a range, got {p.levels}")
        try:
            for kw in p.level_values():
                t = make_defense(p.defense, **kw)
                if getattr(t, "per_example", False):
                    problems.append(f"perturbations[{i}]: {p.defense!r} needs per-example gradients; "
                                    "the trainer augments batch gradients")
                    break
        except ValueError as e:
            problems.append(f"perturbations[{i}]: {e}")
    return problems


# ----------------------------------------------------------------------------- dict <-> config


def freeze(v: Any) -> Any:
    """Lists (from JSON) -> tuples and mappings -> key-sorted ((key, value), ...), recursively.

    The one freezer of gitjax's frozen configs and specs (trainer configs, study runs,
    pipeline cache keys): the result is hashable and equal for equal content.
    """
    if isinstance(v, (list, tuple)):
        return tuple(freeze(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), freeze(x)) for k, x in v.items()))
    return v


def jsonable(v: Any) -> Any:
    """Plain JSON values of a (nested) config: dataclasses -> dicts, tuples -> lists, numpy scalars -> numbers.

    A value with a ``to_json()`` method gives its own form (e.g. ``gitjax.study.Defense``).
    Also usable as ``json.dumps(..., default=jsonable)``.
    """
    if hasattr(v, "to_json") and not isinstance(v, type):
        return v.to_json()
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def config_to_dict(config: TrainConfig) -> dict[str, Any]:
    """A JSON-serialisable dict (victim_kwargs as a dict, tuples as lists)."""
    d = jsonable(config)
    d["victim_kwargs"] = {k: jsonable(v) for k, v in config.victim_kwargs}
    return d


def _dataclass_from_dict(cls: type, d: Mapping[str, Any], where: str) -> Any:
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a dict for {cls.__name__}, got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown {cls.__name__} fields {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for k, v in d.items():
        hint = hints.get(k)
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _dataclass_from_dict(hint, v, f"{where}.{k}")
        else:
            kwargs[k] = freeze(v)
    return cls(**kwargs)


def config_from_dict(d: Mapping[str, Any]) -> TrainConfig:
    """Inverse of ``config_to_dict``; raises ConfigError for unknown fields."""
    d = dict(d)
    perts = [_dataclass_from_dict(Perturbation, p, f"perturbations[{i}]") for i, p in enumerate(d.pop("perturbations", []))]
    kwargs = d.pop("victim_kwargs", {}) or {}
    cfg = _dataclass_from_dict(TrainConfig, d, "config")
    return dataclasses.replace(cfg, perturbations=tuple(perts), victim_kwargs=tuple(dict(kwargs).items()))


def config_diff(a: TrainConfig, b: TrainConfig, ignore: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
    """Field name -> (a's value, b's value) for the fields that differ (JSON form)."""
    da, db = config_to_dict(a), config_to_dict(b)
    return {k: (da.get(k), db.get(k)) for k in sorted(set(da) | set(db)) if k not in ignore and da.get(k) != db.get(k)}


# ----------------------------------------------------------------------------- presets


def tiny() -> TrainConfig:
    """python -m gitjax.train --preset tiny --workdir runs/tiny

    ~40 s on 2 shared CPU cores, most of it compilation. Test MSE of the EMA
    generator 0.113 -> ~0.075 (PSNR 9.9 -> 12.0 dB); tests assert a >= 20 % drop.
    The tests' preset: MLP(32) victim, small Coarse-GIT, N=8, B=1, 60 steps.
    """
    return TrainConfig(
        victim="mlp", victim_kwargs=(("widths", (32,)),),
        generator=GeneratorConfig(kind="coarse", batch_size=1, width=64),
        victim_batch=1, global_batch=8, steps=60, lr=3e-3, warmup=5, ema_decay=0.9,
        eval_gradients=32, checkpoint_every=0, log_every=10, eval_every=30,
    )


# Streamed training data of the converged LeNet presets: half random-resized crops of the six
# train photographs, a quarter dead leaves, a quarter 1/f^alpha noise (gitjax.stream).
STREAM_MIX = StreamConfig(photos=2.0, dead_leaves=1.0, spectral=1.0)


def stream_for(dataset: str) -> StreamConfig:
    """The streamed training data of a prior on ``dataset`` (no image seen twice in a run).

    A photo dataset (patches, textures): ``STREAM_MIX``, crops of its train photographs plus
    procedural images. Any other (digits, faces, tfds cifar10, ...): its own train images
    with random crops, flips and colour jitter (the stream's ``dataset`` component).
    """
    from gitjax.data import photo_dataset

    return STREAM_MIX if photo_dataset(dataset) else StreamConfig(dataset=1.0)


def prior_generator(kind: str, batch_size: int, **overrides: Any) -> GeneratorConfig:
    """The generator config of the converged presets for ``kind``: Coarse-GIT with the mirror
    decoder (16 channels at the top; it falls back to the latent decoder for victims without
    conv layers); Exact-GIT and LTI with their defaults. ``overrides`` win."""
    extra = {"coarse_decoder": "mirror", "decoder_channels": 16} if kind == "coarse" else {}
    return GeneratorConfig(kind=kind, batch_size=batch_size, **{**extra, **overrides})


def lenet_coarse() -> TrainConfig:
    """python -m gitjax.train --preset lenet_coarse --workdir runs/lenet_coarse

    Coarse-GIT on the DLG LeNet, one image per gradient (the paper's main setting), with
    the mirror decoder (16 channels at the top) on the stream: 27000 steps x 64 = 1.73M
    streamed examples (no image seen twice); the best checkpoint by validation PSNR
    (coffee patches) is what load_prior returns.
    Measured 2026-12-01 on the 2-core CPU (``gitjax train-prior --preset lenet_coarse
    --workdir runs/lenet_coarse``; two short test/benchmark jobs shared the CPU near steps
    1k-3k): 46.4 min wall. The VM slowed during the run: 790 examples/s at steps 5k-10k,
    520-560 in the last 5k with nothing else running; the same compiled step
    on the same state timed 76 ms before the run and 109 ms right after it (at 790 examples/s
    the run takes 36.5 min). Validation 10.50 -> 20.05 (1k steps) -> 22.35 (10k) -> 22.69
    (16k) -> best 22.85 dB at step 25000 (+0.05 dB over the last 20 %: converged); test
    22.28 dB (128 gradients), 22.24 dB on the 32 test patches of
    ``experiments.compare_generators`` (mean-colour oracle 19.10). The 16000-step form of this
    preset (1.02M examples, 30.6 min) reached 22.51 / 21.80 dB.
    Rerun 2026-12-07 on the same command with nothing else running: 36.6 min wall
    (12.4 steps/s; 700-895 examples/s, 5th-95th percentile), best validation 22.79 dB at
    step 26500 (+0.07 dB over the last 20 %), test
    22.30 dB (128 gradients): within the 45-minute budget on a 2-core CPU of that speed
    (runs of 2026-12-02 on a ~1.5x slower VM took 49.3 min).
    """
    return TrainConfig(
        victim="lenet",
        generator=prior_generator("coarse", 1),
        stream=stream_for("patches"),
        victim_batch=1, global_batch=64, steps=27000, lr=1e-3, warmup=200,
        eval_gradients=128, checkpoint_every=1000, log_every=100, eval_every=500,
    )


def lenet_exact() -> TrainConfig:
    """python -m gitjax.train --preset lenet_exact --workdir runs/lenet_exact

    Exact-GIT on the streamed mix with converging inversions: 256 CG steps per conv layer
    (64, the generic default, leave LeNet's conv inversions at ~22 dB), 16 for the implicit
    gradient; 200 steps x 32 = 6.4k examples. Measured 2026-11-30, 2-core CPU (not shared):
    10.5 min wall, 12.2 examples/s; validation (coffee patches) 41.41 dB untrained, best
    41.50 dB at step 50, 40.89 at 200; test 39.73 -> 39.86 dB (best checkpoint). On clean
    gradients the exact inversion does the work; training adjusts little. The demo's shipped
    prior is this run's best checkpoint, run with 512 CG steps at attack time (test: 50.05 dB
    on 32 patches; ``python -m experiments.exact_cg_iters``).
    """
    return dataclasses.replace(
        lenet_coarse(),
        generator=GeneratorConfig(kind="exact", batch_size=1, exact_cg_iters=256, exact_cg_grad_iters=16),
        global_batch=32, steps=200, warmup=20, checkpoint_every=100, log_every=10, eval_every=50,
    )


def lenet_lti() -> TrainConfig:
    """python -m gitjax.train --preset lenet_lti --workdir runs/lenet_lti

    LTI (Wu et al. 2023) with its recipe on the same streamed data and as many
    examples as lenet_coarse: the full flat gradient (15.8k entries, no projection)
    into two hidden layers of 500 units (the paper's 3000: lenet_lti_paper, a GPU job;
    1000 units measured ~2x the CPU time of 500), Adam 1e-4 (no weight decay, no
    clipping), batch 256, learning rate /10 at 75 %; 6750 steps x 256 = 1.73M examples.
    Measured 2026-12-01 on the 2-core CPU (the VM ran ~1.4x slower than earlier that day):
    28.2 min wall, ~950-1150 examples/s; validation 9.82 -> 17.35 (1k steps) -> 19.42 (3.25k)
    -> 20.26 dB at step 6750 (+0.07 dB over the last 20 %); test 19.16 dB (128 gradients),
    19.47 dB on the 32 test patches of ``experiments.compare_generators``: 0.4 dB above the
    mean-colour oracle (19.10), 2.8 dB below lenet_coarse.
    """
    from gitjax.generators.lti import CPU_HIDDEN, paper_config

    return dataclasses.replace(
        lenet_coarse(), generator=paper_config(1, hidden=CPU_HIDDEN), global_batch=256, steps=6750,
        lr=1e-4, warmup=0, schedule="step", end_lr_ratio=0.1, decay_at=0.75, weight_decay=0.0, grad_clip=0.0,
        checkpoint_every=500, log_every=50, eval_every=250,
    )


def lenet_lti_paper() -> TrainConfig:
    """python -m gitjax.train --preset lenet_lti_paper --workdir runs/lenet_lti_paper

    lenet_lti with the paper's MLP-3000 (66M parameters, ~0.4 GFLOP per example): for
    the GPU suite. Time and PSNR: expected, not yet measured (on 2 CPU cores ~3-4 h,
    scaling the 1000-unit measurement in lenet_lti by the parameter count).
    """
    from gitjax.generators.lti import paper_config

    return dataclasses.replace(lenet_lti(), generator=paper_config(1))


def lenet_noise() -> TrainConfig:
    """python -m gitjax.train --preset lenet_noise --workdir runs/lenet_noise

    The matched prior for Gaussian gradient noise of std 1e-2: lenet_coarse (``init_from=
    "runs/lenet_coarse"``, train that first) fine-tuned 2000 steps x 64 with noise on every
    gradient, std on 16 levels over [0.5x, 2x] the tested one ([5e-3, 2e-2]).
    Measured 2026-12-02, 2-core CPU, from the 27000-step lenet_coarse: 5.6 min wall; validation
    under the same noise 12.72 -> 17.42 dB (best at the last step, +0.06 over the last 25 %); at
    std 1e-2 on the 32 test patches one-shot 17.56 dB, GIT+IG(200) 17.02 dB, IG(200) 15.71 dB:
    +1.85 dB (``python -m experiments.robust_check --prior matched=runs/lenet_noise --conditions
    noise-1e-2``; 2026-12-01, before GIT+IG's fix: 17.61 / 17.62, +1.91; from the 16000-step
    base: 17.69 / 17.86 dB, +2.15).
    """
    return dataclasses.replace(
        lenet_coarse(), init_from="runs/lenet_coarse", steps=2000, lr=3e-4, warmup=50,
        checkpoint_every=500, eval_every=500,
        perturbations=(perturb("gaussian", std=(5e-3, 2e-2), prob=1.0, levels=16),),
    )


def lenet_patches() -> TrainConfig:
    """python -m gitjax.train --preset lenet_patches --workdir runs/lenet_patches

    ~4 min on 2 shared CPU cores, ~400 examples/s. The former lenet_coarse: Coarse-GIT on
    LeNet trained on the fixed train patches (1161 without the validation photo), 1000 x 64
    examples. Test PSNR 9.9 -> ~17.5 dB, plateauing from step 500 (measured with all seven
    photos; more steps only overfit). The base of the fixed-data presets below.
    """
    return TrainConfig(
        victim="lenet",
        generator=GeneratorConfig(kind="coarse", batch_size=1),
        victim_batch=1, global_batch=64, steps=1000, lr=1e-3, warmup=50,
        checkpoint_every=250, log_every=50, eval_every=250,
    )


def lenet_coarse_b4() -> TrainConfig:
    """python -m gitjax.train --preset lenet_coarse_b4 --workdir runs/lenet_coarse_b4

    ~11 min (660 s) on 2 shared CPU cores, ~55 gradients/s (220 images/s). Test MSE
    0.108 -> 0.049 (PSNR 10.0 -> 14.3 dB, images compared in the label-sorted order),
    still falling at the end.
    Coarse-GIT on LeNet with four images behind each batch-mean gradient.
    """
    return dataclasses.replace(
        lenet_patches(), generator=GeneratorConfig(kind="coarse", batch_size=4), victim_batch=4, global_batch=32,
    )


def lenet_robust() -> TrainConfig:
    """python -m gitjax.train --preset lenet_robust --workdir runs/lenet_robust

    Fine-tunes the converged lenet_coarse prior (``init_from="runs/lenet_coarse"``: train
    that preset into that folder first) with matched augmentation for the robustness
    checks: half of the gradients get Gaussian noise (absolute std on a 1e-3 grid over
    [0, 2e-2]), half top-k pruning (ratio on a 0.005 grid over [0.8, 0.995]), so the tested
    levels (std 1e-3 and 1e-2; 90 % and 99 %) lie inside the trained ranges; 1500 steps x
    64 = 96k streamed examples at lr 3e-4. Measured 2026-12-01 on the 2-core CPU from the
    27000-step lenet_coarse: 6.0 min wall (4.8 without the matched evaluations); validation
    under the same augmentation 15.78 -> 18.32 dB (best at the last step, +0.02 over the last
    250); on the 32 test patches one-shot 19.67 / 16.46 / 17.81 / 15.53 dB at noise std 1e-3 /
    1e-2 and pruning 90 / 99 % (IG(200): 20.55 / 15.71 / 17.56 / 5.39); docs/results.md.
    """
    return dataclasses.replace(
        lenet_coarse(), init_from="runs/lenet_coarse", steps=1500, lr=3e-4, warmup=50,
        checkpoint_every=500, eval_every=250,
        perturbations=(perturb("gaussian", std=(0.0, 2e-2), prob=0.5, levels=21),
                       perturb("prune", ratio=(0.8, 0.995), prob=0.5, levels=40)),
    )


def resnet8_coarse() -> TrainConfig:
    """python -m gitjax.train --preset resnet8_coarse --workdir runs/resnet8_coarse

    ~5 min (310 s) on 2 shared CPU cores, ~130 examples/s. Test MSE 0.111 -> 0.026
    (PSNR 16.9 dB), flat from step 750.
    Coarse-GIT on a small GroupNorm ResNet (per-example gradients stay per-example).
    """
    return dataclasses.replace(
        lenet_patches(), victim="resnet8", victim_kwargs=(("norm", "group"),), global_batch=32,
    )


_PRESET_FNS: tuple[Callable[[], TrainConfig], ...] = (
    tiny, lenet_coarse, lenet_exact, lenet_lti, lenet_lti_paper, lenet_noise, lenet_patches, lenet_coarse_b4,
    lenet_robust,
    resnet8_coarse,
)

PRESETS: dict[str, TrainConfig] = {f.__name__: f() for f in _PRESET_FNS}


def describe_presets() -> dict[str, str]:
    """Preset name -> its docstring (command, time, expected number)."""
    return {f.__name__: (f.__doc__ or "").strip() for f in _PRESET_FNS}


def get_preset(name: str, **overrides: Any) -> TrainConfig:
    """A preset with fields replaced, e.g. get_preset("tiny", steps=10)."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    try:
        return dataclasses.replace(PRESETS[name], **overrides)
    except TypeError as e:
        raise ConfigError(f"bad override for preset {name!r}: {e}") from None
