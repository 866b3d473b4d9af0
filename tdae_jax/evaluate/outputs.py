"""Writing an evaluation: metrics.jsonl/csv, matrix.md, report.html, plots, eval_config.json, failures.txt."""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from tdae_jax import purify as purify_lib
from tdae_jax.data import io as dio
from tdae_jax.evaluate.runner import EvalResult
from tdae_jax.evaluate.specs import CLIP_METRICS, COLUMNS, METRICS, MIN_SIDE, EvalConfig, UsageError


def default_outdir(cfg: EvalConfig) -> Path:
    if cfg.outdir:
        return Path(cfg.outdir)
    if len(cfg.runs) == 1:
        return Path(cfg.runs[0]) / "eval"
    raise UsageError("several --runs: give --outdir")


def write_outputs(result: EvalResult, cfg: EvalConfig) -> dict[str, Path]:
    """``metrics.jsonl`` / ``metrics.csv`` (every row), ``matrix.md``, ``report.html``, ``plots/*.png``,
    ``eval_config.json`` and ``failures.txt`` (when any) under ``result.outdir``."""
    from tdae_jax.metrics import report

    out = result.outdir
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows
    report.write_metrics(out, rows, columns=COLUMNS + (CLIP_METRICS if cfg.clip_dir else ()))
    finite = lambda v: isinstance(v, (int, float)) and math.isfinite(v)  # noqa: E731
    measured = [m for m in METRICS if any(m in r for r in rows)]
    metrics = [m for m in measured if any(finite(r.get(m)) for r in rows)]
    missing = [m for m in measured if m not in metrics]
    runs = [{**r.meta(), "name": r.name, "label": r.label, "path": str(r.path),
             "images": sum(it.clean is not None for it in r.items)} for r in result.runs]
    victims = [v.name for v in cfg.victims]
    purifiers = [p.name for p in purify_lib.parse(cfg.purify)] or ["none"]
    notes = [f"victim {v.name}: {v.family} {v.source}, editor {v.editor_kwargs(cfg.edit)}" for v in cfg.victims]
    if missing:  # said once, instead of tables of n/a
        sides = ", ".join(f"{m} {MIN_SIDE[m]} px" for m in missing if MIN_SIDE.get(m))
        notes.append(f"not computed: {', '.join(missing)} (no finite value for any image: LPIPS needs its weights, "
                     f"--lpips_weights; the others need a minimum image side{': ' + sides if sides else ''})")
    if result.failures:
        notes.append(f"{len(result.failures)} problem(s), see failures.txt")
    md = report.eval_matrix_md(rows, runs, victims, purifiers, list(cfg.seeds), metrics, notes)
    dio.atomic_write_bytes(out / "matrix.md", md.encode())
    plots = report.eval_plots(out, rows, runs, victims, metrics, purifiers) if cfg.plots else []
    stats = {}
    first = "none" if "none" in purifiers else purifiers[0]
    for r in rows:
        if r["kind"] == "protection" and r["purify"] == first and r["seed"] == cfg.seeds[0]:
            stats[(r["victim"], r["run"], r["id"])] = ("edit(protected) vs edit(clean): " + ", ".join(
                f"{m}={r[m]:.4g}" for m in metrics if r.get(m) is not None and math.isfinite(r[m]))
                + "; protected vs original: PSNR "
                f"{r.get('imp_psnr', math.nan):.2f} dB, L∞ {r.get('imp_linf_255')}/255")
    summary = {"runs": ", ".join(f"{r['label']}" for r in runs), "victims": "; ".join(notes[:len(victims)]),
               "purifiers": ", ".join(purifiers), "seeds": ", ".join(map(str, cfg.seeds)), "rows": len(rows),
               "failures": len(result.failures)}
    paths = {"metrics_csv": out / "metrics.csv", "metrics_jsonl": out / "metrics.jsonl", "matrix": out / "matrix.md",
             "report": report.write_eval_html(out, "tdae_jax evaluation", summary, md, result.thumbs, victims, stats,
                                              plots)}
    cfg_json = json.dumps(dataclasses.asdict(cfg), indent=1, default=str)
    dio.atomic_write_bytes(out / "eval_config.json", cfg_json.encode())
    if result.failures:
        dio.atomic_write_bytes(out / "failures.txt", ("\n".join(result.failures) + "\n").encode())
    elif (out / "failures.txt").exists():
        (out / "failures.txt").unlink()
    for i, p in enumerate(plots):
        paths[f"plot{i}"] = p
    return paths
