"""PhotoGuard's diffusion attack (PGD, Salman et al., ICML 2023; TDAE spec §3) on a flow-matching surrogate (SD3).

The SD/IP2P version (``photoguard.make_diffusion``) unrolls K DDIM steps; SD3 is a rectified-flow model
(spec SD3.md §5), so the unrolled edit here is what ``StableDiffusion3Img2ImgPipeline`` runs with
``num_inference_steps = K``: the FlowMatchEulerDiscreteScheduler schedule (shift from the model's scheduler
config, 3.0), truncated at img2img ``strength`` (pipeline default 0.6: ``t_start = int(K - K·strength)``),
start latent ``(1 - σ_s) z_0 + σ_s ε`` from the posterior sample ``z_0``, CFG on the velocity
``v_u + g (v_c - v_u)`` (negative = the encoded empty prompt, with its own pooled projection) and Euler steps
``z += (σ_{i+1} - σ_i) v``; then the VAE decoder. Minimized: ``||D(edit_K(x + delta, e)) - y_tgt||_2`` with
y_tgt the mid-gray image (0 in [-1, 1]; ``--target``), as the SD version. Each step is ``jax.checkpoint``-ed
unless ``cfg.remat`` is off (``--remat``).

``emb`` is SD3's ``prompt_embeds`` (what DPD perturbs); ``batch["pooled"]`` / ``batch["uncond_pooled"]`` stay fixed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax.configs import Objective
from tdae_jax.models import flow_match
from tdae_jax.objectives import common, photoguard

STRENGTH = 0.6  # StableDiffusion3Img2ImgPipeline.__call__ default (diffusers 0.39.0)


def schedule(sur, steps: int, strength: float = STRENGTH):
    """(timesteps ``[n]`` = 1000σ, sigmas ``[n + 1]``) of the img2img steps actually run (host-side, float32)."""
    ts, sig = flow_match.set_timesteps(sur.static.scheduler, steps)
    start = flow_match.img2img_start(steps, strength)
    return ts[start:], sig[start:]


def make_diffusion(sur, cfg: Objective, strength: float = STRENGTH):
    """Returns ``loss_fn(delta, batch, emb, keys) -> [B]`` (minimized)."""
    ts, sig = schedule(sur, max(1, cfg.denoise_steps), strength)
    if ts.shape[0] == 0:
        raise ValueError(f"img2img strength {strength} with {cfg.denoise_steps} steps runs no denoising step")
    if sig[0] >= 1.0:  # e.g. K = 2 at strength 0.6: t_start = 0, the edit starts from pure noise
        raise ValueError(f"SD3 PGD: {cfg.denoise_steps} denoising steps at img2img strength {strength} start from "
                         f"sigma = 1 (pure noise), so the image has no influence and the gradient is 0; use "
                         f"--denoise_steps >= 3")
    g = cfg.guidance_scale

    def loss_fn(delta, batch, emb, keys):
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
        tgt = photoguard._target_image(batch["x0"], "gray" if cfg.target == "zero" else cfg.target)
        return common.safe_l2(y - tgt)

    return loss_fn
