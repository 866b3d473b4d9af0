"""InstructPix2Pix surrogates (Brooks et al. 2023, "InstructPix2Pix: Learning to Follow Image Editing
Instructions", §3.2): an SD UNet with 8 input channels ``[z_t || E_mode(x)]`` (unscaled image latents).

Thin wrapper over the generic builder in :mod:`tdae_jax.models.sd`; the weights directory is a local
diffusers ``StableDiffusionInstructPix2PixPipeline`` layout.
"""
from __future__ import annotations

import jax.numpy as jnp

from tdae_jax.models import sd
from tdae_jax.models.surrogate import Surrogate

FAMILY = "ip2p"


def create(weights_dir, dtype=jnp.float32) -> Surrogate:
    """InstructPix2Pix surrogate from a local diffusers-format directory (UNet in_channels must be 8)."""
    return sd.build(FAMILY, weights_dir, dtype)


def tiny(seed: int = 0, dtype=jnp.float32) -> Surrogate:
    """Tiny random InstructPix2Pix surrogate (8-channel UNet) for tests."""
    return sd.tiny_surrogate(FAMILY, seed, dtype)
