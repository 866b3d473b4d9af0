"""DLADiff layer 1, stage 0 and the attention loss (DLADiff §4.1.1 DSUR, Eq. 7; Eq. 8).

- :func:`train_static`: the static surrogate UNet_s, DreamBooth on the clean photos with "a photo of sks
  person", **UNet only, no prior**, Adam (DLADiff §4.1.1, Alg. 1 lines 3-5; project default = the victim's 400 steps,
  lr 5e-6, batch 4).
- :func:`select_layers`: which attention modules feed L_att. Project default (Eq. 8 names none): every transformer
  block whose maps are ``resolution x resolution`` (16: SD-2.1-base at 512 px -> ``down_blocks_2`` and
  ``up_blocks_1``; the tiny test UNet at 32 px -> ``down_blocks_0`` and ``up_blocks_1``), self (``attn1``)
  and cross (``attn2``), or explicit path prefixes.
- :func:`attention_loss`: ``w_c sum_l ||Mc_s^l - Mc_d^l||^2 + w_s sum_l ||Ms_s^l - Ms_d^l||^2`` per image
  (the literal Eq. 8: sums of squares of the head-averaged post-softmax probabilities over all tokens).
- :func:`l_att`: Eq. 8 for a batch: the static UNet on the clean latent ``z_t = noise(Enc(x), t, eps)``
  (under ``stop_gradient``) vs the dynamic UNet on ``z'_t = noise(Enc(x + delta), t, eps)``, the same ``t``,
  ``eps`` and VAE-sample draw for both branches (Alg. 1 lines 14-20).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp

from tdae_jax.editors import finetune as ft

SELF, CROSS = "attn1", "attn2"


@dataclasses.dataclass(frozen=True)
class AttentionLayers:
    """Resolved selection (hashable, a static jit argument): module path prefixes and map kinds."""

    prefixes: tuple
    kinds: tuple = (SELF, CROSS)

    def __call__(self, path: str) -> bool:
        return path.rsplit("/", 1)[-1] in self.kinds and any(path.startswith(p) for p in self.prefixes)


def block_resolutions(unet, latent_hw: int) -> dict[str, int]:
    """Map side of each attention-carrying block: ``{"down_blocks_i": s, "mid_block": s, "up_blocks_j": s}``."""
    n = len(unet.block_out_channels)
    out = {}
    for i, kind in enumerate(unet.down_block_types):
        if "CrossAttn" in kind:
            out[f"down_blocks_{i}"] = latent_hw // 2 ** i
    out["mid_block"] = latent_hw // 2 ** (n - 1)
    for j, kind in enumerate(unet.up_block_types):
        if "CrossAttn" in kind:
            out[f"up_blocks_{j}"] = latent_hw // 2 ** (n - 1 - j)
    return out


def select_layers(surrogate, image_hw: int, resolution: int = 16, prefixes: Sequence[str] = (),
                  kinds: Sequence[str] = (SELF, CROSS)) -> AttentionLayers:
    """The attention modules of L_att: explicit ``prefixes`` or every block at ``resolution`` (map side)."""
    kinds = tuple(kinds)
    if any(k not in (SELF, CROSS) for k in kinds) or not kinds:
        raise ValueError(f"kinds must be a non-empty subset of ({SELF!r}, {CROSS!r}), got {kinds}")
    if prefixes:
        return AttentionLayers(tuple(prefixes), kinds)
    res = block_resolutions(surrogate.static.unet, image_hw // surrogate.downsample)
    chosen = tuple(sorted(b for b, s in res.items() if s == resolution))
    if not chosen:
        raise ValueError(f"no attention block has {resolution}x{resolution} maps at {image_hw} px; "
                         f"available: {sorted(set(res.values()))} ({res})")
    return AttentionLayers(chosen, kinds)


def attention_loss(maps_s: dict, maps_d: dict, w_cross: float = 1.0, w_self: float = 1.0) -> jax.Array:
    """Per-image Eq. 8 ``[B]`` from two ``{path: [B,Q,K]}`` dicts with the same keys."""
    if set(maps_s) != set(maps_d) or not maps_s:
        raise ValueError(f"attention maps differ or are empty: {sorted(maps_s)} vs {sorted(maps_d)}")
    total = 0.0
    for path in sorted(maps_s):
        w = w_cross if path.endswith(CROSS) else w_self
        d = maps_s[path].astype(jnp.float32) - maps_d[path].astype(jnp.float32)
        total = total + w * jnp.sum(jnp.square(d), axis=(1, 2))
    return total


def noised_pair(vae_sur, x_clean, x_adv, keys, latent_sample: bool = True):
    """``(z_t, z'_t, t)``: one ``t``, one ``eps`` and one VAE posterior draw per image, shared by both branches."""
    enc = lambda x: _latent(vae_sur, x, keys, latent_sample)  # noqa: E731
    z, zp = enc(x_clean), enc(x_adv)
    t = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), (), 0, vae_sur.num_train_timesteps))(keys)
    eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 2), z.shape[1:], z.dtype))(keys)
    return vae_sur.add_noise(z, eps, t), vae_sur.add_noise(zp, eps, t), t


def _latent(sur, x, keys, latent_sample):
    if not latent_sample:
        return sur.encode(x)
    mean, std = sur.moments(x)
    e = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 3), mean.shape[1:], mean.dtype))(keys)
    return (mean + std * e) * sur.static.scaling_factor


def l_att(static_sur, dynamic_sur, x_clean, x_adv, emb, keys, layers: AttentionLayers, w_cross: float = 1.0,
          w_self: float = 1.0, latent_sample: bool = True) -> jax.Array:
    """Eq. 8 per image ``[B]``. ``static_sur``/``dynamic_sur`` share VAE and text encoder (only the UNets
    differ). Only ``x_adv`` (and ``dynamic_sur``) carry gradients."""
    z_t, zp_t, t = noised_pair(dynamic_sur, x_clean, x_adv, keys, latent_sample)
    _, maps_s = static_sur.unet_out(z_t, t, emb, attention=layers)
    maps_s = jax.lax.stop_gradient(maps_s)
    _, maps_d = dynamic_sur.unet_out(zp_t, t, emb, attention=layers)
    return attention_loss(maps_s, maps_d, w_cross, w_self)


def static_config(steps: int = 400, lr: float = 5e-6, batch_size: int = 4, max_grad_norm: float = 1.0,
                  latent_sample: bool = True) -> ft.FinetuneConfig:
    """DSUR's fine-tuning config: UNet only, no prior, Adam (weight decay 0)."""
    return ft.FinetuneConfig(method="dreambooth", steps=steps, batch_size=batch_size, lr=lr, weight_decay=0.0,
                             max_grad_norm=max_grad_norm, train_text_encoder=False, prior_weight=0.0,
                             latent_sample=latent_sample)


def train_static(surrogate, clean_images, prompt: str, cfg: ft.FinetuneConfig, key: jax.Array, *, uids=None,
                 mesh=None, ckpt_dir=None, ckpt_every: int = 0, log=None) -> ft.FinetuneResult:
    """UNet_s = DreamBooth(theta_pre) on ``clean_images [N,H,W,3]`` (DLADiff §4.1.1). Returns the fine-tuning result
    (``.surrogate`` has the static UNet)."""
    if cfg.method != "dreambooth" or cfg.train_text_encoder or cfg.prior_weight:
        raise ValueError("DSUR trains the UNet only, without prior (DLADiff §4.1.1); use dsur.static_config()")
    return ft.finetune(surrogate, clean_images, prompt, cfg, key, uids=uids, mesh=mesh, ckpt_dir=ckpt_dir,
                       ckpt_every=ckpt_every, log=log)
