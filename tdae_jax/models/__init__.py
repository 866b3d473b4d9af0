"""Model layer: the only package that imports diffusers / transformers.

``load(family, weights_dir)`` builds a :class:`Surrogate` from a local diffusers-format directory,
``tiny(family)`` a tiny random one for tests. Family modules are imported lazily, so importing
``tdae_jax.models`` (or the Surrogate type) stays cheap.
"""
from __future__ import annotations

import importlib

from tdae_jax.models.surrogate import IN_CHANNELS, Static, Surrogate

FAMILIES = {"sd": "tdae_jax.models.sd", "ip2p": "tdae_jax.models.ip2p", "inpaint": "tdae_jax.models.inpaint",
            "sd3": "tdae_jax.models.sd3"}  # sd3: an ``SD3`` (models/sd3.py), not a ``Surrogate``, same adapter

# The fields of a prompts row (``data/manifest.py``: ``load_prompts``) each family edits with, in order of preference: InstructPix2Pix
# is given an instruction ("make the car red"); the text-to-image families (img2img, inpainting) a description of
# the edited image ("a red car").
_EDIT_TEXT_FIELDS = {"ip2p": ("instruction", "caption")}
_DESCRIPTION_FIELDS = ("edited_prompt", "caption", "instruction")


def edit_text(row: dict | None, family: str, default: str) -> str:
    """The text a ``family`` editor edits with, from a prompts ``row`` (None or no usable field: ``default``)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    fields = _EDIT_TEXT_FIELDS.get(family, _DESCRIPTION_FIELDS)
    return next((row[f] for f in fields if row and row.get(f)), default)


def family_module(family: str):
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[family])


def load(family: str, weights_dir, dtype=None) -> Surrogate:
    """Surrogate of ``family`` from a local diffusers-format directory (safetensors or Flax msgpack)."""
    import jax.numpy as jnp

    return family_module(family).create(weights_dir, dtype=jnp.float32 if dtype is None else dtype)


def tiny(family: str, seed: int = 0) -> Surrogate:
    """Tiny random surrogate of ``family`` (seeded) for tests."""
    return family_module(family).tiny(seed)


def save(surrogate: Surrogate, out_dir, dtype=None):
    """Write ``surrogate`` as a diffusers-layout directory (see :func:`sd.save_diffusers`)."""
    import numpy as np

    from tdae_jax.models.sd import save_diffusers

    return save_diffusers(surrogate, out_dir, np.float32 if dtype is None else dtype)


__all__ = ["FAMILIES", "IN_CHANNELS", "Static", "Surrogate", "edit_text", "family_module", "load", "save", "tiny"]
