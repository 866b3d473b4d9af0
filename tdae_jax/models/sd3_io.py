"""Torch-free safetensors reading for the SD3 family (the safetensors format; diffusers SD3 checkpoint layout).

A minimal safetensors parser: an 8-byte little-endian header length, a JSON header
(``name -> {dtype, shape, data_offsets}``), then the raw bytes. Tensors are returned as numpy
views of a read-only memory map, so a 16 GB sharded checkpoint is read one tensor at a time.
BF16 (the SD3.5 on-disk dtype) is read through ``ml_dtypes.bfloat16``, which works whatever the
installed safetensors version supports. Pickle files are refused.

Errors name the file and the tensor: a missing file, a malformed header, a tensor that a
sharded index maps to a file that lacks it, a missing/unexpected/wrong-shaped tensor.
"""
from __future__ import annotations

import json
import mmap
import os
import re
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

from tdae_jax.models.weights import WeightsError, read_config as _read_json  # one error type for every loader

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}




def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of one ``.safetensors`` file as read-only numpy arrays (memory-mapped)."""
    if not os.path.isfile(path):
        raise WeightsError(f"missing weights file: {path}")
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise WeightsError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise WeightsError(f"{path}: malformed safetensors header ({e})") from None
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 8 + n else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dt = _DTYPES.get(info["dtype"])
        if dt is None:
            raise WeightsError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        shape = tuple(info["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * np.dtype(dt).itemsize:
            raise WeightsError(f"{path}: tensor {name!r} byte range does not match shape {shape} {info['dtype']}")
        arr = np.frombuffer(buf, dtype=dt, count=count, offset=8 + n + start) if count else np.zeros(0, dt)
        out[name] = arr.reshape(shape)
    return out


def load_state_dict(directory: str, stem: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read ``<stem>.safetensors`` or the shards listed in ``<stem>.safetensors.index.json``.

    Args:
      directory: a diffusers/transformers component folder (e.g. ``<root>/transformer``).
      stem: ``diffusion_pytorch_model`` (diffusers) or ``model`` (transformers).
    Returns:
      (tensors by PyTorch name, file path by PyTorch name).
    """
    single = os.path.join(directory, f"{stem}.safetensors")
    index = single + ".index.json"
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        tensors, where = {}, {}
        for fname in sorted(set(weight_map.values())):
            path = os.path.join(directory, fname)
            shard = read_safetensors(path)
            for name, arr in shard.items():
                tensors[name] = arr
                where[name] = path
        for name, fname in weight_map.items():
            if name not in tensors:
                raise WeightsError(f"{index}: tensor {name!r} is mapped to {fname}, which does not contain it")
        return tensors, where
    if os.path.isfile(single):
        tensors = read_safetensors(single)
        return tensors, {k: single for k in tensors}
    for bad in (f"{stem}.bin", f"{stem}.ckpt", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(directory, bad)):
            raise WeightsError(f"{os.path.join(directory, bad)}: pickle checkpoints are refused; convert to safetensors")
    raise WeightsError(f"missing weights file: {single} (or {os.path.basename(index)})")


def read_config(directory: str, name: str = "config.json") -> dict:
    """``directory/name`` as a dict (``weights.read_config``: errors name the file)."""
    return _read_json(os.path.join(directory, name))


def torch_key_to_path(key: str) -> tuple[str, ...]:
    """``transformer_blocks.3.ff.net.0.proj.weight`` -> ``(transformer_blocks_3, ff, net_0, proj, weight)``:
    a module list index is joined to its list's name, as linen names submodules set in ``setup``."""
    key = re.sub(r"(\w+)\.(\d+)(?=\.|$)", r"\1_\2", key)
    return tuple(key.split("."))


def check_and_unflatten(
    converted: Mapping[tuple[str, ...], tuple[np.ndarray, str, str]],
    expected: Mapping[tuple[str, ...], tuple[int, ...]],
    component: str,
    ignore_missing: Iterable[tuple[str, ...]] = (),
) -> dict:
    """Strict layout check, then a nested param dict.

    Args:
      converted: flax path -> (array, torch name, file).
      expected: flax path -> shape (from ``jax.eval_shape`` of the module's init).
      component: what is being loaded, for the messages (e.g. ``"transformer"``).
    """
    ignore = set(ignore_missing)
    problems = []
    for path, (arr, tname, fname) in converted.items():
        if path not in expected:
            problems.append(f"unexpected tensor {tname!r} in {fname} (-> {'/'.join(path)})")
        elif tuple(arr.shape) != tuple(expected[path]):
            problems.append(
                f"tensor {tname!r} in {fname} has shape {tuple(arr.shape)} after conversion; "
                f"{component} expects {tuple(expected[path])} at {'/'.join(path)}"
            )
    files = sorted({f for _, _, f in converted.values()}) or ["<no files>"]
    for path in expected:
        if path not in converted and path not in ignore:
            problems.append(f"missing tensor for {'/'.join(path)} (not in {', '.join(files)})")
    if problems:
        more = f" (+{len(problems) - 20} more)" if len(problems) > 20 else ""
        raise WeightsError(f"{component}: checkpoint does not match the model:\n  " + "\n  ".join(problems[:20]) + more)
    tree: dict = {}
    for path, (arr, _, _) in converted.items():
        node = tree
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = arr
    return tree


def flat_shapes(tree, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flatten a nested dict of arrays/ShapeDtypeStructs to ``path -> shape``."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat_shapes(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = tuple(v.shape)
    return out
