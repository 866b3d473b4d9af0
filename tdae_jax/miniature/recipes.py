"""End-to-end recipes for the miniature models: data -> training -> shipped directory -> oracle score.

``run_vae`` trains an AutoencoderKL and writes ``<out>/config.json`` + ``diffusion_pytorch_model.safetensors``
(diffusers' AutoencoderKL layout; read it back with ``tdae_jax.models.sd.load_vae``). ``run_diffusion`` trains
an InstructPix2Pix editor (``family="ip2p"``) or a text-to-image UNet (``"sd"``) with its text encoder on a
frozen autoencoder's latents and writes a whole diffusers-layout pipeline with ``tdae_jax.models.save``; the
ip2p result is then re-loaded with ``tdae_jax.models.load`` and scored on held-out scenes by the oracle.
Every run writes ``<out>/training.json`` (configs, steps, wall time, losses, evaluation).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.miniature import train as T
from tdae_jax.miniature import world


def _dtype(name: str):
    return {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}[name]


def _cached(path: Path, make):
    """A dict of numpy arrays cached as .npz (the world is deterministic; rendering costs minutes on 2 cores)."""
    if path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    out = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **out)
    return out


def run_vae(cfg: T.VAEConfig, opt: T.Optim, data: T.Data, *, seed: int, out_dir, workdir, save_dtype="float16",
            eval_n: int = 128, eval_seed: int = 1000, ckpt_every: int = 100, log_every: int = 25,
            time_limit_s: float = 0.0, log=print) -> dict:
    from tdae_jax.models import weights
    from tdae_jax.models import sd

    t_start = time.time()
    workdir, out_dir = Path(workdir), Path(out_dir)
    ds = _cached(workdir / f"scenes_{data.seed}_{data.n}_{data.size}.npz",
                 lambda: {"image": world.make_scenes(data.seed, data.n, data.size)["image"]})
    log(f"data: {len(ds['image'])} scenes ({time.time() - t_start:.0f} s)")
    vae = T.make_vae(cfg)
    state = T.init_state(T.init_params(vae, seed), opt)
    step = T.make_step(T.vae_loss(vae, cfg), opt)
    images = T.to_unit(ds["image"])
    batches = T.batch_sampler({"image": images}, data.batch_size, data.seed)
    meta = {"kind": "vae", **T.config_dict(cfg, opt, data), "seed": seed}
    t_train = time.time()
    state, history = T.train_loop(step, state, batches, steps=opt.steps, key=jax.random.key(seed), workdir=workdir,
                                  ckpt_every=ckpt_every, log_every=log_every, time_limit_s=time_limit_s, meta=meta,
                                  log=log)
    train_s = history[-1]["elapsed_s"] if history else time.time() - t_train  # summed over resumed runs
    ema = state["ema"]
    mean, _ = T.encode_dataset(vae, ema, ds["image"][:512])
    sf = T.scaling_factor(mean)
    vae = T.make_vae(cfg, sf)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights.write_json(out_dir / "config.json", {**sd.vae_pt_config(vae, sf), "_diffusers_version": _version()})
    weights.write_safetensors(out_dir / "diffusion_pytorch_model.safetensors",
                              weights.to_pytorch(ema, vae=True, dtype=_dtype(save_dtype)))
    # reload what ships and measure reconstruction on held-out scenes
    vae2, params2 = sd.load_vae(out_dir)
    held = world.make_scenes(eval_seed, eval_n, data.size)["image"]
    m2, _ = T.encode_dataset(vae2, params2, held)
    rec = jax.jit(lambda p, z: T.vae_decode(vae2, p, z))(params2, jnp.asarray(np.transpose(m2, (0, 2, 3, 1))))
    rec = np.clip(np.asarray(rec), 0, 1)
    mse = np.mean((rec - T.to_unit(held)) ** 2, axis=(1, 2, 3))
    psnr = float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10))))
    # the best an editor in this latent space can reach, per core edit kind (32 pairs each)
    report_ceiling = ceiling(vae2, params2, eval_seed, 128, data.size, data.max_objects, world.CORE_KINDS)
    report = {"kind": "vae", "seed": seed, "ceiling": report_ceiling, **T.config_dict(cfg, opt, data),
              "steps_done": int(state["step"]),
              "train_wall_s": round(train_s, 1), "total_wall_s": round(time.time() - t_start, 1),
              "scaling_factor": sf, "latent_std_unscaled": float(np.std(mean)), "final": history[-1] if history else {},
              "eval": {"seed": eval_seed, "n": eval_n, "psnr_db": psnr}, "save_dtype": save_dtype}
    weights.write_json(out_dir / "training.json", report)
    log(f"vae saved to {out_dir}: scaling_factor {sf}, held-out PSNR {psnr:.2f} dB")
    return report


def ceiling(vae, params, seed: int = 1000, n: int = 64, size: int = 32, max_objects: int = 2,
            kinds=("recolour",)) -> dict:
    """Oracle scores of the autoencoder's round trip of the *ground truth* of ``n`` held-out edits (``kinds``
    cycled): the best an editor in this latent space can reach (``success`` per kind, mean ``psnr``)."""
    from tdae_jax.miniature import oracle

    p = T.pairs(seed, n, size, tuple(kinds), max_objects)
    m, _ = T.encode_dataset(vae, params, p["target"], batch=64)
    rec = jax.jit(lambda pr, z: T.vae_decode(vae, pr, z))(params, jnp.asarray(np.transpose(m, (0, 2, 3, 1))))
    s = oracle.evaluate(np.round(np.clip(np.asarray(rec), 0, 1) * 255).astype(np.uint8), p)
    return {"seed": seed, "n": n, "max_objects": max_objects, "success": s["success"], "psnr": s["psnr"]}


def _version():
    from importlib.metadata import version

    return version("diffusers")


def evaluate_t2i(sur, seed: int, n: int, size: int, *, eval_steps: int = 10, max_objects: int = 2,
                 scale: float = 3.0, strengths=(0.5, 0.6, 0.7)) -> dict:
    """Held-out scores of a text-to-image model (``oracle.scene_scores``): text-to-image from the scenes'
    captions (every named colour present) and SDEdit img2img of the scenes themselves at ``strengths``
    (every object keeps its colour at its place; PSNR to the source), ``eval_steps`` DDIM steps, guidance
    ``scale``."""
    from tdae_jax.miniature import oracle, sample

    t0 = time.time()
    scenes = [s for s in world.make_scenes(seed, 4 * n, size)["scenes"] if len(s.objects) <= max_objects][:n]
    images = np.stack([world.render(s, size) for s in scenes])
    ids = jnp.asarray(sur.tokenize([world.caption(s) for s in scenes]))
    key = jax.random.key(seed)
    gen = sample.text_to_image(sur, ids, key, num_steps=eval_steps, scale=scale, size=size)
    t2i = oracle.scene_scores(np.round(np.asarray(gen) * 255).astype(np.uint8), scenes, size)
    out = {"seed": seed, "n": len(scenes), "max_objects": max_objects, "num_steps": eval_steps, "scale": scale,
           "t2i_colours": t2i["success"], "img2img": {}}
    x = jnp.asarray(images, jnp.float32) / 255.0
    for st in strengths:
        y = sample.text_to_image(sur, ids, key, num_steps=eval_steps, scale=scale, images=x, strength=st)
        r = oracle.scene_scores(np.round(np.asarray(y) * 255).astype(np.uint8), scenes, size, sources=images)
        out["img2img"][str(st)] = {"layout": r["success"], "psnr": r["psnr"]}
    out["wall_s"] = round(time.time() - t0, 1)
    return out


def build_surrogate(family, vae, vae_params, sf, unet, text, tok, params):
    from tdae_jax.models import sd
    from tdae_jax.models.surrogate import Static, Surrogate

    sched = dict(T.SCHEDULER)
    static = Static(family=family, vae=vae, unet=unet, text_encoder=text, tokenizer=tok,
                    alphas_cumprod=sd.alphas_cumprod(sched), prediction_type=sched["prediction_type"],
                    scaling_factor=float(sf), scheduler_config=sched, name="miniature", source="training")
    return Surrogate(params={"vae": vae_params, "unet": params["unet"], "text_encoder": params["text_encoder"]},
                     static=static)


def run_diffusion(cfg: T.DiffusionConfig, opt: T.Optim, data: T.Data, *, seed: int, vae_dir, out_dir, workdir,
                  save_dtype="float16", eval_n: int = 128, eval_seed: int = 1000, eval_steps: int = 10,
                  eval_max_objects: int | None = None, ckpt_every: int = 100, log_every: int = 25,
                  time_limit_s: float = 0.0, log=print) -> dict:
    from tdae_jax import models
    from tdae_jax.miniature import sample
    from tdae_jax.models import sd

    t_start = time.time()
    workdir, out_dir = Path(workdir), Path(out_dir)
    vae, vae_params = sd.load_vae(vae_dir)
    sf = float(vae.scaling_factor)
    tag = f"{data.seed}_{data.n}_{data.size}_{'-'.join(data.kinds)}_{data.max_objects}"
    if cfg.family == "ip2p":
        raw = _cached(workdir / f"pairs_{tag}.npz", lambda: {
            k: v for k, v in T.pairs(data.seed, data.n, data.size, data.kinds, data.max_objects).items()
            if k in ("source", "target", "instruction")})
        texts, targets = [str(s) for s in raw["instruction"]], raw["target"]
    else:
        raw = _cached(workdir / f"scenes_{data.seed}_{data.n}_{data.size}.npz", lambda: {
            k: np.asarray(v) for k, v in world.make_scenes(data.seed, data.n, data.size).items()
            if k in ("image", "caption")})
        texts, targets = [str(s) for s in raw["caption"]], raw["image"]
    log(f"data: {len(texts)} items ({time.time() - t_start:.0f} s)")
    tok = T.world_tokenizer(cfg.max_length)
    arrays = {"ids": T.tokenize(tok, texts)}
    z_mean, _ = T.encode_dataset(vae, vae_params, targets)
    arrays["z0"] = (z_mean * sf).astype(np.float32)
    if cfg.family == "ip2p":
        arrays["image_latents"], _ = T.encode_dataset(vae, vae_params, raw["source"])
    log(f"latents: {arrays['z0'].shape}, scaled std {arrays['z0'].std():.3f} ({time.time() - t_start:.0f} s)")
    h = data.size // 2 ** (len(vae.block_out_channels) - 1)
    unet = T.make_unet(cfg, vae.latent_channels, h)
    text = T.make_text_encoder(cfg, tok)
    params = {"unet": T.init_params(unet, seed), "text_encoder": T.init_params(text, seed + 1)}
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
    log(f"params: {n_params / 1e6:.2f} M (unet + text encoder)")
    sur0 = build_surrogate(cfg.family, vae, vae_params, sf, unet, text, tok, params)
    state = T.init_state(params, opt)
    step = T.make_step(T.diffusion_loss(unet, text, cfg, sur0.static.alphas_cumprod, T.tokenize(tok, [""])[0]), opt)
    meta = {"kind": cfg.family, **T.config_dict(cfg, opt, data), "seed": seed, "vae_dir": str(vae_dir)}
    t_train = time.time()
    state, history = T.train_loop(step, state, T.batch_sampler(arrays, data.batch_size, data.seed), steps=opt.steps,
                                  key=jax.random.key(seed), workdir=workdir, ckpt_every=ckpt_every,
                                  log_every=log_every, time_limit_s=time_limit_s, meta=meta, log=log)
    train_s = history[-1]["elapsed_s"] if history else time.time() - t_train  # summed over resumed runs
    sur = build_surrogate(cfg.family, vae, vae_params, sf, unet, text, tok, state["ema"])
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    models.save(sur, tmp, dtype=_dtype(save_dtype))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    report = {"kind": cfg.family, "seed": seed, "vae_dir": str(vae_dir), **T.config_dict(cfg, opt, data),
              "params_millions": round(n_params / 1e6, 3), "steps_done": int(state["step"]),
              "train_wall_s": round(train_s, 1), "final": history[-1] if history else {}, "save_dtype": save_dtype}
    if cfg.family == "ip2p" and eval_n > 0:
        loaded = models.load("ip2p", out_dir)
        mo = data.max_objects if eval_max_objects is None else eval_max_objects
        held = T.pairs(eval_seed, eval_n, data.size, data.kinds, mo)
        t0 = time.time()
        ev = sample.evaluate_editor(loaded, held, num_steps=eval_steps)
        report["eval"] = {"seed": eval_seed, "n": eval_n, "max_objects": mo, "kinds": list(data.kinds),
                          "num_steps": eval_steps, "success": ev["success"], "psnr": ev["psnr"], "ssim": ev["ssim"],
                          "wall_s": round(time.time() - t0, 1)}
        log(f"held-out oracle success: {json.dumps(ev['success'])}")
    if cfg.family == "sd" and eval_n > 0:
        report["eval"] = evaluate_t2i(models.load("sd", out_dir), eval_seed, eval_n, data.size,
                                      eval_steps=eval_steps, max_objects=data.max_objects)
        log(f"held-out text-to-image / img2img: {json.dumps(report['eval'])}")
    report["total_wall_s"] = round(time.time() - t_start, 1)
    from tdae_jax.models import weights

    weights.write_json(out_dir / "training.json", report)
    log(f"saved to {out_dir}")
    return report
