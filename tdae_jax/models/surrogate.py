"""The Surrogate: one interface over every editor family the defenses differentiate through.

A ``Surrogate`` is a pytree: ``params`` (``{"vae", "unet", "text_encoder"}``) are leaves, the Flax
modules, tokenizer, noise schedule and family are static (identity-hashed, so a jitted step that takes
a surrogate as an argument traces once per loaded model). Conventions:

- images: ``[B, H, W, 3] float32 in [0, 1]`` (NHWC, as the data layer produces them);
- latents: ``[B, C, h, w]`` scaled by the VAE's ``scaling_factor`` (diffusers' layout);
- text embeddings: ``[B, T, D]`` text-encoder last hidden states.

Families: ``sd`` (SD 1.x/2.x, 4-channel UNet input), ``ip2p`` (InstructPix2Pix, 8 channels:
``[z_t || E_mode(x)]``), ``inpaint`` (9 channels: ``[z_t || mask || E(masked x)]``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.models import fastconv, fastnorm

IN_CHANNELS = {"sd": 4, "ip2p": 8, "inpaint": 9}


@dataclasses.dataclass(eq=False)
class Static:
    """Non-array parts of a surrogate. Compared and hashed by identity (one per loaded model)."""

    family: str
    vae: nn.Module
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: Any
    alphas_cumprod: np.ndarray  # [T] float64, from scheduler_config
    prediction_type: str  # epsilon | sample | v_prediction
    scaling_factor: float
    scheduler_config: dict
    name: str = ""
    source: str = ""  # weights directory or "tiny"

    __hash__ = object.__hash__


@flax.struct.dataclass
class Surrogate:
    params: Any
    static: Static = flax.struct.field(pytree_node=False)

    # ------------------------------------------------------------------ properties
    @property
    def family(self) -> str:
        return self.static.family

    @property
    def num_train_timesteps(self) -> int:
        return int(self.static.alphas_cumprod.shape[0])

    @property
    def latent_channels(self) -> int:
        return int(self.static.vae.latent_channels)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.static.vae.block_out_channels) - 1)

    @property
    def alphas_cumprod(self) -> jax.Array:
        return jnp.asarray(self.static.alphas_cumprod, jnp.float32)

    def memory_efficient(self) -> "Surrogate":
        """The same surrogate (same params) whose UNet computes attention in query/key chunks under
        ``jax.checkpoint`` (diffusers' ``use_memory_efficient_attention``, Rabe & Staats 2021): the full
        ``[B, heads, q, k]`` score tensor is never stored, so the backward pass of a 512 px SD-2.1 UNet
        keeps a fraction of the activations (docs/benchmarks.md, ADFT). Same function up to float
        rounding; the DSUR attention maps are still recomputed for the selected layers."""
        if self.static.unet.use_memory_efficient_attention:
            return self
        unet = self.static.unet.clone(use_memory_efficient_attention=True)
        static = dataclasses.replace(self.static, unet=unet, name=f"{self.static.name}+mea")
        return self.replace(static=static)

    @property
    def compute_dtype(self):
        """The dtype the UNet computes in (float32 unless :meth:`mixed_precision`)."""
        return jnp.dtype(self.static.unet.dtype)

    def mixed_precision(self, dtype=jnp.bfloat16) -> "Surrogate":
        """The same surrogate computing in ``dtype`` (bf16 mixed precision, as MaxText's ``dtype`` vs
        ``weight_dtype``): every module's convolutions, matmuls and activations run in ``dtype``; the frozen
        VAE and text-encoder weights are stored in ``dtype``; the UNet weights stay float32 *master* weights
        (DSUR, ADFT stage 3 and the fine-tuning attacker train them: Flax casts them at each use and their
        gradients come back float32, so AdamW's state and updates stay float32). Latents, text embeddings,
        UNet outputs and decoded images are returned as float32, so noise, timesteps, losses and their
        per-image reductions stay float32; the attention maps of DSUR's L_att are float32 softmaxes.
        ``dtype=float32`` returns ``self``. At 512 px it cuts what the ADFT steps save for their backward
        pass by about a third (GroupNorm normalizes in float32, as PyTorch's autocast does; docs/benchmarks.md),
        on a backend with bf16 kernels (XLA:CPU computes bf16 convolutions in float32)."""
        dtype = jnp.dtype(dtype)
        if dtype == self.compute_dtype:
            return self
        st = self.static
        modules = {k: getattr(st, k).clone(dtype=dtype) for k in ("vae", "unet", "text_encoder")
                   if getattr(st, k) is not None}  # a benchmark surrogate may have no text encoder
        static = dataclasses.replace(st, **modules, name=f"{st.name}+{dtype.name}")
        params = {**self.params, **{k: cast_floats(self.params[k], dtype) for k in ("vae", "text_encoder")
                                    if k in self.params}}
        return self.replace(params=params, static=static)

    def frozen_unet(self, unet_params):
        """UNet params that will not be trained (DSUR's static UNet_s, FSMG's surrogate) stored in the compute
        dtype (no master copy needed)."""
        return cast_floats(unet_params, self.compute_dtype)

    # ------------------------------------------------------------------ VAE
    def moments(self, x: jax.Array):
        """VAE posterior (mean, std) in *unscaled* latent units, NCHW."""
        sample = jnp.transpose(x * 2.0 - 1.0, (0, 3, 1, 2))
        with fastconv.polyphase_downsampling(), fastnorm.fast_group_norm():  # CPU backward passes
            dist = self.static.vae.apply({"params": self.params["vae"]}, sample,
                                         method=self.static.vae.encode).latent_dist
        # latents are float32 whatever the VAE computes in (mixed precision: noise and losses stay fp32)
        mean = jnp.transpose(dist.mean, (0, 3, 1, 2)).astype(jnp.float32)
        std = jnp.transpose(dist.std, (0, 3, 1, 2)).astype(jnp.float32)
        return mean, std

    def encode(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Scaled latents of images ``x: [B,H,W,3] in [0,1]``. ``key`` None: the posterior mean;
        otherwise one posterior sample (``latent_dist.sample()``)."""
        mean, std = self.moments(x)
        z = mean if key is None else mean + std * jax.random.normal(key, mean.shape, mean.dtype)
        return z * self.static.scaling_factor

    def encode_mode(self, x: jax.Array) -> jax.Array:
        """Unscaled posterior mode, as InstructPix2Pix uses for its image condition."""
        return self.moments(x)[0]

    def normalize(self, raw: jax.Array) -> jax.Array:
        """``raw * scaling_factor``: raw VAE latents -> the UNet's latent space (``SD3.normalize`` also shifts)."""
        return raw * self.static.scaling_factor

    def decode(self, z: jax.Array) -> jax.Array:
        """Images ``[B,H,W,3]`` in [0,1] (not clipped, so gradients pass) from scaled latents ``[B,C,h,w]``."""
        # NHWC in: FlaxAutoencoderKL.decode only transposes NCHW input when shape[-1] != latent_channels,
        # so an NCHW latent whose width equals the channel count (e.g. [B,4,h,4]) would be misread.
        z = jnp.transpose(z / self.static.scaling_factor, (0, 2, 3, 1))
        with fastnorm.fast_group_norm():  # GroupNorm's backward pass on CPU (fastnorm.py)
            out = self.static.vae.apply({"params": self.params["vae"]}, z, method=self.static.vae.decode).sample
        return jnp.transpose(out, (0, 2, 3, 1)).astype(jnp.float32) * 0.5 + 0.5

    # ------------------------------------------------------------------ diffusion
    def add_noise(self, z0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
        """q(z_t | z_0) with per-image timesteps ``t: [B] int``."""
        a = self.alphas_cumprod[t].reshape((-1,) + (1,) * (z0.ndim - 1))
        return jnp.sqrt(a) * z0 + jnp.sqrt(1.0 - a) * noise

    def to_eps(self, out: jax.Array, z_t: jax.Array, t: jax.Array) -> jax.Array:
        """Convert the UNet output to an epsilon prediction whatever the prediction type."""
        a = self.alphas_cumprod[t].reshape((-1,) + (1,) * (z_t.ndim - 1))
        pt = self.static.prediction_type
        if pt == "epsilon":
            return out
        if pt == "sample":
            return (z_t - jnp.sqrt(a) * out) / jnp.sqrt(1.0 - a)
        if pt == "v_prediction":
            return jnp.sqrt(a) * out + jnp.sqrt(1.0 - a) * z_t
        raise ValueError(f"unknown prediction_type {pt!r}")

    def to_x0(self, out: jax.Array, z_t: jax.Array, t: jax.Array) -> jax.Array:
        a = self.alphas_cumprod[t].reshape((-1,) + (1,) * (z_t.ndim - 1))
        eps = self.to_eps(out, z_t, t)
        return (z_t - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)

    def unet_input(self, z_t, image_latents=None, mask=None, masked_latents=None):
        """Assemble the family's UNet input channels."""
        fam = self.family
        if fam == "sd":
            return z_t
        if fam == "ip2p":
            if image_latents is None:
                raise ValueError("ip2p surrogate needs image_latents (E_mode(x), unscaled)")
            return jnp.concatenate([z_t, image_latents], axis=1)
        if fam == "inpaint":
            if mask is None or masked_latents is None:
                raise ValueError("inpaint surrogate needs mask [B,1,h,w] and masked_latents")
            return jnp.concatenate([z_t, mask, masked_latents], axis=1)
        raise ValueError(f"unknown family {fam!r}")

    def unet_out(self, z_t, t, emb, image_latents=None, mask=None, masked_latents=None, attention=None):
        """Raw UNet output (in the model's prediction type).

        ``attention``: None, or a predicate ``path -> bool`` selecting attention modules whose
        head-averaged probabilities are returned as a dict ``{path: [B, Q, K]}`` (self-attention
        ``attn1``: K = Q = h*w; cross-attention ``attn2``: K = tokens). See notes/attention-maps.md.
        """
        sample = self.unet_input(z_t, image_latents, mask, masked_latents)
        t = jnp.broadcast_to(jnp.asarray(t), (sample.shape[0],))
        # mixed precision: float32 master weights are cast once, so a master and its frozen bf16 copy compute
        # bit-identically (norm layers would otherwise promote to float32 for the master only)
        variables = {"params": cast_floats(self.params["unet"], self.compute_dtype)}
        with fastconv.polyphase_downsampling(), fastnorm.fast_group_norm():  # CPU backward passes
            if attention is None:
                return self.static.unet.apply(variables, sample, t, emb).sample.astype(jnp.float32)
            with nn.intercept_methods(_attention_sower(attention)):
                out, state = self.static.unet.apply(variables, sample, t, emb, mutable=["intermediates"])
        maps = {}
        for path, leaf in flax.traverse_util.flatten_dict(flax.core.unfreeze(state["intermediates"])).items():
            maps["/".join(path[:-1])] = leaf[0] if isinstance(leaf, tuple) else leaf
        return out.sample.astype(jnp.float32), maps

    def eps(self, z_t, t, emb, image_latents=None, mask=None, masked_latents=None):
        """Epsilon prediction ``[B,C,h,w]`` at per-image timesteps ``t``."""
        out = self.unet_out(z_t, t, emb, image_latents, mask, masked_latents)
        return self.to_eps(out, z_t, jnp.broadcast_to(jnp.asarray(t), (z_t.shape[0],)))

    def guided_eps(self, z_t, t, emb, uncond, cond: dict, guidance_scale: float,
                   image_guidance_scale: float = 1.5) -> jax.Array:
        """Classifier-free guided epsilon, as the diffusers pipelines compute it (``guidance_scale`` <= 1 or no
        ``uncond``: the conditional branch alone). sd / inpaint: eps_u + s (eps_c - eps_u). ip2p
        (``StableDiffusionInstructPix2PixPipeline``: text+image, image only, none): eps_u + s_T (eps_ti - eps_i)
        + s_I (eps_i - eps_u), with the null image latents = 0."""
        if guidance_scale <= 1.0 or uncond is None:
            return self.eps(z_t, t, emb, **cond)
        if self.family == "ip2p":
            img = cond["image_latents"]
            e_ti = self.eps(z_t, t, emb, image_latents=img)
            e_i = self.eps(z_t, t, uncond, image_latents=img)
            e_u = self.eps(z_t, t, uncond, image_latents=jnp.zeros_like(img))
            return e_u + guidance_scale * (e_ti - e_i) + image_guidance_scale * (e_i - e_u)
        e_c = self.eps(z_t, t, emb, **cond)
        e_u = self.eps(z_t, t, uncond, **cond)
        return e_u + guidance_scale * (e_c - e_u)

    # ------------------------------------------------------------------ text
    def tokenize(self, prompts: Sequence[str]) -> np.ndarray:
        """Host-side tokenization to ``[B, max_length] int32`` (padded, truncated like diffusers)."""
        tok = self.static.tokenizer
        ids = tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="np").input_ids
        return np.asarray(ids, np.int32)

    def embed_ids(self, ids: jax.Array) -> jax.Array:
        """Text-encoder last hidden states ``[B, T, D]`` for token ids ``[B, T]``."""
        ids = jnp.asarray(ids)
        pos = jnp.broadcast_to(jnp.arange(ids.shape[-1])[None], ids.shape)
        out = self.static.text_encoder.apply(
            {"params": self.params["text_encoder"]}, ids, jnp.ones_like(ids), pos, deterministic=True
        )
        return out[0].astype(jnp.float32)

    def embed_text(self, prompts: Sequence[str]) -> jax.Array:
        return self.embed_ids(self.tokenize(prompts))

    def text_batch(self, prompts: Sequence[str], negative: str = "", embed=None) -> dict:
        """The protect batch's text entries (numpy): ``emb`` ``[B,T,D]`` (what DPD perturbs), the CFG negative
        ``uncond`` of ``negative`` (diffusers: the empty string, encoded like a prompt) and the prompts'
        ``token_ids`` ``[B,T]`` (the Semantic Attack's token mask is read from them). ``embed``: a compiled
        ``embed_ids`` to use (default: this surrogate's own)."""
        embed = embed or self.embed_ids
        ids = self.tokenize(prompts)
        return {"emb": np.asarray(embed(ids)), "uncond": np.asarray(embed(self.tokenize([negative] * len(ids)))),
                "token_ids": ids}


def cast_floats(tree, dtype):
    """``tree`` with its floating-point leaves in ``dtype`` (integer leaves and leaves already in ``dtype``
    untouched: a no-op on a float32 surrogate)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) and a.dtype != dtype
                        else a, tree)


def _attention_sower(select: Callable[[str], bool]):
    """Interceptor that sows head-averaged attention probabilities of selected FlaxAttention calls."""
    from diffusers.models.attention_flax import FlaxAttention

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if not isinstance(module, FlaxAttention) or context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        path = "/".join(module.scope.path)
        if not select(path):
            return next_fun(*args, **kwargs)
        hidden = args[0]
        ctx = kwargs.get("context", args[1] if len(args) > 1 else None)
        ctx = hidden if ctx is None else ctx
        b = hidden.shape[0]
        q = module.query(hidden).reshape(b, -1, module.heads, module.dim_head)
        k = module.key(ctx).reshape(b, -1, module.heads, module.dim_head)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * module.scale
        probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).mean(axis=1)
        module.sow("intermediates", "attn_probs", probs)
        return next_fun(*args, **kwargs)

    return interceptor
