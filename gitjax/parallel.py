"""Data parallelism for the prior trainer: one 1-D ("data",) mesh over every device of every host.

The trainer is a plain ``jax.jit`` over arrays that carry a ``NamedSharding``:
the batch is split along its leading axis (``P("data")``), parameters and the
optimiser state are replicated (``P()``), and XLA inserts the all-reduce of the
generator's gradient. Nothing here depends on the number of hosts: on one host
``jax.devices()`` is the local devices, on many it is all of them, and
``global_batch_from_local`` stitches each process's rows into one global array.

Multi-host start-up (see docs/multihost.md)::

    GITJAX_DISTRIBUTED=1 JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 \\
    JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0 python -m gitjax.train --preset lenet_coarse --workdir runs/x
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gitjax.types import Array

DATA_AXIS = "data"

# Environment variables that ask for multi-process start-up. Any of them being set
# (to a non-empty value other than "0") makes ``maybe_initialize_distributed`` act.
_DISTRIBUTED_FLAG = "GITJAX_DISTRIBUTED"
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS",)

_initialized = False


def distributed_requested(environ: dict[str, str] | None = None) -> bool:
    """True when the environment asks for ``jax.distributed.initialize``.

    ``GITJAX_DISTRIBUTED=1`` (auto-detected clusters: SLURM, Cloud TPU, ...) or an
    explicit ``JAX_COORDINATOR_ADDRESS``. ``GITJAX_DISTRIBUTED=0`` forces it off.
    """
    env = os.environ if environ is None else environ
    flag = env.get(_DISTRIBUTED_FLAG, "")
    if flag == "0":
        return False
    return bool(flag) or any(env.get(v) for v in _COORDINATOR_VARS)


def maybe_initialize_distributed(force: bool | None = None, **kwargs: Any) -> bool:
    """Calls ``jax.distributed.initialize(**kwargs)`` once, only when asked to.

    Must run before the first JAX computation. An unconditional call fails on a
    single CPU host (there is no cluster to detect), hence the gate.

    Args:
      force: True/False overrides the environment; None reads it
        (``distributed_requested``).
      **kwargs: passed to ``jax.distributed.initialize`` (coordinator_address,
        num_processes, process_id, ...). Unset ones come from the environment:
        ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``,
        or the cluster's own variables (SLURM, TPU pods).

    Returns:
      True if this call (or an earlier one) initialised the distributed runtime.
    """
    global _initialized
    if _initialized:
        return True
    want = distributed_requested() if force is None else force
    if not want:
        return False
    env_args = {
        "coordinator_address": os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": _int_env("JAX_NUM_PROCESSES"),
        "process_id": _int_env("JAX_PROCESS_ID"),
    }
    args = {k: v for k, v in env_args.items() if v is not None}
    args.update(kwargs)
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        # Cross-process collectives of the CPU backend need an implementation; gloo
        # ships with jaxlib. GPU/TPU backends ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**args)
    _initialized = True
    return True


def _int_env(name: str) -> int | None:
    v = os.environ.get(name)
    return int(v) if v not in (None, "") else None


def make_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh with axis "data" over ``devices`` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over "data", other axes whole: for x_NxBxHxWxC, y_NxB, grads_N."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array: parameters, optimiser state, PRNG keys."""
    return NamedSharding(mesh, P())


def num_data_shards(mesh: Mesh) -> int:
    return int(mesh.shape[DATA_AXIS])


def local_batch_slice(global_size: int, mesh: Mesh) -> slice:
    """Rows [start, stop) of a global batch of ``global_size`` this process must provide.

    The rows of each process are contiguous and in device order, as
    ``jax.make_array_from_process_local_data`` expects for ``P("data")``. Raises
    ValueError when the global size does not split evenly over the devices.
    """
    n_dev = num_data_shards(mesh)
    if global_size % n_dev:
        raise ValueError(
            f"global batch of {global_size} does not split over the {n_dev} devices of the mesh; "
            f"use a multiple of {n_dev}"
        )
    per_dev = global_size // n_dev
    pid = jax.process_index()
    local = [i for i, d in enumerate(mesh.devices.flat) if d.process_index == pid]
    if not local:
        raise ValueError(f"process {pid} owns no device of the mesh")
    if local != list(range(local[0], local[-1] + 1)):
        raise ValueError(f"devices of process {pid} are not contiguous in the mesh: positions {local}")
    return slice(local[0] * per_dev, (local[-1] + 1) * per_dev)


def global_batch_from_local(local: Array | np.ndarray, mesh: Mesh, global_size: int | None = None) -> Array:
    """Builds the global array, sharded ``P("data")``, from this process's rows.

    Args:
      local: this process's rows (``local_batch_slice`` of the global batch),
        shape (N_local, ...).
      mesh: the data mesh.
      global_size: N, the global leading size; default N_local * process_count.

    Returns:
      A jax.Array of shape (N, ...) whose shards live on the mesh devices. On one
      process this is just a sharded ``device_put``.
    """
    local = np.asarray(local)
    n = local.shape[0] * jax.process_count() if global_size is None else global_size
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local, (n, *local.shape[1:]))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host pytree (identical on every process) replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), tree
    )
