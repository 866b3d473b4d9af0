"""Multi-host runs with JAX's multi-controller runtime: the same command on every process.

- ``initialize(...)``: calls ``jax.distributed.initialize`` when asked (flags, or the environment:
  ``TDAE_COORDINATOR``/``TDAE_NUM_PROCESSES``/``TDAE_PROCESS_ID``, or ``--multihost=auto`` on a TPU pod or
  a SLURM job where JAX detects the cluster itself). On CPU the collectives go through gloo.
- One global ``Mesh(("data",))`` spans every device of every process. A global batch of G rows (a
  multiple of the device count) is split into ``process_count`` contiguous blocks; process p loads and
  writes only the images of its block (``local_rows``): a disjoint, deterministic shard of the inputs.
- ``to_global`` turns per-process rows into one global ``jax.Array``; ``local_rows`` reads a process's
  own rows back; ``allgather_json`` lets process 0 merge per-process results (no shared filesystem
  needed for the metrics; checkpoints need one, as orbax does).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    index: int = 0
    count: int = 1

    @property
    def is_main(self) -> bool:
        return self.index == 0


def initialize(mode: str = "off", coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> ProcessInfo:
    """Start the distributed runtime when requested. ``mode``: off | on | auto.

    ``on`` needs coordinator/num_processes/process_id (flags or TDAE_* environment variables);
    ``auto`` lets JAX detect a TPU pod / SLURM / Open MPI cluster.
    """
    coordinator = coordinator or os.environ.get("TDAE_COORDINATOR", "")
    num_processes = num_processes or int(os.environ.get("TDAE_NUM_PROCESSES", "0") or 0)
    if process_id < 0:
        process_id = int(os.environ.get("TDAE_PROCESS_ID", "-1") or -1)
    if mode == "off" and not coordinator:
        return ProcessInfo()
    # CPU collectives over gloo (only affects the CPU client; must not touch the backend before initialize)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if mode == "auto" and not coordinator:
        jax.distributed.initialize()
    else:
        if not coordinator or num_processes < 1 or process_id < 0:
            raise ValueError("multi-process run needs --coordinator, --num_processes and --process_id "
                             "(or TDAE_COORDINATOR / TDAE_NUM_PROCESSES / TDAE_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return ProcessInfo(jax.process_index(), jax.process_count())


def info() -> ProcessInfo:
    return ProcessInfo(jax.process_index(), jax.process_count())


def block(global_rows: int, proc: ProcessInfo) -> slice:
    """The contiguous rows of a global batch that process ``proc`` owns."""
    if global_rows % proc.count:
        raise ValueError(f"global batch {global_rows} is not a multiple of the process count {proc.count}")
    n = global_rows // proc.count
    return slice(proc.index * n, (proc.index + 1) * n)


def to_global(tree: Any, sharding: NamedSharding) -> Any:
    """Per-process rows (numpy) -> global arrays sharded as ``sharding`` (also right for one process)."""
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def local_rows(arr: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (replicas de-duplicated)."""
    if arr.is_fully_addressable:
        return np.asarray(jax.device_get(arr))
    shards = {}
    for s in arr.addressable_shards:
        start = s.index[0].start or 0
        shards.setdefault(start, np.asarray(s.data))
    return np.concatenate([shards[k] for k in sorted(shards)], axis=0)


def allgather_json(obj: Any, proc: ProcessInfo) -> list:
    """Every process's JSON-able ``obj``, in process order (a no-op list for one process)."""
    if proc.count == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj, default=str).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.asarray([data.size], np.int32))
    size = int(np.max(lengths))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    allp = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(allp[i][: int(lengths[i][0])]).decode()) for i in range(proc.count)]


def barrier(name: str, proc: ProcessInfo) -> None:
    if proc.count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
