"""What the prior trainer feeds its step: fixed examples at indices that are a pure function of (seed, step).

Each step of ``gitjax.train`` (without ``config.stream``) trains on N*B examples of the
fit split at ``step_indices(seed, step, ...)``: a resumed run sees exactly the data of an
uninterrupted one, whatever the number of hosts, and each process materialises only its
own rows of the global (N, B, ...) batch (``local_batch``). Groups of B can be ordered by
(label, brightness), on the host (``gather_groups``) or inside jit (``sort_groups``, for
the stream's generated images).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from gitjax import parallel
from gitjax.configs import TrainConfig
from gitjax.data import ImageDataset
from gitjax.types import Array


def step_indices(seed: int, step: int, num_examples: int, count: int) -> np.ndarray:
    """The ``count`` example indices of one step: a pure function of (seed, step) (exact resume).

    Without replacement within a step when the dataset is large enough.
    """
    rng = np.random.default_rng([int(seed), 0x5EED, int(step)])
    return rng.choice(num_examples, size=count, replace=count > num_examples)


def gather_groups(images: np.ndarray, labels: np.ndarray, idx_NxB: np.ndarray,
                  sort_by_label: bool) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, B, H, W, C) and labels (N, B) at ``idx``; optionally each group ordered by (label, brightness)."""
    x = images[idx_NxB]
    y = labels[idx_NxB].astype(np.int32)
    if sort_by_label and idx_NxB.shape[1] > 1:
        key_NxB = y + 0.5 * x.mean(axis=(2, 3, 4))  # mean in [0, 1]: ties in label broken by brightness
        order = np.argsort(key_NxB, axis=1, kind="stable")
        x = np.take_along_axis(x, order[:, :, None, None, None], axis=1)
        y = np.take_along_axis(y, order, axis=1)
    return x, y


def sort_groups(x_NxBxHxWxC: Array, y_NxB: Array) -> tuple[Array, Array]:
    """``gather_groups``' order inside jit: each group of B sorted by (label, brightness)."""
    key_NxB = y_NxB + 0.5 * jnp.mean(x_NxBxHxWxC, axis=(2, 3, 4))
    order = jnp.argsort(key_NxB, axis=1, stable=True)
    return (jnp.take_along_axis(x_NxBxHxWxC, order[:, :, None, None, None], axis=1),
            jnp.take_along_axis(y_NxB, order, axis=1))


def local_batch(images: np.ndarray, labels: np.ndarray, idx: np.ndarray, config: TrainConfig, n: int,
                 mesh: Mesh) -> tuple[Array, Array]:
    """This process's rows of a global (N, B, ...) batch, assembled into global sharded arrays."""
    rows = parallel.local_batch_slice(n, mesh)
    x, y = gather_groups(images, labels, idx.reshape(n, config.victim_batch)[rows], config.sort_by_label)
    return parallel.global_batch_from_local(x, mesh, n), parallel.global_batch_from_local(y, mesh, n)


def eval_batch(ds: ImageDataset, seed: list[int], config: TrainConfig, n_eval: int, mesh: Mesh) -> tuple[Array, Array]:
    """A fixed set of n_eval held-out groups of B images of ``ds`` (drawn once from ``seed``)."""
    b = config.victim_batch
    idx = np.random.default_rng(seed).choice(len(ds), size=n_eval * b, replace=n_eval * b > len(ds))
    return local_batch(ds.images, ds.labels, idx, config, n_eval, mesh)
