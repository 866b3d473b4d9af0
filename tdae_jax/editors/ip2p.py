"""InstructPix2Pix (Brooks et al. 2023, "InstructPix2Pix", §3.2.1 Eq. 3; diffusers
``StableDiffusionInstructPix2PixPipeline``).

The image condition is the VAE posterior mode, unscaled (``retrieve_latents(..., sample_mode="argmax")``);
sampling starts from pure noise (``noise * init_noise_sigma``) and each step evaluates three branches, in the
pipeline's order ``(text, image) / (uncond, image) / (uncond, no image)``:

    e = e(u, 0) + s_T [e(c_T, c_I) - e(u, c_I)] + s_I [e(u, c_I) - e(u, 0)]

with ``s_T = guidance_scale`` (7.5) and ``s_I = image_guidance_scale`` (1.5); guidance is on when
``s_T > 1 and s_I >= 1``, as in the pipeline. The model input is ``[scale_model_input(z) || c_I]``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax.editors import common as E
from tdae_jax.editors import schedulers


def edit(surrogate, images, emb, uncond_emb, keys, config: E.Editor, mask=None, noise=None):
    """Edited images.

    Args:
      surrogate: ``ip2p`` family (8-channel UNet).
      images: ``[B,H,W,3]`` float32 in [0,1] (the image to edit).
      emb, uncond_emb: ``[B,T,D]`` embeddings of the instruction and of the negative prompt (``""``).
      keys: ``[B]`` per-image keys.
      config: :class:`~tdae_jax.editors.Editor` with ``kind="ip2p"``.
      mask: unused.
      noise: optional injected draws ``{"latents": [B,C,h,w], "steps": [N,B,C,h,w]}``.
    Returns:
      ``[B,H,W,3]`` float32 in [0,1] (or latents with ``config.output="latent"``).
    """
    del mask
    config = config.resolve(surrogate)
    plan = E.plan_for(config, surrogate)
    images = jnp.asarray(images, jnp.float32)
    b = images.shape[0]
    keys = E.as_keys(keys, b)
    shape = E.latent_shape(surrogate, images)
    uncond_emb = E.broadcast_uncond(uncond_emb, emb)

    image_latents = surrogate.encode_mode(images)  # unscaled, as the pipeline
    z = schedulers.start_from_noise(plan, E.get_noise(noise, "latents", keys, shape))
    step_noise = E.get_step_noise(noise, keys, plan, shape)
    g, gi = config.guidance_scale, config.image_guidance_scale

    def model_fn(z_in, t):
        if not (g > 1.0 and gi >= 1.0):
            return E.unet_branches(surrogate, z_in, t, [emb], image_latents=[image_latents])[:, 0]
        out = E.unet_branches(surrogate, z_in, t, [emb, uncond_emb, uncond_emb],
                              image_latents=[image_latents, image_latents, jnp.zeros_like(image_latents)])
        text, image, uncond = out[:, 0], out[:, 1], out[:, 2]
        return uncond + g * (text - image) + gi * (image - uncond)

    z = schedulers.denoise(plan, model_fn, z, step_noise, remat=config.remat)
    return E.finish(surrogate, z, config)


edit_jit = jax.jit(edit, static_argnames=("config",))
