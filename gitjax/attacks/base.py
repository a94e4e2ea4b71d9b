"""The one interface every attack shares: an AttackProblem (+ Hints) in, an AttackResult out.

Every attack is one :class:`AttackSpec` in the explicit dict ``gitjax.attacks.registry.ATTACKS``
(nothing registers itself on import). One call signature for all::

    spec.run(problem, key, config, hints) -> AttackResult     # host-validated, one problem

and, for attacks whose core is a pure jittable function, ``spec.reconstruct`` with the
signature of :data:`Reconstruct` (what ``gitjax.attacks.batched`` vmaps over N gradients).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from gitjax.layout import GradientLayout, validate_gradient
from gitjax.trace import forward_order
from gitjax.types import Array, GitjaxError, Grads, ModelState, Params, PRNGKey
from gitjax.victims import Victim


@dataclasses.dataclass(frozen=True)
class AttackProblem:
    """What the attacker observes.

    Attributes:
      victim: the architecture (always known to the attacker).
      params, state: the victim parameters the gradient was computed at (the
        server knows them in FL; GIT's one-shot mode does not need them).
      grads: the leaked gradient pytree, the batch-mean over B images (no leading axis).
      batch_size: B, the number of images behind ``grads``.
      labels: (B,) int labels if known, else None (attacks then recover them).
    """

    victim: Victim
    params: Params
    state: ModelState
    grads: Grads
    batch_size: int = 1
    labels: Array | None = None

    def validate(self) -> GradientLayout:
        """Checks the gradient against the victim (structure, shapes, finiteness); returns the layout."""
        layout = GradientLayout.from_params(self.params, order=forward_order(self.victim))
        validate_gradient(layout, self.grads)
        if self.batch_size < 1:
            raise GitjaxError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.labels is not None and tuple(jnp.shape(self.labels)) != (self.batch_size,):
            raise GitjaxError(f"labels must have shape ({self.batch_size},), got {tuple(jnp.shape(self.labels))}")
        return layout


@dataclasses.dataclass
class AttackResult:
    """Reconstruction (B, H, W, C) in [0, 1], labels (B,), and diagnostics.

    ``info`` holds JSON-friendly values: e.g. iterations, grad_distance,
    seconds, and optionally ``history`` (list of per-iteration dicts).
    """

    images: Array
    labels: Array
    info: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Hints:
    """Side information an attack may use beyond the leaked gradient; each attack ignores what it does not read.

    Attributes:
      x_init: (B, H, W, C) start point of an optimisation attack (e.g. GIT's output).
      x_prior: (B, H, W, C) image for a ``prior_weight * mean((x - x_prior)^2)`` penalty.
      x_true: (B, H, W, C) ground truth, only to record PSNR per iteration (never used to attack).
      prior: a ``gitjax.prior.Prior`` for the learned (GIT) attacks; else loaded from ``config.checkpoint``.
      bn_targets: reference BatchNorm statistics for 'ig+bn' (e.g. leaked ones).
      extra_loss: x_BxHxWxC -> scalar added to an optimisation attack's objective.
    """

    x_init: Array | None = None
    x_prior: Array | None = None
    x_true: Array | None = None
    prior: Any = None
    bn_targets: ModelState | None = None
    extra_loss: Callable[[Array], Array] | None = None

    def given(self, *names: str) -> dict[str, Any]:
        """{name: value} for the named fields that are set (keyword arguments for a module's run)."""
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


RunFn = Callable[[AttackProblem, PRNGKey, Any, Hints], AttackResult]
# reconstruct(victim, params, state, grads, labels | None, key, config, *, batch_size, x_init, x_prior, x_true)
#   -> (x_BxHxWxC, info with at least "labels" (B,) and "grad_distance"); pure, vmappable over (grads, labels, key).
Reconstruct = Callable[..., tuple[Array, dict[str, Array]]]
FAMILIES = ("optimisation", "closed-form", "learned", "labels")


@dataclasses.dataclass(frozen=True)
class AttackSpec:
    """One attack in the registry.

    Attributes:
      name: the registry key (``gitjax attack --method NAME``).
      family: 'optimisation' (iterative, vmappable ``reconstruct``), 'closed-form' (host-side
        solves, one problem at a time), or 'learned' (a trained GIT/LTI prior, optionally refined).
      config_cls: the frozen config dataclass (defaults = the attack's paper settings).
      run_fn: the module's host-side entry ``(problem, key, config, **hint_fields)``.
      hint_names: the Hints fields ``run_fn`` accepts.
      reconstruct: the pure core (signature :data:`Reconstruct`), None for closed-form attacks.
      refine: for the learned family, the optimisation attack GIT's output seeds ('' = one-shot).
      threat_model, paper: what the attacker knows; the reference.
    """

    name: str
    family: str
    config_cls: type
    run_fn: Callable[..., AttackResult]
    threat_model: str
    paper: str
    hint_names: tuple[str, ...] = ()
    reconstruct: Reconstruct | None = None
    refine: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def vmappable(self) -> bool:
        return self.reconstruct is not None

    def run(self, problem: AttackProblem, key: PRNGKey, config: Any = None, hints: Hints | None = None,
            **hint_fields: Any) -> AttackResult:
        """The one call signature: ``hints`` (or its fields as keywords) carry the side information."""
        if hint_fields:
            hints = dataclasses.replace(hints or Hints(), **hint_fields)
        hints = hints or Hints()
        config = self.config_cls() if config is None else config
        return self.run_fn(problem, key, config, **hints.given(*self.hint_names))


def get_attack(name: str) -> AttackSpec:
    """``gitjax.attacks.registry.get_attack`` (kept here for older imports)."""
    from gitjax.attacks.registry import get_attack as _get

    return _get(name)


def run_attack(name: str, problem: AttackProblem, key: PRNGKey | None = None, config: Any = None,
               hints: Hints | None = None, **overrides: Any) -> AttackResult:
    """``gitjax.attacks.registry.run_attack`` (kept here for older imports)."""
    from gitjax.attacks.registry import run_attack as _run

    return _run(name, problem, key, config, hints, **overrides)
