"""SD3 / SD3.5 MMDiT (``SD3Transformer2DModel``) in Flax linen, and its torch-free weight converter.

Implements the MMDiT (Esser et al. 2024, arXiv 2403.03206, §2 and §5.3.2) with the
semantics of diffusers 0.39.0 ``models/transformers/transformer_sd3.py``: patch embedding with the
center-cropped 2D sin-cos table, timestep + pooled-text embedding, context embedder, joint blocks
with AdaLayerNormZero (SD3.5 dual-attention blocks: SD35AdaLayerNormZeroX + ``attn2``; optional qk
RMSNorm; last block ``context_pre_only``), AdaLayerNormContinuous output norm, unpatchify.

The Flax tree mirrors the diffusers names (``transformer_blocks_{i}/attn/to_out_0/kernel``), so the
converter is a rename + transpose. Layout: latents NCHW ``[B, C, H, W]`` in and out (diffusers'
layout), ``encoder_hidden_states [B, S, joint_attention_dim]``, ``pooled [B, pooled_projection_dim]``,
``timestep [B]`` float = 1000·sigma.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from tdae_jax.models import sd3_io

Dtype = Any


@dataclasses.dataclass(frozen=True)
class SD3Config:
    """The diffusers ``transformer/config.json`` keys (defaults: diffusers' class defaults)."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: Optional[str] = None

    @classmethod
    def from_dict(cls, d: dict) -> "SD3Config":
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        kw["dual_attention_layers"] = tuple(kw.get("dual_attention_layers") or ())
        if kw.get("out_channels") is None:
            kw["out_channels"] = kw.get("in_channels", cls.in_channels)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def validate(self):
        if self.qk_norm not in (None, "rms_norm"):
            raise ValueError(f"SD3 qk_norm={self.qk_norm!r} is not supported (None or 'rms_norm')")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim {self.caption_projection_dim} != heads*head_dim {self.inner_dim}: "
                "diffusers' joint blocks require them equal")
        if not self.pos_embed_max_size:
            raise ValueError("pos_embed_max_size must be set (SD3 crops its position table)")
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} outside 0..{self.num_layers - 1}")


# ---------------------------------------------------------------------------------------- tables
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """diffusers ``get_1d_sincos_pos_embed_from_grid`` (float64 frequencies): ``[len(pos), dim]``."""
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.outer(pos.astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def pos_embed_crop_factors(cfg: SD3Config, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """The center crop of the ``M×M`` sin-cos table for an ``h×w`` token grid, as two factors.

    ``table[r*M + c] = concat(sc(c·s), sc(r·s))`` is separable: returns (cols ``[w, D/2]``,
    rows ``[h, D/2]``) in float64, positions in float32 as diffusers builds them.
    """
    m = cfg.pos_embed_max_size
    if h > m or w > m:
        raise ValueError(f"latent token grid {h}x{w} exceeds pos_embed_max_size {m}")
    base = cfg.sample_size // cfg.patch_size
    grid = np.arange(m, dtype=np.float32) / np.float32(m / base)
    top, left = (m - h) // 2, (m - w) // 2
    d2 = cfg.inner_dim // 2
    return _sincos_1d(d2, grid[left:left + w]), _sincos_1d(d2, grid[top:top + h])


def pos_embed_rows(cfg: SD3Config, index: np.ndarray) -> np.ndarray:
    """Rows ``index`` of the full ``[M², D]`` table (to validate a checkpoint's stored buffer)."""
    m = cfg.pos_embed_max_size
    base = cfg.sample_size // cfg.patch_size
    grid = np.arange(m, dtype=np.float32) / np.float32(m / base)
    d2 = cfg.inner_dim // 2
    return np.concatenate([_sincos_1d(d2, grid[index % m]), _sincos_1d(d2, grid[index // m])], axis=1)


def timestep_embedding(t: jax.Array, dim: int = 256) -> jax.Array:
    """diffusers ``Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)`` in float32: ``[B, dim]``."""
    half = dim // 2
    exponent = (np.float32(-np.log(10000.0)) * np.arange(half, dtype=np.float32)) / np.float32(half)
    freqs = np.exp(exponent.astype(np.float64)).astype(np.float32)  # correctly rounded (torch: 2 of 128 differ by 1 ulp)
    args = jnp.asarray(t, jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


# ---------------------------------------------------------------------------------------- layers
def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in at least float32 (two-pass, like torch)."""
    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nn.Module):
    """diffusers ``RMSNorm(dim, eps=1e-6)`` with a weight (stored as ``scale``); variance in float32."""

    dim: int
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("scale", nn.initializers.ones, (self.dim,), self.param_dtype)
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (y * w.astype(xf.dtype)).astype(x.dtype)


class Linear(nn.Module):
    """Container whose only child is a Dense named ``linear`` (diffusers ``*.linear``)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, emb):
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="linear")(nn.silu(emb))


class MLPEmbed(nn.Module):
    """``linear_1 -> SiLU -> linear_2`` (TimestepEmbedding / PixArtAlphaTextProjection)."""

    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return nn.Dense(self.features, name="linear_2", **kw)(nn.silu(nn.Dense(self.features, name="linear_1", **kw)(x)))


class _Proj(nn.Module):
    features: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.features, dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x)


class FeedForward(nn.Module):
    """``net.0.proj (D->4D) -> GELU(tanh) -> net.2 (4D->D)``."""

    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = jax.nn.gelu(_Proj(4 * self.dim, name="net_0", **kw)(x), approximate=True)
        return nn.Dense(self.dim, name="net_2", **kw)(h)


class Attention(nn.Module):
    """diffusers ``Attention`` + ``JointAttnProcessor2_0``: joint softmax over [image; text] tokens.

    ``joint``: has the ``add_*_proj`` context projections; ``context_pre_only``: no ``to_add_out``.
    """

    heads: int
    head_dim: int
    qk_norm: Optional[str] = None
    joint: bool = True
    context_pre_only: bool = False
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c=None):
        d = self.heads * self.head_dim
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        b, n = x.shape[:2]

        def proj(name, t, norm=None):
            y = nn.Dense(d, name=name, **kw)(t).reshape(b, t.shape[1], self.heads, self.head_dim)
            if norm is not None and self.qk_norm == "rms_norm":
                y = RMSNorm(self.head_dim, param_dtype=self.param_dtype, name=norm)(y)
            return y

        q, k, v = proj("to_q", x, "norm_q"), proj("to_k", x, "norm_k"), proj("to_v", x)
        if self.joint:
            q = jnp.concatenate([q, proj("add_q_proj", c, "norm_added_q")], axis=1)
            k = jnp.concatenate([k, proj("add_k_proj", c, "norm_added_k")], axis=1)
            v = jnp.concatenate([v, proj("add_v_proj", c)], axis=1)
        o = sdpa(q, k, v, self.attention_impl)
        o = o.reshape(b, -1, d)
        ox = nn.Dense(d, name="to_out_0", **kw)(o[:, :n])
        if not self.joint:
            return ox
        oc = None if self.context_pre_only else nn.Dense(d, name="to_add_out", **kw)(o[:, n:])
        return ox, oc


def sdpa(q, k, v, impl: Optional[str] = None):
    """Softmax attention over ``[B, T, heads, hd]``, scale 1/sqrt(hd), no mask.

    ``impl`` None: plain einsum/softmax with logits in ``promote(dtype, float32)`` (exact in float64);
    otherwise ``jax.nn.dot_product_attention(implementation=impl)`` ("xla", "cudnn": fused on GPU, bf16).
    """
    if impl is not None:
        return jax.nn.dot_product_attention(q, k, v, implementation=impl)
    ldt = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=ldt) * (q.shape[-1] ** -0.5)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _modulate(xn, shift, scale):
    return xn * (1 + scale[:, None]) + shift[:, None]


class JointTransformerBlock(nn.Module):
    """diffusers ``JointTransformerBlock`` (``attention.py``). Returns ``(c_out | None, x_out)``."""

    dim: int
    heads: int
    head_dim: int
    context_pre_only: bool = False
    qk_norm: Optional[str] = None
    use_dual_attention: bool = False
    attention_impl: Optional[str] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, c, temb):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        akw = dict(heads=self.heads, head_dim=self.head_dim, qk_norm=self.qk_norm,
                   attention_impl=self.attention_impl, **kw)
        m = jnp.split(Linear((9 if self.use_dual_attention else 6) * self.dim, name="norm1", **kw)(temb),
                      9 if self.use_dual_attention else 6, axis=-1)
        sh_msa, sc_msa, g_msa, sh_mlp, sc_mlp, g_mlp = m[:6]
        ln_x = layer_norm(x)
        xn = _modulate(ln_x, sh_msa, sc_msa)
        if self.context_pre_only:  # AdaLayerNormContinuous: (scale, shift)
            c_sc, c_sh = jnp.split(Linear(2 * self.dim, name="norm1_context", **kw)(temb), 2, axis=-1)
            cn = _modulate(layer_norm(c), c_sh, c_sc)
        else:
            cm = jnp.split(Linear(6 * self.dim, name="norm1_context", **kw)(temb), 6, axis=-1)
            cn = _modulate(layer_norm(c), cm[0], cm[1])
        ox, oc = Attention(joint=True, context_pre_only=self.context_pre_only, name="attn", **akw)(xn, cn)
        x = x + g_msa[:, None] * ox
        if self.use_dual_attention:
            sh2, sc2, g2 = m[6:]
            x = x + g2[:, None] * Attention(joint=False, name="attn2", **akw)(_modulate(ln_x, sh2, sc2))
        x = x + g_mlp[:, None] * FeedForward(self.dim, name="ff", **kw)(_modulate(layer_norm(x), sh_mlp, sc_mlp))
        if self.context_pre_only:
            return None, x
        c = c + cm[2][:, None] * oc
        c = c + cm[5][:, None] * FeedForward(self.dim, name="ff_context", **kw)(_modulate(layer_norm(c), cm[3], cm[4]))
        return c, x


class SD3Transformer2DModel(nn.Module):
    """Flax ``SD3Transformer2DModel``.

    Args (call):
      hidden_states: ``[B, in_channels, H, W]`` latents (H, W multiples of patch_size).
      encoder_hidden_states: ``[B, S, joint_attention_dim]`` (S = 333 for the SD3 pipelines).
      pooled_projections: ``[B, pooled_projection_dim]``.
      timestep: ``[B]`` float, 1000·sigma.
    Returns: ``[B, out_channels, H, W]`` velocity prediction.
    ``remat``: wrap each block in ``nn.remat`` (gradient checkpointing).
    ``attention_impl``: passed to ``jax.nn.dot_product_attention`` (None = XLA; "cudnn" on GPU/bf16).
    """

    config: SD3Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: bool = False
    attention_impl: Optional[str] = None

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, pooled_projections, timestep):
        cfg = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        d, p = cfg.inner_dim, cfg.patch_size
        b, _, hgt, wid = hidden_states.shape
        h, w = hgt // p, wid // p
        if h * p != hgt or w * p != wid:
            raise ValueError(f"latent {hgt}x{wid} is not a multiple of patch_size {p}")
        # patch embedding + cropped sin-cos table (diffusers PatchEmbed)
        x = _PatchEmbed(d, p, name="pos_embed", **kw)(jnp.transpose(hidden_states, (0, 2, 3, 1)))
        cols, rows = pos_embed_crop_factors(cfg, h, w)
        cols, rows = cols.astype(np.float32), rows.astype(np.float32)  # diffusers keeps the table in fp32
        pe = jnp.concatenate([jnp.broadcast_to(cols[None], (h, w, d // 2)),
                              jnp.broadcast_to(rows[:, None], (h, w, d // 2))], -1)
        x = (x + pe.reshape(1, h * w, d)).astype(x.dtype)
        # conditioning
        temb = _TimeTextEmbed(d, name="time_text_embed", **kw)(timestep, pooled_projections)
        c = nn.Dense(cfg.caption_projection_dim, name="context_embedder", **kw)(encoder_hidden_states)
        block_cls = nn.remat(JointTransformerBlock) if self.remat else JointTransformerBlock
        for i in range(cfg.num_layers):
            c, x = block_cls(
                d, cfg.num_attention_heads, cfg.attention_head_dim, context_pre_only=i == cfg.num_layers - 1,
                qk_norm=cfg.qk_norm, use_dual_attention=i in cfg.dual_attention_layers,
                attention_impl=self.attention_impl, name=f"transformer_blocks_{i}", **kw)(x, c, temb)
        sc, sh = jnp.split(Linear(2 * d, name="norm_out", **kw)(temb), 2, axis=-1)
        x = _modulate(layer_norm(x), sh, sc)
        y = nn.Dense(p * p * cfg.out_channels, name="proj_out", **kw)(x)
        y = y.reshape(b, h, w, p, p, cfg.out_channels)
        return jnp.einsum("nhwpqc->nchpwq", y).reshape(b, cfg.out_channels, h * p, w * p)


class _PatchEmbed(nn.Module):
    dim: int
    patch: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x_nhwc):
        y = nn.Conv(self.dim, (self.patch, self.patch), strides=(self.patch, self.patch), padding="VALID",
                    dtype=self.dtype, param_dtype=self.param_dtype, name="proj")(x_nhwc)
        return y.reshape(y.shape[0], -1, self.dim)


class _TimeTextEmbed(nn.Module):
    dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep, pooled):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        t = timestep_embedding(jnp.broadcast_to(jnp.asarray(timestep, jnp.float32).reshape(-1), (pooled.shape[0],)))
        return MLPEmbed(self.dim, name="timestep_embedder", **kw)(t.astype(pooled.dtype)) + \
            MLPEmbed(self.dim, name="text_embedder", **kw)(pooled)


# ---------------------------------------------------------------------------------------- weights
def init_shapes(model: SD3Transformer2DModel) -> dict:
    """Param shapes (``jax.eval_shape`` of init on a minimal input; nothing is allocated)."""
    cfg = model.config
    p = cfg.patch_size
    args = (jnp.zeros((1, cfg.in_channels, p, p)), jnp.zeros((1, 1, cfg.joint_attention_dim)),
            jnp.zeros((1, cfg.pooled_projection_dim)), jnp.zeros((1,)))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), *args))["params"]


def convert_state_dict(tensors: dict, where: dict, model: SD3Transformer2DModel, dtype=np.float32) -> dict:
    """diffusers ``SD3Transformer2DModel`` state dict (numpy) -> Flax params, strictly checked.

    ``pos_embed.pos_embed`` is not a parameter: a sample of its rows is compared with the recomputed
    table (atol: 1e-5, or the dtype's eps for half-precision checkpoints) and it is dropped.
    """
    cfg = model.config
    converted = {}
    for name, arr in tensors.items():
        fname = where.get(name, "<memory>")
        if name == "pos_embed.pos_embed":
            m2 = cfg.pos_embed_max_size ** 2
            if arr.shape != (1, m2, cfg.inner_dim):
                raise sd3_io.WeightsError(f"tensor {name!r} in {fname} has shape {arr.shape}; "
                                          f"expected (1, {m2}, {cfg.inner_dim}) from pos_embed_max_size")
            idx = np.unique(np.linspace(0, m2 - 1, 257).astype(np.int64))
            ref = pos_embed_rows(cfg, idx)
            atol = 1e-5 if arr.dtype in (np.float32, np.float64) else float(ml_dtypes.finfo(arr.dtype).eps)  # half: 1 ulp at 1
            err = float(np.max(np.abs(np.asarray(arr[0, idx], np.float64) - ref)))
            if err > atol:
                raise sd3_io.WeightsError(f"tensor {name!r} in {fname} differs from the sin-cos table by {err:.2e} "
                                          "(sample_size / pos_embed_max_size in config.json do not match the weights?)")
            continue
        path = sd3_io.torch_key_to_path(name)
        leaf = path[-1]
        a = np.asarray(arr)
        if leaf == "weight" and a.ndim == 4:
            path, a = path[:-1] + ("kernel",), a.transpose(2, 3, 1, 0)
        elif leaf == "weight" and a.ndim == 2:
            path, a = path[:-1] + ("kernel",), a.T
        elif leaf == "weight" and a.ndim == 1:
            path = path[:-1] + ("scale",)
        converted[path] = (np.ascontiguousarray(a.astype(dtype)), name, fname)
    expected = sd3_io.flat_shapes(init_shapes(model))
    return sd3_io.check_and_unflatten(converted, expected, "transformer")


def load_transformer(directory: str, dtype=jnp.float32, param_dtype=np.float32, remat: bool = False,
                     attention_impl: Optional[str] = None):
    """Load ``<root>/transformer`` (config.json + safetensors, single or sharded) -> (module, params)."""
    cfg = SD3Config.from_dict(sd3_io.read_config(directory))
    model = SD3Transformer2DModel(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, attention_impl=attention_impl)
    tensors, where = sd3_io.load_state_dict(directory, "diffusion_pytorch_model")
    return model, convert_state_dict(tensors, where, model, dtype=param_dtype)


# ---------------------------------------------------------------------------------------- sharding
_COLUMN = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "net_0")
_ROW = ("to_out_0", "to_add_out", "net_2")


def partition_spec(path: tuple[str, ...], shape: tuple[int, ...], axis: str = "model"):
    """Megatron-style rule for one param: q/k/v and the first FF matmul split their output dim over
    ``axis`` (heads stay whole when heads % axis_size == 0), the attention output and the second FF
    matmul split their input dim; everything else (norms, modulation, embeddings) is replicated."""
    from jax.sharding import PartitionSpec as P

    names = set(path)
    if names & set(_COLUMN):
        return P(None, axis) if len(shape) == 2 else P(axis)
    if names & set(_ROW) and len(shape) == 2:
        return P(axis, None)
    return P()


def param_shardings(params, mesh, axis: str = "model"):
    """``NamedSharding`` tree for the transformer params over ``mesh``'s ``axis`` (see ``partition_spec``)."""
    from jax.sharding import NamedSharding

    size = mesh.shape[axis]

    def one(kp, leaf):
        path = tuple(getattr(k, "key", str(k)) for k in kp)
        spec = partition_spec(path, leaf.shape, axis)
        if any(a == axis and leaf.shape[i] % size for i, a in enumerate(spec)):
            spec = type(spec)()  # not divisible: replicate
        return NamedSharding(mesh, spec)

    return jax.tree_util.tree_map_with_path(one, params)
