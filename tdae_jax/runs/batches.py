"""The batch loop of a run, generic over "protect one batch", with progress lines and an ETA.

A *protect* callable takes ``(batch_index, ids, on_iter)`` and returns a :class:`BatchResult` for those ids (an
empty ``ids`` is the padding batch of a multi-process run: it must still run, SPMD, and its result is dropped).
A *finish* callable writes one image (runs/finish.py) and returns its loss curve or None. A batch that raises is
failed as a whole (each id marked failed with the error) and the run goes on, except for an ``OSError`` anywhere
in the exception's chain (a checkpoint on a full disk): that is the workdir's problem, a :class:`RunError`.

The ETA follows the steady-state rate, measured from the first progress call of the run (the first iteration
includes compilation), in the manner of the steps-per-second summaries of google/flax
``examples/imagenet/train.py`` ``train_and_evaluate``.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import numpy as np

from tdae_jax.data.manifest import Manifest
from tdae_jax.runs.errors import io_error, write_failure
from tdae_jax.runs.workdir import Workdir

log = logging.getLogger("tdae_jax")


@dataclasses.dataclass
class BatchResult:
    """``delta``: ``[n,H,W,3]`` float32; ``history``: name -> ``[n, steps]``; ``outputs``: per-image extra
    manifest outputs (e.g. the prompt used); ``resumed``: the checkpoint iteration resumed from, or None."""

    delta: np.ndarray
    history: dict
    outputs: list = dataclasses.field(default_factory=list)
    resumed: int | None = None


def hms(seconds: float) -> str:
    """``h:mm:ss`` (``--:--:--`` for an unknown duration)."""
    if not np.isfinite(seconds):
        return "--:--:--"
    s = int(round(max(seconds, 0.0)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Clock:
    """Progress lines ``batch b/B (n img) iter i/N loss=... elapsed h:mm:ss ETA h:mm:ss``."""

    def __init__(self, n_batches: int, steps: int, progress: Callable[[str], None]):
        self.n_batches, self.steps, self.progress = n_batches, steps, progress
        self.total = max(1, n_batches * steps)
        self.t_run = time.perf_counter()
        self.first: tuple[float, int] | None = None

    def on_iter(self, bi: int, n_images: int) -> Callable[[int, dict], None]:
        def report(it: int, info: dict) -> None:
            now, done = time.perf_counter(), bi * self.steps + it
            if self.first is None:
                self.first = (now, done)
            t1, n1 = self.first
            eta = (now - t1) / (done - n1) * (self.total - done) if done > n1 else float("nan")
            loss = info.get("loss")
            mean = float(np.mean(loss)) if loss is not None and len(loss) else float("nan")
            eta_s = f"ETA {hms(eta)}" if np.isfinite(eta) else "ETA (after the next report)"
            self.progress(f"batch {bi + 1}/{self.n_batches} ({n_images} img) iter {it}/{self.steps} "
                          f"loss={mean:.5g} elapsed {hms(now - self.t_run)} {eta_s}")

        return report


def run(wd: Workdir, manifest: Manifest, work: list[list[str]], protect: Callable, finish: Callable,
        clock: Clock) -> dict[str, list[float]]:
    """Runs every batch of ``work``; returns the loss curves of the images done (id -> curve)."""
    curves: dict[str, list[float]] = {}
    for bi, ids in enumerate(work):
        t0 = time.perf_counter()
        with wd.writing("manifest.json"):
            for i in ids:
                manifest.mark(i, "running")
        try:
            res = protect(bi, ids, clock.on_iter(bi, len(ids)))
        except Exception as err:  # noqa: BLE001 - one failing batch must not stop the run
            cause = io_error(err)
            if cause is not None:
                raise write_failure(wd.root, f"batch {bi + 1}'s checkpoint", cause) from err
            log.exception("batch %d failed", bi + 1)
            with wd.writing("manifest.json"):
                for i in ids:
                    manifest.mark(i, "failed", error=f"optimisation failed: {type(err).__name__}: {err}")
            continue
        if res.resumed:
            clock.progress(f"batch {bi + 1}: resumed from checkpoint at iteration {res.resumed}")
        secs = (time.perf_counter() - t0) / max(len(ids), 1)
        for j, i in enumerate(ids):
            out = res.outputs[j] if j < len(res.outputs) else None
            curve = finish(i, res.delta[j], {k: v[j] for k, v in res.history.items()}, secs, out)
            if curve is not None:
                curves[i] = curve
    return curves
