"""The one attack pipeline: leak N gradients -> defend -> attack -> score (with oracle rows).

The CLI (``gitjax attack``), the demo and the robustness study all run these steps::

    setup = attacker_from_prior(load_prior("runs/tiny"))        # or attacker_from_dataset(...)
    grads_N = leak(setup.victim, params, state, x_NxBxHxWxC, y_NxB, key, defense="gaussian",
                   defense_args={"std": 1e-3})
    rec = reconstruct("git+ig", setup, grads_N, key, batch_size=B)  # vmapped where the attack allows
    table = score(rec.images, x_NxBxHxWxC, rec.labels, y_NxB, mean_image=setup.mean_image)

``reconstruct`` picks the route from the registry's spec: a learned attack runs
``jit(vmap(attack))`` over the N gradients (then, for 'git+ig' / 'git+dlg', the vmapped
refinement from GIT's output); an optimisation attack with a pure core runs it vmapped
(``attacks.batched``), ``chunk`` gradients at a time; closed-form attacks run one problem
at a time on the host. Every gradient is checked on the host first (``check_gradients``).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from gitjax.attacks.base import AttackProblem, Hints
from gitjax.attacks.registry import get_attack
from gitjax.configs import freeze
from gitjax.prior import Prior, attack, check_gradients
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class Attacker:
    """What the attacker holds: the victim architecture, its copy of the params, and optionally a prior.

    ``mean_image``: the mean image of the victim's auxiliary (train) split, for the
    ``oracle: mean image`` row (None: that row is left out).
    """

    victim: Victim
    params: Params
    state: ModelState
    prior: Prior | None = None
    mean_image: np.ndarray | None = None


def dataset_mean_image(dataset: str, victim: Victim) -> np.ndarray:
    """Mean image (H, W, C) of ``dataset``'s train split at the victim's input size."""
    from gitjax.data import load_dataset

    ds = load_dataset(dataset, "train", image_size=victim.input_shape[0], channels=victim.input_shape[2])
    return np.asarray(ds.images, np.float32).mean(axis=0)


def attacker_from_prior(prior: Prior, mean_image: np.ndarray | None = None) -> Attacker:
    """The attacker of a trained prior: its victim, the params it was trained against, the aux-data mean image."""
    if mean_image is None and prior.config is not None:
        mean_image = dataset_mean_image(prior.config.dataset, prior.victim)
    return Attacker(prior.victim, prior.victim_params, prior.victim_state, prior, mean_image)


def attacker_from_dataset(victim_name: str, dataset: str, seed: int = 0, data_dir: str | None = None,
                          **victim_kwargs: Any) -> Attacker:
    """A random-init victim (seeded) with ``dataset``'s shape, classes and normalisation; no prior.

    ``data_dir``: where a TFDS dataset was prepared (ignored by the embedded ones)."""
    from gitjax.data import load_dataset
    from gitjax.victims import make_victim

    ds = load_dataset(dataset, "train", data_dir=data_dir)
    victim = make_victim(victim_name, input_shape=ds.image_shape, num_classes=ds.num_classes, mean=ds.mean,
                         std=ds.std, **victim_kwargs)
    params, state = jax.jit(victim.init)(jax.random.key(seed))
    return Attacker(victim, params, state, None, np.asarray(ds.images, np.float32).mean(axis=0))


# ----------------------------------------------------------------------------- leak + defend


@functools.lru_cache(maxsize=64)
def _leak_fn(victim: Victim, defense: str, defense_args: tuple, local_steps: int, local_lr: float):
    """jit(vmap): client params, N groups of B images, key -> N defended leaked gradients."""
    from gitjax.defenses import defended_gradient, make_defense
    from gitjax.leakage import fedavg_update

    transform = make_defense(defense, **dict(defense_args))
    if getattr(transform, "per_example", False) and local_steps > 1:
        raise GitjaxError(f"defence {defense!r} needs per-example gradients; FedAvg with {local_steps} local "
                          "steps shares a model difference")

    def one(params: Params, state: ModelState, x_BxHxWxC: Array, y_B: Array, key: PRNGKey) -> Grads:
        if local_steps > 1:
            return transform(key, fedavg_update(victim, params, state, x_BxHxWxC, y_B, local_steps, local_lr))
        return defended_gradient(victim, params, state, x_BxHxWxC, y_B, transform, key)

    def leak_all(params: Params, state: ModelState, x_NxBxHxWxC: Array, y_NxB: Array, key: PRNGKey) -> Grads:
        keys_N = jax.random.split(key, x_NxBxHxWxC.shape[0])
        return jax.vmap(one, in_axes=(None, None, 0, 0, 0))(params, state, x_NxBxHxWxC, y_NxB, keys_N)

    return jax.jit(leak_all)


def leak(victim: Victim, params: Params, state: ModelState, x_NxBxHxWxC: Any, y_NxB: Any, key: PRNGKey, *,
         defense: str = "none", defense_args: Mapping[str, Any] | None = None, local_steps: int = 1,
         local_lr: float = 0.1) -> Grads:
    """The N gradients the clients share: each the batch-mean gradient of its B images (FedSGD; FedAvg's
    model difference when ``local_steps > 1``), after the defence. Leaves (N, *param)."""
    fn = _leak_fn(victim, defense, freeze(dict(defense_args or {})), int(local_steps), float(local_lr))
    return fn(params, state, jnp.asarray(x_NxBxHxWxC), jnp.asarray(y_NxB, jnp.int32), key)


# ----------------------------------------------------------------------------- attack


@dataclasses.dataclass
class Reconstruction:
    """images (N, B, H, W, C) in [0, 1]; labels (N, B) or None; info: seconds, compile_seconds, and per-method
    arrays (e.g. grad_distance (N,), psnr (N, R) when ``x_true`` was given)."""

    images: np.ndarray
    labels: np.ndarray | None
    info: dict[str, Any]


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


@functools.cache
def _one_shot_N():
    """jit(vmap(attack)) clipped to [0, 1] as the trainer's evaluation: N gradients -> (N, B, H, W, C)."""
    return jax.jit(lambda prior, grads_N: jnp.clip(jax.vmap(attack, in_axes=(None, 0))(prior, grads_N), 0.0, 1.0))


def default_refine_config(refine: str) -> Any:
    """IG/DLG settings for refining GIT's output (``gitjax.attacks.git.refine_setup``'s defaults)."""
    from gitjax.attacks.git import GITConfig, refine_setup

    return refine_setup(GITConfig(refine=refine, random_starts=0))[1]


def method_config(method: str, *, checkpoint: str | None = None, steps: int | None = None,
                  noise_std: float = 0.0, holdout: float | None = None) -> Any:
    """The registry config of ``method`` as ``gitjax attack`` runs it: the defaults, ``steps``
    for an iterative method (for git+ig / git+dlg: of the refinement), ``checkpoint`` for GIT,
    ``noise_std`` (> 0: the known noise level, ``IGConfig.noise_std``) and ``holdout`` (held-out
    selection, ``IGConfig.holdout``; None: the method's default, 0.2 for git+ig and off
    otherwise; 0: off) where the method or its refinement takes them; a method that cannot use
    one is refused."""
    from gitjax.attacks import get_attack

    spec = get_attack(method)
    config = spec.config_cls()
    if spec.family == "learned":
        config = dataclasses.replace(config, checkpoint=checkpoint)
        if spec.refine:
            # The refinement attack's own defaults: refine_setup adds GIT's rules at run time
            # (the random restart, and GITConfig.holdout unless a selection rule is set here).
            sub = get_attack(spec.refine).config_cls()
            if steps is not None:
                sub = dataclasses.replace(sub, steps=steps)
            sub = _with_ig_fields(sub, method, noise_std, holdout)
            config = dataclasses.replace(config, refine=spec.refine, refine_config=sub)
            if holdout is not None and spec.refine == "ig":
                config = dataclasses.replace(config, holdout=float(holdout))
        else:
            _with_ig_fields(config, method, noise_std, holdout)  # refuses: one-shot GIT has neither setting
    else:
        if steps is not None and hasattr(config, "steps"):
            config = dataclasses.replace(config, steps=steps)
        config = _with_ig_fields(config, method, noise_std, holdout)
    return config


_IG_FIELDS = {"noise_std": "a known noise level", "holdout": "held-out selection"}


def _with_ig_fields(config: Any, method: str, noise_std: float = 0.0, holdout: float | None = None) -> Any:
    """``config`` with IG's ``noise_std`` / ``holdout`` set where nonzero; GitjaxError where it has no such field."""
    for field, value in (("noise_std", noise_std), ("holdout", holdout)):
        if not value:
            continue
        if not hasattr(config, field):
            raise GitjaxError(f"method {method!r} cannot use {_IG_FIELDS[field]}; use ig or git+ig, "
                              f"or drop it")
        config = dataclasses.replace(config, **{field: float(value)})
    return config


def _take(tree: Any, sl: slice) -> Any:
    return jax.tree_util.tree_map(lambda a: a[sl], tree)


def _batched(method: str, attacker: Attacker, grads_N: Grads, labels_NxB: Array | None, key: PRNGKey, config: Any,
             batch_size: int, chunk: int, **images_N: Array | None) -> tuple[Array, dict[str, Array]]:
    """``attacks.batched.batched_attack`` over the N gradients, ``chunk`` at a time (0: all at once)."""
    from gitjax.attacks.batched import batched_attack

    n = jax.tree_util.tree_leaves(grads_N)[0].shape[0]
    chunk = chunk or n
    xs, infos = [], []
    for i, s in enumerate(range(0, n, chunk)):
        sl = slice(s, s + chunk)
        extra = {k: v[sl] for k, v in images_N.items() if v is not None}
        x, info = batched_attack(method, attacker.victim, attacker.params, attacker.state, _take(grads_N, sl),
                                 None if labels_NxB is None else labels_NxB[sl], jax.random.fold_in(key, i),
                                 config, batch_size=batch_size, **extra)
        xs.append(x)
        infos.append(info)
    info = {k: jnp.concatenate([d[k] for d in infos]) for k in infos[0]}
    return jnp.concatenate(xs), info


def reconstruct(method: str, attacker: Attacker, grads_N: Grads, key: PRNGKey, *, batch_size: int,
                config: Any = None, labels_NxB: Any | None = None, x_true_NxBxHxWxC: Any | None = None,
                chunk: int = 0, vmapped: bool = True) -> Reconstruction:
    """Attacks N leaked gradients with the registered ``method``.

    Args:
      method: a key of ``gitjax.attacks.ATTACKS``.
      attacker: victim, params the gradients are attacked at, and the prior for learned methods.
      grads_N: leaves (N, *param); checked on the host first (structure, shapes, finiteness).
      batch_size: B images behind each gradient.
      config: the method's config (default: its config class's defaults; for 'git+ig'/'git+dlg' the
        refinement uses ``config.refine_config`` or :func:`default_refine_config`).
      labels_NxB: true labels given to the attack (None: recovered from the gradient).
      x_true_NxBxHxWxC: the truth, only to record PSNR per iteration of optimisation attacks.
      chunk: gradients per vmapped call (0: all N).
      vmapped: False runs every method one problem at a time (``spec.run``), as a check.

    Returns:
      Reconstruction; ``info`` has seconds (wall, compilation included) and compile_seconds.
    """
    spec = get_attack(method)
    config = spec.config_cls() if config is None else config
    check_gradients(attacker.params, grads_N, leading=1)
    if spec.family == "learned" and attacker.prior is None:
        raise GitjaxError(f"--method {method} needs a trained prior: pass --checkpoint <prior run dir>")
    n = jax.tree_util.tree_leaves(grads_N)[0].shape[0]
    labels = None if labels_NxB is None else jnp.asarray(labels_NxB, jnp.int32)
    x_true = None if x_true_NxBxHxWxC is None else jnp.asarray(x_true_NxBxHxWxC, jnp.float32)
    _watch_compiles()
    compiled_before, t0 = _compile_seconds[0], time.perf_counter()
    info: dict[str, Any] = {}
    if spec.family == "learned" and vmapped:
        prior = attacker.prior
        if prior.config is not None and prior.batch_size != batch_size:
            raise GitjaxError(f"the GIT prior reconstructs batches of {prior.batch_size}; the gradients hold "
                              f"{batch_size} images each")
        images = _one_shot_N()(prior, grads_N)
        out_labels = labels
        if spec.refine:
            from gitjax.attacks.git import refine_setup

            # The same refinement rule as the one-at-a-time path (random restarts, step, proximity).
            _, refine_cfg = refine_setup(dataclasses.replace(config, refine=spec.refine))
            mode = config.prior_mode
            images, info = _batched(spec.refine, attacker, grads_N, labels, key, refine_cfg, batch_size, chunk,
                                    x_init_N=images if mode in ("init", "both") else None,
                                    x_prior_N=images if mode in ("reg", "both") else None, x_true_N=x_true)
            out_labels = info["labels"]
    elif spec.vmappable and vmapped:
        images, info = _batched(method, attacker, grads_N, labels, key, config, batch_size, chunk, x_true_N=x_true)
        out_labels = info["labels"]
    else:
        xs, ys, infos = [], [], []
        for i in range(n):
            problem = AttackProblem(attacker.victim, attacker.params, attacker.state, _take(grads_N, i),
                                    batch_size=batch_size, labels=None if labels is None else labels[i])
            hints = Hints(x_true=None if x_true is None else x_true[i], prior=attacker.prior)
            res = spec.run(problem, jax.random.fold_in(key, i), config, hints)
            xs.append(jnp.clip(jnp.asarray(res.images, jnp.float32), 0.0, 1.0))
            ys.append(jnp.asarray(res.labels, jnp.int32))
            infos.append(res.info)
        images, out_labels = jnp.stack(xs), jnp.stack(ys)
        info = {k: [d.get(k) for d in infos] for k in infos[0]}
    images = np.asarray(jax.block_until_ready(images), np.float32)
    info = {k: (np.asarray(v) if isinstance(v, jax.Array) else v) for k, v in info.items()}
    info["seconds"] = time.perf_counter() - t0
    info["compile_seconds"] = _compile_seconds[0] - compiled_before
    info["iterations"] = _iterations(spec, config)
    return Reconstruction(images, None if out_labels is None else np.asarray(out_labels), info)


def _iterations(spec: Any, config: Any) -> int:
    if spec.family == "learned":
        return int((config.refine_config or default_refine_config(spec.refine)).steps) if spec.refine else 0
    return int(getattr(config, "steps", 0))


# ----------------------------------------------------------------------------- score


def score(recon_NxBxHxWxC: np.ndarray, x_NxBxHxWxC: np.ndarray, labels_NxB: np.ndarray | None = None,
          y_NxB: np.ndarray | None = None, *, mean_image: np.ndarray | None = None) -> dict[str, Any]:
    """Matched metrics of the reconstruction plus the oracle rows for the same images.

    Returns:
      ``metrics.score_groups``'s dict, with ``oracles``: a list of rows
      {"method": "oracle: ...", "psnr", "ssim", "mse"} (see ``metrics.oracle_rows``).
    """
    from gitjax import metrics

    recon = np.asarray(recon_NxBxHxWxC, np.float32)
    truth = np.asarray(x_NxBxHxWxC, np.float32)
    if recon.shape != truth.shape:
        raise GitjaxError(f"the reconstruction has shape {recon.shape}; expected {truth.shape}")
    if not np.all(np.isfinite(recon)):
        raise GitjaxError(f"non-finite reconstruction ({int(np.sum(~np.isfinite(recon)))} of {recon.size} "
                          "pixels NaN/inf)")
    out = metrics.score_groups(recon, truth, labels_NxB, y_NxB)
    out["oracles"] = metrics.oracle_rows(truth.reshape(-1, *truth.shape[2:]), mean_image)
    return out


@dataclasses.dataclass
class PipelineResult:
    """One pipeline run: the truth, the reconstruction, its scores (with oracle rows) and the attack's info."""

    x_NxBxHxWxC: np.ndarray
    y_NxB: np.ndarray
    reconstruction: Reconstruction
    scores: dict[str, Any]

    def rows(self, method: str) -> list[dict[str, Any]]:
        """A quality table: the method's row, then the oracle rows."""
        s = self.scores
        return [{"method": method, "psnr": s["psnr"], "ssim": s["ssim"], "mse": s["mse"]}, *s["oracles"]]


def run_pipeline(method: str, attacker: Attacker, x_NxBxHxWxC: Any, y_NxB: Any, key: PRNGKey, *,
                 config: Any = None, defense: str = "none", defense_args: Mapping[str, Any] | None = None,
                 leak_params: Params | None = None, local_steps: int = 1, local_lr: float = 0.1,
                 labels_known: bool = False, record_truth: bool = False, chunk: int = 0,
                 vmapped: bool = True) -> PipelineResult:
    """Leak (at ``leak_params``, default the attacker's), defend, attack with ``method``, score.

    ``record_truth`` passes the truth to the attack for PSNR-per-iteration curves only.
    """
    x = np.asarray(x_NxBxHxWxC, np.float32)
    y = np.asarray(y_NxB, np.int32)
    if x.ndim != 5 or y.shape != x.shape[:2]:
        raise GitjaxError(f"expected images (N, B, H, W, C) and labels (N, B); got {x.shape} and {y.shape}")
    k_leak, k_attack = jax.random.split(key)
    params = attacker.params if leak_params is None else leak_params
    grads_N = leak(attacker.victim, params, attacker.state, x, y, k_leak, defense=defense,
                   defense_args=defense_args, local_steps=local_steps, local_lr=local_lr)
    rec = reconstruct(method, attacker, grads_N, k_attack, batch_size=x.shape[1], config=config,
                      labels_NxB=y if labels_known else None, x_true_NxBxHxWxC=x if record_truth else None,
                      chunk=chunk, vmapped=vmapped)
    return PipelineResult(x, y, rec, score(rec.images, x, rec.labels, y, mean_image=attacker.mean_image))
