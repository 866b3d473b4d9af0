"""Mesh over devices with a batch axis ``"data"`` and, for models too large for one device, a ``"model"``
axis (docs/design.md, convention 5).

Batches are sharded over ``data``; surrogate params are replicated, or split over ``model`` by the
surrogate's own rule (``SD3.shard``: Megatron-style attention/FF splits) when ``model_parallel > 1``. ``pad_batch`` pads a batch to
a multiple of the device count with copies of its last row and a ``valid`` mask, so any number of
images runs on any number of devices and the padding never reaches an output.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(num_devices: int | None = None, axis: str = "data", model_parallel: int = 1) -> Mesh:
    """A mesh over the first ``num_devices`` devices (all by default): 1-D ``(axis,)``, or
    ``(axis, "model")`` of shape ``(num_devices // model_parallel, model_parallel)`` when
    ``model_parallel > 1`` (consecutive devices share a model replica, as MaxText lays out ICI axes)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices < 1 or num_devices > len(devices):
            raise ValueError(f"num_devices={num_devices} but {len(devices)} devices are visible")
        devices = devices[:num_devices]
    if model_parallel < 1 or len(devices) % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must be >= 1 and divide the {len(devices)} devices")
    if model_parallel == 1:
        return Mesh(np.asarray(devices), (axis,))
    return Mesh(np.asarray(devices).reshape(-1, model_parallel), (axis, "model"))


def data_size(mesh: Mesh) -> int:
    """Devices along the batch axis (the first): batches are padded to a multiple of this."""
    return int(mesh.shape[mesh.axis_names[0]])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over ``data``."""
    return NamedSharding(mesh, P(mesh.axis_names[0]))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shard_batch(tree: Any, mesh: Mesh) -> Any:
    """Place every array leaf of ``tree`` with its leading axis sharded over ``data``."""
    s = batch_sharding(mesh)
    return jax.tree.map(lambda a: jax.device_put(a, s), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    s = replicated(mesh)
    return jax.tree.map(lambda a: jax.device_put(a, s), tree)


def padded_size(n: int, mesh: Mesh) -> int:
    d = data_size(mesh)
    return max(d, -(-n // d) * d)


def pad_batch(tree: Any, n: int, size: int) -> tuple[Any, np.ndarray]:
    """Pad each leaf's leading axis from ``n`` to ``size`` by repeating the last row.

    Returns the padded tree and ``valid: [size] bool``.
    """
    if size < n:
        raise ValueError(f"cannot pad {n} rows to {size}")

    def pad(a):
        a = np.asarray(a)
        if size == n:
            return a
        reps = np.repeat(a[n - 1 : n], size - n, axis=0)
        return np.concatenate([a[:n], reps], axis=0)

    valid = np.arange(size) < n
    return jax.tree.map(pad, tree), valid


def pad_and_shard(a: Any, mesh: Mesh, n: int, axis: int = 0) -> jax.Array:
    """``a`` (``n`` rows along ``axis``) padded to :func:`padded_size` by repeating its last row, then placed with
    that axis split over ``data``: the one pad-and-shard of callers that split a batch themselves (the editors)."""
    import jax.numpy as jnp

    size = padded_size(n, mesh)
    a = jnp.asarray(a)
    if size > n:
        a = jnp.take(a, jnp.minimum(jnp.arange(size), n - 1), axis=axis)
    return jax.device_put(a, NamedSharding(mesh, P(*([None] * axis + [mesh.axis_names[0]]))))
