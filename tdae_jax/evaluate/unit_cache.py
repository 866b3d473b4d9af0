"""Resumable evaluation: every finished (batch of sources, victim) unit is stored in ``<outdir>/partial/``.

A unit is the rows and report thumbnails one victim produced on one batch of sources (``Runner.run``); it is keyed
by the victim and the (run, image id) pairs of the batch, under the settings that decide its numbers
(:func:`fingerprint`). An evaluation stopped midway (killed, a victim failing on one batch) re-run with the same
command loads the stored units and computes only the others; changed settings discard the stored units (they
would give other numbers). Files are written atomically (``data/io.py``) as ``.npz`` without pickles: the rows
and the thumbnail labels as JSON bytes, each thumbnail cell as a uint8 array.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np

from tdae_jax.data import io as dio

log = logging.getLogger("tdae_jax")

# EvalConfig fields that change no number of a unit (where outputs go, what the report shows)
NOT_RESULTS = ("outdir", "plots", "report_images")


def fingerprint(cfg) -> str:
    """A digest of the settings that determine a unit's rows."""
    d = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_RESULTS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


class UnitCache:
    """``<outdir>/partial/``: one ``.npz`` per finished unit, and ``settings.sha256``. No ``outdir`` (a library
    call that writes nothing): nothing is stored."""

    def __init__(self, outdir, cfg):
        self.root = Path(outdir) / "partial" if outdir else None
        if self.root is None:
            return
        digest = fingerprint(cfg)
        stamp = self.root / "settings.sha256"
        if self.root.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != digest):
            log.warning("%s: stored units were computed with other settings; recomputing", self.root)
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        dio.atomic_write_bytes(stamp, (digest + "\n").encode())

    def _path(self, victim: str, chunk) -> Path:
        ids = sorted(f"{it.run.name}/{it.id}" for group in chunk for it in group)
        key = hashlib.sha256(json.dumps([victim, ids]).encode()).hexdigest()[:24]
        return self.root / f"{key}.npz"

    def load(self, victim: str, chunk) -> tuple[list, dict] | None:
        """``(rows, thumbs)`` of a stored unit, or None (not stored, or unreadable: recomputed)."""
        path = self._path(victim, chunk) if self.root is not None else None
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(z["meta"].tobytes().decode())
                thumbs = {tuple(t["key"]): {"prompt": t["prompt"],
                                            "cells": {lab: z[f"t{i}_{j}"] for j, lab in enumerate(t["labels"])}}
                          for i, t in enumerate(meta["thumbs"])}
        except (OSError, ValueError, KeyError) as e:
            log.warning("%s: unreadable stored unit (%s); recomputing it", path, e)
            return None
        return meta["rows"], thumbs

    def save(self, victim: str, chunk, rows: list, thumbs: dict) -> None:
        if self.root is None:
            return
        arrays, tmeta = {}, []
        for i, (key, t) in enumerate(thumbs.items()):
            tmeta.append({"key": list(key), "prompt": t["prompt"], "labels": list(t["cells"])})
            arrays.update({f"t{i}_{j}": np.asarray(a, np.uint8) for j, a in enumerate(t["cells"].values())})
        meta = json.dumps({"rows": rows, "thumbs": tmeta}, default=float).encode()
        buf = io.BytesIO()
        np.savez(buf, meta=np.frombuffer(meta, np.uint8), **arrays)
        dio.atomic_write_bytes(self._path(victim, chunk), buf.getvalue())
