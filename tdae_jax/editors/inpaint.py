"""Stable Diffusion inpainting with a 9-channel UNet (Rombach et al. 2022, LDM §4.5; diffusers
``StableDiffusionInpaintPipeline``).

The mask (1 = repaint) is binarized at 0.5 (``mask_processor``: ``do_binarize``), the masked image is the
input with the repaint region set to 0 in [-1, 1] (0.5 in [0, 1]) and encoded with ``latent_dist.sample``
(scaled); the mask is resized to latent resolution by nearest-neighbour (``F.interpolate`` default). The UNet
input is ``[scale_model_input(z) || mask || masked_latents]``, guidance is the usual two-branch CFG.
Strength 1.0 (the default) starts from pure noise (``noise * init_noise_sigma``); a smaller strength noises the
image latents to the first kept timestep, as img2img.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax.editors import common as E
from tdae_jax.editors import schedulers


def prepare_mask(mask, images, factor: int):
    """``(binary mask [B,H,W,1] in {0,1}, latent mask [B,1,h,w])`` from ``[B,H,W]`` / ``[B,H,W,1]`` in [0,1]."""
    m = jnp.asarray(mask, jnp.float32)
    if m.ndim == 3:
        m = m[..., None]
    if m.shape != images.shape[:3] + (1,):
        raise ValueError(f"mask shape {mask.shape} does not match images {images.shape} ([B,H,W] or [B,H,W,1])")
    m = (m >= 0.5).astype(jnp.float32)
    lat = jnp.transpose(m[:, ::factor, ::factor, :], (0, 3, 1, 2))  # nearest: source index = dst * factor
    return m, lat


def edit(surrogate, images, emb, uncond_emb, keys, config: E.Editor, mask=None, noise=None):
    """Inpainted images.

    Args:
      surrogate: ``inpaint`` family (9-channel UNet).
      images: ``[B,H,W,3]`` float32 in [0,1].
      emb, uncond_emb: ``[B,T,D]`` prompt / negative-prompt embeddings.
      keys: ``[B]`` per-image keys.
      config: :class:`~tdae_jax.editors.Editor` with ``kind="inpaint"``.
      mask: ``[B,H,W]`` or ``[B,H,W,1]`` in [0,1], 1 (white) = region to repaint. Required.
      noise: optional injected draws ``{"encode", "latents", "masked": [B,C,h,w], "steps": [N,B,C,h,w]}``
        (``encode`` is used only when strength < 1).
    Returns:
      ``[B,H,W,3]`` float32 in [0,1] (or latents with ``config.output="latent"``).
    """
    if mask is None:
        raise ValueError("inpaint needs a mask [B,H,W] (1 = repaint)")
    config = config.resolve(surrogate)
    plan = E.plan_for(config, surrogate)
    images = jnp.asarray(images, jnp.float32)
    b = images.shape[0]
    keys = E.as_keys(keys, b)
    shape = E.latent_shape(surrogate, images)
    uncond_emb = E.broadcast_uncond(uncond_emb, emb)
    sample = config.latent_sample == "sample"

    m, mask_lat = prepare_mask(mask, images, surrogate.downsample)
    masked = jnp.where(m > 0, 0.5, images)  # init_image * (mask < 0.5) in [-1, 1]
    masked_lat = E.encode(surrogate, masked, E.get_noise(noise, "masked", keys, shape) if sample else None)
    n = E.get_noise(noise, "latents", keys, shape)
    if E.starts_from_noise("inpaint", config.strength):  # is_strength_max: pure noise
        z = schedulers.start_from_noise(plan, n)
    else:
        z0 = E.encode(surrogate, images, E.get_noise(noise, "encode", keys, shape) if sample else None)
        z = schedulers.start_from_image(plan, z0, n)
    step_noise = E.get_step_noise(noise, keys, plan, shape)
    g = config.guidance_scale

    def model_fn(z_in, t):
        if g <= 1.0:
            return E.unet_branches(surrogate, z_in, t, [emb], mask=[mask_lat], masked_latents=[masked_lat])[:, 0]
        out = E.unet_branches(surrogate, z_in, t, [uncond_emb, emb], mask=[mask_lat] * 2,
                              masked_latents=[masked_lat] * 2)
        return out[:, 0] + g * (out[:, 1] - out[:, 0])

    z = schedulers.denoise(plan, model_fn, z, step_noise, remat=config.remat)
    return E.finish(surrogate, z, config)


edit_jit = jax.jit(edit, static_argnames=("config",))
