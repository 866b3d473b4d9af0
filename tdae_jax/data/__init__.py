"""Data in and out: loading and validating images, budget-exact PNG output, prompts and the run manifest.

No jax here: everything is numpy + Pillow (see io.py and manifest.py).
"""
from tdae_jax.data.io import (
    DEFAULT_MAX_PIXELS,
    DEFAULT_MIN_SIDE,
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    DataError,
    ImageError,
    LoadedImage,
    OutputDirError,
    Transform,
    atomic_write_bytes,
    budget_steps,
    check_output_dir,
    linf_uint8,
    list_images,
    load_image,
    map_back,
    protect_at_original,
    protect_loaded,
    quantize_protected,
    read_back_uint8,
    sample_dir,
    save_png_atomic,
    to_uint8,
)
from tdae_jax.data.manifest import (
    STATUSES,
    Manifest,
    PromptProblem,
    find_prompt,
    load_prompts,
    sha256_file,
    unique_ids,
)

__all__ = [n for n in dir() if not n.startswith("_") and n not in ("files", "io", "manifest")]
