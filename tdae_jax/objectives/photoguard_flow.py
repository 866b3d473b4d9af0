"""PhotoGuard's diffusion attack (PGD, Salman et al., ICML 2023; a TDAE host) on a flow-matching surrogate (SD3).

The SD/IP2P version (``photoguard.make_diffusion``) unrolls K DDIM steps of an img2img edit; SD3 is a
rectified-flow model (Esser et al. 2024, §2), so the unrolled edit here is the victim editor's own chain
(``editors/sd3_img2img.py`` = ``StableDiffusion3Img2ImgPipeline`` at its defaults: 50 steps, strength 0.6,
FlowMatchEuler with the model's shift, 3.0), **coarsened to K Euler steps**: the victim's remaining sigmas
``σ[t_start:]`` (σ_s = 0.814 down to 0 over 30 steps for the defaults) are sampled at K + 1 evenly spaced
indices (first and last kept), so the attack starts at the victim's noise level for any K, and K = the victim's
step count reproduces the victim's chain exactly. (Running the pipeline itself with ``num_inference_steps = K``
would start from pure noise for K <= 2: shift 3 puts σ[0] = 1 and ``t_start = int(K - 0.6 K) = 0``.)

Chain: start latent ``(1 - σ_s) z_0 + σ_s ε`` from the posterior sample ``z_0``, CFG on the velocity
``v_u + g (v_c - v_u)`` (negative = the encoded empty prompt, with its own pooled projection), Euler steps
``z += (σ_{k+1} - σ_k) v`` at timesteps ``1000 σ_k``; then the VAE decoder. Minimized:
``||D(edit_K(x + delta, e)) - y_tgt||_2`` with y_tgt the mid-gray image (0 in [-1, 1]; ``--target``), as the SD
version. Each step is ``jax.checkpoint``-ed unless ``cfg.remat`` is off (``--remat``). As the DDIM version, the loss
is the mean over ``cfg.pgd_grad_reps`` independent passes (PhotoGuard's ``grad_reps``;
``common.average_over_reps``) and ``cfg.pgd_strength`` (None = 0.6) sets the victim's strength; the Euler
flow sampler is deterministic, so ``cfg.pgd_eta`` (DDIM's eta) does not apply here.

``emb`` is SD3's ``prompt_embeds`` (what DPD perturbs); ``batch["pooled"]`` / ``batch["uncond_pooled"]`` stay fixed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.configs import Objective
from tdae_jax.models import flow_match
from tdae_jax.objectives import common

STRENGTH = 0.6  # StableDiffusion3Img2ImgPipeline.__call__ defaults (diffusers 0.39.0), as editors/sd3_img2img.py
EDITOR_STEPS = 50


def schedule(sur, steps: int, strength: float = STRENGTH, editor_steps: int = EDITOR_STEPS):
    """(timesteps ``[k]`` = 1000σ, sigmas ``[k + 1]`` ending in 0), float32, host-side: the victim's img2img
    sigmas ``σ[t_start:]`` of an ``editor_steps``-step schedule at ``strength``, at ``k = min(steps, remaining)``
    + 1 evenly spaced indices."""
    _, sig = flow_match.set_timesteps(sur.static.scheduler, editor_steps)
    sig = sig[flow_match.img2img_start(editor_steps, strength):]
    remaining = sig.shape[0] - 1
    if remaining < 1:
        raise ValueError(f"img2img strength {strength} with {editor_steps} steps runs no denoising step")
    k = min(max(1, steps), remaining)
    sig = sig[np.round(np.linspace(0, remaining, k + 1)).astype(int)]
    return (sig[:-1] * np.float32(sur.num_train_timesteps)).astype(np.float32), sig


def make_diffusion(sur, cfg: Objective, strength: float | None = None, editor_steps: int = EDITOR_STEPS):
    """Returns ``loss_fn(delta, batch, emb, keys) -> [B]`` (minimized); ``cfg.denoise_steps`` = K; ``strength``
    None: ``cfg.pgd_strength``, else the pipeline default ``STRENGTH``."""
    if strength is None:
        strength = STRENGTH if cfg.pgd_strength is None else cfg.pgd_strength
    ts, sig = schedule(sur, cfg.denoise_steps, strength, editor_steps)
    g = cfg.guidance_scale

    def one_pass(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        pooled, u_pooled = cond["pooled"], cond.get("uncond_pooled")
        uncond = batch.get("uncond")
        cfg_on = g > 1.0 and uncond is not None
        if cfg_on and u_pooled is None:
            raise ValueError("SD3 PGD with guidance needs batch['uncond_pooled']")
        z0 = common.encode_sample(sur, x, keys)
        noise = common.draw_noise(keys, 1, z0.shape[1:])[0]
        z = flow_match.scale_noise(z0, noise, sig[0])

        def denoise(z, i):
            t = jnp.asarray(ts)[i]
            v = sur.velocity_t(z, t, emb, pooled).astype(jnp.float32)
            if cfg_on:
                v_u = sur.velocity_t(z, t, uncond, u_pooled).astype(jnp.float32)
                v = v_u + g * (v - v_u)
            s = jnp.asarray(sig)
            return flow_match.euler_step(v, s[i], s[i + 1], z), None

        z, _ = jax.lax.scan(jax.checkpoint(denoise) if cfg.remat else denoise, z, jnp.arange(ts.shape[0]))
        y = sur.decode(z)
        tgt = common.target_image(batch["x0"], "gray" if cfg.target == "zero" else cfg.target)
        return common.safe_l2(y - tgt)

    return common.average_over_reps(one_pass, cfg.pgd_grad_reps, cfg.remat)
