"""The 16-channel SD3 VAE (Esser et al. 2024) on diffusers' ``FlaxAutoencoderKL``.

The SD3 checkpoints have no ``quant_conv`` / ``post_quant_conv`` (``use_quant_conv=false``), but the
Flax class always builds them. We bypass them instead of loading identity kernels: encode/decode call
the ``encoder`` / ``decoder`` submodules directly (and the quant convs only when the config uses them),
so the param tree holds exactly the checkpoint's tensors. Latent normalisation is outside the module:
``z = (posterior - shift_factor) * scaling_factor`` (SD3: shift 0.0609, scale 1.5305).

Shapes: images ``[B, H, W, 3]`` in [-1, 1] NHWC (the Flax VAE's native layout); latents NCHW
``[B, 16, H/8, W/8]`` (diffusers' layout, what the transformer takes).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.models import fastconv, fastnorm, sd3_io


@dataclasses.dataclass(frozen=True)
class VAEInfo:
    """Static facts about a loaded VAE that the Flax module does not carry."""

    latent_channels: int
    downsample: int
    scaling_factor: float
    shift_factor: float
    use_quant_conv: bool
    use_post_quant_conv: bool


_FLAX_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
              "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "sample_size", "scaling_factor")


def build_vae(config: dict, dtype=jnp.float32):
    """``(FlaxAutoencoderKL, VAEInfo)`` from a diffusers ``vae/config.json`` dict."""
    logging.getLogger("diffusers.models.vae_flax").setLevel(logging.ERROR)  # per-module deprecation spam
    from diffusers.models.vae_flax import FlaxAutoencoderKL

    if not config.get("mid_block_add_attention", True):
        raise ValueError("vae config: mid_block_add_attention=false has no Flax counterpart")
    kw = {k: (tuple(config[k]) if isinstance(config[k], list) else config[k]) for k in _FLAX_KEYS if k in config}
    vae = FlaxAutoencoderKL(**kw, dtype=dtype)
    info = VAEInfo(
        latent_channels=int(config.get("latent_channels", 4)),
        downsample=2 ** (len(config.get("block_out_channels", (64,))) - 1),
        scaling_factor=float(config.get("scaling_factor", 0.18215)),
        shift_factor=float(config.get("shift_factor") or 0.0),
        use_quant_conv=bool(config.get("use_quant_conv", True)),
        use_post_quant_conv=bool(config.get("use_post_quant_conv", True)),
    )
    return vae, info


def init_shapes(vae, info: VAEInfo) -> dict:
    """Param shapes (nested, ``ShapeDtypeStruct``) without the quant convs the config does not use."""
    n = info.downsample
    sample = jnp.zeros((1, vae.in_channels, n, n), jnp.float32)
    shapes = dict(jax.eval_shape(lambda: vae.init(jax.random.key(0), sample))["params"])
    drop = [k for k, use in (("quant_conv", info.use_quant_conv), ("post_quant_conv", info.use_post_quant_conv))
            if not use]
    return {k: v for k, v in shapes.items() if k not in drop}


def _expected_shapes(vae, info: VAEInfo) -> dict:
    return sd3_io.flat_shapes(init_shapes(vae, info))


def convert_state_dict(tensors: dict, where: dict, vae, info: VAEInfo, dtype=np.float32) -> dict:
    """diffusers ``AutoencoderKL`` state dict (numpy) -> Flax params, strictly checked."""
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    expected = _expected_shapes(vae, info)
    structs = {k: jax.ShapeDtypeStruct(v, jnp.float32) for k, v in expected.items()}
    converted = {}
    for name, arr in tensors.items():
        a = np.asarray(arr).astype(dtype)
        key, a = rename_key_and_reshape_tensor(tuple(rename_key(name).split(".")), a, structs)
        converted[key] = (np.ascontiguousarray(a), name, where.get(name, "<memory>"))
    return sd3_io.check_and_unflatten(converted, expected, "vae")


def load_vae(directory: str, dtype=jnp.float32, param_dtype=np.float32):
    """Load ``<root>/vae`` -> (FlaxAutoencoderKL, VAEInfo, params)."""
    vae, info = build_vae(sd3_io.read_config(directory), dtype=dtype)
    tensors, where = sd3_io.load_state_dict(directory, "diffusion_pytorch_model")
    return vae, info, convert_state_dict(tensors, where, vae, info, dtype=param_dtype)


def moments(vae, info: VAEInfo, params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior (mean, std) of images ``[B,H,W,3]`` in [-1, 1]; NCHW, unnormalised latent units."""

    def enc(m, x):
        h = m.encoder(x, deterministic=True)
        return m.quant_conv(h) if info.use_quant_conv else h

    with fastconv.polyphase_downsampling(), fastnorm.fast_group_norm():  # CPU backward passes
        mom = vae.apply({"params": params}, images, method=enc)
    mean, logvar = jnp.split(mom, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, -30.0, 20.0))
    return jnp.transpose(mean, (0, 3, 1, 2)), jnp.transpose(std, (0, 3, 1, 2))


def decode_raw(vae, info: VAEInfo, params: Any, latents: jax.Array) -> jax.Array:
    """Images ``[B,H,W,3]`` (about [-1, 1], unclipped) from unnormalised NCHW latents."""

    def dec(m, z):
        h = m.post_quant_conv(z) if info.use_post_quant_conv else z
        return m.decoder(h, deterministic=True)

    with fastnorm.fast_group_norm():  # GroupNorm's backward pass on CPU (fastnorm.py)
        return vae.apply({"params": params}, jnp.transpose(latents, (0, 2, 3, 1)), method=dec)


def normalize(z_raw: jax.Array, info: VAEInfo) -> jax.Array:
    """``(z - shift_factor) * scaling_factor`` (what the transformer sees)."""
    return (z_raw - info.shift_factor) * info.scaling_factor


def denormalize(z: jax.Array, info: VAEInfo) -> jax.Array:
    return z / info.scaling_factor + info.shift_factor
