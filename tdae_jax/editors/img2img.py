"""SD img2img / SDEdit (Meng et al. 2022, "SDEdit", §3; diffusers ``StableDiffusionImg2ImgPipeline``).

The image is encoded (``latent_dist.sample``, scaled), noised to the first kept timestep
(``scheduler.add_noise(z0, noise, t_start)``, with ``t_start`` from ``strength``), and denoised over the
remaining steps with two-branch classifier-free guidance ``u + g (c - u)`` (Ho & Salimans 2021) on the raw
UNet output, then decoded. Strength 0 keeps no step: the output is the VAE round trip of the input.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from tdae_jax.editors import common as E
from tdae_jax.editors import schedulers


def edit(surrogate, images, emb, uncond_emb, keys, config: E.Editor, mask=None, noise=None):
    """Edited images.

    Args:
      surrogate: ``sd`` family (4-channel UNet).
      images: ``[B,H,W,3]`` float32 in [0,1].
      emb, uncond_emb: ``[B,T,D]`` text embeddings of the prompt and of the negative prompt (``""``).
      keys: ``[B]`` per-image keys (typed, or raw ``[B,2] uint32``).
      config: :class:`~tdae_jax.editors.Editor` (``kind="img2img"``; resolved here if it has ``None`` fields).
      mask: unused (accepted so every editor has the same signature).
      noise: optional injected draws ``{"encode": [B,C,h,w], "latents": [B,C,h,w], "steps": [N,B,C,h,w]}``.
    Returns:
      ``[B,H,W,3]`` float32 in [0,1] (or ``[B,C,h,w]`` latents with ``config.output="latent"``).
    """
    del mask
    config = config.resolve(surrogate)
    plan = E.plan_for(config, surrogate)
    images = jnp.asarray(images, jnp.float32)
    b = images.shape[0]
    keys = E.as_keys(keys, b)
    shape = E.latent_shape(surrogate, images)
    uncond_emb = E.broadcast_uncond(uncond_emb, emb)

    eps = E.get_noise(noise, "encode", keys, shape) if config.latent_sample == "sample" else None
    z0 = E.encode(surrogate, images, eps)
    z = schedulers.start_from_image(plan, z0, E.get_noise(noise, "latents", keys, shape))
    step_noise = E.get_step_noise(noise, keys, plan, shape)
    g = config.guidance_scale

    def model_fn(z_in, t):
        if g <= 1.0:  # diffusers: do_classifier_free_guidance = guidance_scale > 1
            return E.unet_branches(surrogate, z_in, t, [emb])[:, 0]
        out = E.unet_branches(surrogate, z_in, t, [uncond_emb, emb])
        return out[:, 0] + g * (out[:, 1] - out[:, 0])

    z = schedulers.denoise(plan, model_fn, z, step_noise, remat=config.remat)
    return E.finish(surrogate, z, config)


edit_jit = jax.jit(edit, static_argnames=("config",))
