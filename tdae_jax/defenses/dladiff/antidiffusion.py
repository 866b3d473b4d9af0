"""Anti-Diffusion (Zheng Li et al., "Anti-Diffusion: Preventing Abuse of Modifications of Diffusion-Based Models",
AAAI 2025) as a DLADiff layer-1 baseline, under DLADiff's budget.

Reference: ``whulizheng/Anti-Diffusion``. Restated here, not copied:

- ``Defense/antidiffusion.py``: ``defense`` (the outer loop, on a deep copy of the model), ``tunning_prompts``
  (prompt tuning, PTO), ``protect_epoch`` (the PGD phase with the semantic disturbance loss, SDL),
  ``tunning_epoch`` (UNet fine-tuning); ``AttentionStore`` / ``register_attention_control`` /
  ``aggregate_attention`` (prompt-to-prompt's capture: how the maps are taken and averaged);
- ``Main.py``: the argparse defaults (``--learning_rate`` 5e-7, ``--tunning_steps`` 20, ``--attention_size`` 16,
  ``--pgd_itrs`` 10, ``--epoches`` 5, ``--pgd_alpha`` 2e-3, ``--pgd_eps`` 5e-2, seed 42, 512 px, batch 1);
- ``Scripts/anti-diffusion_demo.sh``: the recipe (SD-2.1-base, ``--pgd_alpha=2e-3 --pgd_eps=1e-2 --epoches=5
  --pgd_itrs=10``); ``Utils.py``: images in [-1,1].

The loop (``defense``), on a private copy f of theta_pre, for the photos X it protects::

    E  = PTO(E(""), X, pto_steps)            # tunning_prompts from the empty prompt's text-encoder output
    X' = PGD(f, E, X, pgd_steps)             # protect_epoch
    repeat epochs:
        f  = train(f, X', E, tune_steps)     # tunning_epoch: the UNet alone, a fresh AdamW per call
        X' = PGD(f, E, X', pgd_steps)        # its L_inf ball centred on the phase's starting images
        E  = PTO(E, X', pto_steps)           # continues from E with a fresh AdamW

PTO (``tunning_prompts``): the whole ``[1,T,D]`` text-encoder output E (every position: BOS, EOS, padding) is
the variable, shared by all images; AdamW with torch's defaults (lr 1e-3 in the code, betas 0.9/0.999, eps 1e-8,
weight decay 1e-2), 30 steps (hard-coded), minimizing ``mean_i ||eps_i - UNet_f(noise(z0_i, t_i, eps_i), t_i,
E)||^2`` with ``z0_i`` one VAE sample encoded once per call and fresh ``(t_i, eps_i)`` every step.

PGD step (``protect_epoch``), per image i on one draw (t_i ~ U[0, T), eps_i, VAE sample)::

    L_cond,i = mean || eps_i - UNet_f(noise(Enc(x_i + delta_i), t_i, eps_i), t_i, E) ||^2
    A_i      = mean over the 16 x 16 cross-attention layers ("down", "up") and heads of the maps   [Q, T]
    SDL_i    = mean_{q,k} clip(100 A_i[q,k], 0, 1)^2                   (the MSE of the clipped maps to zero maps)
    delta_i <- Pi( delta_i + alpha sign grad_delta (L_cond,i - lambda SDL_i) )      lambda = 1

The reference's loss is ``-MSE(maps, 0) + MSE(pred, noise)`` and its step is ``+alpha sign(grad)``: it ascends
the diffusion loss and *descends* the attention term, driving the clipped, scaled cross-attention maps to zero
(the text stops steering the denoiser). As every objective here is minimized, the step descends
``J_i = lambda SDL_i - L_cond,i`` with ADFT's image optimizer (:func:`adft.image_optimizer`: sign, or the raw
gradient with ``update="raw"``), then :func:`defenses.pgd.project` and the phase ball (choice 1).

Fine-tuning (``tunning_epoch``): UNet only (no text encoder, no prior term), conditioned on E, on the current
perturbed images; AdamW lr 5e-7, betas 0.9/0.999, weight decay 1e-2, eps 1e-8, re-created each call;
``--tunning_steps`` 20 steps per epoch. Here :func:`adft.train_on` (ASPL's compiled training step).

Keys: PGD step ``k`` (the global counter ``PerturbState.step``) of image ``u`` uses ``image_keys("antidiffusion/pgd",
u, k)`` (streams 1 = t, 2 = noise, 3 = VAE sample: :func:`editors.finetune.diffusion_draw`); PTO step ``s``
(a counter over all calls) ``image_keys("antidiffusion/pto", u, s)``; the fixed latents of PTO call ``c``
``image_keys("antidiffusion/pto_latents", u, c)``; the fine-tuning draws ``train_on``'s ``"antidiffusion/tune"``.

Choices of this port, where the code is ambiguous or the setting differs:

1. Budget. ``protect_epoch`` clamps ``images - ori_images`` to ``+-eps`` with ``ori_images`` the images the phase
   *starts* from, so the reference bounds a phase's move, and its total only by ``(epochs + 1) eps`` (the demo:
   6 x 1e-2 on [-1,1] = 0.03 in [0,1], 7.65/255). Here every step projects onto DLADiff's eta (7/255 around the
   clean image, :func:`defenses.pgd.project`) and onto the reference's phase ball, ``phase_eps`` around the
   phase's starting perturbation (0.005 = the demo's ``--pgd_eps=1e-2`` on [-1,1]; ``phase_eps = 0`` drops it).
   Both are boxes containing that starting point, so clipping to one then the other lands in both.
2. Units: [0,1] pixels. ``step_size`` 1e-3 is the demo's ``--pgd_alpha=2e-3`` on [-1,1]; gradients are taken
   w.r.t. the [0,1] image (a factor 2 on the gradient, the same sign). The reference runs fp32 weights.
3. Heads. ``AttentionControl.__call__`` stores ``attn[h // 2:]``, prompt-to-prompt's "conditional half of a
   classifier-free-guidance batch"; on the reference's one-image batch that axis holds the heads, so only the
   upper half of each layer's heads enters A. The surrogate's capture returns head-averaged maps, so every head
   enters here. Layers: every cross-attention (``attn2``) map of side ``resolution`` = 16
   (:func:`dsur.select_layers`): SD-2.1-base at 512 px ``down_blocks_2`` + ``up_blocks_1`` (``from_where=["down",
   "up"]`` with ``aggregate_attention``'s 16 x 16 filter), the tiny surrogate at 32 px ``down_blocks_0`` +
   ``up_blocks_1``. The mean over layers of head means (:func:`disdiff.cross_map_mean`) is the reference's mean
   over (layer, head) when the layers have equally many heads (SD-2.1-base at 16 x 16: 20 each). All T tokens
   count, as in the reference (its target is a ``[1, 256, 77]`` zero map).
4. Per image. The reference runs one image per forward and divides each loss by the batch size: the gradient on
   image i is its own term's over B, which a sign step does not see; here ``J`` is summed over the batch.
5. PTO: one draw per image per step (the reference averages B independent draws of the whole batch per step: the
   same expected gradient, B times the UNet passes); the regression target is the scheduler's prediction type
   (``tunning_prompts`` regresses to the noise whatever the type: the same for SD-2.1-base, an epsilon model).
   The reference's last PTO call (after the last PGD phase) is skipped: its embedding is never used.
6. Fine-tuning: the batch mean of the per-image losses (``tunning_epoch`` reassigns ``bsz = 1`` inside its loop
   and sums them: AdamW is invariant to that scale but for its eps); clipping: ``clip_grad_norm_`` receives the
   ``itertools.chain`` the AdamW constructor already consumed and clips nothing (as in Anti-DreamBooth), so
   ``max_grad_norm`` is the shared 1.0 and 0 reproduces the reference. The reference zeroes the UNet's gradients
   only after each optimizer step, so the first fine-tuning step of an epoch also carries the UNet gradients of
   the last PGD iteration (and, from the second epoch, of the previous 30 PTO steps); not reproduced.
7. Inputs: the reference tunes E and the UNet on the protected photos alone: set_A (``--clean_images``) and the
   instance prompt are not used; PTO starts from ``init_prompt`` (the reference: the empty prompt).
8. One compiled PGD step: the cross-attention forward is DisDiff's :func:`disdiff.cond_and_maps` (uniform t), the
   update and projection ADFT's; ``lambda`` and ``phase_eps`` are traced, so every PGD step of a run (and the
   tests' SDL-weighted variants) share one compilation. PTO is one more compiled step.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdae_jax import prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses.dladiff import adft, baselines, disdiff, dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.parallel import mesh as meshlib

STREAMS = ("antidiffusion/pgd", "antidiffusion/pto", "antidiffusion/pto_latents", "antidiffusion/tune")


@dataclasses.dataclass(frozen=True)
class AntiDiffusionConfig:
    """Anti-Diffusion's own settings; the budget (``eps``), the PGD step (``step_size``), ``epochs``, the UNet
    fine-tuning's lr / weight decay / clipping, ``update`` and ``latent_sample`` are the shared
    :class:`baselines.BaselineConfig`'s. The reference's value (file, argument or constant) in each comment."""

    pgd_steps: int = 10  # anti-diffusion_demo.sh --pgd_itrs=10 (Main.py default 10)
    tune_steps: int = 20  # Main.py --tunning_steps 20 (UNet fine-tuning steps per epoch)
    pto_steps: int = 30  # tunning_prompts: range(30)
    pto_lr: float = 1e-3  # tunning_prompts: AdamW(lr=1e-3)
    pto_weight_decay: float = 1e-2  # torch.optim.AdamW's default weight_decay
    sdl_weight: float = 1.0  # protect_epoch: cross_attention_loss + adv_loss (weight 1); 0 = no SDL
    sdl_scale: float = 100.0  # protect_epoch: aggregate_attention(...) * 1e+2, then clamp [0, 1]
    resolution: int = 16  # Main.py --attention_size 16
    phase_eps: float = 0.005  # anti-diffusion_demo.sh --pgd_eps=1e-2 on [-1,1], around the phase's start
    init_prompt: str = ""  # tunning_prompts: tokenizer("") when no embedding is given

    def __post_init__(self):
        if self.pgd_steps < 1 or min(self.tune_steps, self.pto_steps) < 0:
            raise ValueError(f"need pgd_steps >= 1, tune_steps >= 0 and pto_steps >= 0 (got {self.pgd_steps}, "
                             f"{self.tune_steps}, {self.pto_steps})")
        if self.pto_lr <= 0 or self.pto_weight_decay < 0 or self.sdl_weight < 0 or self.sdl_scale <= 0:
            raise ValueError(f"need pto_lr > 0, pto_weight_decay >= 0, sdl_weight >= 0, sdl_scale > 0 (got "
                             f"{self.pto_lr}, {self.pto_weight_decay}, {self.sdl_weight}, {self.sdl_scale})")
        if self.resolution < 1 or not 0 <= self.phase_eps < 1:
            raise ValueError(f"need resolution >= 1 and phase_eps in [0, 1) (got {self.resolution}, "
                             f"{self.phase_eps})")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled PGD step depends on (a static jit argument); ``lambda`` and ``phase_eps`` are traced."""

    eps: float
    step_size: float
    update: str
    latent_sample: bool
    layers: dsur.AttentionLayers
    scale: float


def step_config(cfg: baselines.BaselineConfig, acfg: AntiDiffusionConfig, layers: dsur.AttentionLayers) -> StepConfig:
    return StepConfig(cfg.eps, cfg.step_size, cfg.update, cfg.latent_sample, layers, acfg.sdl_scale)


def check_recipe(cfg: baselines.BaselineConfig):
    """Anti-Diffusion fine-tunes the UNet alone on the tuned embedding, without a prior term (``tunning_epoch``):
    a ``cfg`` asking for the text encoder or class images is a ``ValueError``, not silently ignored."""
    if cfg.train_text_encoder or cfg.prior_weight > 0:
        raise ValueError("Anti-Diffusion fine-tunes the UNet alone, on its tuned embedding and without a prior "
                         "term: the text encoder training and the prior weight do not apply")


# ------------------------------------------------------------------------------------------------ SDL
def semantic_disturbance(maps: dict, scale: float = 100.0) -> jax.Array:
    """SDL per image ``[B]`` (module docstring; ``protect_epoch``): ``mean_{q,k} clip(scale A[q,k], 0, 1)^2`` with
    ``A`` the mean cross-attention map ``[B,Q,T]`` (:func:`disdiff.cross_map_mean` of ``{path: [B,Q,T]}``)."""
    avg = disdiff.cross_map_mean(maps)
    return jnp.mean(jnp.square(jnp.clip(scale * avg, 0.0, 1.0)), axis=(1, 2))


# ------------------------------------------------------------------------------------------------ PGD step
def phase_clip(delta, anchor, phase_eps) -> jax.Array:
    """``delta`` within ``phase_eps`` of ``anchor`` (the phase's starting perturbation); ``phase_eps <= 0``: as is."""
    return jnp.where(phase_eps > 0, jnp.clip(delta, anchor - phase_eps, anchor + phase_eps), delta)


def antidiffusion_step(p: adft.PerturbState, base_sur, unet, batch: dict, key, sdl_weight, phase_eps,
                       cfg: StepConfig):
    """One Anti-Diffusion PGD step against ``unet``: descent on ``J = sdl_weight SDL - L_cond`` (module docstring),
    projected on the budget and on the phase ball. ``batch``: ``x0 [B,H,W,3]``, ``uid [B]``, ``emb [B,T,D]`` (the
    tuned embedding), ``anchor [B,H,W,3]`` (the perturbation the phase started from). Returns ``(PerturbState,
    metrics)``, all ``[B]`` and taken before the step: ``antidiffusion/cond``, ``antidiffusion/sdl``,
    ``antidiffusion/objective`` (J), ``antidiffusion/t``; and ``budget/linf`` (after it)."""
    keys = prng.image_keys(key, batch["uid"], p.step)
    sur = base_sur.replace(params={**base_sur.params, "unet": unet})
    x0 = batch["x0"]
    t = disdiff.sample_timesteps(keys, jnp.ones((x0.shape[0], sur.num_train_timesteps), bool))  # U[0, T)

    def objective(delta):
        lc, maps = disdiff.cond_and_maps(sur, x0 + delta, batch["emb"], keys, t, cfg.layers, cfg.latent_sample)
        ls = semantic_disturbance(maps, cfg.scale)
        j = sdl_weight * ls - lc
        return jnp.sum(j), (lc, ls, j)

    (_, (lc, ls, j)), g = jax.value_and_grad(objective, has_aux=True)(p.delta)
    p = adft._pgd_apply(cfg, p, g, x0)
    p = p._replace(delta=phase_clip(p.delta, batch["anchor"], phase_eps))
    return p, {"antidiffusion/cond": lc, "antidiffusion/sdl": ls, "antidiffusion/objective": j,
               "antidiffusion/t": t, "budget/linf": pgd_lib.per_image_linf(p.delta)}


step_jit = jax.jit(antidiffusion_step, static_argnames=("cfg",), donate_argnums=(0,))


# ------------------------------------------------------------------------------------------------ PTO
class PromptState(NamedTuple):
    emb: jax.Array  # [1,T,D] the tuned text-encoder output E, shared by the images
    opt_state: Any
    step: jax.Array  # global PTO counter (over all calls: the draws never repeat)


_PTO_TRACE = ft.FinetuneConfig(lr=1.0, weight_decay=0.0, max_grad_norm=0.0)  # lr and decay live in the state


def init_prompt_state(emb, acfg: AntiDiffusionConfig, step=0) -> PromptState:
    """A fresh AdamW on ``emb [1,T,D]`` (own buffer: the step donates it): torch's defaults (betas 0.9/0.999, eps
    1e-8, decoupled weight decay) with ``acfg.pto_lr`` / ``acfg.pto_weight_decay``, as ``tunning_prompts`` builds
    one per call; ``step`` carries the PTO counter over."""
    emb = jnp.array(emb, jnp.float32, copy=True)
    opt = ft.optimizer(dataclasses.replace(_PTO_TRACE, lr=acfg.pto_lr, weight_decay=acfg.pto_weight_decay))
    return PromptState(emb, opt.init(emb), jnp.asarray(step, jnp.int32))


def pto_step(s: PromptState, base_sur, unet, batch: dict, key):
    """One PTO step against ``unet``: AdamW on E minimizing ``mean_i L_cond,i(E)`` at the call's fixed latents.
    ``batch``: ``z0 [B,C,h,w]`` (scaled latents), ``uid [B]``. Returns ``(PromptState, {"antidiffusion/pto": [B]
    L_cond before the step})``."""
    keys = prng.image_keys(key, batch["uid"], s.step)
    sur = base_sur.replace(params={**base_sur.params, "unet": unet})
    z0 = batch["z0"]

    def loss(emb):
        lc = ft.diffusion_loss(sur, None, jnp.broadcast_to(emb, (z0.shape[0],) + emb.shape[1:]), keys, z0=z0)
        return jnp.mean(lc), lc

    (_, lc), g = jax.value_and_grad(loss, has_aux=True)(s.emb)
    updates, opt_state = ft.optimizer(_PTO_TRACE).update(g, s.opt_state, s.emb)
    return PromptState(optax.apply_updates(s.emb, updates), opt_state, s.step + 1), {"antidiffusion/pto": lc}


pto_jit = jax.jit(pto_step, donate_argnums=(0,))


def _latents(sur, x, uid, key, call, latent_sample: bool):
    """PTO's latents ``[B,C,h,w]``: one VAE draw per call (``tunning_prompts`` encodes once, under no_grad)."""
    return ft.diffusion_draw(sur, x, prng.image_keys(key, uid, call), latent_sample)[0]


latents_jit = jax.jit(_latents, static_argnames=("latent_sample",))


def tune_prompt(s: PromptState, base, unet, x, uid, base_key, acfg: AntiDiffusionConfig, latent_sample: bool,
                call: int, mesh) -> tuple[PromptState, list]:
    """One PTO call (``tunning_prompts``) on the images ``x`` (sharded): their latents encoded once (draw ``call``),
    a fresh AdamW from ``s.emb``, ``acfg.pto_steps`` steps. Returns ``(state, [batch-mean loss before each step])``."""
    if not acfg.pto_steps:
        return s, []
    z0 = latents_jit(base, x, uid, adft.stream_key(base_key, STREAMS[2]), call, latent_sample)
    s = meshlib.replicate(init_prompt_state(s.emb, acfg, s.step), mesh)
    key, losses = adft.stream_key(base_key, STREAMS[1]), []
    for _ in range(acfg.pto_steps):
        s, m = pto_jit(s, base, unet, {"z0": z0, "uid": uid}, key)
        losses.append(float(np.mean(m["antidiffusion/pto"])))
    return s, losses


# ------------------------------------------------------------------------------------------------ the loop
def pgd_phase(p: adft.PerturbState, base, unet, batch: dict, emb, key, acfg: AntiDiffusionConfig, scfg: StepConfig):
    """One ``protect_epoch``: ``acfg.pgd_steps`` steps in the ball of ``acfg.phase_eps`` around the phase's starting
    perturbation. ``batch``: ``x0``, ``uid`` sharded; ``emb [B,T,D]`` the tuned embedding, sharded.
    Returns ``(PerturbState, {"cond": [[B]] per step, "sdl": [[B]] per step})``."""
    pb = {**batch, "emb": emb, "anchor": jnp.array(p.delta, copy=True)}  # own buffer: the step donates p
    out = {"cond": [], "sdl": []}
    for _ in range(acfg.pgd_steps):
        p, m = step_jit(p, base, unet, pb, key, acfg.sdl_weight, acfg.phase_eps, scfg)
        for name in out:
            out[name].append(np.asarray(m[f"antidiffusion/{name}"]))
    return p, out


def protect(surrogate, x0, uid, cfg: baselines.BaselineConfig, acfg: AntiDiffusionConfig, base_key, *, mesh=None,
            on_epoch=None):
    """Anti-Diffusion on one identity (``defense``): ``x0 [B,H,W,3]`` in [0,1], the photos it protects (and tunes
    on: no set_A). ``cfg``: the budget, PGD step, ``epochs`` and the UNet fine-tuning's optimizer (UNet only, no
    prior: :func:`check_recipe`). ``on_epoch(ep, p, hist)`` after each PGD phase (``ep`` 0 = the first one).
    Returns ``(PerturbState, history)``: ``antidiffusion/cond``, ``antidiffusion/sdl`` (per phase, per step,
    ``[B]``), ``antidiffusion/pto`` (per PTO call, the batch-mean loss per step), ``antidiffusion/train`` (per
    epoch, the fine-tuning losses) and ``antidiffusion/emb`` (the last tuned embedding ``[1,T,D]``)."""
    check_recipe(cfg)
    b = np.shape(x0)[0]
    mesh = ft.data_mesh(b, mesh)
    layers = dsur.select_layers(surrogate, np.shape(x0)[1], acfg.resolution, kinds=(dsur.CROSS,))
    scfg, kp = step_config(cfg, acfg, layers), adft.stream_key(base_key, STREAMS[0])
    batch = meshlib.shard_batch({"x0": jnp.asarray(x0, jnp.float32), "uid": jnp.asarray(uid, jnp.int32)}, mesh)
    base = meshlib.replicate(surrogate, mesh)
    tcfg = cfg.train(acfg.tune_steps, b)
    frozen = ft.frozen_part(base, tcfg)
    f = meshlib.replicate(ft.init_state(surrogate, tcfg), mesh)
    s = init_prompt_state(ft.embed_ids(surrogate, surrogate.tokenize([acfg.init_prompt])), acfg)
    p = adft._place_perturb(adft.init_perturb(x0, cfg), mesh)
    hist = {f"antidiffusion/{k}": [] for k in ("pto", "cond", "sdl", "train")}
    s, losses = tune_prompt(s, base, f.trainable["unet"], batch["x0"], batch["uid"], base_key, acfg,
                            cfg.latent_sample, 0, mesh)
    hist["antidiffusion/pto"].append(losses)
    for ep in range(cfg.epochs + 1):
        emb = meshlib.shard_batch(jnp.asarray(np.repeat(np.asarray(s.emb), b, 0)), mesh)
        if ep:  # tunning_epoch: a fresh AdamW on f's UNet, the counter (and so the draws) carried over
            f = meshlib.replicate(baselines._fresh(f.trainable, f.step, tcfg), mesh)
            x_adv = jnp.clip(batch["x0"] + p.delta, 0.0, 1.0)
            f, losses = adft.train_on(f, frozen, x_adv, batch["uid"], emb, base_key, tcfg, mesh, stream=STREAMS[3])
            hist["antidiffusion/train"].append(losses)
        p, out = pgd_phase(p, base, f.trainable["unet"], batch, emb, kp, acfg, scfg)
        hist["antidiffusion/cond"].append(out["cond"])
        hist["antidiffusion/sdl"].append(out["sdl"])
        if 0 < ep < cfg.epochs:  # the reference's PTO after the last phase feeds nothing: skipped
            x_adv = jnp.clip(batch["x0"] + p.delta, 0.0, 1.0)
            s, losses = tune_prompt(s, base, f.trainable["unet"], x_adv, batch["uid"], base_key, acfg,
                                    cfg.latent_sample, ep, mesh)
            hist["antidiffusion/pto"].append(losses)
        if on_epoch is not None:
            on_epoch(ep, p, hist)
    hist["antidiffusion/emb"] = np.asarray(s.emb)
    return p, hist


def curves(hist: dict, acfg: AntiDiffusionConfig) -> dict:
    """Per-image curves ``[B, steps]`` of a :func:`protect` history: ``loss`` = the ascended
    ``L_cond - lambda SDL`` (``-J``), and its two terms."""
    cat = lambda name: np.concatenate([np.stack(ph, 1) for ph in hist[f"antidiffusion/{name}"]], 1)  # noqa: E731
    cond, sdl = cat("cond"), cat("sdl")
    return {"loss": cond - acfg.sdl_weight * sdl, "antidiffusion/cond": cond, "antidiffusion/sdl": sdl}
