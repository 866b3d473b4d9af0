"""Stable Diffusion inpainting surrogates (Rombach et al. 2022, LDM §4.5 / the SD-inpainting checkpoints):
an SD UNet with 9 input channels ``[z_t || mask || E(masked x)]`` (mask at latent resolution, 1 = repaint).

Thin wrapper over the generic builder in :mod:`tdae_jax.models.sd`; the weights directory is a local
diffusers ``StableDiffusionInpaintPipeline`` layout.
"""
from __future__ import annotations

import jax.numpy as jnp

from tdae_jax.models import sd
from tdae_jax.models.surrogate import Surrogate

FAMILY = "inpaint"


def create(weights_dir, dtype=jnp.float32) -> Surrogate:
    """Inpainting surrogate from a local diffusers-format directory (UNet in_channels must be 9)."""
    return sd.build(FAMILY, weights_dir, dtype)


def tiny(seed: int = 0, dtype=jnp.float32) -> Surrogate:
    """Tiny random inpainting surrogate (9-channel UNet) for tests."""
    return sd.tiny_surrogate(FAMILY, seed, dtype)
