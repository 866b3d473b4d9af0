"""Trainers for the miniature models shipped with the package (docs/miniature.md).

Three trainers over the procedural world (``world.py``), all with the same machinery: pure jit-compiled
train steps (``step(state, batch, key) -> (state, metrics)``, state donated), an optax chain
(global-norm clip, AdamW, linear warm-up then cosine decay), EMA weights (the ones that ship), and orbax
checkpoints (``tdae_jax.checkpoint.UnitCheckpointer``) so a killed training resumes where it stopped:

- an AutoencoderKL (Kingma & Welling 2014; LDM, Rombach et al. 2022 §3): diffusers' ``FlaxAutoencoderKL``,
  64x64 RGB -> 16x16x4 (f=4), trained with L1 + L2 reconstruction and a small KL term; the latent
  ``scaling_factor`` is 1 / std of the latents on training scenes, as SD chose 0.18215;
- an InstructPix2Pix editor (Brooks et al. 2023 §3.2): a ``FlaxUNet2DConditionModel`` with 8 input channels
  ``[z_t || E_mode(source)]`` over a frozen autoencoder's latents, trained jointly with a small
  ``FlaxCLIPTextModule`` (end to end from the diffusion loss), condition dropout for classifier-free guidance;
- a text-to-image UNet (4 input channels) on (scene, caption), the victim of img2img / SDEdit.

The diffusion models predict x0 (``prediction_type="sample"``): on 2 CPU cores an epsilon-predicting editor
did not learn in the budget (docs/miniature.md). Batches are drawn by
``numpy.random.default_rng([seed, step])`` and noise by ``fold_in(key, step)``, so a resumed run is the same run.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdae_jax import checkpoint as ckpt
from tdae_jax.miniature import vocab, world
from tdae_jax.models import miniature as mini_models

SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "prediction_type": "sample", "clip_sample": False,
             "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class Optim:
    steps: int = 1000
    lr: float = 1e-3
    warmup: int = 100
    clip: float = 1.0
    weight_decay: float = 1e-4
    ema_decay: float = 0.995
    final_lr_fraction: float = 0.1


@dataclass(frozen=True)
class VAEConfig:
    block_out_channels: tuple = (16, 32, 64)   # length 3: f = 4
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 8
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    kl_weight: float = 1e-4                    # on the per-element KL
    object_weight: float = 0.0                 # extra reconstruction weight on coloured (object) pixels
    edge_weight: float = 0.0                   # L1 on the images' finite differences (sharp outlines)
    size: int = 64


@dataclass(frozen=True)
class DiffusionConfig:
    family: str = "ip2p"                       # "ip2p" | "sd"
    block_out_channels: tuple = (32, 64, 64)   # one entry per level; multiples of 32
    attention_top: bool = False                # cross-attention at the top (full latent) level too
    layers_per_block: int = 1
    attention_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 32
    p_drop_text: float = 0.05
    p_drop_image: float = 0.05


@dataclass(frozen=True)
class Data:
    seed: int = 0
    n: int = 2048
    size: int = 64
    kinds: tuple = ("recolour",)
    max_objects: int = 3
    batch_size: int = 32


# ----------------------------------------------------------------------------------------------- data
def pairs(seed: int, n: int, size: int = 64, kinds=("recolour",), max_objects: int = 3, start: int = 0) -> dict:
    """Edit pairs like ``world.make_pairs`` (identical to it for ``max_objects=3``), with scenes of
    ``1..max_objects`` objects. Item ``i`` depends only on ``(seed, i, kinds, max_objects)``."""
    if max_objects == 3:
        return world.make_pairs(seed, n, size, kinds=tuple(kinds), start=start)
    kinds, edits = tuple(kinds), []
    for i in range(start, start + n):
        rng = world.item_rng(seed, world._PAIRS_STREAM, i)
        edits.append(world.sample_edit(rng, world.sample_scene(rng, max_objects=max_objects), kinds[i % len(kinds)]))
    src = [world.render_with_masks(e.source, size) for e in edits]
    tgt = [world.render_with_masks(e.target, size) for e in edits]
    return {"source": np.stack([s[0] for s in src]), "target": np.stack([t[0] for t in tgt]),
            "instruction": [e.instruction for e in edits], "caption": [e.caption for e in edits],
            "edited_caption": [e.edited_caption for e in edits], "kind": [e.kind for e in edits],
            "index": np.arange(start, start + n), "edits": edits, "size": size, "ss": 4}


def to_unit(images) -> np.ndarray:
    """uint8 [..., 3] -> float32 in [0, 1]."""
    return np.asarray(images, np.float32) / 255.0


# ------------------------------------------------------------------------------- tokenizer and modules
# The constructors live in the model layer (models/miniature.py); re-exported here for the recipes and tests.
make_vae, make_unet, make_text_encoder = mini_models.make_vae, mini_models.make_unet, mini_models.make_text_encoder


def world_tokenizer(max_length: int = 32):
    """A real ``CLIPTokenizer`` whose BPE merges make every word of ``vocab.words()`` a single token
    (``models.miniature.word_tokenizer``: CLIP's 512 byte-level symbols, then one entry per merge, learned by plain
    BPE on the word list until every word is one symbol, then the two special tokens)."""
    return mini_models.word_tokenizer(vocab.words(), max_length)


def tokenize(tok, texts) -> np.ndarray:
    return np.asarray(tok(list(texts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="np").input_ids, np.int32)


def init_params(module, seed: int) -> dict:
    """Seeded random params, drawn with numpy (no compile of ``module.init``; see ``weights.random_params``)."""
    from tdae_jax.models import weights

    return weights.random_params(module, seed)


# ----------------------------------------------------------------------------------------------- optimisation
def optimizer_schedule(opt: Optim):
    """Linear warm-up to ``lr``, then cosine decay to ``lr * final_lr_fraction`` at ``steps``."""
    return optax.warmup_cosine_decay_schedule(0.0, opt.lr, max(opt.warmup, 1), max(opt.steps, opt.warmup + 1),
                                              opt.lr * opt.final_lr_fraction)


def optimizer(opt: Optim) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(opt.clip),
                       optax.adamw(optimizer_schedule(opt), weight_decay=opt.weight_decay))


def init_state(params, opt: Optim) -> dict:
    params = jax.tree.map(jnp.array, params)   # a copy: the train step donates its state
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer(opt).init(params),
            "ema": jax.tree.map(jnp.copy, params)}


def make_step(loss_fn: Callable, opt: Optim):
    """``step(state, batch, key) -> (state, metrics)`` for ``loss_fn(params, batch, key) -> (loss, metrics)``;
    jit-compiled once, state donated. The EMA decay warms up as ``min(decay, (1 + n) / (10 + n))``."""
    tx = optimizer(opt)

    def step(state, batch, key):
        key = jax.random.fold_in(key, state["step"])
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        n = state["step"].astype(jnp.float32)
        d = jnp.minimum(opt.ema_decay, (1.0 + n) / (10.0 + n))
        ema = jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, state["ema"], params)
        metrics = {**metrics, "loss": loss, "grad_norm": optax.tree.norm(grads)}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}, metrics

    return jax.jit(step, donate_argnums=0)


# ----------------------------------------------------------------------------------------------- losses
def vae_moments(vae, params, x):
    """Posterior (mean, std) NHWC of images ``x [B,H,W,3] in [0,1]``."""
    dist = vae.apply({"params": params}, jnp.transpose(x * 2.0 - 1.0, (0, 3, 1, 2)), method=vae.encode).latent_dist
    return dist.mean, dist.std, dist.logvar


def vae_decode(vae, params, z_nhwc):
    """Images ``[B,H,W,3]`` (about [0,1], unclipped) from unscaled NHWC latents."""
    out = vae.apply({"params": params}, z_nhwc, method=vae.decode).sample
    return jnp.transpose(out, (0, 2, 3, 1)) * 0.5 + 0.5


def _coloured(x):
    """``[B,H,W]`` 1 where a pixel of ``x [B,H,W,3] in [0,1]`` has chroma >= the oracle's CHROMA_MIN (objects:
    every background is near-grey), else 0. Small objects are few pixels; weighting them keeps their colour."""
    from tdae_jax.miniature import oracle

    a = x[..., 0] - 0.5 * (x[..., 1] + x[..., 2])
    b = (3 ** 0.5 / 2) * (x[..., 1] - x[..., 2])
    return (jnp.hypot(a, b) * 255.0 >= oracle.CHROMA_MIN).astype(x.dtype)


def edge_l1(rec, x):
    """Mean L1 between the horizontal and vertical finite differences of ``rec`` and ``x`` ``[B,H,W,C]``: the
    gradient-difference loss of Mathieu, Couprie & LeCun (ICLR 2016, Eq. 5, alpha = 1), which penalizes blurred
    outlines that a per-pixel loss tolerates (a square decoded as a blob)."""
    dy = lambda a: a[:, 1:] - a[:, :-1]  # noqa: E731
    dx = lambda a: a[:, :, 1:] - a[:, :, :-1]  # noqa: E731
    return 0.5 * (jnp.abs(dy(rec) - dy(x)).mean() + jnp.abs(dx(rec) - dx(x)).mean())


def vae_loss(vae, cfg: VAEConfig):
    """L1 + L2 reconstruction (optionally up-weighted on object pixels, mean weight 1) + per-element KL, plus
    ``cfg.edge_weight`` times :func:`edge_l1`."""
    def loss_fn(params, batch, key):
        x = batch["image"]
        mean, std, logvar = vae_moments(vae, params, x)
        z = mean + std * jax.random.normal(key, mean.shape)
        rec = vae_decode(vae, params, z)
        w = 1.0 + cfg.object_weight * _coloured(x)[..., None]
        w = w / w.mean()
        l1, l2 = (w * jnp.abs(rec - x)).mean(), (w * jnp.square(rec - x)).mean()
        kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar).mean()
        edge = edge_l1(rec, x)
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.kl_weight * kl + cfg.edge_weight * edge
        return loss, {"vae/l1": l1, "vae/l2": l2, "vae/kl": kl, "vae/edge": edge, "vae/latent_std": mean.std()}

    return loss_fn


def diffusion_loss(unet, text, cfg: DiffusionConfig, alphas_cumprod: np.ndarray, empty_ids: np.ndarray):
    """x0-prediction loss ``|| unet([z_t || c_img], t, E_text(ids)) - z0 ||^2``; batch: ``z0 [B,C,h,w]`` scaled
    target latents, ``ids [B,T]``, and for ip2p ``image_latents [B,C,h,w]`` (unscaled E_mode(source)).
    Condition dropout: text -> the empty prompt with ``p_drop_text``, image latents -> 0 with ``p_drop_image``."""
    acp = jnp.asarray(alphas_cumprod, jnp.float32)
    empty = jnp.asarray(empty_ids, jnp.int32)

    def loss_fn(params, batch, key):
        z0, ids = batch["z0"], batch["ids"]
        b = z0.shape[0]
        kt, kn, kd1, kd2 = jax.random.split(key, 4)
        t = jax.random.randint(kt, (b,), 0, acp.shape[0])
        noise = jax.random.normal(kn, z0.shape)
        a = acp[t][:, None, None, None]
        z_t = jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise
        drop_t = jax.random.uniform(kd1, (b,)) < cfg.p_drop_text
        ids = jnp.where(drop_t[:, None], empty[None], ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1])[None], ids.shape)
        emb = text.apply({"params": params["text_encoder"]}, ids, jnp.ones_like(ids), pos, deterministic=True)[0]
        x = z_t
        if cfg.family == "ip2p":
            drop_i = jax.random.uniform(kd2, (b,)) < cfg.p_drop_image
            x = jnp.concatenate([z_t, jnp.where(drop_i[:, None, None, None], 0.0, batch["image_latents"])], axis=1)
        out = unet.apply({"params": params["unet"]}, x, t, emb).sample
        loss = jnp.square(out - z0).mean()
        return loss, {"diffusion/mse": loss}

    return loss_fn


# ----------------------------------------------------------------------------------------------- loop
def train_loop(step_fn, state, batch_fn: Callable[[int], dict], *, steps: int, key, workdir=None, ckpt_every: int = 0,
               log_every: int = 25, time_limit_s: float = 0.0, meta: dict | None = None, log=print):
    """Runs ``step_fn`` until ``steps`` (or ``time_limit_s`` of wall time, if > 0), resuming from the latest
    orbax checkpoint under ``workdir/ckpt`` whose fingerprint matches ``meta``. Returns ``(state, history)``;
    history is a list of ``{step, loss, ..., elapsed_s}`` at each progress line (restored with the checkpoint);
    ``elapsed_s`` is the training wall time summed over every run that contributed (a run stopped by its time
    limit and continued later counts both)."""
    meta = dict(meta or {})
    fp = {"fingerprint": ckpt.fingerprint(meta)}
    saver = ckpt.UnitCheckpointer(Path(workdir) / "ckpt", ckpt_every) if workdir and ckpt_every > 0 else None
    history, prior_s = [], 0.0
    if saver is not None:
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
        got = saver.restore(abstract, fp)
        if got is not None:
            _, state, m = got
            history = list(m.get("history", []))
            prior_s = float(m.get("train_s", history[-1]["elapsed_s"] if history else 0.0))
            log(f"resumed from step {int(state['step'])} ({prior_s / 60:.1f} min of training before)")
    start, t0, last = int(state["step"]), time.time(), time.time()
    acc: dict = {}
    for i in range(start, steps):
        state, metrics = step_fn(state, batch_fn(i), key)
        for k, v in metrics.items():
            acc.setdefault(k, []).append(v)
        done = i + 1
        timed_out = time_limit_s > 0 and time.time() - t0 > time_limit_s
        if done % log_every == 0 or done == steps or timed_out:
            row = {"step": done, **{k: float(np.mean(jax.device_get(v))) for k, v in acc.items()}}
            acc = {}
            el = time.time() - t0
            rate = el / max(done - start, 1)
            row["elapsed_s"], row["s_per_step"] = round(prior_s + el, 1), round(time.time() - last, 2) / log_every
            history.append(row)
            eta = rate * (steps - done)
            log(f"step {done}/{steps} loss {row['loss']:.5f} " +
                " ".join(f"{k} {v:.4g}" for k, v in row.items() if "/" in k) +
                f" | {rate:.2f} s/step, elapsed {el / 60:.1f} min, ETA {eta / 60:.1f} min")
            last = time.time()
        if saver is not None and (done % ckpt_every == 0 or done == steps or timed_out):
            saver.maybe_save(done, state, {**fp, "history": history, "train_s": prior_s + time.time() - t0},
                             force=True)
        if timed_out:
            log(f"time limit reached at step {done}")
            break
    if saver is not None:
        saver.close()
    return state, history


def batch_sampler(arrays: dict, batch_size: int, seed: int) -> Callable[[int], dict]:
    """``batch(step)``: rows drawn by ``default_rng([seed, step])`` (resumable, layout independent)."""
    n = len(next(iter(arrays.values())))

    def get(step):
        idx = np.random.default_rng([seed, 7, step]).integers(0, n, batch_size)
        return {k: v[idx] for k, v in arrays.items()}

    return get


# ----------------------------------------------------------------------------------------------- helpers
def encode_dataset(vae, params, images_u8, batch: int = 128):
    """(mean, std) NCHW float32 of uint8 images, computed in jitted chunks."""
    fn = jax.jit(lambda p, x: vae_moments(vae, p, x)[:2])
    means, stds = [], []
    for i in range(0, len(images_u8), batch):
        chunk = to_unit(images_u8[i:i + batch])
        pad = batch - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
        m, s = fn(params, chunk)
        means.append(np.asarray(m)[:batch - pad]), stds.append(np.asarray(s)[:batch - pad])
    to_nchw = lambda a: np.transpose(np.concatenate(a), (0, 3, 1, 2))  # noqa: E731
    return to_nchw(means), to_nchw(stds)


def scaling_factor(latent_means: np.ndarray) -> float:
    """1 / std of the latents (SD's recipe for 0.18215), rounded to 4 significant digits."""
    return float(f"{1.0 / float(np.std(latent_means)):.4g}")


def params_to_host(tree: Any, dtype=np.float32) -> Any:
    return jax.tree.map(lambda a: np.asarray(jax.device_get(a), dtype), flax.core.unfreeze(tree))


def config_dict(*cfgs) -> dict:
    out = {}
    for c in cfgs:
        out[type(c).__name__] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(c).items()}
    return out


__all__ = ["Optim", "VAEConfig", "DiffusionConfig", "Data", "SCHEDULER", "pairs", "world_tokenizer", "tokenize",
           "make_vae", "make_unet", "make_text_encoder", "init_params", "optimizer", "init_state", "make_step",
           "vae_loss", "diffusion_loss", "train_loop", "batch_sampler", "encode_dataset", "scaling_factor",
           "params_to_host", "config_dict"]
