"""Run reports: metrics.jsonl / metrics.csv rows and a self-contained report.html.

The HTML shows, per image, original | protected | amplified difference (|x' - x| scaled so the
budget maps to full range) and, when an editor was run, edit(original) | edit(protected), plus the
per-iteration loss curve as inline SVG (no plotting dependency). Thumbnails are written beside the
report (``report_assets/``) so the page works offline and never points into an input folder.
"""
from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image

from tdae_jax.data import io as dio

COLUMNS = ("id", "source", "status", "linf_255", "psnr", "ssim", "final_loss", "seconds", "error")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def write_metrics(workdir: Path, rows: Sequence[dict], columns: Sequence[str] = COLUMNS) -> None:
    """``metrics.jsonl`` (every key of each row) and ``metrics.csv`` (``columns``), both atomic."""
    jl = "".join(json.dumps({k: _clean(v) for k, v in r.items()}, sort_keys=False) + "\n" for r in rows)
    dio.atomic_write_bytes(workdir / "metrics.jsonl", jl.encode())
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else _clean(r.get(k))) for k in columns})
    dio.atomic_write_bytes(workdir / "metrics.csv", buf.getvalue().encode())


def amplified_difference(original: np.ndarray, protected: np.ndarray, eps: float) -> np.ndarray:
    """uint8 visualization: 128 + (x' - x) * 127 / (eps*255), so +-eps maps to the full range."""
    k = max(dio.budget_steps(eps), 1)
    d = protected.astype(np.int32) - original.astype(np.int32)
    return np.clip(128 + d * (127.0 / k), 0, 255).astype(np.uint8)


def _thumb(arr: np.ndarray, path: Path, side: int = 256) -> str:
    img = Image.fromarray(arr)
    img.thumbnail((side, side), Image.Resampling.NEAREST if max(arr.shape[:2]) <= side else Image.Resampling.LANCZOS)
    if max(img.size) < 128:  # tiny images: upscale for visibility
        f = 128 // max(img.size)
        img = img.resize((img.size[0] * f, img.size[1] * f), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    dio.atomic_write_bytes(path, buf.getvalue())
    return path.name


def loss_svg(curve: Iterable[float], width: int = 240, height: int = 90) -> str:
    ys = [float(v) for v in curve if v is not None and math.isfinite(float(v))]
    if len(ys) < 2:
        return "<svg width='%d' height='%d'></svg>" % (width, height)
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    pts = " ".join(
        f"{4 + i * (width - 8) / (len(ys) - 1):.1f},{4 + (hi - y) * (height - 20) / span:.1f}" for i, y in enumerate(ys)
    )
    return (
        f"<svg width='{width}' height='{height}' style='background:#fafafa'>"
        f"<polyline fill='none' stroke='#c33' stroke-width='1.5' points='{pts}'/>"
        f"<text x='4' y='{height - 3}' font-size='10'>loss {ys[0]:.4g} &#8594; {ys[-1]:.4g} ({len(ys)} it)</text></svg>"
    )


def write_html(workdir: Path, title: str, entries: Sequence[dict], eps: float, summary: dict) -> Path:
    """``entries``: dicts with id, status, error, metrics, and optional arrays ``original``, ``protected``,
    ``edit_original``, ``edit_protected`` (uint8 HxWx3) and ``loss_curve`` (list of float)."""
    assets = workdir / "report_assets"
    assets.mkdir(parents=True, exist_ok=True)
    rows = []
    for e in entries:
        cells = []
        eid = e["id"]
        if e.get("original") is not None and e.get("protected") is not None:
            cells.append(("original", _thumb(e["original"], assets / f"{eid}.orig.png")))
            cells.append(("protected", _thumb(e["protected"], assets / f"{eid}.prot.png")))
            diff = amplified_difference(e["original"], e["protected"], eps)
            cells.append((f"difference x{127 / max(dio.budget_steps(eps), 1):.0f}", _thumb(diff, assets / f"{eid}.diff.png")))
        for key, label in (("edit_original", "edit(original)"), ("edit_protected", "edit(protected)")):
            if e.get(key) is not None:
                cells.append((label, _thumb(e[key], assets / f"{eid}.{key}.png")))
        imgs = "".join(
            f"<figure><img src='report_assets/{html.escape(src)}'><figcaption>{html.escape(lab)}</figcaption></figure>"
            for lab, src in cells
        )
        m = e.get("metrics", {})
        stats = ", ".join(f"{k}={_fmt(m[k])}" for k in ("linf_255", "psnr", "ssim", "final_loss", "seconds") if k in m)
        err = f"<p class='err'>{html.escape(str(e.get('error') or ''))}</p>" if e.get("error") else ""
        curve = loss_svg(e.get("loss_curve") or [])
        rows.append(
            f"<section><h3>{html.escape(eid)} <small>{html.escape(e.get('status', ''))}</small></h3>"
            f"<div class='row'>{imgs}{curve}</div><p>{html.escape(stats)}</p>{err}</section>"
        )
    summ = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in summary.items())
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:20px} .row{display:flex;gap:8px;align-items:flex-end;flex-wrap:wrap}"
        "figure{margin:0} img{image-rendering:pixelated;max-width:256px} figcaption{font-size:12px;text-align:center}"
        ".err{color:#b00} section{border-top:1px solid #ddd;padding:6px 0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>{summ}</ul>" + "".join(rows) + "</body></html>"
    )
    out = workdir / "report.html"
    dio.atomic_write_bytes(out, page.encode())
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
