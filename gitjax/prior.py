"""The one Prior type: a trained GIT generator and the victim it was trained against.

GIT (Chen & Liu 2025, arXiv 2505.20026) trains a generator offline (``gitjax.train``);
attacks only need its EMA params, the victim architecture and the attacker's copy of
the victim params. :class:`Prior` holds exactly that as one pytree: arrays are fields
(so ``jax.jit(attack)(prior, grads)`` traces them), the generator, the victim and the
training config are static. Both the trainer (which builds one per checkpoint) and the
attacks import this module; it never builds the trainer's compiled functions::

    prior = load_prior("runs/tiny")                  # no cache: a retrain is seen at once
    x_BxHxWxC = jax.jit(gitjax.attack)(prior, grads)
    check_gradients(prior, grads)                    # host-side: one GitjaxError line, before work
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from gitjax.layout import GradientLayout
from gitjax.trace import forward_order
from gitjax.types import Array, GitjaxError, Grads, GradientMismatchError, ModelState, NonFiniteGradientError, Params
from gitjax.victims import Victim

# Priors shipped inside the package (gitjax/priors/NAME, made by experiments.ship_prior; each
# made_by.json names its command), keyed by (victim, generator kind). The demo and the study's
# small scale use them.
SHIPPED_PRIORS: dict[tuple[str, str], str] = {("lenet", "exact"): "lenet_exact", ("lenet", "coarse"): "lenet_coarse"}


def shipped_prior_dir(victim: str, generator: str) -> Path | None:
    """The shipped prior's folder for (victim, generator), or None if none is shipped (or it is missing)."""
    name = SHIPPED_PRIORS.get((victim, generator))
    path = None if name is None else Path(__file__).resolve().parent / "priors" / name
    return path if path is not None and (path / "checkpoints").is_dir() else None


@flax.struct.dataclass
class Prior:
    """A trained prior (a pytree).

    Attributes:
      gen_params: the generator's EMA params (what attacks use).
      victim_params, victim_state: the attacker's copy of the victim the prior was trained
        against (``victim_state``: BatchNorm statistics, {} for most victims).
      generator: the Flax generator module (static).
      victim: the victim architecture (static).
      config: the ``gitjax.configs.TrainConfig`` it was trained with (static; None when
        built by hand, e.g. in tests).
    """

    gen_params: Params
    victim_params: Params
    victim_state: ModelState
    generator: nn.Module = flax.struct.field(pytree_node=False)
    victim: Victim = flax.struct.field(pytree_node=False)
    config: Any = flax.struct.field(pytree_node=False, default=None)

    @property
    def batch_size(self) -> int:
        """B, the number of images the generator reconstructs from one gradient."""
        if self.config is None:
            raise GitjaxError("this Prior has no config: its batch size is unknown")
        return int(self.config.generator.batch_size)

    @property
    def layout(self) -> GradientLayout:
        return GradientLayout.from_params(self.victim_params, order=forward_order(self.victim))

    def with_generator_config(self, **changes: Any) -> "Prior":
        """The same learned params under a generator config with ``changes`` that add no
        parameters, e.g. ``exact_cg_iters`` (Exact-GIT's solver steps at attack time)."""
        if self.config is None:
            raise GitjaxError("this Prior has no config to change")
        from gitjax.generators import build_generator

        gen_cfg = dataclasses.replace(self.config.generator, **changes)
        return self.replace(config=dataclasses.replace(self.config, generator=gen_cfg),
                            generator=build_generator(gen_cfg, self.victim, self.victim_params))


def attack(prior: Prior, grads: Grads) -> Array:
    """One-shot GIT: a leaked gradient (no leading axis) -> images (B, H, W, C), pure (jit / vmap it).

    Values are the generator's output, not clipped. vmap over gradients with
    ``jax.vmap(attack, in_axes=(None, 0))``. Invalid gradients cannot raise under jit:
    call :func:`check_gradients` on the host first.
    """
    grads_1 = jax.tree_util.tree_map(lambda g: g[None], grads)
    return prior.generator.apply({"params": prior.gen_params}, grads_1, prior.victim_params)[0]


def check_gradients(prior_or_layout: Prior | GradientLayout | Params, grads: Grads, *, leading: int = 0) -> None:
    """Host-side check before any work: raises one-line GitjaxError for a gradient the prior cannot invert.

    Args:
      prior_or_layout: a Prior, a GradientLayout, or a victim params pytree.
      grads: the leaked gradient; with ``leading=1`` every leaf carries one extra leading (N) axis.
      leading: number of leading batch axes on every leaf (0 or 1).

    Raises:
      GradientMismatchError: structure or shapes differ ("a gradient of another model").
      NonFiniteGradientError: NaN or inf entries.
    """
    if isinstance(prior_or_layout, Prior):
        layout = prior_or_layout.layout
    elif isinstance(prior_or_layout, GradientLayout):
        layout = prior_or_layout
    else:
        layout = GradientLayout.from_params(prior_or_layout)
    try:
        layout.check(grads)
    except GradientMismatchError as e:
        raise GradientMismatchError(f"{e} (a gradient of another model?)") from None
    block = layout.blocks[0]
    name, shape = block.leaves[0]
    node = layout._get(grads, block.path)
    lead = np.ndim(node if block.kind == "embed" else node[name]) - len(shape)
    if lead != leading:
        raise GradientMismatchError(f"expected {leading} leading batch axes on every gradient leaf, got {lead}")
    finite = {jax.tree_util.keystr(p): np.isfinite(np.asarray(leaf)).reshape(
        np.shape(leaf)[:leading] + (-1,)).all(-1) for p, leaf in jax.tree_util.tree_leaves_with_path(grads)}
    bad = [k for k, ok in finite.items() if not np.all(ok)]
    if bad:
        where = ""
        if leading:  # name the first leaked gradient (batch) that carries them
            first = int(np.argmin(np.logical_and.reduce([ok for ok in finite.values()])))
            where = f" (batch {first})"
        raise NonFiniteGradientError(f"the leaked gradient{where} has NaN/inf entries in {', '.join(bad[:3])}"
                                     f"{' ...' if len(bad) > 3 else ''}; pass a finite gradient")


# ----------------------------------------------------------------------------- save / load


def _abstract_victim(victim: Victim) -> dict[str, Any]:
    """{"params": ..., "state": ...} as ShapeDtypeStructs (no computation)."""
    return jax.eval_shape(lambda: dict(zip(("params", "state"), victim.init(jax.random.PRNGKey(0)))))


def abstract_train_state(config: Any, generator: nn.Module, abstract_victim_params: Params) -> Any:
    """The trainer's TrainState as ShapeDtypeStructs, by ``jax.eval_shape`` (nothing compiled or run).

    A checkpoint holds the whole fingerprinted training state, so restoring needs its
    structure: the generator's params and the optimiser state of ``config``.
    """
    from gitjax.train_step import TrainState, make_optimizer  # pure pieces only

    tx = make_optimizer(config)

    def init(victim_params: Params) -> Any:
        grads_1 = jax.tree_util.tree_map(lambda p: jnp.zeros((1,) + p.shape, p.dtype), victim_params)
        params = generator.init(jax.random.key(0, impl="rbg"), grads_1, victim_params)["params"]
        return TrainState(jnp.zeros((), jnp.int32), params, params, tx.init(params), jax.random.PRNGKey(0))

    return jax.eval_shape(init, abstract_victim_params)


def load_prior(path: str | Path, step: int | None = None) -> Prior:
    """Loads a trained prior for attacks (read from disk on every call; no cache).

    Args:
      path: a run directory (``train_prior``'s workdir), its ``checkpoints/``
        directory, or one step directory.
      step: a saved step; default the one named by ``path``, else the best by validation
        PSNR when the run recorded one (``best.json``), else the latest.

    Returns:
      Prior with the EMA generator params; arrays on the first local device.

    Raises:
      CheckpointError: nothing loadable at ``path``.
    """
    from gitjax.checkpoint import (BEST_FILE, BEST_SUBDIR, CheckpointError, PriorCheckpointer, quiet_orbax_logs,
                                   resolve_checkpoint_dir)
    from gitjax.configs import ConfigError, config_from_dict
    from gitjax.generators import build_generator
    from gitjax.victims import make_victim

    quiet_orbax_logs()
    best_dir = Path(path).expanduser() / BEST_SUBDIR
    if step is None and (Path(path).expanduser() / BEST_FILE).is_file() and best_dir.is_dir():
        path = best_dir  # the run's best-by-validation checkpoint
    directory, path_step = resolve_checkpoint_dir(path)
    step = path_step if step is None else step
    explicit = step is not None  # a named step is strict; "latest" falls back past a broken newest step
    with PriorCheckpointer(directory, max_to_keep=None, read_only=True) as ckpt:
        if step is None:
            step = ckpt.latest_step()
            if step is None:
                raise CheckpointError(f"no checkpoint found in {directory}")
        try:
            config = config_from_dict(ckpt.restore_config(step))
        except ConfigError as e:
            raise CheckpointError(f"checkpoint {directory / str(step)} holds an unreadable config: {e}") from e
        vm = ckpt.restore_meta(step).get("victim")
        if not vm:
            raise CheckpointError(f"checkpoint {directory / str(step)} has no victim spec in its meta item")
        victim = make_victim(config.victim, input_shape=tuple(vm["input_shape"]), num_classes=int(vm["num_classes"]),
                             mean=tuple(vm["mean"]), std=tuple(vm["std"]), **dict(config.victim_kwargs))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        place = lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device)  # noqa: E731
        abstract_victim = _abstract_victim(victim)
        generator = build_generator(config.generator, victim, abstract_victim["params"])
        abstract_state = abstract_train_state(config, generator, abstract_victim["params"])
        state, victim_tree, _ = ckpt.restore(step if explicit else None, jax.tree_util.tree_map(place, abstract_state),
                                             jax.tree_util.tree_map(place, abstract_victim))
    return Prior(state.ema_params, victim_tree["params"], victim_tree["state"], generator, victim, config)


def save_prior(prior: Prior, workdir: str | Path, step: int = 0, ema_only: bool = False) -> Path:
    """Writes ``prior`` as a loadable run directory (``workdir/checkpoints/<step>/``); returns ``workdir``.

    For priors built or edited outside the trainer (it writes its own checkpoints). The
    optimiser state saved alongside is freshly initialised; ``load_prior`` returns
    ``gen_params`` unchanged. Needs ``prior.config``.

    ``ema_only``: the train state's raw params are stored as zeros (they compress to nothing;
    what attacks and ``init_from`` fine-tunes read is the EMA), which halves a shipped
    prior. The meta item says so, and the trainer refuses to resume such a folder.
    """
    from gitjax.checkpoint import CHECKPOINT_SUBDIR, PriorCheckpointer
    from gitjax.configs import config_to_dict
    from gitjax.train_step import TrainState, make_optimizer

    if prior.config is None:
        raise GitjaxError("save_prior needs a Prior with its TrainConfig (prior.config)")
    workdir = Path(workdir)
    tx = make_optimizer(prior.config)
    params = prior.gen_params
    raw = jax.tree_util.tree_map(jnp.zeros_like, params) if ema_only else params
    state = TrainState(jnp.asarray(step, jnp.int32), raw, params, tx.init(params), jax.random.PRNGKey(0))
    v = prior.victim
    meta = {"victim": {"input_shape": list(v.input_shape), "num_classes": v.num_classes,
                       "mean": list(v.mean), "std": list(v.std)}, "ema_only": ema_only}
    with PriorCheckpointer(workdir / CHECKPOINT_SUBDIR, max_to_keep=None) as ckpt:
        ckpt.save(step, state, {"params": prior.victim_params, "state": prior.victim_state},
                  config_to_dict(prior.config), meta)
    return workdir
