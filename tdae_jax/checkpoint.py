"""Orbax checkpoints of an in-flight optimisation, so a killed run resumes where it stopped.

One ``CheckpointManager`` per work unit (a batch of images), under ``<workdir>/ckpt/<unit>``: it saves
the whole optimiser state pytree (perturbation, DPD state, optimizer state, step) plus JSON metadata
(image ids, per-iteration loss history, config fingerprint) every ``every`` iterations. Restoring
places the arrays with the shardings of an abstract target, so a resumed step runs with exactly the
same layout and (keys being derived from image id and step, prng.py) gives bit-identical results.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class UnitCheckpointer:
    """Save/restore of ``(state, meta)`` for one work unit."""

    def __init__(self, directory: Path | str, every: int, max_to_keep: int = 2):
        self.directory = Path(directory).absolute()
        self.every = int(every)
        self._mngr = None
        if self.every > 0:
            self._mngr = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
            )

    @property
    def enabled(self) -> bool:
        return self._mngr is not None

    def latest_step(self) -> int | None:
        return self._mngr.latest_step() if self._mngr else None

    def maybe_save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        if not self._mngr or (not force and step % self.every):
            return False
        self._mngr.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
        self._mngr.wait_until_finished()
        return True

    def restore(self, abstract_state: Any, expect_meta: dict | None = None):
        """Returns ``(step, state, meta)`` of the latest checkpoint, or None.

        ``abstract_state``: a pytree of ``jax.ShapeDtypeStruct`` with shardings. If ``expect_meta`` is given,
        a checkpoint whose ``fingerprint`` differs (other flags, other images) is ignored, not resumed.
        """
        step = self.latest_step()
        if step is None:
            return None
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
        )
        meta = dict(out["meta"])
        if expect_meta is not None and meta.get("fingerprint") != expect_meta.get("fingerprint"):
            return None
        return step, out["state"], meta

    def close(self, remove: bool = False):
        if self._mngr:
            self._mngr.wait_until_finished()
            self._mngr.close()
            self._mngr = None
        if remove and self.directory.exists():
            shutil.rmtree(self.directory, ignore_errors=True)


def abstract_like(tree: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` pytree with the given shardings (restore target)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def fingerprint(obj: Any) -> str:
    """Stable short hash of a JSON-able description (flags + image ids)."""
    import hashlib

    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
