"""SD3 img2img, the victim editor for an SD3 surrogate: diffusers 0.39.0 ``StableDiffusion3Img2ImgPipeline``
(TDAE §IV-A: the "SD3" editor, at the pipeline's standard settings).

Pipeline defaults (``__call__`` of diffusers 0.39.0): **strength 0.6, 50 steps, guidance 7.0**, negative prompt
``""`` (encoded, not zeros), FlowMatchEulerDiscreteScheduler from the model's scheduler config (shift 3.0 for the
released models; ``models/flow_match.py``). The image is used at its own size (the pipeline would resize to
1024² unless height/width are passed: we always pass the real size). Steps:

    sigmas = set_timesteps(n)  (shifted twice, final 0);  t_start = int(n - min(n·strength, n))
    z_0 = (E(x).sample - shift_factor) · scaling_factor                     (``latent_dist.sample``)
    z   = (1 - σ[t_start]) z_0 + σ[t_start] ε                              (``scheduler.scale_noise``)
    for i in t_start..n-1:  v = v_u + g (v_c - v_u)   (CFG when g > 1; batch [uncond, cond])
                            z = z + (σ[i+1] - σ[i]) v  (float32 Euler step, ``scheduler.step``)
    image = clip(D(z / scaling_factor + shift_factor) / 2 + 0.5, 0, 1)

One jitted ``lax.scan`` over the ``n - t_start`` steps; every randomness is per image (``keys[i]``: posterior
noise ``fold_in(key, 1)``, start noise ``fold_in(key, 2)``, as ``editors.STREAMS``) or injected
(``noise={"encode", "latents"}``, how the PyTorch parity test feeds both sides the same numbers). Text
conditioning is ``(prompt_embeds [B,S,D], pooled [B,P])`` for the prompt and for the negative prompt.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.editors import common as E
from tdae_jax.models import flow_match

KIND = "sd3_img2img"
PIPELINE_DEFAULTS = {"num_inference_steps": 50, "strength": 0.6, "guidance_scale": 7.0}  # diffusers 0.39.0
SCHEDULERS = (None, "flow_match_euler", "FlowMatchEulerDiscreteScheduler")


@dataclasses.dataclass(frozen=True)
class SD3Img2Img:
    """Editor configuration (hashable: a static jit argument). ``None`` = the pipeline default.

    ``latent_sample``: ``"sample"`` (diffusers) or ``"mean"``; ``output``: ``"image"`` or ``"latent"``;
    ``remat``: ``jax.checkpoint`` each denoising step (only matters when differentiated)."""

    num_inference_steps: int | None = None
    strength: float | None = None
    guidance_scale: float | None = None
    latent_sample: str = "sample"
    output: str = "image"
    remat: bool = False
    kind: str = KIND

    def __post_init__(self):
        if self.latent_sample not in ("sample", "mean"):
            raise ValueError(f"latent_sample must be 'sample' or 'mean', got {self.latent_sample!r}")
        if self.output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {self.output!r}")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")

    def resolve(self, surrogate=None) -> "SD3Img2Img":
        if surrogate is not None and getattr(surrogate, "family", None) != "sd3":
            raise ValueError(f"editor {KIND!r} needs an SD3 surrogate, got family {getattr(surrogate, 'family', None)!r}")
        d = PIPELINE_DEFAULTS
        return dataclasses.replace(
            self, num_inference_steps=self.num_inference_steps or d["num_inference_steps"],
            strength=d["strength"] if self.strength is None else self.strength,
            guidance_scale=d["guidance_scale"] if self.guidance_scale is None else self.guidance_scale)


def plan(config: SD3Img2Img, surrogate) -> tuple[np.ndarray, np.ndarray]:
    """Host-side schedule of the steps run: (timesteps ``[k]`` = 1000σ, sigmas ``[k + 1]``), float32."""
    config = config.resolve(surrogate)
    ts, sig = flow_match.set_timesteps(surrogate.static.scheduler, config.num_inference_steps)
    start = flow_match.img2img_start(config.num_inference_steps, config.strength)
    return ts[start:], sig[start:]


def _pair(emb, like=None):
    """``(prompt_embeds [B,S,D], pooled [B,P])``, broadcast to ``like``'s batch (negative prompt of one row)."""
    if not isinstance(emb, (tuple, list)) or len(emb) != 2:
        raise ValueError("SD3 text conditioning is a pair (prompt_embeds [B,S,D], pooled [B,P])")
    pe, pooled = jnp.asarray(emb[0]), jnp.asarray(emb[1])
    pe, pooled = (pe[None] if pe.ndim == 2 else pe), (pooled[None] if pooled.ndim == 1 else pooled)
    if like is not None:
        pe = jnp.broadcast_to(pe, like[0].shape).astype(like[0].dtype)
        pooled = jnp.broadcast_to(pooled, like[1].shape).astype(like[1].dtype)
    return pe, pooled


def edit(surrogate, images, emb, uncond_emb, keys, config: SD3Img2Img, mask=None, noise=None):
    """Edited images.

    Args:
      surrogate: ``models.sd3.SD3``.
      images: ``[B,H,W,3]`` float32 in [0,1] (H, W multiples of VAE factor x patch size).
      emb, uncond_emb: ``(prompt_embeds [B,S,D], pooled [B,P])`` of the prompt and of the negative prompt
        (``""``; a single row is broadcast).
      keys: ``[B]`` per-image keys (typed, or raw ``[B,2] uint32``).
      config: :class:`SD3Img2Img` (resolved here).
      mask: unused (same signature as every editor).
      noise: optional injected draws ``{"encode": [B,16,h,w], "latents": [B,16,h,w]}``.
    Returns:
      ``[B,H,W,3]`` float32 in [0,1] (or the final latents ``[B,16,h,w]`` with ``output="latent"``).
    """
    del mask
    config = config.resolve(surrogate)
    ts, sig = plan(config, surrogate)
    images = jnp.asarray(images, jnp.float32)
    b = images.shape[0]
    keys = E.as_keys(keys, b)
    shape = E.latent_shape(surrogate, images)
    pe, pooled = _pair(emb)
    upe, upooled = _pair(uncond_emb, (pe, pooled))

    mean, std = surrogate.moments(images)
    raw = mean if config.latent_sample == "mean" else mean + std * E.get_noise(noise, "encode", keys, shape)
    z = flow_match.scale_noise(surrogate.normalize(raw), E.get_noise(noise, "latents", keys, shape), sig[0])
    g = float(config.guidance_scale)
    cfg_on = g > 1.0  # diffusers: do_classifier_free_guidance = guidance_scale > 1

    # image-major [uncond_0, cond_0, uncond_1, ...] rows: a batch-sharded z stays local
    inter = lambda u, c: jnp.stack([u, c], 1).reshape((2 * b,) + c.shape[1:])  # noqa: E731
    pe2, pooled2 = (inter(upe, pe), inter(upooled, pooled)) if cfg_on else (pe, pooled)

    def step(z, i):
        t = jnp.asarray(ts)[i]
        if cfg_on:
            v = surrogate.velocity_t(jnp.repeat(z, 2, axis=0), t, pe2, pooled2).astype(jnp.float32)
            v = v.reshape((b, 2) + v.shape[1:])
            v = v[:, 0] + g * (v[:, 1] - v[:, 0])
        else:
            v = surrogate.velocity_t(z, t, pe2, pooled2).astype(jnp.float32)
        s = jnp.asarray(sig)
        return flow_match.euler_step(v, s[i], s[i + 1], z), None

    body = jax.checkpoint(step) if config.remat else step
    z, _ = jax.lax.scan(body, z, jnp.arange(ts.shape[0]))
    if config.output == "latent":
        return z
    return jnp.clip(surrogate.decode(z).astype(jnp.float32), 0.0, 1.0)


edit_jit = jax.jit(edit, static_argnames=("config",))
_JITS: dict = {}


def _jitted(compiler_options: Mapping | None):
    if not compiler_options:
        return edit_jit
    key = tuple(sorted(dict(compiler_options).items()))
    if key not in _JITS:
        _JITS[key] = jax.jit(edit, static_argnames=("config",), compiler_options=dict(compiler_options))
    return _JITS[key]


class SD3EditFn:
    """``edit_fn(images, emb, uncond_emb, keys, mask=None, noise=None) -> images`` bound to an SD3 surrogate;
    the counterpart of ``editors.EditFn`` (``emb`` / ``uncond_emb`` are ``(prompt_embeds, pooled)`` pairs).
    With a ``mesh`` the batch is padded to a multiple of the device count and sharded over its first axis."""

    def __init__(self, surrogate, config: SD3Img2Img, mesh=None, compiler_options: Mapping | None = None):
        from tdae_jax.parallel import mesh as mesh_lib

        self.config = config.resolve(surrogate)
        self.plan = plan(self.config, surrogate)
        self.mesh = mesh
        self.surrogate = surrogate if mesh is None else mesh_lib.replicate(surrogate, mesh)
        self._fn = _jitted(compiler_options)

    def __call__(self, images, emb, uncond_emb, keys, mask=None, noise=None):
        images = jnp.asarray(images, jnp.float32)
        emb = _pair(emb)
        uncond_emb = _pair(uncond_emb, emb)
        keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
        if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
            keys = jax.random.key_data(keys)
        args = (images, emb, uncond_emb, keys, None if noise is None else {k: v for k, v in noise.items()
                                                                           if v is not None})
        if self.mesh is None:
            return self._fn(self.surrogate, *args[:4], self.config, None, args[4])
        return self._sharded(*args)

    def _sharded(self, images, emb, uncond_emb, keys, noise):
        from tdae_jax.parallel import mesh as mesh_lib

        n = images.shape[0]
        place = lambda a: mesh_lib.pad_and_shard(a, self.mesh, n)  # noqa: E731
        images, emb, uncond_emb, keys, noise = jax.tree.map(place, (images, emb, uncond_emb, keys, noise))
        return self._fn(self.surrogate, images, emb, uncond_emb, keys, self.config, None, noise)[:n]

    def from_prompts(self, images, prompts: Sequence[str], keys, negative_prompts: str | Sequence[str] = "",
                     mask=None, noise=None):
        """Embed ``prompts`` (and the negative prompts, ``""`` as diffusers) with the surrogate's three text
        encoders (host-side), then edit."""
        emb, uncond = embed_prompts(self.surrogate, prompts, negative_prompts)
        return self(images, emb, uncond, keys, mask=mask, noise=noise)


def embed_prompts(surrogate, prompts: Sequence[str], negative_prompts: str | Sequence[str] = ""):
    """``((prompt_embeds, pooled), (negative prompt_embeds, negative pooled))`` of prompt strings."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    neg = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(neg) != len(prompts):
        raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
    pe, pooled = surrogate.embed_text(prompts + neg)
    k = len(prompts)
    return (pe[:k], pooled[:k]), (pe[k:], pooled[k:])


def make(surrogate, mesh=None, compiler_options: Mapping | None = None, *, kind: str = KIND,
         scheduler: str | None = None, eta: float | None = 0.0, image_guidance_scale=None,
         scheduler_options=(), **cfg) -> SD3EditFn:
    """``editors.make_editor("sd3_img2img", sd3, ...)``. ``cfg``: :class:`SD3Img2Img` fields. The generic editor
    options ``scheduler`` (only the flow-matching Euler scheduler), ``eta`` (0) and ``scheduler_options`` (none)
    are checked; ``image_guidance_scale`` (InstructPix2Pix only) is ignored."""
    del kind, image_guidance_scale
    if scheduler not in SCHEDULERS:
        raise ValueError(f"{KIND}: only the FlowMatchEulerDiscreteScheduler is implemented, got {scheduler!r}")
    if eta:
        raise ValueError(f"{KIND}: the flow-matching Euler sampler is deterministic (eta must be 0), got {eta}")
    if scheduler_options:
        raise ValueError(f"{KIND}: scheduler options are not supported, got {scheduler_options!r}")
    return SD3EditFn(surrogate, SD3Img2Img(**cfg), mesh=mesh, compiler_options=compiler_options)
