"""Run reports: metrics.jsonl / metrics.csv rows and a self-contained report.html.

The HTML opens with an optional banner (e.g. "this model demonstrates the method; it does not protect
against real editors"), the run's settings and a verdict (how many images were written within the budget),
then shows, per image, the edit instruction(s) used, original | protected | amplified difference
(|x' - x| scaled so the budget maps to full range) and, when an editor was run, edit(original) |
edit(protected), plus the per-iteration loss curve as inline SVG with labelled axes (no plotting
dependency). Thumbnails are written beside the report (``report_assets/``) so the page works offline and
never points into an input folder.
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
    dio.atomic_write_bytes(workdir / "metrics.csv", buf.getvalue().encode("utf-8", "backslashreplace"))  # PEP 383 names as \\xNN: valid UTF-8


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


def loss_svg(curve: Iterable[float], width: int = 300, height: int = 150) -> str:
    """The loss curve as an inline SVG plot: x axis "iteration" (1 .. N), y axis "loss" (min .. max), with
    tick labels at both ends of each axis; an empty plot with a note when fewer than two finite values."""
    ys = [float(v) for v in curve if v is not None and math.isfinite(float(v))]
    if len(ys) < 2:
        return (f"<svg class='loss' width='{width}' height='{height}'><text x='8' y='20' font-size='11'>"
                "no loss curve (fewer than 2 finite values)</text></svg>")
    left, right, top, bottom = 52, 8, 8, 34  # margins: y tick labels on the left, x ticks + label below
    pw, ph = width - left - right, height - top - bottom
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    pts = " ".join(f"{left + i * pw / (len(ys) - 1):.1f},{top + (hi - y) * ph / span:.1f}" for i, y in enumerate(ys))
    x0, y0 = left, top + ph  # the axes' origin
    text = "<text x='{:.1f}' y='{:.1f}' font-size='10' text-anchor='{}'{}>{}</text>".format
    return (
        f"<svg class='loss' width='{width}' height='{height}' style='background:#fafafa'>"
        f"<title>loss {ys[0]:.4g} &#8594; {ys[-1]:.4g} ({len(ys)} iterations)</title>"
        f"<line x1='{x0}' y1='{top}' x2='{x0}' y2='{y0}' stroke='#333'/>"
        f"<line x1='{x0}' y1='{y0}' x2='{left + pw}' y2='{y0}' stroke='#333'/>"
        f"<polyline fill='none' stroke='#c33' stroke-width='1.5' points='{pts}'/>"
        + text(x0 - 3, top + 8, "end", "", f"{hi:.3g}") + text(x0 - 3, y0, "end", "", f"{lo:.3g}")
        + text(x0, y0 + 12, "middle", "", "1") + text(left + pw, y0 + 12, "end", "", str(len(ys)))
        + text(left + pw / 2, height - 4, "middle", " class='xlabel'", "iteration")
        + text(12, top + ph / 2, "middle", f" class='ylabel' transform='rotate(-90 12 {top + ph / 2:.1f})'", "loss")
        + "</svg>"
    )


def verdict(entries: Sequence[dict], eps: float) -> str:
    """One sentence: how many images were written within the budget (on-disk L_inf, in 1/255 steps), how many
    failed, and whether any written image exceeds it (which would be a bug: data/io.py quantizes inside it)."""
    k = dio.budget_steps(eps)
    done = [e for e in entries if e.get("status") == "done"]
    failed = sum(e.get("status") == "failed" for e in entries)
    linf = [(e.get("metrics") or {}).get("linf_255") for e in done]
    over = sum(v is not None and v > k for v in linf)
    changed = sum(v is not None and v > 0 for v in linf)
    out = (f"{len(done)} of {len(entries)} images protected and written within the budget "
           f"(on-disk L_inf <= {k}/255)" if not over else f"{over} written images EXCEED the budget of {k}/255")
    out += f"; {changed} of them changed by the perturbation" if done else ""
    return out + (f"; {failed} failed (reasons below)" if failed else "")


def _instructions(e: dict) -> str:
    p = e.get("prompt")
    texts = [p] if isinstance(p, str) else list(p or [])
    if not texts:
        return ""
    label = "instruction" if len(texts) == 1 else "instructions"
    return f"<p class='prompt'><b>{label}</b>: " + "; ".join(f"&#8220;{html.escape(t)}&#8221;" for t in texts) + "</p>"


def write_html(workdir: Path, title: str, entries: Sequence[dict], eps: float, summary: dict,
               banner: str | None = None) -> Path:
    """``entries``: dicts with id, status, error, metrics, and optional arrays ``original``, ``protected``,
    ``edit_original``, ``edit_protected`` (uint8 HxWx3), ``loss_curve`` (list of float) and ``prompt`` (the
    edit instruction(s) the perturbation was optimized against: a string or a list). ``summary``: the settings
    shown at the top, followed by :func:`verdict`; ``banner``: a warning shown above everything."""
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
            f"{_instructions(e)}<div class='row'>{imgs}{curve}</div><p>{html.escape(stats)}</p>{err}</section>"
        )
    summ = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(v))}</li>" for k, v in summary.items())
    summ = f"<h2>Settings</h2><ul class='settings'>{summ}</ul><h2>Verdict</h2><p class='verdict'>" + html.escape(
        verdict(entries, eps)) + "</p>"
    top = f"<div class='banner' role='alert'>{html.escape(banner)}</div>" if banner else ""
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:20px} .row{display:flex;gap:8px;align-items:flex-end;flex-wrap:wrap}"
        "figure{margin:0} img{image-rendering:pixelated;max-width:256px} figcaption{font-size:12px;text-align:center}"
        ".err{color:#b00} section{border-top:1px solid #ddd;padding:6px 0}"
        ".banner{background:#fff3cd;border:2px solid #c90;padding:10px;font-weight:bold;margin-bottom:12px}"
        "</style></head><body>"
        f"{top}<h1>{html.escape(title)}</h1>{summ}" + "".join(rows) + "</body></html>"
    )
    out = workdir / "report.html"
    dio.atomic_write_bytes(out, page.encode("utf-8", "backslashreplace"))
    return out


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


# ================================================================================================ evaluation
# Outputs of ``tdae_jax.evaluate`` (``python -m experiments.evaluate``): matrix.md, report.html, plots/.
# ``runs``: dicts with name, label, surrogate, objective, defense, eps, eot, path, images.
METRIC_LABEL = {"psnr": "PSNR (dB)", "ssim": "SSIM", "lpips": "LPIPS", "vifp": "VIFp", "fsim": "FSIM"}
PROTECTION_ARROW = {"psnr": "↓", "ssim": "↓", "lpips": "↑", "vifp": "↓", "fsim": "↓"}


def _finite(vals) -> list[float]:
    return [float(v) for v in vals if v is not None and v != "" and math.isfinite(float(v))]


def mean_std(vals) -> tuple[float, float, int]:
    """Mean, population std and count of the finite values (NaN, NaN, 0 when there are none)."""
    v = _finite(vals)
    if not v:
        return math.nan, math.nan, 0
    return float(np.mean(v)), float(np.std(v)), len(v)


def _cell(vals, metric: str) -> str:
    m, s, n = mean_std(vals)
    if n == 0:
        return "n/a"
    d = 2 if metric == "psnr" else 4
    return f"{m:.{d}f} ± {s:.{d}f}"


def select(rows: Sequence[dict], **where) -> list[dict]:
    """Rows matching ``where``. ``seed_floor`` / ``purifier_cost`` rows do not depend on the run: a source
    shared by several runs (same working size) counts once."""
    out, seen = [], set()
    for r in rows:
        if all(r.get(k) == v for k, v in where.items()):
            if r.get("kind") in ("seed_floor", "purifier_cost") and "run" not in where:
                key = (r.get("source"), r.get("id"), r.get("victim"), r.get("kind"), r.get("purify"), r.get("seed"),
                       r.get("seed_b"))
                if key in seen:
                    continue
                seen.add(key)
            out.append(r)
    return out


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(out) + "\n"


def eval_matrix_md(rows: Sequence[dict], runs: Sequence[dict], victims: Sequence[str], purifiers: Sequence[str],
                   seeds: Sequence[int], metrics: Sequence[str], notes: Sequence[str] = ()) -> str:
    """``matrix.md``: surrogate (run) x victim tables of mean ± std over images x seeds, one per metric, for
    no purification, the per-image worst case and each purifier; the seed floor; purifier costs;
    imperceptibility."""
    out = ["# tdae_jax evaluation: surrogate x victim\n",
           "Cells: mean ± std over images x seeds. Protection = edit(protected) vs edit(clean), same victim, "
           "prompt, seed and noise (TDAE §IV-A): lower PSNR/SSIM/VIFp/FSIM and higher LPIPS = stronger "
           "protection. Seed floor = edit(clean; seed a) vs edit(clean; seed b): protection only counts where it "
           "moves the edit further than a change of seed does. n/a = no finite value (metric not computed, or "
           "the images are too small for it).\n",
           f"Victims: {', '.join(victims)}. Purifiers: {', '.join(purifiers)}. Seeds: {', '.join(map(str, seeds))}.\n"]
    out += [f"- {n}\n" for n in notes]
    out.append("\n## Runs\n")
    out.append(_table(["run", "surrogate", "objective", "defense", "eps", "EOT", "images"],
                      [[r["name"], r["surrogate"], r["objective"], r["defense"],
                        f"{r['eps'] * 255:.2f}/255" if math.isfinite(r["eps"]) else "?", r["eot"], r["images"]]
                       for r in runs]))

    def block(title, kind, purify, with_floor):
        s = [f"\n## {title}\n"]
        for m in metrics:
            body = [[r["label"]] + [_cell([x.get(m) for x in select(rows, kind=kind, purify=purify, run=r["name"],
                                                                    victim=v)], m) for v in victims] for r in runs]
            if with_floor:
                body.append(["*seed floor*"] + [_cell([x.get(m) for x in select(rows, kind="seed_floor", victim=v)], m)
                                                for v in victims])
            s.append(f"\n### {METRIC_LABEL.get(m, m)} {PROTECTION_ARROW.get(m, '')}\n\n")
            s.append(_table(["surrogate [run]"] + list(victims), body))
        return "".join(s)

    first = "none" if "none" in purifiers else purifiers[0]
    out.append(block("Protection" + (", no purification" if first == "none" else f", purifier {first}"),
                     "protection", first, True))
    if len(purifiers) > 1:
        out.append(block(f"Worst case over purifiers {{{', '.join(purifiers)}}} (per image and metric, the purifier "
                         "best for the attacker: max PSNR/SSIM/VIFp/FSIM, min LPIPS)", "worst", "worst", True))
        out.append("\n## Per purifier\n")
        for m in metrics:
            body = [[f"{r['label']} / {p}"] + [_cell([x.get(m) for x in select(rows, kind="protection", purify=p,
                                                                                run=r["name"], victim=v)], m)
                                                  for v in victims] for r in runs for p in purifiers]
            out.append(f"\n### {METRIC_LABEL.get(m, m)} {PROTECTION_ARROW.get(m, '')}\n\n")
            out.append(_table(["surrogate [run] / purifier"] + list(victims), body))
        cost = [p for p in purifiers if p != "none"]
        if any(select(rows, kind="purifier_cost")):
            out.append("\n## Purifier cost on clean images: edit(P(clean)) vs edit(clean)\n\n")
            cm = [m for m in ("psnr", "ssim", "lpips") if m in metrics]
            body = [[p] + [" / ".join(_cell([x.get(m) for x in select(rows, kind="purifier_cost", purify=p,
                                                                      victim=v)], m) for m in cm)
                           for v in victims] for p in cost]
            out.append(_table([f"purifier ({' / '.join(METRIC_LABEL.get(m, m) for m in cm)})"] + list(victims), body))
    out.append("\n## Imperceptibility: protected vs original (original resolution, as on disk)\n\n")
    body = []
    for r in runs:
        prot = select(rows, kind="protection", purify=first, run=r["name"])
        per_image = {x["id"]: x for x in prot}.values()  # the same for every victim and seed
        body.append([r["label"]] + [_cell([x.get(f"imp_{m}") for x in per_image], m) for m in ("psnr", "ssim", "lpips")]
                    + [str(max((int(x["imp_linf_255"]) for x in per_image if x.get("imp_linf_255") not in (None, "")),
                               default="n/a"))])
    out.append(_table(["surrogate [run]", "PSNR ↑", "SSIM ↑", "LPIPS ↓", "max L∞ (/255)"], body))
    return "".join(out)


def eval_plots(outdir: Path, rows: Sequence[dict], runs: Sequence[dict], victims: Sequence[str],
               metrics: Sequence[str], purifiers: Sequence[str]) -> list[Path]:
    """``plots/<metric>_vs_eps.png`` (one line per (surrogate, objective, defense, EOT) x victim; solid: no
    purification, dashed: worst case) and ``plots/loss_vs_iteration.png`` (mean loss curve per run, from
    its ``curves/*.json``). Needs matplotlib; returns [] (with a log line) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import logging

        logging.getLogger("tdae_jax").warning("matplotlib is not installed: no plots (pip install matplotlib)")
        return []
    pdir = Path(outdir) / "plots"
    pdir.mkdir(parents=True, exist_ok=True)
    written = []
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["surrogate"], r["objective"], r["defense"], r["eot"]), []).append(r)
    first = "none" if "none" in purifiers else purifiers[0]
    for m in metrics:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        any_line = False
        for (sur, obj, dfn, eot), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["eps"])
            for v in victims:
                color = None
                for kind, pur, style in (("protection", first, "-o"), ("worst", "worst", "--x")):
                    ys = [mean_std([x.get(m) for x in select(rows, kind=kind, purify=pur, run=r["name"], victim=v)])[0]
                          for r in rs]
                    if sum(math.isfinite(y) for y in ys) < 2:  # a curve needs two budgets at least
                        continue
                    lab = f"{sur} {obj}/{dfn}{'' if eot == 'none' else ' eot=' + eot} → {v}"
                    (line,) = ax.plot([r["eps"] * 255 for r in rs], ys, style, color=color,
                                      label=lab + (" (worst case)" if kind == "worst" else ""))
                    color = line.get_color()
                    any_line = True
        for v in victims:
            fl = mean_std([x.get(m) for x in select(rows, kind="seed_floor", victim=v)])[0]
            if math.isfinite(fl):
                ax.axhline(fl, color="gray", lw=0.8, ls=":")
                ax.annotate(f"seed floor {v}", (0.01, fl), xycoords=("axes fraction", "data"), fontsize=7, color="gray")
        if not any_line:
            plt.close(fig)
            continue
        ax.set_xlabel("eps (/255)")
        ax.set_ylabel(f"{METRIC_LABEL.get(m, m)}: edit(protected) vs edit(clean) {PROTECTION_ARROW.get(m, '')}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
        fig.tight_layout()
        p = pdir / f"{m}_vs_eps.png"
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    any_curve = False
    for r in runs:
        curves = []
        for f in sorted((Path(r["path"]) / "curves").glob("*.json")):
            try:
                c = json.loads(f.read_text()).get("loss") or []
            except (OSError, ValueError):
                continue
            curves.append([float(x) for x in c])
        if curves:
            n = min(len(c) for c in curves)
            if n:
                ax.plot(range(1, n + 1), np.mean([c[:n] for c in curves], axis=0), label=r["label"])
                any_curve = True
    if any_curve:
        ax.set_xlabel("iteration")
        ax.set_ylabel("objective (minimized), mean over images")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        p = pdir / "loss_vs_iteration.png"
        fig.savefig(p, dpi=100)
        written.append(p)
    plt.close(fig)
    return written


def markdown_html(md: str) -> str:
    """The subset of markdown the reports write (``#`` headings, ``|`` tables, ``-`` lists, paragraphs) as HTML,
    every text escaped: tables a browser renders instead of pipes in a ``<pre>``."""
    out, table, items = [], [], []

    def flush():
        if table:
            rows = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table
                    if not set(r.replace("|", "").strip()) <= set("-: ")]
            head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        s = line.strip()
        if s.startswith("|"):
            table.append(s)
            continue
        if s.startswith("- "):
            items.append(s[2:])
            continue
        flush()
        if s.startswith("#"):
            level = min(len(s) - len(s.lstrip("#")) + 1, 6)
            out.append(f"<h{level}>{html.escape(s.lstrip('#').strip())}</h{level}>")
        elif s:
            out.append(f"<p>{html.escape(s)}</p>")
    flush()
    return "".join(out)


def write_eval_html(outdir: Path, title: str, summary: dict, matrix_md: str, thumbs: dict, victims: Sequence[str],
                    row_stats: dict, plots: Sequence[Path] = ()) -> Path:
    """``report.html``: summary, the matrix (as text), plots, and per victim one grid row per image:
    original | protected | edit(original) | edit(protected) [| edit(P(protected)) per purifier].

    ``thumbs``: (victim, run, id) -> {"cells": {caption: uint8 [H,W,3]}, "prompt": str};
    ``row_stats``: (victim, run, id) -> one line of metrics."""
    outdir = Path(outdir)
    assets = outdir / "report_assets"
    assets.mkdir(parents=True, exist_ok=True)
    parts = []
    for v in victims:
        secs = []
        for (vv, run, iid), t in thumbs.items():
            if vv != v:
                continue
            figs = []
            for j, (cap, arr) in enumerate(t["cells"].items()):
                src = _thumb(arr, assets / f"{v}.{run}.{iid}.{j}.png")
                figs.append(f"<figure><img src='report_assets/{html.escape(src)}'><figcaption>{html.escape(cap)}"
                            "</figcaption></figure>")
            stats = html.escape(row_stats.get((vv, run, iid), ""))
            secs.append(f"<section><h4>{html.escape(run)} / {html.escape(iid)} <small>prompt: "
                        f"{html.escape(t.get('prompt', ''))}</small></h4><div class='row'>{''.join(figs)}</div>"
                        f"<p>{stats}</p></section>")
        parts.append(f"<h2>victim {html.escape(v)}</h2>" + "".join(secs))
    summ = "".join(f"<li><b>{html.escape(str(k))}</b>: {html.escape(str(val))}</li>" for k, val in summary.items())
    imgs = "".join(f"<img class='plot' src='{html.escape(str(p.relative_to(outdir)))}'>" for p in plots)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>" + html.escape(title) + "</title><style>"
        "body{font-family:sans-serif;margin:20px} .row{display:flex;gap:8px;align-items:flex-end;flex-wrap:wrap}"
        "figure{margin:0} img{image-rendering:pixelated;max-width:256px} img.plot{max-width:640px;image-rendering:auto}"
        "figcaption{font-size:12px;text-align:center}"
        " table{border-collapse:collapse;font-size:12px;margin:6px 0} td,th{border:1px solid #ccc;padding:2px 6px}"
        "section{border-top:1px solid #ddd;padding:6px 0}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><ul>{summ}</ul><div>{imgs}</div>"
        f"<details open><summary>tables (matrix.md)</summary>{markdown_html(matrix_md)}</details>"
        + "".join(parts) + "</body></html>"
    )
    out = outdir / "report.html"
    dio.atomic_write_bytes(out, page.encode("utf-8", "backslashreplace"))
    return out
