"""SA: the Semantic Attack (Lo, Yeo, Shuai, Cheng, CVPR 2024, "Distraction is All You Need: Memory-Efficient
Image Immunization against Diffusion-Based Image Editing"), a TDAE host (§IV).

The authors published no code (none found). This module restates the paper's
equations as the two public reimplementations read them, and says where it departs from them:

- ``siiyayu/SemanticAttack`` ``semantic_attack.py``, class ``SemanticAttack``: ``average_attention_maps`` (every
  cross-attention layer's map upsampled bicubically to the finest resolution and combined),
  ``generate_mask_using_forward_noise`` (mask = the token's map above 0.5 x its maximum),
  ``timestep_universal_gradient_updating`` (L1 of the token's map; gradients averaged over the DDIM grid of
  ``set_timesteps(10)``; one sign step per iteration);
- ``Nelson0314/Non-Additive-Adversarial-Image-Editing-Defense``: ``src/models/attention.py``
  ``aggregate_token_attention`` (Eq. 3: sum over layers), ``attention_region_mask`` (Eq. 4: tau = 0.5 of the
  peak), ``masked_attention_l1`` (Eq. 5: the mask applied to the attention map); ``src/defense/linf_attack.py``
  ``make_semantic_attack_loss`` (the mask comes from the clean image; T = 10 timesteps).

Per image, with target tokens S, K timesteps t_k and noises e_k, the value minimized is

    Att(x, t) = sum_l bicubic_up( sum_{s in S} A_l(x, t)[:, s] )                   (paper Eq. 3)
    M         = 1[ mean_k Att(x0, t_k) > tau * max ]       (clean image x0)         (paper Eq. 4)
    O(delta)  = mean_k || M * Att(x0 + delta, t_k) ||_1 / (L h w)                   (paper Eq. 5, Alg. 1)

(L layers, h x w the finest attention resolution; the constant 1/(L h w) keeps O within about [0, 1]; sign steps
ignore it).

Options (``Objective.sa_*``, flags ``--sa_*``), defaults = the reference where it has one:

- target tokens S = ``batch["token_mask"] [B,T]`` from :func:`target_token_mask`: the positions of the words
  ``sa_tokens`` in the prompt (multi-token words included). The paper's c_a is a word the defender chooses per
  image; the data carry none, so the default (no words) is every content token (project default).
- ``sa_mask``: ``attention`` (Eq. 4) | ``region`` (``batch["mask"]``, 1 = counted; without one the inpainting
  region of ``common.inpaint_mask``) | ``none`` (every query).
- ``sa_timesteps``: ``grid`` (the K-step DDIM grid of the surrogate's scheduler config, 901, 801, ..., 1 for the
  paper's T = K = 10 on SD-1.x) | ``random`` (K uniform draws per iteration).

Choices the paper leaves open, made here: (1) the UNet is conditioned on the editor's prompt (TDAE conditions
every host on it and DPD perturbs it), not on c_a alone as both reimplementations do; (2) tau = 0.5 of the
maximum, as both; (3) the mask is recomputed every iteration from the clean image at that iteration's (t_k, e_k)
(the reimplementations compute it once before the attack); (4) the mask multiplies the attention map (Eq. 5
writes Att(M * x); Nelson0314's reading; an earlier siiyayu version masks the UNet's latent input); (5)
``jax.image.resize`` "cubic" is Keys' kernel with a = -0.5 (torch's bicubic: -0.75). Attention maps come from
``Surrogate.unet_out(attention=...)`` (an interceptor over diffusers' FlaxAttention, no fork).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.configs import Objective
from tdae_jax.models.surrogate import Surrogate
from tdae_jax.objectives import common
from tdae_jax.objectives.diffusion import _mean_over_k

MASKS = ("attention", "region", "none")
TIMESTEPS = ("grid", "random")


def content_token_mask(ids: np.ndarray, tokenizer) -> np.ndarray:
    """``[B,T] float32``: 1 on content tokens (not BOS, EOS or padding)."""
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    mask = ~np.isin(ids, [s for s in special if s is not None])
    return mask.astype(np.float32)


def word_positions(row: np.ndarray, tokenizer, word: str) -> list[int]:
    """Token positions of every whole-word occurrence of ``word`` (one or more words) in the id row ``row``.

    The word is tokenized alone (CLIP's BPE splits the text into words first, so a word has the same ids alone
    and in a sentence); a match must start a word: the token before it is special or ends CLIP's end-of-word
    marker ``</w>`` (so "red" does not match the end of "bored").
    """
    sub = list(tokenizer(word.strip(), add_special_tokens=False).input_ids)
    if not sub:
        return []
    ids = [int(i) for i in row]
    toks = tokenizer.convert_ids_to_tokens(ids)
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    marks_words = str(tokenizer.convert_ids_to_tokens(sub[-1])).endswith("</w>")
    out = []
    for j in range(len(ids) - len(sub) + 1):
        if ids[j:j + len(sub)] != sub or ids[j] in special:
            continue
        if marks_words and j > 0 and ids[j - 1] not in special and not str(toks[j - 1]).endswith("</w>"):
            continue
        out.extend(range(j, j + len(sub)))
    return out


def target_token_mask(ids: np.ndarray, tokenizer, words=()) -> tuple[np.ndarray, list[int]]:
    """``([B,T] float32, missing)``: SA's target tokens per prompt row.

    ``words`` empty: every content token. Otherwise the positions of the words in each row; a row that contains
    none of them keeps every content token and is listed in ``missing`` (the caller warns).
    """
    content = content_token_mask(ids, tokenizer)
    words = [w for w in words if w.strip()]
    if not words:
        return content, []
    mask, missing = np.zeros_like(content), []
    for b, row in enumerate(np.asarray(ids)):
        pos = sorted({p for w in words for p in word_positions(row, tokenizer, w)})
        if pos:
            mask[b, pos] = 1.0
        else:
            mask[b] = content[b]
            missing.append(b)
    return mask, missing


def text_entries(sur, texts, words=(), embed=None) -> tuple[dict, list[int]]:
    """A protect batch's text entries for ``texts``: the surrogate's ``text_batch`` (``emb``, ``uncond``, the
    family's extras) plus SA's ``token_mask`` of ``words`` (:func:`target_token_mask`) where the family has CLIP
    token ids (SD3 has none: SA is refused for it). Returns ``(entries, rows with none of the words)``."""
    text = sur.text_batch(list(texts), embed=embed)
    ids = text.pop("token_ids", None)
    if ids is None:
        return text, []
    text["token_mask"], missing = target_token_mask(ids, sur.static.tokenizer, words)
    return text, missing


def check_config(cfg: Objective) -> None:
    """Raises ValueError on a bad SA option, or on an SA option set for another objective."""
    if cfg.name != "sa":
        default = Objective()
        set_ = [f"--{f.name}" for f in dataclasses.fields(Objective)
                if f.name.startswith("sa_") and getattr(cfg, f.name) != getattr(default, f.name)]
        if set_:
            raise ValueError(f"{', '.join(set_)}: only used by --objective=sa (got --objective={cfg.name})")
        return
    if cfg.sa_mask not in MASKS:
        raise ValueError(f"--sa_mask must be one of {', '.join(MASKS)}, got {cfg.sa_mask!r}")
    if cfg.sa_timesteps not in TIMESTEPS:
        raise ValueError(f"--sa_timesteps must be one of {', '.join(TIMESTEPS)}, got {cfg.sa_timesteps!r}")
    if not 0.0 < cfg.sa_mask_threshold < 1.0:
        raise ValueError(f"--sa_mask_threshold must be in (0, 1), got {cfg.sa_mask_threshold}")
    if any(not w.strip() for w in cfg.sa_tokens):
        raise ValueError(f"--sa_tokens: empty word in {list(cfg.sa_tokens)}")


def grid_timesteps(sur: Surrogate, k: int) -> np.ndarray:
    """``[k] int32``: the ``k`` timesteps of diffusers' ``DDIMScheduler.from_config(<surrogate's scheduler
    config>).set_timesteps(k)`` (siiyayu/SemanticAttack ``timestep_universal_gradient_updating``), descending;
    SD-1.x config (leading spacing, steps_offset 1), k = 10: 901, 801, ..., 101, 1."""
    from tdae_jax.editors import schedulers

    cfg = schedulers.resolve_config("ddim", sur.static.scheduler_config, sur.static.prediction_type)
    cfg["num_train_timesteps"] = sur.num_train_timesteps
    plan = schedulers.make_plan("ddim", cfg, sur.static.alphas_cumprod, k)
    return np.asarray(plan.timesteps).round().astype(np.int32)


def layer_shape(q: int, h0: int, w0: int) -> tuple[int, int]:
    """``(h, w)`` of an attention layer with ``q`` queries in a UNet on an ``h0 x w0`` latent (row-major
    queries; each downsampling halves the size, rounding up as a stride-2 padded convolution)."""
    h, w = h0, w0
    while h * w > q:
        h, w = -(-h // 2), -(-w // 2)
    if h * w != q:
        raise ValueError(f"attention layer with {q} queries does not tile a {h0}x{w0} latent")
    return h, w


def aggregate(maps: dict, tok: jax.Array, latent_hw: tuple[int, int]) -> jax.Array:
    """Paper Eq. 3: ``[B,h,w]`` = sum over layers of the target tokens' map, bicubically resized to the finest
    attention grid ``h x w`` of the maps (the latent's for SD-1.x).

    ``maps``: ``{path: [B,Q,T]}`` head-averaged cross-attention; ``tok``: ``[B,T]`` target-token weights.
    """
    hw = layer_shape(max(m.shape[1] for m in maps.values()), *latent_hw)
    out = 0.0
    for m in maps.values():
        b, q, _ = m.shape
        h, w = layer_shape(q, *latent_hw)
        plane = jnp.einsum("bqk,bk->bq", m, tok).reshape(b, h, w)
        out = out + (plane if (h, w) == hw else jax.image.resize(plane, (b, *hw), "cubic"))
    return out


def attention_mask(att: jax.Array, tau: float) -> jax.Array:
    """Paper Eq. 4: ``[B,h,w]`` 1 where the clean image's map exceeds ``tau`` x its per-image maximum."""
    peak = jnp.max(att, axis=(1, 2), keepdims=True)
    return jax.lax.stop_gradient((att > tau * peak).astype(att.dtype))


def region_mask(mask: jax.Array, hw: tuple[int, int]) -> jax.Array:
    """``[B,h,w]``: an image-space mask ``[B,H,W,1]`` (1 = counted) averaged down to the attention grid."""
    b = mask.shape[0]
    return jax.lax.stop_gradient(jax.image.resize(mask[..., 0].astype(jnp.float32), (b, *hw), "linear"))


def masked_l1(att: jax.Array, mask: jax.Array, n_layers: int) -> jax.Array:
    """Paper Eq. 5 per image, ``[B]``: ``|| mask * Att ||_1 / (L h w)``."""
    return common.per_image_sum(mask * jnp.abs(att)) / (n_layers * att.shape[1] * att.shape[2])


def is_cross_attention(path: str) -> bool:
    return path.endswith("attn2")


def _timesteps(sur: Surrogate, cfg: Objective, keys: jax.Array) -> jax.Array:
    """``[K,B]`` timesteps: the DDIM grid for every image, or K uniform draws per image."""
    k, b = cfg.timesteps, keys.shape[0]
    if cfg.sa_timesteps == "grid":
        return jnp.broadcast_to(jnp.asarray(grid_timesteps(sur, k))[:, None], (k, b))
    return jnp.swapaxes(common.draw_timesteps(keys, k, sur.num_train_timesteps), 0, 1)


def make_sa(sur: Surrogate, cfg: Objective, select=is_cross_attention):
    """SA's ``loss_fn(delta, batch, emb, keys) -> [B]`` (to minimize; module docstring). ``batch``: ``x0``,
    ``token_mask [B,T]``, ``emb`` (the clean prompt, for the Eq. 4 mask), ``mask [B,H,W,1]`` (``sa_mask=region``)."""
    check_config(dataclasses.replace(cfg, name="sa"))

    def maps_at(z0, t, n, emb, cond):
        _, maps = sur.unet_out(sur.add_noise(z0, n, t), t, emb, attention=select, **cond)
        if not maps:
            raise ValueError("SA needs a UNet with cross-attention layers; none were selected")
        return maps

    def clean_mask(batch, emb, keys, ts, noises):
        """Eq. 4 from the clean image and its prompt (not DPD's), at this iteration's (t, noise) draws."""
        x0, tok = batch["x0"], batch["token_mask"]
        z0, cond = common.encode_sample(sur, x0, keys), common.conditioning(sur, x0, batch)
        ref = _mean_over_k(lambda t, n: aggregate(maps_at(z0, t, n, emb, cond), tok, z0.shape[-2:]),
                           ts, noises, False)
        return attention_mask(jax.lax.stop_gradient(ref), cfg.sa_mask_threshold)

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z0 = common.encode_sample(sur, x, keys)
        ts = _timesteps(sur, cfg, keys)
        noises = common.draw_noise(keys, cfg.timesteps, z0.shape[1:])  # [K,B,...]
        tok = batch["token_mask"]  # [B,T]
        ref = clean_mask(batch, batch.get("emb", emb), keys, ts, noises) if cfg.sa_mask == "attention" else None

        def one(t, n):
            maps = maps_at(z0, t, n, emb, cond)
            att = aggregate(maps, tok, z0.shape[-2:])
            if cfg.sa_mask == "region":
                mask = region_mask(common.inpaint_mask(batch, batch["x0"]), att.shape[1:])
            else:
                mask = jnp.ones_like(att) if ref is None else ref
            return masked_l1(att, mask, len(maps))

        return _mean_over_k(one, ts, noises, cfg.remat)

    return loss_fn
