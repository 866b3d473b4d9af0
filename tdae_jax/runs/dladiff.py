"""Protect one identity's photos with DLADiff (or the ASPL / FSMG / DisDiff / Anti-Diffusion baselines): the library
side of ``python -m experiments.dladiff``, on the run engine of ``tdae_jax/runs/`` (the workdir contract of
``pipeline.run``: preflight, lock, manifest with the run's settings, atomic budget-exact outputs, metrics, report;
``UsageError`` -> exit 2 before anything is written, failed inputs -> 1, ``RunError`` -> 1 and re-run to resume).

All inputs of a run are one identity (DLADiff protects an identity's 4 photos jointly, DLADiff §5.1):
layer 1 optimizes them as one batch against one static/dynamic surrogate pair; layer 2 runs per image on
its face (landmarks from ``landmarks`` JSON or dlib's detector). The written image is
``x + delta_ft + delta_zs`` snapped to the 1/255 grid within ``eta_ft + eta_zs`` (``eta_ft`` alone outside
the face crop, which is recorded as ``linf_outside_255``). Layers: ``runs/dladiff_layers.py``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Callable

import numpy as np

from tdae_jax import prng
from tdae_jax.data import io as dio
from tdae_jax.defenses.dladiff import adft, antidiffusion, baselines, disdiff, dsur, zeroshot
from tdae_jax.editors import finetune as ft
from tdae_jax.metrics import report
from tdae_jax.runs import dladiff_layers as layers
from tdae_jax.runs import finish as run_finish
from tdae_jax.runs import inputs as run_inputs
from tdae_jax.runs import report as run_report
from tdae_jax.runs.errors import UsageError
from tdae_jax.runs.workdir import Workdir

log = logging.getLogger("tdae_jax")
TINY_SIZE = 32  # layer-1 working size with the built-in tiny surrogate (its 16x16 maps = att_resolution 16)
METHODS = ("dladiff", "aspl", "fsmg", "disdiff", "antidiffusion", "none")
COLUMNS = ("id", "source", "status", "linf_255", "linf_outside_255", "psnr", "ssim", "final_loss", "zs_steps",
           "zs_cos_after", "ism_pro", "ism_pro_heldout", "face_detected", "seconds", "error")
# fields that do not change the protected images (left out of the settings the manifest records)
RUN_ONLY = ("images", "workdir", "num_devices", "memory_efficient_attention", "ckpt_every", "retry_failed",
            "report", "overwrite")


@dataclasses.dataclass(frozen=True)
class DLADiffRunConfig:
    images: str
    workdir: str
    clean_images: str = ""  # extra clean photos of the identity (set_A); X_clean = these + the inputs
    weights_dir: str = ""
    surrogate: str = "sd"
    method: str = "dladiff"  # layer 1: dladiff | aspl | fsmg | disdiff | antidiffusion | none
    layer2: bool = False
    prompt: str = "a photo of sks person"
    static: ft.FinetuneConfig = dsur.static_config()
    adft: adft.ADFTConfig = adft.ADFTConfig()
    att_resolution: int = 16
    att_layers: tuple = ()
    att_kinds: tuple = ("attn1", "attn2")
    baseline: baselines.BaselineConfig = baselines.BaselineConfig()
    disdiff: disdiff.DisDiffConfig = disdiff.DisDiffConfig()  # with baseline's ASPL loop, budget and trainings
    antidiffusion: antidiffusion.AntiDiffusionConfig = antidiffusion.AntiDiffusionConfig()  # with baseline's budget
    zs: zeroshot.ZSConfig = zeroshot.ZSConfig()
    encoders: tuple = ("dlib",)
    encoder_params: tuple = ()  # "name=path.msgpack" (Flax params) for the IResNet encoders
    landmarks: str = ""
    detector: str = "auto"  # auto | dlib | none
    missing_face: str = "layer1_only"  # layer1_only | fail
    size: int | None = 512
    resize: str = "center_crop"
    seed: int = 0
    num_devices: int | None = None
    memory_efficient_attention: bool = False  # chunked UNet attention (Surrogate.memory_efficient)
    dtype: str = "float32"  # compute dtype; bfloat16 = mixed precision (Surrogate.mixed_precision)
    ckpt_every: int = 0  # epochs
    retry_failed: bool = False
    report: bool = True
    overwrite: bool = False  # start the workdir afresh (its previous outputs removed once the lock is held)

    @property
    def eps_total(self) -> float:
        e1 = {"dladiff": self.adft.eps, "aspl": self.baseline.eps, "fsmg": self.baseline.eps,
              "disdiff": self.baseline.eps, "antidiffusion": self.baseline.eps}.get(self.method, 0.0)
        return e1 + (self.zs.eps if self.layer2 else 0.0)


def settings(cfg: DLADiffRunConfig) -> dict:
    """What determines the protected images (the manifest records it; another value on resume is refused)."""
    out = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_ONLY}
    for method in ("disdiff", "antidiffusion"):  # workdirs made before these existed record no such key: they
        if cfg.method != method:  # still resume
            out.pop(method)
    out["weights_dir"] = str(Path(cfg.weights_dir).expanduser().resolve()) if cfg.weights_dir else ""
    return json.loads(json.dumps(out, default=str))


@dataclasses.dataclass
class Plan:
    """What the run reads, checked before anything is written."""

    paths: list
    clean_paths: list
    landmarks: dict


def validate(cfg: DLADiffRunConfig) -> Plan:
    """Every usage error (``UsageError``) before anything is written: method, inputs, workdir, landmarks."""
    if cfg.method not in METHODS:
        raise UsageError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method == "none" and not cfg.layer2:
        raise UsageError("nothing to do: --method=none without --layer2")
    workdir = Path(cfg.workdir).expanduser().resolve()
    try:
        dio.check_workdir(cfg.workdir)
        paths = dio.list_inputs(cfg.images, exclude=workdir).paths
        clean_paths = dio.list_inputs(cfg.clean_images, exclude=workdir).paths if cfg.clean_images else []
        dio.check_output_dir(workdir, sorted({p.parent for p in paths + clean_paths}))
    except (dio.DataError, OSError) as e:
        raise UsageError(str(e)) from e
    table = {}
    if cfg.landmarks:
        try:
            table = json.loads(Path(cfg.landmarks).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{cfg.landmarks}: cannot read landmarks JSON ({e})") from e
    return Plan(paths, clean_paths, table)


def _models(cfg: DLADiffRunConfig):
    """``(cfg as it runs, surrogate or None, identity encoders, face detector)``; refusals are UsageErrors."""
    from tdae_jax.pipeline import load_surrogate

    sur = load_surrogate(cfg) if cfg.method != "none" else None
    if sur is not None and not cfg.weights_dir and (cfg.size is None or cfg.size > TINY_SIZE):
        log.warning("built-in tiny surrogate: layer 1 works at %d px (its UNet attends at full latent resolution; "
                    "--size=%s would not fit). Layer 2 and the outputs keep the original resolution.",
                    TINY_SIZE, cfg.size)
        cfg = dataclasses.replace(cfg, size=TINY_SIZE, resize="center_crop" if cfg.resize == "none" else cfg.resize)
    if cfg.method == "none":  # layer 2 alone works at the original resolution: no working canvas
        cfg = dataclasses.replace(cfg, size=None, resize="none")
    if cfg.layer2:
        encs = layers.encoders(cfg)
    else:  # layer 1 alone: the encoders only score ISM_pro, when they can be built
        try:
            encs = layers.encoders(cfg)
        except UsageError as e:
            log.warning("ISM_pro not measured: %s", e)
            encs = []
    return cfg, sur, encs, layers.detector(cfg)


def run(cfg: DLADiffRunConfig, progress: Callable[[str], None] = log.info):
    """Protects ``cfg.images`` (one identity) into ``cfg.workdir``; resumes what the workdir already holds."""
    from tdae_jax.pipeline import RunResult

    plan = validate(cfg)
    wd = Workdir(cfg.workdir)
    wd.preflight(settings(cfg), overwrite=cfg.overwrite)
    ran, sur, encs, det = _models(cfg)
    with wd.open(settings(cfg), overwrite=cfg.overwrite) as manifest:
        with wd.writing("manifest.json"):
            sel = run_inputs.select(manifest, plan.paths, [], wd.proc, retry_failed=cfg.retry_failed)
            loaded = run_inputs.load(sel, manifest, size=ran.size, resize=ran.resize)
            loaded = _one_shape(manifest, loaded)
        if sel.skipped:
            progress(f"resuming: {len(sel.skipped)} of {sel.total} inputs already done or failed (not retried)")
        curves = _protect(ran, sur, wd, manifest, loaded, plan, encs, det, progress) if loaded else {}
        rows = [_row(e) for e in manifest.entries()]
        with wd.writing("metrics.jsonl / metrics.csv"):
            report.write_metrics(wd.root, rows, COLUMNS)
        wd.write_bytes("config.json", json.dumps(dataclasses.asdict(ran), indent=1, default=str).encode())
        if cfg.report:
            _write_report(ran, wd, manifest, curves, loaded)
    return RunResult(done=manifest.done(), failed=manifest.failed(), skipped=sel.skipped, rows=rows)


def _one_shape(manifest, loaded: dict) -> dict:
    """One identity = one batch: inputs of different working sizes are failed rows (they need a resize mode)."""
    shapes = {li.array.shape for li in loaded.values()}
    if len(shapes) <= 1:
        return loaded
    for i in loaded:
        manifest.mark(i, "failed", error=f"inputs have different working sizes {sorted(shapes)}; use --resize")
    return {}


def _clean_set(cfg, plan: Plan, x, uids):
    """X_clean (DLADiff §4.1: set_A + the inputs) and its uids; an unreadable clean photo is skipped, logged."""
    extra, names = [], []
    for p in plan.clean_paths:
        try:
            extra.append(dio.load_image(p, size=cfg.size, resize=cfg.resize).array)
            names.append(f"clean:{p.name}")
        except (dio.DataError, OSError) as err:
            log.warning("clean image skipped: %s", err)
    if not extra:
        return x, uids
    return np.concatenate([np.stack(extra), x]), np.concatenate([prng.uids(names), uids])


def _protect(cfg, sur, wd: Workdir, manifest, loaded: dict, plan: Plan, encs, det, progress) -> dict:
    """Layer 1 on the whole identity, then each image finished (layer 2, write, measure); returns loss curves."""
    ids = list(loaded)
    x = np.stack([loaded[i].array for i in ids])
    uids = prng.uids(ids)
    x_clean, uid_clean = _clean_set(cfg, plan, x, uids)
    with wd.writing("manifest.json"):
        for i in ids:
            manifest.mark(i, "running")
    t0 = time.perf_counter()
    try:
        delta, curves1 = layers.layer1(cfg, sur, x, uids, x_clean, uid_clean, wd.ckpt / "adft", progress)
    except Exception as err:  # noqa: BLE001 - the run reports, not crashes
        log.exception("layer 1 failed")
        with wd.writing("manifest.json"):
            for i in ids:
                manifest.mark(i, "failed", error=f"layer 1 failed: {type(err).__name__}: {err}")
        return {}
    secs = (time.perf_counter() - t0) / len(ids)
    curves = {}
    for j, i in enumerate(ids):
        curve = {k: v[j] for k, v in curves1.items()}
        if _finish_one(cfg, wd, manifest, loaded[i], delta[j], curve, secs, encs, plan.landmarks, det):
            curves[i] = [float(v) for v in curve.get("loss", [])]
    return curves


def _finish_one(cfg, wd: Workdir, manifest, li, delta_ft, curve, secs, encs, table, det) -> bool:
    """Layer 2 (if on), the budget-exact write and the on-disk metrics of one image; False when it failed."""
    t0 = time.perf_counter()
    metrics = run_finish.loss_metrics(curve, 0.0)
    lm = layers.landmarks(li, table, det) if (cfg.layer2 or encs) else None
    x = li.original_uint8.astype(np.float32) / 255.0  # layer 2 works at the original resolution
    delta, mask = dio.map_back(np.asarray(delta_ft, np.float32), li), None
    problem = run_finish.divergence(li, delta, curve)
    if cfg.layer2 and problem is None:
        if lm is None:
            problem = f"{li.path}: no face landmarks (no --landmarks entry and no face detected): layer 2 not applied"
            if cfg.missing_face != "fail":
                log.warning("%s", problem)
                metrics["zs_steps"], problem = 0, None
        else:
            try:
                delta, mask, zs = layers.layer2(cfg, li, x, delta, lm, encs)
                metrics.update(zs)
                if metrics["final_loss"] is None:  # layer 2 alone: its final identity cosine
                    metrics["final_loss"] = zs["zs_cos_after"]
            except ValueError as err:
                problem = f"{li.path}: layer 2: {err}"
    if problem is not None:
        with wd.writing("manifest.json"):
            manifest.mark(li.id, "failed", error=problem)
        return False
    prot = dio.protect_at_original(li.original_uint8, delta, cfg.eps_total)
    metrics.update(_face_metrics(li, prot, mask, det))
    metrics["seconds"] = round(secs + time.perf_counter() - t0, 3)
    out = run_finish.commit(wd, manifest, li, prot, curve, metrics)
    if lm is not None and encs:
        with wd.writing("manifest.json"):
            manifest.mark(li.id, "done", metrics=layers.ism_pro(li, out, lm, encs))
    return True


def _face_metrics(li, prot: np.ndarray, mask, det) -> dict:
    """L_inf outside the face crop (layer 2 changes only the crop beyond eta_ft) and dlib's re-detection."""
    out = {}
    if mask is not None:
        diff = np.abs(prot.astype(np.int16) - li.original_uint8.astype(np.int16)).max(-1)
        out["linf_outside_255"] = int(diff[~mask].max(initial=0))
    if det is not None:
        out["face_detected"] = int(len(det.detect(prot)) > 0)
    return out


def _row(e: dict) -> dict:
    m = e.get("metrics") or {}
    return {"id": e["id"], "source": e["source"], "status": e["status"], **{k: m.get(k) for k in COLUMNS[3:-1]},
            **{k: v for k, v in m.items() if k.startswith(("ism_pro/", "id_dist/", "zs_"))},
            "error": e.get("error") or ""}


def _write_report(cfg, wd: Workdir, manifest, curves: dict, loaded: dict):
    """report.html: each image (original | protected, loss curve), which layers ran on it and why."""
    entries = manifest.entries()
    layer2_ran = sum(1 for e in entries if (e.get("metrics") or {}).get("zs_steps"))
    summary = {"method": cfg.method + (f" + layer 2 (applied to {layer2_ran} of {len(entries)} images)"
                                       if cfg.layer2 else ""),
               "surrogate": f"{cfg.surrogate} ({cfg.weights_dir or 'built-in tiny'})",
               "eps": f"ft {cfg.adft.eps * 255:.2f}/255" + (f", zs {cfg.zs.eps * 255:.2f}/255" if cfg.layer2 else ""),
               "encoders": ", ".join(cfg.encoders), "done": len(manifest.done()), "failed": len(manifest.failed()),
               "loss direction": "layer 1 maximizes the attacked losses (L_att / L_cond): a rising curve is the "
                                 "protection working"}
    run_report.write_report(wd, "DLADiff protection report", entries, max(cfg.eps_total, 1 / 255), summary,
                            curves, None)
