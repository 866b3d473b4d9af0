"""SA: the Semantic Attack (Lo et al., CVPR 2024, "Distraction is All You Need"), TDAE spec §3.

Minimize the L1 norm of the prompt tokens' cross-attention maps of the UNet on the protected image,
averaged over the cross-attention layers and over K timesteps ("timestep-universal"), so that the
editor's text no longer attends to the image content:

    O = mean_t mean_layers  (1/Q) sum_q sum_{tok in mask} A_layer(x + delta, t)[q, tok]

``batch["token_mask"] [B,T]`` selects the target tokens (default: every content token, i.e. not the
start/end/padding tokens). Attention maps come from ``Surrogate.unet_out(attention=...)`` (an
interceptor over diffusers' FlaxAttention, notes/attention-maps.md), so no fork of diffusers.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from tdae_jax.configs import Objective
from tdae_jax.models.surrogate import Surrogate
from tdae_jax.objectives import common
from tdae_jax.objectives.diffusion import _mean_over_k, _noised


def content_token_mask(ids: np.ndarray, tokenizer) -> np.ndarray:
    """``[B,T] float32``: 1 on content tokens (not BOS, EOS or padding)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    mask = ~np.isin(ids, [s for s in special if s is not None])
    return mask.astype(np.float32)


def is_cross_attention(path: str) -> bool:
    return path.endswith("attn2")


def make_sa(sur: Surrogate, cfg: Objective, select=is_cross_attention):
    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z0, ts, noises = _noised(sur, x, keys, cfg.timesteps)
        tok = batch["token_mask"]  # [B,T]

        def one(t, n):
            _, maps = sur.unet_out(sur.add_noise(z0, n, t), t, emb, attention=select, **cond)
            if not maps:
                raise ValueError("SA needs a UNet with cross-attention layers; none were selected")
            per_layer = [jnp.einsum("bqk,bk->b", m, tok) / m.shape[1] for m in maps.values()]
            return jnp.mean(jnp.stack(per_layer), axis=0)

        return _mean_over_k(one, ts, noises, cfg.remat)

    return loss_fn
