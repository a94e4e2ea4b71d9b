"""Executing study runs: train (or reuse) each prior once, then every row through ``gitjax.pipeline``.

Each row: leak the gradients of N groups of B test images at the client's params
(possibly discrepant from the attacker's copy, possibly FedAvg over K local steps),
apply the defence, run the method, score matched PSNR/SSIM/MSE and the oracle rows.
A row that raises or outputs non-finite images is recorded as ``failed`` with its
reason; the others go on. A rerun skips rows whose JSON says ``ok``.

Files::

    out/<experiment>/<run_key>.json     config + metrics + oracles + status of one run
    out/priors/<victim>-<kind>-<key>/   trained priors, shared by every run that needs the same one

A prior is keyed by its own training config (victim, generator kind, training data,
training-time perturbation, B, steps, seed), so every noise level that attacks with
a clean prior reuses one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.configs import jsonable
from gitjax.study.spec import Budget, Run, _hash, run_key, run_to_dict
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim

PRIOR_DIR = "priors"
_PRIOR_DONE = "study_prior.json"  # written once a prior finished training

# ----------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class Method:
    """A study column: a registered attack (``gitjax.attacks.ATTACKS``) and the prior kind it needs (or None)."""

    attack: str
    prior_kind: str | None = None
    description: str = ""


METHODS: dict[str, Method] = {
    "lti": Method("git", "lti", "Learning to Invert (Wu et al. 2023): one MLP, flat gradient -> images"),
    "coarse": Method("git", "coarse", "Coarse-GIT: per-layer MLP blocks mirroring the victim in reverse"),
    "exact": Method("git", "exact", "Exact-GIT: the backward pass inverted layer by layer (pseudo-inverses + "
                                    "learned parts)"),
    "ig": Method("ig", None, "Inverting Gradients (Geiping et al. 2020) from a random start"),
    "git+ig": Method("git+ig", "coarse", "IG initialised at Coarse-GIT's output (GIT as a prior)"),
    "exact+ig": Method("git+ig", "exact", "IG initialised at Exact-GIT's output (where an Exact prior exists)"),
}


def method_of(run: Run) -> Method:
    if run.method not in METHODS:
        raise GitjaxError(f"unknown method {run.method!r}; available: {', '.join(METHODS)}")
    return METHODS[run.method]


# ----------------------------------------------------------------------------- priors


FINETUNE_LR = 3e-4  # the presets' fine-tunes of a converged prior (lenet_noise, lenet_robust)


@dataclasses.dataclass(frozen=True)
class BasePrior:
    """A converged prior a clean row uses as is (``Run.base_prior``; nothing to train)."""

    path: str


def prior_config(run: Run):
    """What ``run``'s prior is: a ``gitjax.configs.TrainConfig`` to train, a :class:`BasePrior`
    to load, or None for prior-free methods.

    With ``run.base_prior`` a clean row loads it; a matched row fine-tunes it under the
    row's defence for ``prior_steps`` at ``FINETUNE_LR`` with the base's own recipe (its
    generator, stream and batch), as the presets ``lenet_noise`` / ``lenet_robust`` do.
    """
    from gitjax.configs import TrainConfig, perturb, prior_generator, stream_for

    kind = method_of(run).prior_kind
    if kind is None:
        return None
    b = run.budget
    gen_kw = {}
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
    if run.base_prior:
        from gitjax.study.grids import _base_config, base_prior_fits, package_path

        path = package_path(run.base_prior)
        base = _base_config(path)
        problem = base_prior_fits(run, base)
        if problem:
            raise GitjaxError(f"base prior {run.base_prior} cannot attack this row: {problem}")
        if run.prior_training == "clean":
            return BasePrior(path)
        return dataclasses.replace(
            base, init_from=path, steps=b.prior_steps, lr=FINETUNE_LR, warmup=min(b.prior_warmup, b.prior_steps - 1),
            perturbations=perturbations, param_discrepancy=discrepancy, eval_gradients=b.prior_eval,
            checkpoint_every=0, keep_checkpoints=1, log_every=max(1, b.prior_steps // 10), eval_every=0)
    return TrainConfig(
        victim=run.victim, victim_kwargs=run.victim_kwargs, victim_pretrain_steps=b.victim_pretrain_steps,
        # The presets' recipe (lenet_coarse): streamed data, Coarse-GIT's mirror decoder.
        dataset=run.train_dataset, stream=stream_for(run.train_dataset),
        generator=prior_generator(kind, run.batch_size, **gen_kw), victim_batch=run.batch_size,
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

    def get(self, config) -> tuple[Any, dict[str, Any]]:
        """(gitjax.prior.Prior, record) for ``config``, training it first if needed."""
        from gitjax.prior import load_prior
        from gitjax.train import train_prior

        if isinstance(config, BasePrior):
            return self._base(config)
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
        entry = (load_prior(workdir), record)
        self._loaded[key] = entry
        return entry

    def _base(self, base: BasePrior) -> tuple[Any, dict[str, Any]]:
        """A converged prior, as is (loaded once per process, shared with the grids' fit check);
        its record names its best step and validation PSNR."""
        from gitjax.study.grids import load_base_prior

        if base.path not in self._loaded:
            path = Path(base.path)
            best = {}
            for name, field in (("best.json", None), ("made_by.json", "best")):
                if (path / name).is_file():
                    info = json.loads((path / name).read_text())
                    best = info.get(field, {}) if field else info
                    break
            record = {"key": f"base:{path.name}", "workdir": str(path), "train_seconds": 0.0, "base": True,
                      "final": {k: best[k] for k in ("step", "val_psnr", "test_psnr") if k in best}}
            self._loaded[base.path] = (load_base_prior(base.path), record)
        return self._loaded[base.path]


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


@functools.lru_cache(maxsize=16)
def _mean_image(dataset: str, victim: Victim) -> np.ndarray:
    from gitjax.pipeline import dataset_mean_image

    return dataset_mean_image(dataset, victim)


def attack_config(run: Run) -> Any:
    """The registry config of ``run``'s attack at its budget (IG settings also drive GIT+IG's refinement)."""
    from gitjax.attacks.git import GITConfig
    from gitjax.attacks.registry import get_attack

    b = run.budget
    attack = method_of(run).attack
    spec = get_attack(attack)
    if attack == "ig":
        return _ig_config(b)
    if spec.family == "learned":
        return GITConfig(refine_config=_ig_config(b) if spec.refine == "ig" else None)
    config = spec.config_cls()
    return dataclasses.replace(config, steps=b.attack_steps) if hasattr(config, "steps") else config


def _ig_config(budget: Budget):
    from gitjax.attacks.ig import IGConfig

    return IGConfig(steps=budget.attack_steps, lr=budget.ig_lr, tv_weight=budget.ig_tv,
                    restarts=budget.ig_restarts, record_every=0)


def execute(run: Run, priors: PriorCache) -> dict[str, Any]:
    """Runs one row through ``gitjax.pipeline``; returns its record (raises on failure: :func:`run_runs` records it)."""
    from gitjax import pipeline

    method = method_of(run)
    timing: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timing[name] = now - t
        t = now

    record: dict[str, Any] = {"timing": timing}
    cfg = prior_config(run)
    if cfg is not None:
        prior, record["prior"] = priors.get(cfg)
        attacker = pipeline.Attacker(prior.victim, prior.victim_params, prior.victim_state, prior)
    else:
        attacker = pipeline.Attacker(*attacker_victim(run))
    victim, params, state = attacker.victim, attacker.params, attacker.state
    attacker = dataclasses.replace(attacker, mean_image=_mean_image(run.train_dataset, victim))
    if victim.input_shape[0] != run.budget.image_size:
        raise GitjaxError(f"victim expects {victim.input_shape} images; the budget asks for size {run.budget.image_size}")
    # RBG keys: XLA:CPU compiles threefry noise for a whole gradient pytree ~5x slower.
    key = jax.random.key(run.seed, impl="rbg")
    k_client, k_leak, k_attack = jax.random.split(jax.random.fold_in(key, 0x57D1), 3)

    x_NxBxHxWxC, y_NxB = private_batch(run, victim)
    lap("setup")
    leaked_at = client_params(run, victim, params, state, k_client)
    leak_kw = dict(local_steps=run.local_steps, local_lr=run.budget.local_lr)
    grads_N = pipeline.leak(victim, leaked_at, state, x_NxBxHxWxC, y_NxB, k_leak, defense=run.defense.name,
                            defense_args=run.defense.kwargs, **leak_kw)
    clean_N = grads_N if run.defense.name == "none" else pipeline.leak(victim, leaked_at, state, x_NxBxHxWxC,
                                                                        y_NxB, k_leak, **leak_kw)
    stats = {k: v.item() for k, v in jax.device_get(_leak_stats(params, leaked_at, grads_N, clean_N)).items()}
    if not stats.pop("finite"):
        raise GitjaxError(f"the defended gradient is not finite (defence {run.defense.label})")
    rms = stats["grad_rms"]
    record["leak"] = {**stats, "perturbation_to_signal": stats["perturbation_rms"] / rms if rms > 0 else None,
                      "num_gradients": int(y_NxB.shape[0]), "images": int(y_NxB.size)}
    lap("leak")

    rec = pipeline.reconstruct(method.attack, attacker, grads_N, k_attack, batch_size=run.batch_size,
                               config=attack_config(run), labels_NxB=y_NxB if run.labels_known else None,
                               chunk=run.budget.attack_chunk)
    lap("attack")
    record["metrics"] = pipeline.score(rec.images, x_NxBxHxWxC, rec.labels, y_NxB, mean_image=attacker.mean_image)
    record["oracles"] = record["metrics"].pop("oracles")
    # Wall time of the attack, and without JAX's tracing/compilation (paid once per shape in a process).
    compile_s = rec.info["compile_seconds"]
    record["metrics"]["seconds"] = timing["attack"]
    record["metrics"]["compile_seconds"] = compile_s
    record["metrics"]["seconds_per_gradient"] = max(timing["attack"] - compile_s, 0.0) / y_NxB.shape[0]
    lap("score")
    record["_images"] = (x_NxBxHxWxC, rec.images)
    return record


# ----------------------------------------------------------------------------- many rows


def _write_json(path: Path, obj: Any) -> None:
    """Atomic write (a killed run never leaves half a JSON behind)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=jsonable))
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
