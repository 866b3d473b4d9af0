"""The miniature models that ship with the package (docs/miniature.md), by name.

``tdae_jax/assets/miniature/<name>/`` holds, per name: autoencoders ``vae_*`` (diffusers AutoencoderKL layout:
``config.json`` + ``diffusion_pytorch_model.safetensors``), InstructPix2Pix editors ``ip2p_*`` and text-to-image
models ``sd_*`` (whole diffusers pipeline layouts). Each has a ``training.json`` (configs, wall time, losses,
held-out oracle scores); ``experiments/flags/miniature_<name>.flags`` reproduces it.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "assets" / "miniature"


def names() -> list[str]:
    """Names of the shipped models (directories with a training.json)."""
    return sorted(p.name for p in ROOT.iterdir() if (p / "training.json").is_file()) if ROOT.is_dir() else []


def path(name: str) -> Path:
    p = ROOT / name
    if not (p / "training.json").is_file():
        raise FileNotFoundError(f"no shipped miniature model {name!r} under {ROOT} (have: {names()})")
    return p


def info(name: str) -> dict:
    """The model's training.json."""
    return json.loads((path(name) / "training.json").read_text())


def family(name: str) -> str:
    """"vae", "ip2p" or "sd"."""
    return info(name)["kind"]


def load(name: str, dtype=None):
    """A shipped pipeline as a :class:`~tdae_jax.models.Surrogate` (``ip2p_*``, ``sd_*``), or a shipped
    autoencoder as ``(FlaxAutoencoderKL, params)`` (``vae_*``)."""
    import jax.numpy as jnp

    from tdae_jax import models

    kind, p = family(name), path(name)
    if kind == "vae":
        from tdae_jax.models import sd

        return sd.load_vae(p, jnp.float32 if dtype is None else dtype)
    return models.load(kind, p, dtype)
