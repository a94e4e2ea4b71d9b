"""The robustness study: the experiment matrix of GIT's robustness section, as reproducible runs.

Chen & Liu 2025 (arXiv 2505.20026) claim GIT stays accurate under inaccurate
gradients (noise, pruning), distribution shift and parameter discrepancy. This
module turns such a claim into a grid of independent *runs*: one victim, one
method, one attack-time defence, one data pair, one discrepancy, one batch size,
at one compute budget. The grids themselves live in ``experiments/configs.py``.

A run is pure data (:class:`Run`); its key is a short hash of its canonical
JSON, so results are content-addressed::

    out/<experiment>/<run_key>.json     config + metrics + status of one run
    out/<experiment>/table.md           rows = settings, columns = methods (PSNR / SSIM)
    out/<experiment>/psnr_vs_*.png      PSNR against the swept quantity, one curve per method
    out/priors/<victim>-<kind>-<key>/   trained priors, shared by every run that needs the same one

A prior (a trained GIT / LTI generator) is keyed by its own training config
(victim, generator kind, training data, training-time perturbation, B, steps,
seed), so every noise level that attacks with a clean prior reuses one.

Each row: leak the gradients of N groups of B test images at the client's
params (possibly discrepant from the attacker's copy, possibly FedAvg over K
local steps), apply the defence, run the method, score matched PSNR/SSIM/MSE.
A row that raises or outputs non-finite images is recorded as ``failed`` with
its reason; the others go on. A rerun skips rows whose JSON says ``ok``.

Entry points: :func:`run_experiment` (library), :func:`main` (``python -m
experiments.run`` and ``gitjax experiment``).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim

SCALES = ("small", "full")
PRIOR_DIR = "priors"
_PRIOR_DONE = "study_prior.json"  # written once a prior finished training

# ----------------------------------------------------------------------------- run description


def _freeze(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, Mapping):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    return v


@dataclasses.dataclass(frozen=True)
class Defense:
    """An attack-time defence: a ``gitjax.defenses`` name and its hyper-parameters ((name, value), ...)."""

    name: str = "none"
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted((str(k), _freeze(v)) for k, v in dict(self.params).items())))

    @classmethod
    def of(cls, name: str, **params: Any) -> "Defense":
        return cls(name, tuple(params.items()))

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return f"{self.name}(" + ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in self.params) + ")"


@dataclasses.dataclass(frozen=True)
class Budget:
    """The compute scale of a run (what ``--scale small|full`` changes).

    Attributes:
      image_size: S of the S x S test images (the prior trainer loads its data at 32).
      prior_steps, prior_batch, prior_lr, prior_warmup: prior training (TrainConfig
        steps, global_batch N (a multiple of the device count), lr, warmup).
      prior_eval: held-out gradients scored at the end of prior training.
      generator_width: width of the generator blocks (None: the generator's default).
      victim_pretrain_steps: SGD steps on the auxiliary data before leaking (0: round 0 of FL).
      attack_steps: IG iterations (also the refinement of GIT+IG).
      ig_lr, ig_tv, ig_restarts: IG step size, total-variation weight, restarts.
      num_images: test images per row (N = max(1, num_images // B) leaked gradients).
      attack_chunk: leaked gradients attacked at once by the vmapped IG (0: all N).
      local_lr: client SGD step size (FedAvg local steps and 'steps' discrepancy).
      local_data: client's own examples for 'steps' discrepancy (from the attack dataset's train split).
    """

    image_size: int = 32
    prior_steps: int = 600
    prior_batch: int = 32
    prior_lr: float = 1e-3
    prior_warmup: int = 50
    prior_eval: int = 32
    generator_width: int | None = None
    victim_pretrain_steps: int = 0
    attack_steps: int = 200
    ig_lr: float = 0.1
    ig_tv: float = 1e-2
    ig_restarts: int = 1
    num_images: int = 8
    attack_chunk: int = 0
    local_lr: float = 0.1
    local_data: int = 256


def _presentation(default: Any) -> Any:
    """A Run field that labels tables and plots but is not part of the run's identity."""
    return dataclasses.field(default=default, compare=False, metadata={"key": False})


@dataclasses.dataclass(frozen=True)
class Run:
    """One cell of an experiment matrix (pure data; hashable; JSON round-trip).

    Attributes:
      experiment: experiment name (results go to ``out/<experiment>/``).
      victim, victim_kwargs: ``make_victim`` name and factory arguments.
      method: a key of :data:`METHODS` ('lti', 'coarse', 'exact', 'ig', 'git+ig', ...).
      defense: the attack-time defence applied to every leaked gradient.
      prior_training: 'clean' (the prior never saw a defence) or 'matched'
        (trained on gradients under this run's defence / discrepancy).
      train_dataset: the attacker's auxiliary data (prior training; the victim's normalisation).
      attack_dataset: where the private test images come from (distribution shift if different).
      discrepancy, discrepancy_amount: 'none'; 'steps' (the client trained its copy
        ``amount`` more SGD steps on its own data); 'relative' (client params =
        attacker's + noise of relative L2 size ``amount``).
      batch_size: B images behind one leaked gradient.
      local_steps: K FedAvg local steps (1: FedSGD, the plain batch gradient).
      labels_known: give the true labels to IG (else recovered from the gradient).
      budget: the compute scale.
      seed: data selection, victim init, defence noise, attack init.
      setting, x, panel: table row label, numeric x for plots, plot panel (not in the key).
    """

    experiment: str
    victim: str
    method: str
    defense: Defense = Defense()
    prior_training: str = "clean"
    train_dataset: str = "patches"
    attack_dataset: str = "patches"
    discrepancy: str = "none"
    discrepancy_amount: float = 0.0
    batch_size: int = 1
    local_steps: int = 1
    labels_known: bool = False
    victim_kwargs: tuple[tuple[str, Any], ...] = ()
    budget: Budget = Budget()
    seed: int = 0
    setting: str = _presentation("")
    x: float | None = _presentation(None)
    panel: str = _presentation("")

    def __post_init__(self) -> None:
        object.__setattr__(self, "victim_kwargs", _freeze(dict(self.victim_kwargs)))

    @property
    def column(self) -> str:
        """Table column / plot curve of this run: the method, tagged when its prior is matched."""
        return f"{self.method} (matched prior)" if self.prior_training == "matched" else self.method


def run_to_dict(run: Run) -> dict[str, Any]:
    """The run's identity as plain JSON values (presentation fields excluded)."""
    out = {}
    for f in dataclasses.fields(run):
        if f.metadata.get("key", True):
            out[f.name] = _jsonable(getattr(run, f.name))
    return out


def _jsonable(v: Any) -> Any:
    if isinstance(v, Defense):
        return {"name": v.name, "params": {k: _jsonable(x) for k, x in v.params}}
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _jsonable(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (np.integer, np.floating)):
        return v.item()
    return v


def _hash(obj: Any, n: int = 12) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:n]


def run_key(run: Run) -> str:
    """12 hex digits of sha256 over the canonical JSON of :func:`run_to_dict`."""
    return _hash(run_to_dict(run))


# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass
class Context:
    """What a method sees for one row (the attacker's view plus the truth for scoring).

    Attributes:
      victim, params, state: the architecture and the attacker's copy of the params
        (the prior's; a discrepant client leaked at other params).
      grads_N: the N leaked (defended) gradients, leaves (N, *param).
      x_NxBxHxWxC, y_NxB: the private images and labels (for scoring; labels go to
        IG only when ``run.labels_known``).
      prior: ``gitjax.attacks.git.Prior`` for methods with a prior kind, else None.
    """

    run: Run
    victim: Victim
    params: Params
    state: ModelState
    grads_N: Grads
    x_NxBxHxWxC: np.ndarray
    y_NxB: np.ndarray
    prior: Any = None


MethodFn = Callable[[Context, PRNGKey], tuple[Array, Array | None]]


@dataclasses.dataclass(frozen=True)
class Method:
    """fn(ctx, key) -> (images (N, B, H, W, C), labels (N, B) or None); prior_kind: generator kind or None."""

    fn: MethodFn
    prior_kind: str | None = None
    description: str = ""


@functools.cache
def _generate():
    """jit(vmap(git.attack)): N leaked gradients -> (N, B, H, W, C) one-shot reconstructions, clipped as in
    the trainer's evaluation."""
    from gitjax.attacks.git import attack

    return jax.jit(lambda prior, grads_N: jnp.clip(jax.vmap(attack, in_axes=(None, 0))(prior, grads_N), 0.0, 1.0))


def _one_shot(ctx: Context, key: PRNGKey) -> tuple[Array, None]:
    del key  # a forward pass: deterministic
    return _generate()(ctx.prior, ctx.grads_N), None


def _ig_config(budget: Budget):
    from gitjax.attacks.ig import IGConfig

    return IGConfig(steps=budget.attack_steps, lr=budget.ig_lr, tv_weight=budget.ig_tv,
                    restarts=budget.ig_restarts, record_every=0)


def ig_batched(ctx: Context, key: PRNGKey, x_init_NxBxHxWxC: Array | None = None) -> tuple[Array, Array]:
    """Inverting Gradients (Geiping et al. 2020) on the N leaked gradients, vmapped, ``attack_chunk`` at a time."""
    from gitjax.attacks.batched import batched_attack

    run = ctx.run
    n, b = ctx.y_NxB.shape
    config = _ig_config(run.budget)
    chunk = run.budget.attack_chunk or n
    xs, ys = [], []
    for i, s in enumerate(range(0, n, chunk)):
        sl = slice(s, s + chunk)
        x, info = batched_attack(
            "ig", ctx.victim, ctx.params, ctx.state, jax.tree_util.tree_map(lambda a: a[sl], ctx.grads_N),
            jnp.asarray(ctx.y_NxB[sl]) if run.labels_known else None, jax.random.fold_in(key, i), config,
            batch_size=b, x_init_N=None if x_init_NxBxHxWxC is None else x_init_NxBxHxWxC[sl])
        xs.append(x)
        ys.append(info["labels"])
    return jnp.concatenate(xs), jnp.concatenate(ys)


def _git_ig(ctx: Context, key: PRNGKey) -> tuple[Array, Array]:
    x_git = _generate()(ctx.prior, ctx.grads_N)
    return ig_batched(ctx, key, x_init_NxBxHxWxC=x_git)


METHODS: dict[str, Method] = {
    "lti": Method(_one_shot, "lti", "Learning to Invert (Wu et al. 2023): one MLP, flat gradient -> images"),
    "coarse": Method(_one_shot, "coarse", "Coarse-GIT: per-layer MLP blocks mirroring the victim in reverse"),
    "exact": Method(_one_shot, "exact", "Exact-GIT: the backward pass inverted layer by layer (pseudo-inverses + learned parts)"),
    "ig": Method(ig_batched, None, "Inverting Gradients (Geiping et al. 2020) from a random start"),
    "git+ig": Method(_git_ig, "coarse", "IG initialised at Coarse-GIT's output (GIT as a prior)"),
}


def register_method(name: str, method: Method) -> None:
    """Adds (or replaces) a method, e.g. a new baseline, or a failing one in tests."""
    METHODS[name] = method


# ----------------------------------------------------------------------------- priors


def prior_config(run: Run):
    """The ``gitjax.configs.TrainConfig`` of the prior ``run`` needs (None for prior-free methods)."""
    from gitjax.configs import TrainConfig, perturb
    from gitjax.generators import GeneratorConfig

    kind = METHODS[run.method].prior_kind
    if kind is None:
        return None
    b = run.budget
    gen_kw = {"kind": kind, "batch_size": run.batch_size}
    if b.generator_width is not None:
        gen_kw["width"] = b.generator_width
    perturbations, discrepancy = (), (0.0, 0.0)
    if run.prior_training == "matched":
        if run.defense.name != "none":
            perturbations = (perturb(run.defense.name, **run.defense.kwargs),)
        if run.discrepancy == "relative" and run.discrepancy_amount > 0:
            discrepancy = (0.0, float(run.discrepancy_amount))
        if not perturbations and discrepancy == (0.0, 0.0):
            raise GitjaxError(f"run {run.setting or run_key(run)}: a matched prior needs a defence or a "
                              "relative discrepancy to match")
    elif run.prior_training != "clean":
        raise GitjaxError(f"prior_training must be 'clean' or 'matched', got {run.prior_training!r}")
    return TrainConfig(
        victim=run.victim, victim_kwargs=run.victim_kwargs, victim_pretrain_steps=b.victim_pretrain_steps,
        dataset=run.train_dataset, generator=GeneratorConfig(**gen_kw), victim_batch=run.batch_size,
        global_batch=b.prior_batch, steps=b.prior_steps, lr=b.prior_lr, warmup=min(b.prior_warmup, b.prior_steps - 1),
        perturbations=perturbations, param_discrepancy=discrepancy, seed=run.seed, eval_gradients=b.prior_eval,
        checkpoint_every=0, keep_checkpoints=1, log_every=max(1, b.prior_steps // 10), eval_every=0,
    )


def prior_key(config) -> str:
    from gitjax.configs import config_to_dict

    return _hash(config_to_dict(config))


def prior_dir(out_dir: str | Path, config) -> Path:
    return Path(out_dir) / PRIOR_DIR / f"{config.victim}-{config.generator.kind}-{prior_key(config)}"


class PriorCache:
    """Trains each prior once (on disk, shared by runs and experiments) and loads it once per process."""

    def __init__(self, out_dir: str | Path, progress: bool = False):
        self.out_dir = Path(out_dir)
        self.progress = progress
        self._loaded: dict[str, Any] = {}
        self._failed: dict[str, str] = {}

    def get(self, config) -> tuple[Any, Any, dict[str, Any]]:
        """(git.Prior, loaded victim, record) for ``config``, training it first if needed."""
        from gitjax.attacks.git import Prior
        from gitjax.train import load_prior, train_prior

        key = prior_key(config)
        if key in self._failed:
            raise GitjaxError(f"prior {key} failed to train: {self._failed[key]}")
        if key in self._loaded:
            return self._loaded[key]
        workdir = prior_dir(self.out_dir, config)
        marker = workdir / _PRIOR_DONE
        if marker.exists():
            record = json.loads(marker.read_text())
        else:
            try:
                t0 = time.perf_counter()
                result = train_prior(config, workdir, resume=True, progress=self.progress)
                seconds = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - recorded on every run that needs this prior
                self._failed[key] = f"{type(e).__name__}: {e}"
                raise
            last = {k: v for r in result.history for k, v in r.items() if isinstance(v, (int, float))}
            record = {"key": key, "workdir": str(workdir), "train_seconds": seconds,
                      "final": {k: last[k] for k in ("step", "loss", "mse", "test_loss", "test_psnr") if k in last}}
            _write_json(marker, record)
        loaded = load_prior(workdir)
        prior = Prior(loaded.generator, loaded.gen_params, loaded.victim_params)
        entry = (prior, loaded, record)
        self._loaded[key] = entry
        return entry


# ----------------------------------------------------------------------------- one row


def attacker_victim(run: Run) -> tuple[Victim, Params, ModelState]:
    """The attacker's victim and params for a prior-free method: exactly those a prior for ``run`` would use."""
    return _attacker_victim(run.victim, run.victim_kwargs, run.train_dataset, run.seed,
                            run.budget.victim_pretrain_steps)


@functools.lru_cache(maxsize=16)
def _attacker_victim(victim: str, victim_kwargs: tuple, dataset: str, seed: int, pretrain_steps: int):
    from gitjax.configs import TrainConfig
    from gitjax.data import load_dataset
    from gitjax.train import build_victim, init_victim

    cfg = TrainConfig(victim=victim, victim_kwargs=victim_kwargs, dataset=dataset, seed=seed,
                      victim_pretrain_steps=pretrain_steps)
    ds = load_dataset(dataset, "train")
    v = build_victim(cfg, ds.image_shape, ds.num_classes, ds.mean, ds.std)
    params, state = init_victim(cfg, v, ds.images, ds.labels)
    return v, params, state


@functools.lru_cache(maxsize=64)
def _defense_transform(defense: Defense):
    from gitjax.defenses import make_defense

    return make_defense(defense.name, **defense.kwargs)


@functools.lru_cache(maxsize=64)
def _leak_fn(victim: Victim, defense: Defense, local_steps: int, local_lr: float):
    """jit(vmap): client params, N groups of B images -> N defended leaked gradients."""
    from gitjax.defenses import defended_gradient
    from gitjax.leakage import fedavg_update

    transform = _defense_transform(defense)
    per_example = bool(getattr(transform, "per_example", False))
    if per_example and local_steps > 1:
        raise GitjaxError(f"defence {defense.label} needs per-example gradients; FedAvg with "
                          f"{local_steps} local steps shares a model difference")

    def one(params, state, x_BxHxWxC, y_B, key):
        if local_steps > 1:
            return transform(key, fedavg_update(victim, params, state, x_BxHxWxC, y_B, local_steps, local_lr))
        return defended_gradient(victim, params, state, x_BxHxWxC, y_B, transform, key)

    def leak(params, state, x_NxBxHxWxC, y_NxB, key):
        keys_N = jax.random.split(key, x_NxBxHxWxC.shape[0])
        return jax.vmap(one, in_axes=(None, None, 0, 0, 0))(params, state, x_NxBxHxWxC, y_NxB, keys_N)

    return jax.jit(leak)


@jax.jit
def _leak_stats(params: Params, leaked_at: Params, grads_N: Grads, clean_N: Grads) -> dict[str, Array]:
    """One compiled pass: finiteness of the defended gradients, clean RMS, perturbation RMS, param distance."""
    from gitjax.discrepancy import relative_distance

    leaves = jax.tree_util.tree_leaves(grads_N)
    size = sum(a.size for a in leaves)
    sq = lambda t: sum(jnp.sum(jnp.square(a.astype(jnp.float32))) for a in jax.tree_util.tree_leaves(t))  # noqa: E731
    diff = jax.tree_util.tree_map(jnp.subtract, grads_N, clean_N)
    return {"finite": jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in leaves])),
            "grad_rms": jnp.sqrt(sq(clean_N) / size), "perturbation_rms": jnp.sqrt(sq(diff) / size),
            "param_distance": relative_distance(params, leaked_at)}


def client_params(run: Run, victim: Victim, params: Params, state: ModelState, key: PRNGKey) -> Params:
    """The params the client leaked at: the attacker's, or discrepant by K SGD steps / relative noise."""
    from gitjax.discrepancy import perturb_params, train_params_further

    amount = run.discrepancy_amount
    if run.discrepancy == "none" or amount == 0:
        return params
    if run.discrepancy == "relative":
        return perturb_params(key, params, float(amount))
    if run.discrepancy == "steps":
        from gitjax.data import load_dataset

        ds = load_dataset(run.attack_dataset, "train", image_size=run.budget.image_size,
                          channels=victim.input_shape[-1])
        n = min(len(ds), run.budget.local_data)
        labels = np.asarray(ds.labels[:n]) % victim.num_classes
        return train_params_further(victim, params, state, ds.images[:n], labels, steps=int(amount),
                                    lr=run.budget.local_lr, batch_size=min(32, n), key=key)
    raise GitjaxError(f"discrepancy must be 'none', 'steps' or 'relative', got {run.discrepancy!r}")


def private_batch(run: Run, victim: Victim) -> tuple[np.ndarray, np.ndarray]:
    """The private images (N, B, H, W, C) and labels (N, B): a seeded draw from the attack dataset's test split.

    Labels are taken modulo the victim's classes (a shifted dataset may have more).
    """
    from gitjax.data import load_dataset

    ds = load_dataset(run.attack_dataset, "test", image_size=run.budget.image_size,
                      channels=victim.input_shape[-1])
    b = run.batch_size
    n = max(1, run.budget.num_images // b)
    if n * b > len(ds):
        raise GitjaxError(f"{run.attack_dataset}/test has {len(ds)} images; the run needs {n * b}")
    idx = np.random.default_rng([run.seed, 0x7E57]).permutation(len(ds))[: n * b]
    x = ds.images[idx].reshape(n, b, *ds.image_shape)
    y = (ds.labels[idx] % victim.num_classes).astype(np.int32).reshape(n, b)
    return x, y


def score(recon_NxBxHxWxC: np.ndarray, x_NxBxHxWxC: np.ndarray, y_NxB: np.ndarray,
          labels_NxB: np.ndarray | None) -> dict[str, Any]:
    """Matched PSNR / SSIM / MSE (Hungarian matching within each group of B) and label accuracy."""
    from gitjax import metrics

    per = [metrics.evaluate(r, t, match=r.shape[0] > 1) for r, t in zip(recon_NxBxHxWxC, x_NxBxHxWxC)]
    out: dict[str, Any] = {}
    for m in ("psnr", "ssim", "mse"):
        vals = [v for p in per for v in p[f"{m}_per_image"]]
        out[m] = float(np.mean(vals))
        out[f"{m}_per_image"] = vals
    out["label_acc"] = None if labels_NxB is None else float(np.mean(
        [metrics.label_multiset_accuracy(p, t) for p, t in zip(labels_NxB, y_NxB)]))
    return out


_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compile_seconds = [0.0]  # running total of JAX's tracing + lowering + compilation time in this process


@functools.cache
def _watch_compiles() -> None:
    """Counts compile time (jax.monitoring events) so attack timings can leave it out."""

    def listen(event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            _compile_seconds[0] += duration

    jax.monitoring.register_event_duration_secs_listener(listen)


def execute(run: Run, priors: PriorCache) -> dict[str, Any]:
    """Runs one row; returns its record (raises on failure: :func:`run_runs` records it)."""
    if run.method not in METHODS:
        raise GitjaxError(f"unknown method {run.method!r}; available: {', '.join(METHODS)}")
    method = METHODS[run.method]
    timing: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timing[name] = now - t
        t = now

    record: dict[str, Any] = {"timing": timing}
    cfg = prior_config(run)
    prior = None
    if cfg is not None:
        prior, loaded, prior_record = priors.get(cfg)
        victim, params, state = loaded.victim, loaded.victim_params, loaded.victim_state
        record["prior"] = prior_record
    else:
        victim, params, state = attacker_victim(run)
    if victim.input_shape[0] != run.budget.image_size:
        raise GitjaxError(f"victim expects {victim.input_shape} images; the budget asks for size {run.budget.image_size}")
    # RBG keys: XLA:CPU compiles threefry noise for a whole gradient pytree ~5x slower.
    key = jax.random.key(run.seed, impl="rbg")
    k_client, k_leak, k_attack = jax.random.split(jax.random.fold_in(key, 0x57D1), 3)

    x_NxBxHxWxC, y_NxB = private_batch(run, victim)
    lap("setup")
    leaked_at = client_params(run, victim, params, state, k_client)
    leak = _leak_fn(victim, run.defense, run.local_steps, run.budget.local_lr)
    x_j, y_j = jnp.asarray(x_NxBxHxWxC), jnp.asarray(y_NxB)
    grads_N = leak(leaked_at, state, x_j, y_j, k_leak)
    clean_N = grads_N if run.defense.name == "none" else _leak_fn(victim, Defense(), run.local_steps,
                                                                   run.budget.local_lr)(leaked_at, state, x_j, y_j, k_leak)
    stats = {k: v.item() for k, v in jax.device_get(_leak_stats(params, leaked_at, grads_N, clean_N)).items()}
    if not stats.pop("finite"):
        raise GitjaxError(f"the defended gradient is not finite (defence {run.defense.label})")
    rms = stats["grad_rms"]
    record["leak"] = {**stats, "perturbation_to_signal": stats["perturbation_rms"] / rms if rms > 0 else None,
                      "num_gradients": int(y_NxB.shape[0]), "images": int(y_NxB.size)}
    lap("leak")

    ctx = Context(run, victim, params, state, grads_N, x_NxBxHxWxC, y_NxB, prior)
    _watch_compiles()
    compiled_before = _compile_seconds[0]
    recon, labels = method.fn(ctx, k_attack)
    recon = np.asarray(jax.block_until_ready(recon), np.float32)
    lap("attack")
    compile_s = _compile_seconds[0] - compiled_before
    if recon.shape != x_NxBxHxWxC.shape:
        raise GitjaxError(f"method {run.method!r} returned images of shape {recon.shape}; expected {x_NxBxHxWxC.shape}")
    if not np.all(np.isfinite(recon)):
        bad = int(np.sum(~np.isfinite(recon)))
        raise GitjaxError(f"non-finite reconstruction ({bad} of {recon.size} pixels NaN/inf)")
    record["metrics"] = score(recon, x_NxBxHxWxC, y_NxB, None if labels is None else np.asarray(labels))
    # Wall time of the attack, and without JAX's tracing/compilation (paid once per shape in a process).
    record["metrics"]["seconds"] = timing["attack"]
    record["metrics"]["compile_seconds"] = compile_s
    record["metrics"]["seconds_per_gradient"] = max(timing["attack"] - compile_s, 0.0) / y_NxB.shape[0]
    lap("score")
    record["_images"] = (x_NxBxHxWxC, recon)
    return record


# ----------------------------------------------------------------------------- many rows


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write (a killed run never leaves half a JSON behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=_jsonable))
    os.replace(tmp, path)


def run_path(out_dir: str | Path, run: Run) -> Path:
    return Path(out_dir) / run.experiment / f"{run_key(run)}.json"


def read_record(out_dir: str | Path, run: Run) -> dict[str, Any] | None:
    path = run_path(out_dir, run)
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def _short_reason(e: BaseException, limit: int = 300) -> str:
    text = f"{type(e).__name__}: {e}".strip().replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_runs(runs: Sequence[Run], out_dir: str | Path, *, retry_failed: bool = True, progress: bool = True,
             save_images: bool = True) -> list[dict[str, Any]]:
    """Executes ``runs`` (skipping finished ones); returns one record per run, in order.

    Each record is the run's JSON plus ``executed`` (False when it was skipped).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    priors = PriorCache(out_dir, progress=progress)
    records = []
    bar = tqdm(runs, desc="runs", unit="run", disable=not progress, dynamic_ncols=True)
    for run in bar:
        key = run_key(run)
        bar.set_postfix_str(f"{run.experiment} {run.victim} {run.column} {run.setting}"[:60])
        old = read_record(out_dir, run)
        if old is not None and (old.get("status") == "ok" or (old.get("status") == "failed" and not retry_failed)):
            records.append({**old, "executed": False})
            continue
        base = {"run_key": key, "experiment": run.experiment, "config": run_to_dict(run),
                "setting": run.setting, "column": run.column, "jax": jax.__version__,
                "backend": jax.default_backend()}
        try:
            result = execute(run, priors)
            images = result.pop("_images")
            rec = {**base, "status": "ok", "reason": None, **result}
            if save_images:
                _save_examples(out_dir / run.experiment / "images" / f"{key}.png", *images, run.column)
        except Exception as e:  # noqa: BLE001 - a failed row is data; the study goes on
            rec = {**base, "status": "failed", "reason": _short_reason(e),
                   "traceback": traceback.format_exc(limit=8)}
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        _write_json(run_path(out_dir, run), rec)
        records.append({**rec, "executed": True})
    bar.close()
    return records


def _save_examples(path: Path, x_NxBxHxWxC: np.ndarray, recon_NxBxHxWxC: np.ndarray, label: str) -> None:
    from gitjax.viz import save_grid

    shape = x_NxBxHxWxC.shape[2:]
    save_grid(path, [x_NxBxHxWxC.reshape(-1, *shape)[:16], recon_NxBxHxWxC.reshape(-1, *shape)[:16]],
              ["truth", label])


# ----------------------------------------------------------------------------- report


@dataclasses.dataclass(frozen=True)
class PlotSpec:
    """PSNR against ``Run.x``: one PNG per (victim, panel), one curve per column.

    zero_at: on a log axis, draw x = 0 at this value (the label says so).
    """

    name: str
    xlabel: str
    logx: bool = False
    zero_at: float | None = None
    panel_xlabels: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class Experiment:
    """A named grid: ``build(scale, smoke) -> runs``, and how to plot it."""

    name: str
    description: str
    build: Callable[[str, bool], list[Run]]
    plot: PlotSpec | None = None


def _cell(rec: dict[str, Any]) -> str:
    if rec.get("status") != "ok":
        reason = str(rec.get("reason") or "unknown")
        return "failed: " + (reason if len(reason) <= 80 else reason[:77] + "...")
    m = rec["metrics"]
    return f"{m['psnr']:.2f} / {m['ssim']:.3f}"


def _ordered(items: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(items))


def _pivot(runs: Sequence[Run], records: Mapping[str, dict[str, Any]], cell: Callable[[dict], Any],
           floatfmt: str = ".2f") -> str:
    """Markdown table: rows = (victim, setting), columns = method columns; only runs with a record."""
    from gitjax.viz import format_table

    done = [r for r in runs if run_key(r) in records]
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for r in done:
        row = rows.setdefault((r.victim, r.setting), {"victim": r.victim, "setting": r.setting})
        row[r.column] = cell(records[run_key(r)])
    return format_table(list(rows.values()), ["victim", "setting", *_ordered(r.column for r in done)], floatfmt)


def build_table(runs: Sequence[Run], records: Mapping[str, dict[str, Any]]) -> str:
    """Cells 'PSNR / SSIM', or 'failed: reason'."""
    return _pivot(runs, records, _cell)


def build_time_table(runs: Sequence[Run], records: Mapping[str, dict[str, Any]]) -> str:
    """Cells: attack seconds per leaked gradient without compilation."""
    return _pivot(runs, records, lambda rec: rec["metrics"]["seconds_per_gradient"] if rec.get("status") == "ok"
                  else None)


def write_report(exp: Experiment, runs: Sequence[Run], out_dir: str | Path, scale: str) -> dict[str, Any]:
    """Writes ``table.md`` and the plots of one experiment from the run JSONs on disk; returns their paths."""
    out = Path(out_dir) / exp.name
    out.mkdir(parents=True, exist_ok=True)
    records = {}
    for r in runs:
        rec = read_record(out_dir, r)
        if rec is not None:
            records[run_key(r)] = rec
    done = [r for r in runs if run_key(r) in records]
    failed = [(r, records[run_key(r)]) for r in done if records[run_key(r)].get("status") != "ok"]
    priors = {}
    for rec in records.values():
        if rec.get("status") == "ok" and "prior" in rec:
            p = rec["prior"]
            priors[p["key"]] = {"prior": Path(p["workdir"]).name, "train s": p.get("train_seconds"),
                                **{f"final {k}": v for k, v in p.get("final", {}).items()}}
    b = runs[0].budget if runs else Budget()
    lines = [
        f"# {exp.name}: {exp.description}",
        "",
        f"Scale `{scale}`: {b.num_images} test images per row, {b.image_size}x{b.image_size}, priors "
        f"{b.prior_steps} steps x {b.prior_batch} gradients, IG {b.attack_steps} steps. "
        f"{len(done)} of {len(runs)} runs have results ({len(failed)} failed).",
        "",
        "Cells: PSNR (dB) / SSIM, mean over the test images after Hungarian matching within each batch. "
        "Columns are methods; `(matched prior)` = the prior was trained under the same defence.",
        "",
        build_table(runs, records),
        "",
        "## Attack seconds per leaked gradient (wall time minus JAX tracing and compilation)",
        "",
        build_time_table(runs, records),
    ]
    if priors:
        from gitjax.viz import format_table

        lines += ["", "## Priors used", "", format_table(list(priors.values()), floatfmt=".3g")]
    if failed:
        lines += ["", "## Failures", ""]
        lines += [f"- `{run_key(r)}` {r.victim} / {r.column} / {r.setting}: {rec.get('reason')}" for r, rec in failed]
    table_path = out / "table.md"
    table_path.write_text("\n".join(lines) + "\n")
    plots = write_plots(exp, runs, records, out)
    return {"table": str(table_path), "plots": plots}


def write_plots(exp: Experiment, runs: Sequence[Run], records: Mapping[str, dict[str, Any]], out: Path) -> list[str]:
    """PSNR vs ``Run.x`` per (victim, panel); only successful runs are drawn."""
    from gitjax.viz import save_curve_plot

    spec = exp.plot
    if spec is None:
        return []
    paths = []
    for victim in _ordered(r.victim for r in runs):
        for panel in _ordered(r.panel for r in runs if r.victim == victim):
            curves: dict[str, tuple[list[float], list[float]]] = {}
            for r in runs:
                rec = records.get(run_key(r))
                if r.victim != victim or r.panel != panel or r.x is None or rec is None or rec.get("status") != "ok":
                    continue
                x = float(r.x)
                if spec.logx and x <= 0 and spec.zero_at is not None:
                    x = spec.zero_at
                xs, ys = curves.setdefault(r.column, ([], []))
                xs.append(x)
                ys.append(rec["metrics"]["psnr"])
            curves = {k: (list(np.asarray(xs)[np.argsort(xs)]), list(np.asarray(ys)[np.argsort(xs)]))
                      for k, (xs, ys) in curves.items() if xs}
            if not curves:
                continue
            xlabel = dict(spec.panel_xlabels).get(panel, spec.xlabel)
            xlabel += f" (0 drawn at {spec.zero_at:g})" if spec.logx and spec.zero_at else ""
            suffix = f"_{panel}" if panel else ""
            path = out / f"psnr_vs_{spec.name}_{victim}{suffix}.png"
            title = f"{exp.name}: {victim}" + (f" ({panel})" if panel else "")
            paths.append(save_curve_plot(path, curves, xlabel, "PSNR (dB)", title, logx=spec.logx))
    return paths


# ----------------------------------------------------------------------------- experiments


def load_experiments() -> dict[str, Experiment]:
    """``experiments.configs.EXPERIMENTS``; found next to the package when not on sys.path."""
    try:
        mod = importlib.import_module("experiments.configs")
    except ModuleNotFoundError as e:
        if e.name not in ("experiments", "experiments.configs"):
            raise
        root = Path(__file__).resolve().parent.parent
        if not (root / "experiments" / "configs.py").exists():
            raise GitjaxError("the experiment definitions (experiments/configs.py) are not installed; "
                              "run from a gitjax checkout") from None
        sys.path.insert(0, str(root))
        mod = importlib.import_module("experiments.configs")
    return mod.EXPERIMENTS


def get_experiment(name: str) -> Experiment:
    exps = load_experiments()
    if name not in exps:
        raise GitjaxError(f"unknown experiment {name!r}; available: {', '.join(exps)}")
    return exps[name]


def parse_filter(text: str | None) -> Callable[[Run], bool]:
    """``'victim=lenet,method=ig|coarse'`` -> predicate; keys are Run fields plus 'defense' and 'column'.

    Conditions are ANDed; ``|`` separates accepted values; a value matches the
    field's string form (numbers also match numerically, so ``x=0.01`` matches 1e-2).
    """
    if not text:
        return lambda run: True
    conds = []
    names = {f.name for f in dataclasses.fields(Run)} | {"defense", "column"}
    for part in text.split(","):
        if "=" not in part:
            raise GitjaxError(f"--only expects key=value[|value...] conditions, got {part!r}")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in names:
            raise GitjaxError(f"--only: unknown key {k!r}; use one of {', '.join(sorted(names))}")
        conds.append((k, v.split("|")))

    def field_value(run: Run, k: str) -> Any:
        if k == "defense":
            return run.defense.name
        if k == "column":
            return run.column
        return getattr(run, k)

    def matches(value: Any, wanted: str) -> bool:
        if str(value) == wanted:
            return True
        try:
            return value is not None and not isinstance(value, str) and math.isclose(float(value), float(wanted))
        except (TypeError, ValueError):
            return False

    return lambda run: all(any(matches(field_value(run, k), w) for w in ws) for k, ws in conds)


def experiment_runs(name: str, scale: str = "small", smoke: bool = False, only: str | None = None,
                    victims: Sequence[str] | None = None, methods: Sequence[str] | None = None) -> list[Run]:
    """The runs of one experiment at one scale, filtered."""
    if scale not in SCALES:
        raise GitjaxError(f"scale must be one of {SCALES}, got {scale!r}")
    runs = get_experiment(name).build(scale, smoke)
    keep = parse_filter(only)
    return [r for r in runs if keep(r) and (victims is None or r.victim in victims)
            and (methods is None or r.method in methods)]


def run_experiment(name: str, scale: str = "small", out_dir: str | Path = "results", smoke: bool = False, *,
                   only: str | None = None, victims: Sequence[str] | None = None,
                   methods: Sequence[str] | None = None, retry_failed: bool = True, progress: bool = True,
                   extra_runs: Sequence[Run] = ()) -> list[dict[str, Any]]:
    """Runs one experiment (skipping finished runs) and writes its table and plots.

    Args:
      name: a key of ``experiments.configs.EXPERIMENTS``.
      scale: 'small' (embedded data, CPU minutes) or 'full' (TFDS data, paper budgets).
      out_dir: results root; ``out_dir/<name>/`` and the shared ``out_dir/priors/``.
      smoke: the shrunken grid used by tests.
      only: a ``--only`` filter (see :func:`parse_filter`).
      victims, methods: further restrict the grid.
      retry_failed: rerun rows recorded as failed (else keep their record).
      extra_runs: rows appended to the grid (tests use it to inject a failing method).

    Returns:
      one record per run (its JSON plus ``executed``), in grid order.
    """
    exp = get_experiment(name)
    runs = experiment_runs(name, scale, smoke, only, victims, methods) + list(extra_runs)
    records = run_runs(runs, out_dir, retry_failed=retry_failed, progress=progress)
    # The report covers the whole (unfiltered) grid, so partial reruns still give complete tables.
    full = experiment_runs(name, scale, smoke, None, victims, methods) + list(extra_runs)
    write_report(exp, full, out_dir, scale)
    return records


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m experiments.run <name> --scale small|full [--out DIR] [--only FILTER] ...``."""
    p = argparse.ArgumentParser(prog="experiments.run", description="GIT robustness study (see experiments/configs.py)")
    p.add_argument("name", help="experiment name, 'all', or 'list'")
    p.add_argument("--scale", choices=SCALES, default="small")
    p.add_argument("--out", default="results", help="results root (default: results)")
    p.add_argument("--only", default=None, help="row filter, e.g. 'victim=lenet,method=ig|coarse'")
    p.add_argument("--victims", default=None, help="comma-separated victims to keep")
    p.add_argument("--methods", default=None, help="comma-separated methods to keep")
    p.add_argument("--smoke", action="store_true", help="the tiny grid the tests run")
    p.add_argument("--no-retry", action="store_true", help="keep failed rows instead of retrying them")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their keys, run nothing")
    p.add_argument("--report", action="store_true", help="only rewrite table.md and the plots from the run JSONs")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    exps = load_experiments()
    if args.name == "list":
        for n, e in exps.items():
            print(f"{n:<12} {e.description}")
        return 0
    names = list(exps) if args.name == "all" else [args.name]
    split = lambda s: None if s is None else [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
    for name in names:
        if args.dry_run:
            for r in experiment_runs(name, args.scale, args.smoke, args.only, split(args.victims), split(args.methods)):
                print(run_key(r), r.victim, r.column, r.setting, sep="\t")
            continue
        if args.report:
            runs = experiment_runs(name, args.scale, args.smoke, None, split(args.victims), split(args.methods))
            print(write_report(get_experiment(name), runs, args.out, args.scale))
            continue
        t0 = time.perf_counter()
        recs = run_experiment(name, args.scale, args.out, args.smoke, only=args.only, victims=split(args.victims),
                              methods=split(args.methods), retry_failed=not args.no_retry, progress=not args.quiet)
        n_ok = sum(r["status"] == "ok" for r in recs)
        print(f"{name}: {len(recs)} runs ({sum(r['executed'] for r in recs)} executed, {n_ok} ok, "
              f"{len(recs) - n_ok} failed) in {time.perf_counter() - t0:.0f} s; "
              f"table: {Path(args.out) / name / 'table.md'}")
    return 0
