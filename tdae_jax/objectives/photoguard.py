"""PhotoGuard (Salman et al., ICML 2023, arXiv:2302.06588): the encoder and the diffusion attacks.

Encoder attack (PGE, TDAE spec §3 / PEERS §2.1): push the VAE posterior mean of the protected image
towards a target latent. ``targeted`` (the PhotoGuard img2img notebook): minimize
``||mu_E(x+delta) - z_tgt||_2`` with ``z_tgt = mu_E(target)`` (target ``zero``: the zero latent, as the
notebook; ``gray``: a mid-gray image, as the inpainting demo). ``untargeted``: minimize
``-||mu_E(x+delta) - mu_E(x)||_2^2`` (needs a random start: its gradient is 0 at delta = 0, spec §6.4).

Diffusion attack (PGD): minimize ``||D(edit_K(x+delta, e)) - y_tgt||_2`` through K denoising steps with
classifier-free guidance and the VAE decoder (y_tgt = the zero image in [-1,1], i.e. mid-gray here).
Each denoising step is ``jax.checkpoint``-ed, so activation memory does not grow with K.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax.configs import Objective
from tdae_jax.models.surrogate import Surrogate
from tdae_jax.objectives import common


def _target_image(x0: jax.Array, target: str) -> jax.Array:
    if target == "gray":
        return jnp.full_like(x0, 0.5)
    if target == "black":
        return jnp.zeros_like(x0)
    raise ValueError(f"unknown image target {target!r} (zero | gray | black)")


def make_encoder(sur: Surrogate, cfg: Objective, targeted: bool = True):
    """PGE: Returns ``loss_fn(delta, batch, emb, keys) -> [B]`` (minimized; emb and keys unused)."""

    def loss_fn(delta, batch, emb, keys):
        del emb, keys
        x0 = batch["x0"]
        mu = sur.encode_mode(x0 + delta)
        if targeted:
            if cfg.target == "zero":
                tgt = jnp.zeros_like(mu)
            else:
                tgt = jax.lax.stop_gradient(sur.encode_mode(_target_image(x0, cfg.target)))
            return common.safe_l2(mu - tgt)
        ref = jax.lax.stop_gradient(sur.encode_mode(x0))
        return -common.per_image_sum((mu - ref) ** 2)

    return loss_fn


def ddim_timesteps(num_train: int, steps: int, strength: float) -> jax.Array:
    """The ``steps`` DDIM timesteps an img2img edit at ``strength`` runs (diffusers' leading spacing)."""
    ratio = num_train // steps
    ts = (jnp.arange(steps) * ratio)[::-1] + 1  # steps_offset=1, as SD's scheduler config
    init = max(1, min(int(steps * strength), steps))  # >= 1: a zero-step attack would have nothing to differentiate
    return ts[steps - init:]


def make_diffusion(sur: Surrogate, cfg: Objective, strength: float = 0.8):
    """PhotoGuard diffusion attack; ``cfg.denoise_steps`` K DDIM steps (eta 0) at img2img ``strength``."""
    if sur.family == "sd3":  # rectified flow: K Euler steps of the SD3 img2img pipeline (photoguard_flow.py)
        from tdae_jax.objectives import photoguard_flow
        return photoguard_flow.make_diffusion(sur, cfg)
    num_train = sur.num_train_timesteps
    k = max(1, cfg.denoise_steps)
    if sur.family == "ip2p":  # InstructPix2Pix edits from pure noise, conditioned on E_mode(x)
        strength = 1.0
    ts = ddim_timesteps(num_train, k, strength)
    acp = sur.alphas_cumprod

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z0 = common.encode_sample(sur, x, keys)
        noise = common.draw_noise(keys, 1, z0.shape[1:])[0]
        t0 = jnp.full((z0.shape[0],), ts[0])
        z = sur.add_noise(z0, noise, t0) if sur.family != "ip2p" else noise
        uncond = batch.get("uncond")

        @jax.checkpoint
        def denoise(z, i):
            t = ts[i]
            prev = jnp.where(i + 1 < ts.shape[0], ts[jnp.minimum(i + 1, ts.shape[0] - 1)], -1)
            e = common.guided_eps(sur, z, jnp.full((z.shape[0],), t), emb, uncond, cond, cfg.guidance_scale,
                                  cfg.image_guidance_scale)
            a_t = acp[t]
            a_p = jnp.where(prev >= 0, acp[jnp.maximum(prev, 0)], 1.0)
            x0_hat = (z - jnp.sqrt(1 - a_t) * e) / jnp.sqrt(a_t)
            return jnp.sqrt(a_p) * x0_hat + jnp.sqrt(1 - a_p) * e, None

        z, _ = jax.lax.scan(denoise, z, jnp.arange(ts.shape[0]))
        y = sur.decode(z)
        tgt = _target_image(batch["x0"], "gray" if cfg.target == "zero" else cfg.target)
        return common.safe_l2(y - tgt)

    return loss_fn
