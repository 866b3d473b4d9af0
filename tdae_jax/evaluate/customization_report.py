"""Tables and report of ``evaluate.customization``: ``metrics.csv`` / ``metrics.jsonl`` (one row per unit and
prompt: set x attacker x seed x prompt), ``samples.csv`` (one row per sample), ``inputs.csv`` (the sets' own
photos), ``summary.md`` and ``report.html``.

The summary pools the seeds: per (set, attacker, prompt), FDR with a 95 % percentile bootstrap interval over the
samples (``evaluate.stats.rate_ci``), ISM and BRISQUE as means with the same interval (``stats.mean_ci``; ISM over
the samples where dlib finds a face, BRISQUE over the samples it is defined on). The samples of one fine-tuning
are not independent draws of the attack (they share its model), so the interval is a floor on the uncertainty
over attacker seeds. The report shows, per attacker and prompt, each set's samples side by side (the
clean-trained model next to the protected-trained ones) and each set's own photos.
"""
from __future__ import annotations

import csv
import html
import io
import math

import numpy as np
from PIL import Image

from tdae_jax.data import io as dio
from tdae_jax.evaluate import stats
from tdae_jax.metrics import report as report_lib

COLUMNS = ("set", "attacker", "seed", "prompt_idx", "prompt", "status", "n_samples", "n_faces", "fdr", "fdfr", "ism",
           "brisque", "final_loss", "steps", "seconds", "error")
SAMPLE_COLUMNS = ("set", "attacker", "seed", "prompt_idx", "i", "face", "ism", "brisque", "path")
INPUT_COLUMNS = ("set", "file", "face", "ism", "brisque")
MEANING = [
    "FDR: share of samples in which dlib detects a face (DLADiff Table 1; lower = the attacker gets fewer "
    "faces). FDFR = 1 - FDR (Anti-DreamBooth's failure rate).",
    "ISM: cosine of dlib's 128-d descriptor of the face re-detected on a sample to the mean descriptor of the "
    "--clean photos, over the samples with a face (lower = less of the identity).",
    "BRISQUE: no-reference quality (lower = better quality).",
    "Intervals: 95 % percentile bootstrap over the samples, seeds pooled (a floor: samples of one fine-tuning "
    "share its model).",
]


def _mean(vals) -> float | None:
    v = [float(x) for x in vals if x is not None and math.isfinite(float(x))]
    return float(np.mean(v)) if v else None


def group(samples: list[dict]) -> dict:
    """``n_samples``, ``n_faces``, ``fdr``, ``fdfr``, mean ``ism`` (faces only) and ``brisque`` of samples."""
    faces = [bool(s["face"]) for s in samples]
    fdr = float(np.mean(faces)) if faces else None
    return {"n_samples": len(samples), "n_faces": int(sum(faces)), "fdr": fdr,
            "fdfr": None if fdr is None else 1.0 - fdr, "ism": _mean(s["ism"] for s in samples if s["face"]),
            "brisque": _mean(s["brisque"] for s in samples)}


def unit_rows(units: list[dict], prompts) -> list[dict]:
    """One row per unit and prompt; a failed unit is one row (prompt empty) with its error."""
    rows = []
    for u in units:
        base = {k: u.get(k) for k in ("set", "attacker", "seed", "status", "final_loss", "steps", "seconds")}
        if u["status"] != "done":
            rows.append({**base, "prompt_idx": None, "prompt": "", "error": u.get("error", "")})
            continue
        for j, prompt in enumerate(prompts):
            mine = [s for s in u["samples"] if s["prompt_idx"] == j]
            rows.append({**base, "prompt_idx": j, "prompt": prompt, **group(mine), "error": ""})
    return rows


def sample_rows(units: list[dict]) -> list[dict]:
    return [{"set": u["set"], "attacker": u["attacker"], "seed": u["seed"], **s} for u in units for s in u["samples"]]


def _csv(rows: list[dict], columns) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: "" if r.get(k) is None else r.get(k) for k in columns})
    return buf.getvalue().encode("utf-8", "backslashreplace")


def _ci(r: stats.Rate | None, digits: int = 3) -> str:
    if r is None:
        return "n/a"
    return f"{r.rate:.{digits}f} [{r.lo:.{digits}f}, {r.hi:.{digits}f}]"


def pooled(samples: list[dict]) -> dict:
    """FDR, ISM and BRISQUE of ``samples`` with their bootstrap intervals (None where there is nothing)."""
    faces = [bool(s["face"]) for s in samples]
    isms = [s["ism"] for s in samples if s["face"] and s["ism"] is not None]
    qual = [s["brisque"] for s in samples if s["brisque"] is not None and math.isfinite(s["brisque"])]
    return {"n": len(samples), "fdr": stats.rate_ci(faces) if faces else None,
            "ism": stats.mean_ci(isms) if isms else None, "n_ism": len(isms),
            "brisque": stats.mean_ci(qual) if qual else None}


def _table(header, body) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
                     + ["| " + " | ".join(map(str, r)) + " |" for r in body]) + "\n"


def _line(label: list[str], p: dict) -> list[str]:
    return label + [str(p["n"]), _ci(p["fdr"]), f"{_ci(p['ism'])} (n={p['n_ism']})", _ci(p["brisque"], 2)]


def summary_md(cfg, plan, units: list[dict], inputs: list[dict], command: str) -> str:
    """``summary.md``: what ran, what each score means, the attacker's samples pooled over seeds, the inputs."""
    done = [u for u in units if u["status"] == "done"]
    head = ["set", "attacker", "prompt", "n", "FDR [95% CI]", "ISM [95% CI]", "BRISQUE [95% CI]"]
    body = []
    for s in plan.sets:
        for a in cfg.attackers:
            for j, prompt in enumerate(cfg.prompts):
                samples = [x for u in done if u["set"] == s.name and u["attacker"] == a for x in u["samples"]
                           if x["prompt_idx"] == j]
                if samples:
                    body.append(_line([s.name, a, prompt], pooled(samples)))
    photos = [_line([s.name if s is not plan.clean else "--clean", "(its photos)", "-"],
                    pooled([r for r in inputs if r["set"] == s.name])) for s in plan.sets + [plan.clean]]
    failed = [u for u in units if u["status"] != "done"]
    lines = [f"# Customization attack: {cfg.weights_dir or 'built-in tiny model'}", "",
             f"Command: `{command}`", "",
             f"{len(done)} unit(s) done, {len(failed)} failed; attackers {', '.join(cfg.attackers)}; seeds "
             f"{', '.join(map(str, cfg.seeds))}; {cfg.samples_per_prompt} samples per prompt, DDIM "
             f"{cfg.sample_steps} steps, CFG {cfg.guidance:g}, {cfg.resolution} px.", ""]
    lines += [f"- {m}" for m in MEANING] + [""]
    lines += ["## The attacker's samples", "", _table(head, body) if body else "(no unit done)", ""]
    lines += ["## The sets' own photos", "", _table(head, photos), ""]
    lines += [f"- FAILED {u['set']}/{u['attacker']}_seed{u['seed']}: {u.get('error', '')}" for u in failed]
    return "\n".join(lines) + "\n"


def write_all(out, cfg, plan, units: list[dict], inputs: list[dict], command: str = "") -> None:
    """Every table, then ``report.html`` (with ``cfg.report``)."""
    rows = unit_rows(units, cfg.prompts)
    with out.writing("metrics.jsonl / metrics.csv"):
        report_lib.write_metrics(out.root, rows, COLUMNS)
    out.write_bytes("samples.csv", _csv(sample_rows(units), SAMPLE_COLUMNS))
    out.write_bytes("inputs.csv", _csv(inputs, INPUT_COLUMNS))
    md = summary_md(cfg, plan, units, inputs, command or "python -m experiments.evaluate_customization")
    out.write_bytes("summary.md", md.encode("utf-8", "backslashreplace"))
    if cfg.report:
        write_html(out, cfg, plan, units, inputs, md)


# ------------------------------------------------------------------------------------------------ report.html
def tile(images, side: int | None = None, cols: int = 4) -> np.ndarray:
    """A grid of ``[H,W,3] uint8`` images (each resized to ``side`` px when given; small ones upscaled to >= 96
    px, nearest), ``cols`` per row."""
    ims = [np.asarray(Image.fromarray(im).resize((side, side), Image.Resampling.LANCZOS)) if side else im
           for im in images]
    h = max(im.shape[0] for im in ims)
    f = max(1, 96 // h)
    ims = [np.kron(im, np.ones((f, f, 1), np.uint8)) if f > 1 else im for im in ims]
    h, w = ims[0].shape[:2]
    cols = min(cols, len(ims))
    rows = -(-len(ims) // cols)
    grid = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for k, im in enumerate(ims):
        r, c = divmod(k, cols)
        grid[r * (h + 2):r * (h + 2) + im.shape[0], c * (w + 2):c * (w + 2) + im.shape[1]] = im
    return grid


def _figure(out, name: str, images, caption: str, side: int | None = None) -> str:
    if not images:
        return f"<figure><figcaption>{html.escape(caption)}</figcaption></figure>"
    out.save_png(f"report_assets/{name}.png", tile(images, side))
    return (f"<figure><img src='report_assets/{html.escape(name)}.png'><figcaption>{html.escape(caption)}"
            "</figcaption></figure>")


def _uint8(x) -> list:
    return list(np.round(np.clip(np.asarray(x, np.float32), 0, 1) * 255).astype(np.uint8))


def _set_label(s) -> str:
    if s.name.startswith("_"):
        return f"--clean (the ISM reference): photos in {s.root}"
    return f"{s.name}: {'protected photos of the workdir' if s.kind == 'workdir' else 'photos in'} {s.root}"


def _grids(out, cfg, plan, units: list[dict]) -> list[str]:
    """Per attacker and prompt, one figure per set: the first finished seed's samples and the pooled scores."""
    parts = []
    for a in cfg.attackers:
        for j, prompt in enumerate(cfg.prompts):
            figs = []
            for s in plan.sets:
                mine = [u for u in units if u["set"] == s.name and u["attacker"] == a and u["status"] == "done"]
                shown = [x for x in mine[0]["samples"] if x["prompt_idx"] == j][:8] if mine else []
                imgs = [dio.read_back_uint8(out.root / x["path"]) for x in shown]
                p = pooled([x for u in mine for x in u["samples"] if x["prompt_idx"] == j])
                cap = (f"{s.name}: seed {mine[0]['seed']} shown; {p['n']} samples of all seeds: FDR "
                       f"{_ci(p['fdr'])}, ISM {_ci(p['ism'])}, BRISQUE {_ci(p['brisque'], 1)}" if mine
                       else f"{s.name}: no finished unit")
                figs.append(_figure(out, f"{a}.{j}.{s.name}", imgs, cap))
            parts.append(f"<section><h3>{html.escape(a)}: “{html.escape(prompt)}”</h3><div class='row'>"
                         + "".join(figs) + "</div></section>")
    return parts


def write_html(out, cfg, plan, units: list[dict], inputs: list[dict], md: str) -> None:
    """``report.html``: the summary tables, the attacker's samples per set side by side, the sets' photos."""
    grids = _grids(out, cfg, plan, units)
    side = min(cfg.resolution, 128)
    photos = [_figure(out, f"photos.{s.name}", _uint8(s.work[:8]), _set_label(s), side)
              for s in plan.sets + [plan.clean]]
    failed = [f"<p class='err'>FAILED {html.escape(u['set'])}/{html.escape(u['attacker'])}_seed{u['seed']}: "
              f"{html.escape(u.get('error', ''))}</p>" for u in units if u["status"] != "done"]
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Customization attack</title><style>"
            "body{font-family:sans-serif;margin:20px} .row{display:flex;gap:12px;align-items:flex-start;"
            "flex-wrap:wrap} figure{margin:0;max-width:520px} img{image-rendering:pixelated;max-width:512px}"
            " figcaption{font-size:12px} table{border-collapse:collapse;font-size:12px;margin:6px 0}"
            " td,th{border:1px solid #ccc;padding:2px 6px} .err{color:#b00} section{border-top:1px solid #ddd;"
            "padding:6px 0}</style></head><body>" + report_lib.markdown_html(md) + "".join(failed)
            + "<h2>The attacker's samples, per set</h2>" + "".join(grids)
            + "<h2>The sets' own photos</h2><div class='row'>" + "".join(photos) + "</div></body></html>")
    out.write_bytes("report.html", page.encode("utf-8", "backslashreplace"))
