"""The end of a run: every process's entries merged, then metrics.jsonl/csv, config.json and report.html.

In a multi-process run each process has its own manifest; their entries are gathered (no shared filesystem
needed) and process 0 writes the merged files (parallel/multihost.py). The report's optional preview edits
(edit(original) | edit(protected), same prompt and noise) use one editor built once per run
(:func:`preview_editor`), not one per image. Every write goes through the workdir (atomic, umask permissions;
``OSError`` -> ``RunError``).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from tdae_jax import prng
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest
from tdae_jax.metrics import report as report_lib
from tdae_jax.parallel import multihost
from tdae_jax.runs.inputs import INPUT_ROW, PROMPT_ROW
from tdae_jax.runs.workdir import Workdir

log = logging.getLogger("tdae_jax")
EDITOR_KIND = {"sd": "img2img", "ip2p": "ip2p", "inpaint": "inpaint", "sd3": "sd3_img2img"}


def merged_entries(manifest: Manifest, owned: set, proc: multihost.ProcessInfo) -> list[dict]:
    """This process's entries (its own ids and the failed prompt rows and rejected entries), or every process's
    when there are several."""
    mine = [e for e in manifest.entries() if e["id"] in owned or e["id"].startswith((PROMPT_ROW, INPUT_ROW))]
    if proc.count == 1:
        return mine
    gathered = multihost.allgather_json(mine, proc)
    ordered = sorted((e for part in gathered for e in part), key=lambda e: e["id"])
    return list({e["id"]: e for e in ordered}.values())


def row(e: dict) -> dict:
    """The metrics row of a manifest entry (report_lib.COLUMNS + initial_loss)."""
    m = e.get("metrics") or {}
    return {"id": e["id"], "source": e["source"], "status": e["status"], **{k: m.get(k) for k in (
        "linf_255", "psnr", "ssim", "final_loss", "seconds")}, "initial_loss": m.get("initial_loss"),
        "error": e.get("error") or ""}


def write_run_files(wd: Workdir, rows: Sequence[dict], config) -> None:
    """``metrics.jsonl``, ``metrics.csv`` and ``config.json`` (the configuration that ran)."""
    with wd.writing("metrics.jsonl / metrics.csv"):
        report_lib.write_metrics(wd.root, rows)
    wd.write_bytes("config.json", json.dumps(dataclasses.asdict(config), indent=1, default=str).encode())


def preview_name(sur, cfg) -> str:
    """The preview editor as the report names it, e.g. ``ip2p editor of the ip2p surrogate (<weights>), 10
    steps, guidance 1, image guidance 1``."""
    kind = EDITOR_KIND[sur.family]
    extra = f", image guidance {cfg.preview_image_guidance:g}" if kind == "ip2p" else ""
    return (f"{kind} editor of the {sur.family} surrogate ({cfg.weights_dir or 'built-in tiny'}), "
            f"{cfg.preview_steps} steps, guidance {cfg.preview_guidance:g}{extra}")


def preview_editor(sur, cfg) -> Callable:
    """``(entry, original_uint8, protected_uint8) -> (edit(original), edit(protected))`` with the surrogate's own
    editor, built (and traced) once. ``cfg`` carries ``preview_steps``, ``preview_guidance``,
    ``preview_image_guidance``, ``default_prompt``, ``size`` and ``seed``."""
    from tdae_jax import editors

    kind = EDITOR_KIND[sur.family]
    extra = {"image_guidance_scale": cfg.preview_image_guidance} if kind == "ip2p" else {}
    fn = editors.make_editor(kind, sur, num_inference_steps=cfg.preview_steps, guidance_scale=cfg.preview_guidance,
                             **extra)

    def edit(entry: dict, original: np.ndarray, protected: np.ndarray):
        prompt = (entry.get("outputs") or {}).get("prompt") or cfg.default_prompt
        h, w = (cfg.size, cfg.size) if cfg.size else original.shape[:2]
        x = np.stack([np.asarray(Image.fromarray(a).resize((w, h), Image.Resampling.LANCZOS))
                      for a in (original, protected)])
        key = jax.random.fold_in(prng.base_key(cfg.seed), prng.image_uid(entry["id"]))
        out = fn.from_prompts(jnp.asarray(x, jnp.float32) / 255.0, [prompt, prompt], jnp.stack([key, key]))
        out = np.asarray(jnp.clip(out, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)  # same noise for both edits
        return out[0], out[1]

    return edit


def _item(wd: Workdir, e: dict, curves: dict, preview: Callable | None) -> dict:
    item = {"id": e["id"], "status": e["status"], "error": e.get("error"), "metrics": e.get("metrics") or {},
            "prompt": (e.get("outputs") or {}).get("prompt")}
    if e["status"] != "done":
        return item
    try:
        item["original"] = dio.load_image(e["source"], size=None, resize="none", min_side=1).original_uint8
        item["protected"] = dio.read_back_uint8(wd.root / e["outputs"]["protected"])
    except Exception as err:  # noqa: BLE001 - the report must not fail the run
        item["error"] = f"report: {err}"
    if preview is not None and "protected" in item:
        try:
            item["edit_original"], item["edit_protected"] = preview(e, item["original"], item["protected"])
        except Exception as err:  # noqa: BLE001 - a failing preview must not fail the run
            log.warning("%s: preview edit failed: %s", e["id"], err)
    curve = curves.get(e["id"])
    saved = wd.curves / f"{e['id']}.json"
    if curve is None and saved.exists():
        curve = json.loads(saved.read_text()).get("loss")
    item["loss_curve"] = curve
    return item


def write_report(wd: Workdir, title: str, entries: Sequence[dict], eps: float, summary: dict, curves: dict,
                 preview: Callable | None = None, banner: str | None = None) -> None:
    """``report.html``: ``banner`` (a warning above everything), the settings (``summary``) and the verdict, then
    per image its instruction, original | protected | difference [| edits], its loss curve, its metrics."""
    items = [_item(wd, e, curves, preview) for e in entries]
    summary = {**summary, "done": sum(e["status"] == "done" for e in entries),
               "failed": sum(e["status"] == "failed" for e in entries)}
    with wd.writing("report.html"):
        report_lib.write_html(wd.root, title, items, eps, summary, banner=banner)
