"""Type aliases and the shape letters used in array names across gitjax.

Shape letters (suffixes of local array names, e.g. ``x_BxHxWxC``):
  N: independent leaked gradients (attack runs, or training examples of a prior)
  B: victim batch size (images behind one leaked gradient)
  H, W, C: image height, width, channels (NHWC, values in [0, 1])
  K: number of classes
  P: number of flattened gradient/parameter entries
  D: feature width
"""

from __future__ import annotations

from typing import Any

import jax

Array = jax.Array
PRNGKey = jax.Array
Params = Any  # a Flax parameter pytree (nested dicts of arrays)
Grads = Any  # a pytree with the structure of Params
ModelState = Any  # non-trainable victim state, e.g. {"batch_stats": ...}; {} when absent


class GitjaxError(ValueError):
    """Base class of the errors gitjax raises for bad user input."""


class GradientMismatchError(GitjaxError):
    """A gradient pytree does not match the victim model's parameters."""


class NonFiniteGradientError(GitjaxError):
    """A leaked gradient contains NaN or inf entries."""


class InputShapeError(GitjaxError):
    """Images or labels have the wrong shape for the victim model."""
