"""GIT generators: leaked gradients in, B reconstructed images out.

Three kinds share one interface::

    config = GeneratorConfig(kind="coarse", batch_size=1)
    gen = build_generator(config, victim, victim_params)
    gen_params = gen.init(key, grads_N, victim_params)["params"]
    images_NxBxHxWxC = gen.apply({"params": gen_params}, grads_N, victim_params)   # in [0, 1]

``grads_N`` is a gradient pytree shaped like the victim params with a leading N
axis (N independent leaked gradients, each the batch-mean gradient over B images);
``victim_params`` are the victim's parameters without an N axis, or None for the
kinds that do not read them (Coarse-GIT, LTI, Exact-GIT with use_victim_params=False).

* "exact": Exact-GIT (``exact.ExactGIT``), the backward pass inverted block by block.
* "coarse": Coarse-GIT (``coarse.CoarseGIT``), one shallow MLP per layer group in
  reverse order; the variant behind the paper's main results.
* "lti": Learning to Invert (Wu et al. 2023, ``lti.LTI``), an MLP on the flat gradient.

Every generator is built from the victim's gradient layout and traced wiring
(``gitjax.trace.trace_victim``), so all victims of the zoo work without per-model code.
Modules: ``config`` (GeneratorConfig), ``linalg`` (backward-pass algebra), ``features``
(Coarse-GIT's gradient features), ``io`` (input checks, map back to pixels), one per kind.
Derivations: docs/theory.md.
"""

from __future__ import annotations

import flax.linen as nn

from gitjax.generators.coarse import CoarseGIT
from gitjax.generators.config import GENERATORS, GeneratorConfig
from gitjax.generators.exact import ExactGIT
from gitjax.generators.io import check_victim_params
from gitjax.generators.lti import LTI
from gitjax.trace import trace_victim
from gitjax.types import Params
from gitjax.victims import Victim

__all__ = [
    "GENERATORS",
    "GeneratorConfig",
    "build_generator",
    "ExactGIT",
    "CoarseGIT",
    "LTI",
]


def build_generator(config: GeneratorConfig, victim: Victim, victim_params: Params) -> nn.Module:
    """Builds the generator of ``config.kind`` for a victim.

    Args:
      config: generator hyper-parameters.
      victim: the victim architecture.
      victim_params: its parameters (checked against the victim's layout; raises
        GradientMismatchError if they belong to another model). Only their
        structure is used here; Exact-GIT reads their values at ``apply`` time.

    Returns:
      A Flax module with ``apply({"params": p}, grads_N, victim_params) -> (N, B, H, W, C)``.
    """
    plan = trace_victim(victim)
    if victim_params is not None:
        check_victim_params(plan.layout, victim_params)
    if config.kind == "exact":
        return ExactGIT(config, plan)
    if config.kind == "coarse":
        return CoarseGIT(config, plan)
    if config.kind == "lti":
        return LTI(config, plan)
    raise ValueError(f"unknown generator kind {config.kind!r}; expected one of {', '.join(GENERATORS)}")
