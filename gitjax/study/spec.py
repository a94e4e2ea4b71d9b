"""What a study run is: pure, hashable, JSON-round-tripping descriptions (no JAX work here).

A :class:`Run` is one cell of an experiment matrix (one victim, one method, one
attack-time defence, one data pair, one discrepancy, one batch size, at one
:class:`Budget`); its key is a short hash of its canonical JSON, so results on disk
are content-addressed. An :class:`Experiment` is a named grid of runs
(``gitjax.study.grids``) and how to plot it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Callable


from gitjax.configs import freeze, jsonable
from gitjax.types import GitjaxError


@dataclasses.dataclass(frozen=True)
class Defense:
    """An attack-time defence: a ``gitjax.defenses`` name and its hyper-parameters ((name, value), ...)."""

    name: str = "none"
    params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "params", tuple(sorted((str(k), freeze(v)) for k, v in dict(self.params).items())))

    @classmethod
    def of(cls, name: str, **params: Any) -> "Defense":
        return cls(name, tuple(params.items()))

    def to_json(self) -> dict[str, Any]:
        """{"name", "params": {key: value}} (the form run keys hash; see ``gitjax.configs.jsonable``)."""
        return {"name": self.name, "params": {k: jsonable(x) for k, x in self.params}}

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
      method: a key of ``gitjax.study.execute.METHODS`` ('lti', 'coarse', 'exact', 'ig', 'git+ig', ...).
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
      base_prior: a trained prior (a run dir or a shipped ``gitjax/priors/NAME``) for this
        row's method: used as is by a clean row, fine-tuned from by a matched one ("" : the
        row trains its prior at the budget). Set by ``grids.apply_base_priors``; out of the
        key when empty, so rows without one keep their keys.
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
    base_prior: str = dataclasses.field(default="", metadata={"omit_default": True})
    setting: str = _presentation("")
    x: float | None = _presentation(None)
    panel: str = _presentation("")

    def __post_init__(self) -> None:
        object.__setattr__(self, "victim_kwargs", freeze(dict(self.victim_kwargs)))

    @property
    def column(self) -> str:
        """Table column / plot curve of this run: the method, tagged when its prior is matched."""
        return f"{self.method} (matched prior)" if self.prior_training == "matched" else self.method


def run_to_dict(run: Run) -> dict[str, Any]:
    """The run's identity as plain JSON values (presentation fields excluded)."""
    out = {}
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        if f.metadata.get("key", True) and not (f.metadata.get("omit_default") and value == f.default):
            out[f.name] = jsonable(value)
    return out


def _hash(obj: Any, n: int = 12) -> str:
    canonical = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:n]


def run_key(run: Run) -> str:
    """12 hex digits of sha256 over the canonical JSON of :func:`run_to_dict`."""
    return _hash(run_to_dict(run))


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
