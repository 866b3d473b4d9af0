"""CLIP similarity metrics on embeddings (per image; the embeddings come from ``tdae_jax.models.clip``).

- **CLIP image similarity**: ``cos(E_I(a), E_I(b))``, here between ``edit(clean)`` and ``edit(protected)``
  (the CLIP-I score of image-editing evaluations, e.g. Brooks et al. 2023, "InstructPix2Pix: Learning to
  Follow Image Editing Instructions", §4, "CLIP image similarity" to the input image). Higher = the two edits
  look alike to CLIP = the protection failed.
- **CLIP direction similarity** (Gal et al. 2022, "StyleGAN-NADA: CLIP-Guided Domain Adaptation of Image
  Generators", §3.1, the directional CLIP loss; used as an edit metric by Brooks et al. 2023, §4):
  ``cos(E_I(img1) - E_I(img0), E_T(txt1) - E_T(txt0))``, how far the change between the images follows the
  change between the captions. As in the InstructPix2Pix evaluation code, the embeddings are L2-normalized
  before the differences (``CLIPScorer.image_embeds`` / ``text_embeds`` already are).

Pure ``jnp`` functions: ``[B, D]`` embeddings (a ``[D]`` text embedding broadcasts) -> ``[B]`` float32, one
value per image (nothing is reduced over the batch). A zero vector (identical images, identical captions)
has cosine 0, not NaN.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

HIGHER_IS_MORE_SIMILAR = {"clip_img": True, "clip_dir": True}


def cosine(a: jax.Array, b: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Row-wise cosine ``<a, b> / max(|a| |b|, eps)``: ``[..., D] x [..., D] -> [...]``."""
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    num = jnp.sum(a * b, axis=-1)
    den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
    return num / jnp.maximum(den, eps)


def clip_image_similarity(a_emb: jax.Array, b_emb: jax.Array) -> jax.Array:
    """CLIP image similarity (Brooks et al. 2023, §4).

    Args:
      a_emb, b_emb: ``[B, D]`` CLIP image embeddings, e.g. of edit(protected) and edit(clean).
    Returns:
      ``[B]`` cosine in [-1, 1]; 1 for identical images.
    """
    return cosine(a_emb, b_emb)


def clip_direction_similarity(img0: jax.Array, img1: jax.Array, txt0: jax.Array, txt1: jax.Array) -> jax.Array:
    """CLIP directional similarity (Gal et al. 2022, §3.1; Brooks et al. 2023, §4).

    Args:
      img0, img1: ``[B, D]`` unit-norm CLIP image embeddings of the source image and of its edit.
      txt0, txt1: ``[B, D]`` (or ``[D]``) unit-norm CLIP text embeddings of the source caption and of the
        edited caption.
    Returns:
      ``[B]`` ``cos(img1 - img0, txt1 - txt0)`` in [-1, 1]: 1 = the image moved exactly along the caption
      change; antisymmetric in (img0, img1) and in (txt0, txt1); 0 when either difference is zero.
    """
    return cosine(jnp.asarray(img1) - jnp.asarray(img0), jnp.asarray(txt1) - jnp.asarray(txt0))
