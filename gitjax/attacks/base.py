"""The one interface every attack shares: an AttackProblem in, an AttackResult out.

An attack is registered as ``ATTACKS[name] = AttackSpec(run, config_cls, threat_model, paper)``
where ``run(problem, key, config) -> AttackResult``. ``run`` validates the
problem on the host (clear errors), then calls jitted pure functions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from gitjax.layout import GradientLayout, validate_gradient
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
        layout = GradientLayout.from_params(self.params)
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
class AttackSpec:
    run: Callable[[AttackProblem, PRNGKey, Any], AttackResult]
    config_cls: type
    threat_model: str
    paper: str


ATTACKS: dict[str, AttackSpec] = {}


def register(name: str, spec: AttackSpec) -> None:
    ATTACKS[name] = spec


def get_attack(name: str) -> AttackSpec:
    # Importing the package registers every built-in attack.
    import gitjax.attacks  # noqa: F401

    if name not in ATTACKS:
        raise GitjaxError(f"unknown attack {name!r}; available: {', '.join(sorted(ATTACKS))}")
    return ATTACKS[name]


def run_attack(name: str, problem: AttackProblem, key: PRNGKey | None = None, config: Any = None,
               **overrides: Any) -> AttackResult:
    """Runs a registered attack; ``overrides`` replace fields of its default config."""
    spec = get_attack(name)
    config = spec.config_cls() if config is None else config
    if overrides:
        config = dataclasses.replace(config, **overrides)
    key = jax.random.key(0) if key is None else key
    return spec.run(problem, key, config)
