"""SD3 / SD3.5 as a surrogate: the same shape of interface as ``models/surrogate.py`` (Esser et al. 2024).

``SD3`` is a pytree: ``params = {"transformer", "vae"}`` are leaves; the Flax modules, VAE facts,
scheduler config and the host-side text encoders are static (identity-hashed). Conventions:

- images ``[B, H, W, 3] float32 in [0, 1]`` (H, W multiples of 8·patch = 16 px for the real VAE);
- latents ``[B, 16, H/8, W/8]`` NCHW, normalised ``z = (E(x) - shift_factor) · scaling_factor``;
- text: ``(prompt_embeds [B, 77 + 256, 4096], pooled [B, 2048])``, encoded once on the host.

Flow matching (``flow_match.py``): ``z_t = (1 - σ) z_0 + σ ε``, the transformer predicts
``v = ε - z_0`` at timestep ``t = 1000 σ``. Epsilon-style objectives written for ``Surrogate``
(``add_noise(z0, ε, t)`` then ``‖eps(z_t, t, emb) - ε‖²``) work unchanged with ``t`` read as the
float timestep ``1000 σ``: ``eps = z_t + (1 - σ) v``, so ``eps - ε = (1 - σ)(v - (ε - z_0))`` and the
epsilon MSE is the flow-matching velocity MSE weighted by ``(1 - σ)²``. For SD3's own training
weighting use ``velocity`` and ``flow_match.velocity_target`` with σ from ``train_sigmas``.

Timesteps: a **float** ``t`` is ``1000 σ``. An **integer** ``t`` in ``[0, 1000)`` (what the UNet objectives
draw, ``objectives.common.draw_timesteps``) indexes the shifted training grid in DDPM orientation
(larger = noisier): ``1000 σ`` with ``σ = train_sigmas[999 - t]``, i.e. ``σ = shift((t + 1) / 1000)``, so
t = 999 is σ = 1 and t = 0 is σ_min = 0.003 — the grid diffusers' SD3 training scripts draw from.

Adapter for the objectives and the pipeline (``objectives/common.py``, ``pipeline.py``): ``family ==
"sd3"``, ``moments`` / ``encode_mode`` (raw posterior, as ``Surrogate``), ``eps(z_t, t, emb, pooled=...)``
with ``emb`` the (perturbable) ``prompt_embeds`` array and the pooled projection passed separately,
``text_batch(prompts)`` for the protect batch. The Semantic Attack (SA) is not applicable: SD3 has one
joint image+text attention, no UNet cross-attention maps (``unet_out`` raises).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.models import flow_match, sd3_io, sd3_text, sd3_transformer, sd3_vae


@dataclasses.dataclass(eq=False)
class SD3Static:
    transformer: sd3_transformer.SD3Transformer2DModel
    vae: Any  # diffusers FlaxAutoencoderKL
    vae_info: sd3_vae.VAEInfo
    text: Optional[sd3_text.SD3TextEncoders]
    scheduler: flow_match.FlowMatchConfig
    name: str = ""
    source: str = ""  # weights directory or "tiny"

    __hash__ = object.__hash__


@flax.struct.dataclass
class SD3:
    params: Any
    static: SD3Static = flax.struct.field(pytree_node=False)

    family = "sd3"

    # ------------------------------------------------------------------ properties
    @property
    def latent_channels(self) -> int:
        return self.static.vae_info.latent_channels

    @property
    def downsample(self) -> int:
        return self.static.vae_info.downsample

    @property
    def num_train_timesteps(self) -> int:
        return self.static.scheduler.num_train_timesteps

    @property
    def train_sigmas(self) -> jax.Array:
        """The shifted training grid ``[1000]`` (index 0 = σ 1.0), as diffusers' scheduler holds it."""
        return jnp.asarray(flow_match.train_sigmas(self.static.scheduler))

    def timestep(self, t) -> jax.Array:
        """Float timesteps ``1000 σ`` of ``t``: floats pass through; integers index the training grid
        (DDPM orientation, see the module docstring)."""
        t = jnp.asarray(t)
        if jnp.issubdtype(t.dtype, jnp.integer):
            n = self.num_train_timesteps
            return self.train_sigmas[n - 1 - jnp.clip(t, 0, n - 1)] * n
        return t.astype(jnp.float32)

    def sigma(self, t) -> jax.Array:
        """σ of timesteps ``t`` (float ``1000 σ``, or integer grid indices)."""
        return self.timestep(t) / self.num_train_timesteps

    # ------------------------------------------------------------------ VAE
    def moments(self, x: jax.Array):
        """VAE posterior (mean, std), unnormalised, NCHW, of images ``[B,H,W,3]`` in [0, 1]."""
        return sd3_vae.moments(self.static.vae, self.static.vae_info, self.params["vae"], x * 2.0 - 1.0)

    def encode_mode(self, x: jax.Array) -> jax.Array:
        """Raw (unnormalised) posterior mean ``[B,16,h,w]``, as ``Surrogate.encode_mode`` (PhotoGuard PGE)."""
        return self.moments(x)[0]

    def normalize(self, raw: jax.Array) -> jax.Array:
        """``(raw - shift_factor) * scaling_factor``: raw VAE latents -> the transformer's latent space."""
        return sd3_vae.normalize(raw, self.static.vae_info)

    def encode(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Normalised latents ``[B,16,H/8,W/8]``. ``key`` None: posterior mean (deterministic, for
        differentiable losses); otherwise one posterior sample (what the img2img pipeline uses)."""
        mean, std = self.moments(x)
        z = mean if key is None else mean + std * jax.random.normal(key, mean.shape, mean.dtype)
        return sd3_vae.normalize(z, self.static.vae_info)

    def decode(self, z: jax.Array) -> jax.Array:
        """Images ``[B,H,W,3]`` in [0, 1] (not clipped, so gradients pass) from normalised latents."""
        raw = sd3_vae.denormalize(z, self.static.vae_info)
        return sd3_vae.decode_raw(self.static.vae, self.static.vae_info, self.params["vae"], raw) * 0.5 + 0.5

    # ------------------------------------------------------------------ flow matching
    def velocity_t(self, z_t, t, prompt_embeds, pooled) -> jax.Array:
        """Transformer output ``v [B,16,h,w]`` at float timesteps ``t = 1000 σ`` (scalar or ``[B]``)."""
        t = jnp.broadcast_to(self.timestep(t), (z_t.shape[0],))
        return self.static.transformer.apply({"params": self.params["transformer"]}, z_t, prompt_embeds, pooled, t)

    def velocity(self, z_t, sigma, prompt_embeds, pooled) -> jax.Array:
        """Velocity ``v ≈ ε - z_0`` at noise level ``sigma ∈ [0, 1]`` (scalar or ``[B]``)."""
        return self.velocity_t(z_t, jnp.asarray(sigma, jnp.float32) * self.num_train_timesteps, prompt_embeds, pooled)

    def add_noise(self, z0: jax.Array, noise: jax.Array, t) -> jax.Array:
        """``(1 - σ) z0 + σ ε`` at float timesteps ``t = 1000 σ`` (``[B]`` or scalar)."""
        return flow_match.scale_noise(z0, noise, self.sigma(t))

    def guided_eps(self, z_t, t, emb, uncond, cond: dict, guidance_scale: float,
                   image_guidance_scale: float = 1.5) -> jax.Array:
        """Classifier-free guided velocity as ``StableDiffusion3Img2ImgPipeline``: the negative branch has its own
        pooled projection (``cond["pooled"]`` / ``cond["uncond_pooled"]``); ``image_guidance_scale`` is unused."""
        if guidance_scale <= 1.0 or uncond is None:
            return self.eps(z_t, t, emb, **cond)
        e_c = self.eps(z_t, t, emb, pooled=cond["pooled"])
        e_u = self.eps(z_t, t, uncond, pooled=cond["uncond_pooled"])
        return e_u + guidance_scale * (e_c - e_u)

    def eps(self, z_t, t, emb, image_latents=None, mask=None, masked_latents=None, pooled=None,
            uncond_pooled=None) -> jax.Array:
        """Epsilon adapter: ``ε̂ = z_t + (1 - σ) v``.

        ``emb``: ``(prompt_embeds, pooled)``, or the ``prompt_embeds`` array with ``pooled`` given
        (``objectives.common.conditioning`` passes ``pooled`` and ``uncond_pooled``; the latter is for
        ``guided_eps`` and unused here). ``t``: float ``1000 σ`` or integer grid index.
        """
        del uncond_pooled
        if image_latents is not None or mask is not None or masked_latents is not None:
            raise ValueError("the SD3 surrogate has no image-conditioned (ip2p/inpaint) variant")
        if isinstance(emb, (tuple, list)):
            prompt_embeds, pooled = emb
        elif pooled is None:
            raise ValueError("SD3 eps needs the pooled projection: emb=(prompt_embeds, pooled) or pooled=...")
        else:
            prompt_embeds = emb
        v = self.velocity_t(z_t, t, prompt_embeds, pooled)
        return flow_match.eps_from_velocity(v, z_t, self.sigma(jnp.broadcast_to(jnp.asarray(t), (z_t.shape[0],))))

    def unet_out(self, *args, **kwargs):
        raise NotImplementedError("SD3 (MMDiT) has no UNet cross-attention maps: the Semantic Attack (SA) and "
                                  "other attention-map objectives are not applicable to an SD3 surrogate")

    def to_x0(self, v, z_t, t) -> jax.Array:
        return flow_match.x0_from_velocity(v, z_t, self.sigma(jnp.broadcast_to(jnp.asarray(t), (z_t.shape[0],))))

    # ------------------------------------------------------------------ placement
    def shard(self, mesh, model_axis: str = "model") -> "SD3":
        """Place the transformer params split over ``mesh``'s ``model_axis`` (``sd3_transformer.partition_spec``:
        q/k/v and FF-in output dims, attention-out and FF-out input dims) and replicate the VAE params."""
        from jax.sharding import NamedSharding, PartitionSpec

        tr = jax.device_put(self.params["transformer"],
                            sd3_transformer.param_shardings(self.params["transformer"], mesh, model_axis))
        vae = jax.device_put(self.params["vae"], NamedSharding(mesh, PartitionSpec()))
        return self.replace(params={"transformer": tr, "vae": vae})

    # ------------------------------------------------------------------ text
    def embed_text(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """(prompt_embeds ``[B, 77 + T5 len, 4096]``, pooled ``[B, 2048]``), host-side, as encode_prompt."""
        return self.embed_ids(self.tokenize(prompts))

    def _text(self):
        if self.static.text is None:
            raise ValueError("this SD3 surrogate was loaded without text encoders (load_text=False)")
        return self.static.text

    def tokenize(self, prompts: Sequence[str]):
        """Host-side ids ``(ids_l [B,77], ids_g [B,77], ids_t5 [B,max_sequence_length] | None)``."""
        return self._text().tokenize(prompts)

    def embed_ids(self, ids) -> tuple[jax.Array, jax.Array]:
        """(prompt_embeds, pooled) of ``tokenize``'s ids. Not meant to be wrapped in an outer ``jax.jit``:
        the encoders are jitted inside with their params as arguments (a closure would bake T5 in)."""
        return self._text().embed_ids(*ids)

    def text_batch(self, prompts: Sequence[str], negative: str = "", embed=None) -> dict:
        """The protect batch's text entries (numpy): ``emb`` = prompt_embeds ``[B, S, D]`` (what DPD perturbs),
        ``pooled`` ``[B, P]`` (fixed), and the CFG negative ``uncond`` / ``uncond_pooled`` of ``negative``
        (diffusers: the empty string, encoded like a prompt, not zeros). ``embed`` is ignored: the three
        encoders are jitted inside :meth:`embed_ids` (no token ids: SD3 has no Semantic Attack)."""
        prompts = list(prompts)
        pe, pooled = self.embed_text(prompts)
        ue, upooled = self.embed_text([negative] * len(prompts))
        return {"emb": np.asarray(pe), "pooled": np.asarray(pooled), "uncond": np.asarray(ue),
                "uncond_pooled": np.asarray(upooled)}


# ---------------------------------------------------------------------------------------- builders
TINY_TRANSFORMER = dict(sample_size=32, patch_size=2, in_channels=16, num_layers=3, attention_head_dim=8,
                        num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32,
                        pooled_projection_dim=32, out_channels=16, pos_embed_max_size=16,
                        dual_attention_layers=(0,), qk_norm="rms_norm")
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[16, 32], layers_per_block=1,
                latent_channels=16, norm_num_groups=8, sample_size=32, scaling_factor=1.5305,
                shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
TINY_CLIP = dict(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                 projection_dim=16, max_position_embeddings=77, bos_token_id=97, eos_token_id=2, pad_token_id=1)
TINY_T5 = dict(vocab_size=100, d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
               relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", is_encoder_decoder=False)


def tiny(key: jax.Array | int | None = None, remat: bool = False, max_sequence_length: int = 32) -> SD3:
    """A random tiny SD3.5-style model (qk RMSNorm, one dual-attention block), CPU-fast: images 32×32
    -> latents ``[B,16,16,16]``; text ``[B, 77 + max_sequence_length, 48]`` (CLIP 16+16 zero-padded to 48) / pooled ``[B, 32]``."""
    from transformers import CLIPTextConfig, T5Config

    if key is None:
        raise ValueError("tiny() needs an explicit key (no default seed)")
    if isinstance(key, (int, np.integer)):  # models.tiny("sd3", seed)
        key = jax.random.key(int(key))
    k_tr, k_vae, k_l, k_g, k_t5 = jax.random.split(key, 5)
    cfg = sd3_transformer.SD3Config.from_dict(TINY_TRANSFORMER)
    transformer = sd3_transformer.SD3Transformer2DModel(cfg, remat=remat)
    tr_params = random_params(sd3_transformer.init_shapes(transformer), k_tr)
    vae, info = sd3_vae.build_vae(TINY_VAE)
    vae_params = random_params(sd3_vae.init_shapes(vae, info), k_vae)
    ids = jnp.zeros((1, 4), jnp.int32)
    clip_l = sd3_text.clip_module(CLIPTextConfig(**TINY_CLIP, hidden_act="quick_gelu"))
    clip_g = sd3_text.clip_module(CLIPTextConfig(**TINY_CLIP, hidden_act="gelu"))
    t5 = sd3_text.t5_module(T5Config(**TINY_T5))
    shapes = lambda mod, *a: jax.eval_shape(lambda: mod.init(jax.random.key(0), *a))["params"]  # noqa: E731
    text = sd3_text.SD3TextEncoders(
        clip_l, random_params(shapes(clip_l, ids, ids, ids), k_l),
        clip_g, random_params(shapes(clip_g, ids, ids, ids), k_g),
        t5, random_params(shapes(t5, ids, ids), k_t5),
        tokenizer_l=sd3_text.char_tokenizer(77), tokenizer_g=sd3_text.char_tokenizer(77, pad="!"),
        tokenizer_t5=sd3_text.char_tokenizer(max_sequence_length, clip=False),
        max_sequence_length=max_sequence_length, joint_attention_dim=cfg.joint_attention_dim)
    static = SD3Static(transformer, vae, info, text, flow_match.FlowMatchConfig(1000, 3.0), name="sd3-tiny",
                       source="tiny")
    return SD3(params={"transformer": tr_params, "vae": vae_params}, static=static)


def random_params(shapes, key: jax.Array, dtype=np.float32):
    """Random params for a tree of shapes, without compiling an init (fast on a loaded CPU):
    kernels ~ N(0, 1/fan_in), embeddings ~ N(0, 0.02²), biases 0, norm scales/weights 1."""
    rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())

    def one(path, leaf):
        name, shape = str(getattr(path[-1], "key", path[-1])), tuple(leaf.shape)
        if name == "kernel":
            return (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(dtype)
        if name == "embedding":
            return (0.02 * rng.standard_normal(shape)).astype(dtype)
        if name == "bias":
            return np.zeros(shape, dtype)
        return np.ones(shape, dtype)  # LayerNorm/RMSNorm scale, T5 LayerNorm weight

    return jax.tree_util.tree_map_with_path(one, shapes)


def _tokenizer(directory: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def create(weights_dir: str, dtype=jnp.float32, param_dtype=np.float32, remat: bool = False,
           attention_impl: Optional[str] = None, load_text: bool = True, text_dtype=jnp.float32,
           max_sequence_length: int = 256, clip_skip: Optional[int] = None) -> SD3:
    """Load a local diffusers-format SD3 / SD3.5 directory (transformer/, vae/, scheduler/,
    text_encoder{,_2,_3}/, tokenizer{,_2,_3}/); safetensors only, torch-free.

    ``dtype`` / ``param_dtype``: transformer compute / storage dtypes (bf16 on accelerators; fp32 for
    parity). The VAE always runs in float32 (``force_upcast``). ``text_encoder_3`` may be absent
    (T5 dropped: zeros, as diffusers). ``load_text=False`` skips the text encoders entirely.
    """
    if not os.path.isdir(weights_dir):
        raise sd3_io.WeightsError(f"missing SD3 weights directory: {weights_dir}")
    join = lambda *p: os.path.join(weights_dir, *p)  # noqa: E731
    transformer, tr_params = sd3_transformer.load_transformer(join("transformer"), dtype=dtype, param_dtype=param_dtype,
                                                              remat=remat, attention_impl=attention_impl)
    vae, info, vae_params = sd3_vae.load_vae(join("vae"))
    sched_path = join("scheduler", "scheduler_config.json")
    sched = flow_match.FlowMatchConfig.from_dict(sd3_io.read_config(join("scheduler"), "scheduler_config.json")) \
        if os.path.isfile(sched_path) else flow_match.FlowMatchConfig()
    text = None
    if load_text:
        tparam = text_dtype  # numpy .astype accepts jnp.float32 / jnp.bfloat16 (ml_dtypes)
        clip_l, p_l = sd3_text.load_clip(join("text_encoder"), text_dtype, tparam)
        clip_g, p_g = sd3_text.load_clip(join("text_encoder_2"), text_dtype, tparam)
        t5 = p_t5 = tok3 = None
        if os.path.isdir(join("text_encoder_3")):
            t5, p_t5 = sd3_text.load_t5(join("text_encoder_3"), text_dtype, tparam)
            tok3 = _tokenizer(join("tokenizer_3"))
        text = sd3_text.SD3TextEncoders(clip_l, p_l, clip_g, p_g, t5, p_t5, _tokenizer(join("tokenizer")),
                                        _tokenizer(join("tokenizer_2")), tok3, max_sequence_length,
                                        transformer.config.joint_attention_dim, clip_skip)
    static = SD3Static(transformer, vae, info, text, sched, name=os.path.basename(os.path.normpath(weights_dir)),
                       source=weights_dir)
    return SD3(params={"transformer": tr_params, "vae": vae_params}, static=static)
