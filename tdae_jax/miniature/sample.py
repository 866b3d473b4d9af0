"""Jitted DDIM samplers for the miniature models, and their oracle evaluation (docs/miniature.md).

DDIM (Song et al. 2021, eq. 12, eta = 0) with "leading" timestep spacing plus ``steps_offset`` as diffusers'
DDIMScheduler for SD, over any :class:`~tdae_jax.models.Surrogate` (its ``to_x0`` handles every prediction type).
The last step returns the model's x0 estimate. Classifier-free guidance combines x0 estimates, which for a
shared ``z_t`` equals combining epsilons (the map is affine with weights summing to one):

- InstructPix2Pix (Brooks et al. 2023 §3.3): ``x0 = u + s_I (x0(c_I) - u) + s_T (x0(c_I, c_T) - x0(c_I))``,
  ``u`` = unconditional (empty prompt, zero image latents);
- text-to-image / SDEdit img2img (Meng et al. 2022): ``x0 = u + s (x0(c_T) - u)``; img2img starts from the
  source latents noised to ``strength``.

Images are ``[B,H,W,3] float32 in [0, 1]``; outputs are clipped to [0, 1].
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.miniature import oracle


def timesteps(num_steps: int, num_train: int = 1000, offset: int = 1, strength: float = 1.0) -> np.ndarray:
    """Descending DDIM timesteps (leading spacing), the first ``strength`` share of them kept from the end."""
    ratio = num_train // num_steps
    ts = (np.arange(num_steps) * ratio + offset)[::-1]
    ts = np.minimum(ts, num_train - 1)
    keep = max(1, int(round(num_steps * strength)))
    return ts[num_steps - keep:].astype(np.int32)


def _ddim(sur, z, ts, x0_fn):
    acp = sur.alphas_cumprod
    prev = jnp.concatenate([ts[1:], jnp.array([-1], jnp.int32)])

    def body(z, tt):
        t, tp = tt
        x0 = x0_fn(z, t)
        a = acp[t]
        ap = jnp.where(tp >= 0, acp[jnp.maximum(tp, 0)], 1.0)
        eps = (z - jnp.sqrt(a) * x0) / jnp.sqrt(1.0 - a)
        z_new = jnp.where(tp >= 0, jnp.sqrt(ap) * x0 + jnp.sqrt(1.0 - ap) * eps, x0)
        return z_new, None

    z, _ = jax.lax.scan(body, z, (ts, prev))
    return z


@functools.partial(jax.jit, static_argnames=("num_steps", "text_scale", "image_scale"))
def ip2p_edit(sur, images, ids, key, num_steps: int = 10, text_scale: float = 1.0, image_scale: float = 1.0):
    """InstructPix2Pix edit of ``images [B,H,W,3]`` by token ids ``ids [B,T]`` -> ``[B,H,W,3]`` in [0,1]."""
    b = images.shape[0]
    img_lat = sur.encode_mode(images)
    emb_c = sur.embed_ids(ids)
    emb_u = sur.embed_ids(jnp.broadcast_to(jnp.asarray(sur.tokenize([""]))[0], ids.shape))
    ts = jnp.asarray(timesteps(num_steps, sur.num_train_timesteps))
    z = jax.random.normal(key, img_lat.shape, img_lat.dtype)
    guided = not (text_scale == 1.0 and image_scale == 1.0)

    def x0_fn(z, t):
        tb = jnp.full((b,), t)
        if not guided:
            return sur.to_x0(sur.unet_out(z, tb, emb_c, img_lat), z, tb)
        zz = jnp.concatenate([z] * 3)
        lat = jnp.concatenate([img_lat, img_lat, jnp.zeros_like(img_lat)])
        emb = jnp.concatenate([emb_c, emb_u, emb_u])
        t3 = jnp.full((3 * b,), t)
        c, i, u = jnp.split(sur.to_x0(sur.unet_out(zz, t3, emb, lat), zz, t3), 3)
        return u + image_scale * (i - u) + text_scale * (c - i)

    z = _ddim(sur, z, ts, x0_fn)
    return jnp.clip(sur.decode(z), 0.0, 1.0)


@functools.partial(jax.jit, static_argnames=("num_steps", "size", "strength"))
def text_to_image(sur, ids, key, num_steps: int = 20, scale: float = 3.0, images=None, strength: float = 1.0,
                  size: int = 32):
    """Text-to-image from token ids ``ids [B,T]``; with ``images`` given, SDEdit img2img at ``strength``
    (the trailing ``round(num_steps * strength)`` steps, starting from the source latents noised to the first).
    ``size``: output size without ``images``."""
    b = ids.shape[0]
    emb_c = sur.embed_ids(ids)
    emb_u = sur.embed_ids(jnp.broadcast_to(jnp.asarray(sur.tokenize([""]))[0], ids.shape))
    h = size // sur.downsample if images is None else images.shape[1] // sur.downsample
    shape = (b, sur.latent_channels, h, h)
    k1, k2 = jax.random.split(key)
    noise = jax.random.normal(k1, shape)
    if images is None:
        ts = jnp.asarray(timesteps(num_steps, sur.num_train_timesteps))
        z = noise
    else:
        ts = jnp.asarray(timesteps(num_steps, sur.num_train_timesteps, strength=strength))
        z = sur.add_noise(sur.encode(images), noise, jnp.full((b,), ts[0]))

    def x0_fn(z, t):
        zz, t2 = jnp.concatenate([z, z]), jnp.full((2 * b,), t)
        c, u = jnp.split(sur.to_x0(sur.unet_out(zz, t2, jnp.concatenate([emb_c, emb_u])), zz, t2), 2)
        return u + scale * (c - u)

    z = _ddim(sur, z, ts, x0_fn)
    return jnp.clip(sur.decode(z), 0.0, 1.0)


def edit_pairs(sur, pairs: dict, seed: int = 0, num_steps: int = 10, text_scale: float = 1.0,
               image_scale: float = 1.0, batch: int = 64) -> np.ndarray:
    """Edit every source of ``pairs`` (``world.make_pairs``) by its instruction: uint8 ``[n,H,W,3]``."""
    src = np.asarray(pairs["source"], np.float32) / 255.0
    ids = sur.tokenize(pairs["instruction"])
    outs = []
    for i in range(0, len(src), batch):
        n = min(batch, len(src) - i)
        x, t = src[i:i + n], ids[i:i + n]
        if n < batch:  # pad to one compiled shape
            x = np.concatenate([x, np.repeat(x[-1:], batch - n, 0)])
            t = np.concatenate([t, np.repeat(t[-1:], batch - n, 0)])
        key = jax.random.fold_in(jax.random.key(seed), i)
        y = ip2p_edit(sur, jnp.asarray(x), jnp.asarray(t), key, num_steps=num_steps, text_scale=text_scale,
                      image_scale=image_scale)
        outs.append(np.asarray(y)[:n])
    return np.round(np.concatenate(outs) * 255.0).astype(np.uint8)


def evaluate_editor(sur, pairs: dict, **kw) -> dict:
    """Oracle summary (``oracle.evaluate``) of ``edit_pairs(sur, pairs, **kw)``, plus the outputs."""
    outs = edit_pairs(sur, pairs, **kw)
    summary = oracle.evaluate(outs, pairs)
    summary["outputs"] = outs
    return summary
