"""tdae_jax: image immunization (TDAE, DLADiff and their baselines) in JAX/Flax.

Layout and conventions: docs/design.md. Images are
``[B, H, W, 3] float32 in [0, 1]``; latents follow diffusers' ``[B, C, h, w]``.
"""

__version__ = "0.1.0"
