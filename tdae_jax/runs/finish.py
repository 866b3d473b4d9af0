"""Finishing one protected image: check, write, measure, record (in that order).

1. The optimisation's result is checked *before* anything is written: a non-finite final loss or perturbation is a
   failed row naming the file, and no PNG exists for it (the last finite iterate is not a protection the run can
   vouch for).
2. The image is written atomically as a lossless PNG or WebP (``data/io.py`` ``save_image_atomic``: temporary
   file + rename, umask permissions; the source's ICC profile copied, its EXIF only with ``keep_metadata``, the
   orientation tag set to 1 since the pixels are stored upright), read back, and measured against the original
   (L_inf in 1/255 steps, PSNR, SSIM: what is on disk).
3. The loss curves are written (atomically), and only then the manifest marks the image done.

An ``OSError`` at step 2 or 3 (disk full, quota, permissions) is a :class:`RunError`: the image stays ``running``
in the manifest on disk (a resumed run redoes it) and nothing half-written is left. Generic over the defense:
:func:`commit` takes any protected uint8 image (DLADiff composes its own two layers before it).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest
from tdae_jax.metrics import image as image_metrics
from tdae_jax.runs.workdir import Workdir


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def divergence(li: dio.LoadedImage, delta, hist: dict) -> str | None:
    """Why the result of ``li`` cannot be written (non-finite final loss or perturbation), or None."""
    loss = [float(v) for v in hist.get("loss", [])]
    if loss and not math.isfinite(loss[-1]):
        return f"{li.path}: the loss became non-finite (final loss {loss[-1]}); no output written"
    if not np.isfinite(np.asarray(delta)).all():
        return f"{li.path}: the perturbation became non-finite; no output written"
    return None


def loss_metrics(hist: dict, seconds: float) -> dict:
    loss = [float(v) for v in hist.get("loss", [])]
    return {"final_loss": _finite_or_none(loss[-1]) if loss else None,
            "initial_loss": _finite_or_none(loss[0]) if loss else None, "seconds": round(seconds, 3)}


def commit(wd: Workdir, manifest: Manifest, li: dio.LoadedImage, protected_uint8: np.ndarray, hist: dict,
           metrics: dict, outputs: dict | None = None, *, output_format: str = "png",
           keep_metadata: bool = False) -> Path:
    """Writes ``protected/<id>.<png|webp>`` and ``curves/<id>.json``, then marks ``li`` done with its on-disk
    metrics (``output_format``: ``data/io.py`` ``OUTPUT_FORMATS``; ``keep_metadata``: copy the source's EXIF)."""
    rel = f"protected/{li.id}.{output_format}"
    with wd.writing(rel):
        out = dio.save_image_atomic(wd.root / rel, protected_uint8, fmt=output_format,
                                    forbidden_dirs=[li.path.parent], icc_profile=li.icc_profile,
                                    exif=li.exif if keep_metadata else None)
    back = dio.read_back_uint8(out)
    a = np.asarray(back[None], np.float32) / 255.0
    b = np.asarray(li.original_uint8[None], np.float32) / 255.0
    measured = {"linf_255": int(dio.linf_uint8(back, li.original_uint8)),
                "psnr": float(image_metrics.psnr(a, b)[0]), "ssim": float(image_metrics.ssim(a, b)[0])}
    curves = {k: [float(x) for x in np.asarray(v).reshape(-1)] for k, v in hist.items()}
    wd.write_bytes(f"curves/{li.id}.json", json.dumps(curves).encode())
    with wd.writing("manifest.json"):
        manifest.mark(li.id, "done", outputs={**(outputs or {}), "protected": rel}, metrics={**measured, **metrics})
    return out


def finish_image(wd: Workdir, manifest: Manifest, li: dio.LoadedImage, delta, hist: dict, seconds: float,
                 eps: float, outputs: dict | None = None, **write) -> list[float] | None:
    """One image of a batch (``delta``: ``[H,W,3]`` on the working canvas; ``hist``: name -> ``[steps]``;
    ``write``: :func:`commit`'s ``output_format`` / ``keep_metadata``).

    Returns the loss curve when the image is done, None when it failed (non-finite result).
    """
    metrics = loss_metrics(hist, seconds)
    problem = divergence(li, delta, hist)
    with wd.writing("manifest.json"):
        if problem is not None:
            manifest.mark(li.id, "failed", error=problem, outputs=outputs, metrics=metrics)
            return None
    commit(wd, manifest, li, dio.protect_loaded(li, delta, eps), hist, metrics, outputs, **write)
    return [float(v) for v in hist.get("loss", [])]
