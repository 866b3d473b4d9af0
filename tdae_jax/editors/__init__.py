"""The threats, simulated: victim editors as jit-compiled sampling loops (TDAE §IV-A, the editors).

Each editor is a pure function ``edit(surrogate, images, emb, uncond_emb, keys, config, mask=None, noise=None)
-> images [B,H,W,3] in [0,1]`` reproducing a diffusers 0.39.0 pipeline at its defaults:

- ``img2img`` (alias ``sdedit``): ``StableDiffusionImg2ImgPipeline`` (strength 0.8, 50 steps, CFG 7.5);
- ``ip2p``: ``StableDiffusionInstructPix2PixPipeline`` (100 steps, text CFG 7.5, image CFG 1.5, three branches);
- ``inpaint``: ``StableDiffusionInpaintPipeline`` with a 9-channel UNet (strength 1.0, 50 steps, CFG 7.5);
- ``sd3_img2img`` (alias ``sd3``): ``StableDiffusion3Img2ImgPipeline`` (strength 0.6, 50 steps, CFG 7.0, flow-matching
  Euler), on an SD3 surrogate; its own config and ``EditFn`` (``editors/sd3_img2img.py``), text = (embeds, pooled).

The sampler is the model directory's scheduler (``scheduler_config["_class_name"]``, as ``from_pretrained`` does),
or the family's shipped default when the surrogate has none: SD 1.x = PNDM (PLMS, PRK skipped); InstructPix2Pix
= Euler-ancestral and SD-inpainting = DDIM (both as recalled from the hub checkpoints; verify against the
model's ``scheduler_config.json``). All randomness is per image: the draws of image ``i`` come from ``keys[i]``
(``fold_in(key, stream)``), so a batch of 4 equals 4 batches of 1 and edit(clean) / edit(protected) share their
noise when given the same keys. Any draw can be injected instead (``noise={"encode", "latents", "masked",
"steps"}``), which is how the PyTorch parity tests feed both sides the same numbers.
"""
from __future__ import annotations

import importlib
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

from tdae_jax.editors import schedulers
from tdae_jax.editors.common import (  # the shared pieces, re-exported (editors.Editor, editors.get_noise, ...)
    ALIASES, FAMILY, FAMILY_SCHEDULER, FAMILY_SCHEDULER_OPTIONS, KINDS, PIPELINE_DEFAULTS, STREAMS, Editor,
    as_keys, broadcast_uncond, encode, finish, get_noise, get_step_noise, latent_shape, plan_for, starts_from_noise,
    unet_branches,
)

MODULES = {"img2img": "tdae_jax.editors.img2img", "ip2p": "tdae_jax.editors.ip2p",
           "inpaint": "tdae_jax.editors.inpaint", "sd3_img2img": "tdae_jax.editors.sd3_img2img"}
SD3_KINDS = ("sd3_img2img",)  # not ``Editor`` kinds: flow matching, see editors/sd3_img2img.py


# ------------------------------------------------------------------------------------------------ registry
def editor_module(kind: str):
    kind = ALIASES.get(kind, kind)
    if kind not in MODULES:
        raise ValueError(f"unknown editor {kind!r}; known: {KINDS + SD3_KINDS}")
    return importlib.import_module(MODULES[kind])


_JITS: dict = {}


def jitted(kind: str, compiler_options: Mapping | None = None):
    """The jit-compiled editor of ``kind`` (``config`` static), one per set of XLA ``compiler_options``
    (e.g. ``{"xla_backend_optimization_level": 0}`` trades run time for compile time in tests)."""
    mod = editor_module(kind)
    if not compiler_options:
        return mod.edit_jit
    key = (mod.__name__, tuple(sorted(dict(compiler_options).items())))
    if key not in _JITS:
        _JITS[key] = jax.jit(mod.edit, static_argnames=("config",), compiler_options=dict(compiler_options))
    return _JITS[key]


class EditFn:
    """``edit_fn(images, emb, uncond_emb, keys, mask=None, noise=None) -> images`` bound to a surrogate.

    With a ``mesh``, the batch is padded to a multiple of the device count, sharded over its ``data`` axis
    (params replicated), and the padding is cut from the result. ``config`` is the resolved :class:`Editor`.
    """

    def __init__(self, surrogate, config: Editor, mesh=None, compiler_options: Mapping | None = None):
        from tdae_jax.parallel import mesh as mesh_lib

        self.config = config.resolve(surrogate)
        self.plan = plan_for(self.config, surrogate)  # validates the scheduler options now, not at trace time
        self.mesh = mesh
        self.surrogate = surrogate if mesh is None else mesh_lib.replicate(surrogate, mesh)
        self._fn = jitted(self.config.kind, compiler_options)

    def __call__(self, images, emb, uncond_emb, keys, mask=None, noise=None):
        images = jnp.asarray(images, jnp.float32)
        emb = jnp.asarray(emb)
        uncond_emb = broadcast_uncond(uncond_emb, emb)
        keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
        if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
            keys = jax.random.key_data(keys)
        if self.mesh is None:
            return self._fn(self.surrogate, images, emb, uncond_emb, keys, self.config, mask, noise)
        return self._sharded(images, emb, uncond_emb, keys, mask, noise)

    def _sharded(self, images, emb, uncond_emb, keys, mask, noise):
        from tdae_jax.parallel import mesh as mesh_lib

        n = images.shape[0]
        place = lambda a, axis=0: mesh_lib.pad_and_shard(a, self.mesh, n, axis)  # noqa: E731
        noise = None if noise is None else {k: place(v, 1 if k == "steps" else 0) for k, v in noise.items()
                                            if v is not None}
        out = self._fn(self.surrogate, place(images), place(emb), place(uncond_emb), place(keys), self.config,
                       None if mask is None else place(mask), noise)
        return out[:n]

    def from_prompts(self, images, prompts: Sequence[str], keys, negative_prompts: str | Sequence[str] = "",
                     mask=None, noise=None):
        """Convenience: embed ``prompts`` (and the negative prompts, ``""`` as diffusers) with the surrogate's
        own tokenizer and text encoder, then edit."""
        emb, uncond = embed_prompts(self.surrogate, prompts, negative_prompts)
        return self(images, emb, uncond, keys, mask=mask, noise=noise)


_embed_ids = jax.jit(lambda s, ids: s.embed_ids(ids))


def embed_prompts(surrogate, prompts: Sequence[str], negative_prompts: str | Sequence[str] = ""):
    """``(emb [B,T,D], uncond_emb [B,T,D])`` for prompt strings (negative prompt default ``""``).
    SD3: ``((prompt_embeds, pooled), (negative prompt_embeds, pooled))``, encoded host-side."""
    if getattr(surrogate, "family", None) == "sd3":
        from tdae_jax.editors import sd3_img2img
        return sd3_img2img.embed_prompts(surrogate, prompts, negative_prompts)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    neg = [negative_prompts] * len(prompts) if isinstance(negative_prompts, str) else list(negative_prompts)
    if len(neg) != len(prompts):
        raise ValueError(f"{len(neg)} negative prompts for {len(prompts)} prompts")
    ids = surrogate.tokenize(prompts + neg)
    e = _embed_ids(surrogate, ids)
    return e[: len(prompts)], e[len(prompts):]


def make_editor(kind: str, surrogate, mesh=None, compiler_options: Mapping | None = None, **cfg) -> EditFn:
    """Registry entry point: ``make_editor("img2img", sd, strength=0.6, scheduler="ddim")``; ``cfg`` are
    :class:`Editor` fields; ``mesh``: shard the batch over its data axis. ``sd3_img2img``: an
    ``sd3_img2img.SD3EditFn`` (``cfg``: ``SD3Img2Img`` fields)."""
    if ALIASES.get(kind, kind) in SD3_KINDS:
        from tdae_jax.editors import sd3_img2img
        return sd3_img2img.make(surrogate, mesh=mesh, compiler_options=compiler_options, **cfg)
    return EditFn(surrogate, Editor(kind=kind, **cfg), mesh=mesh, compiler_options=compiler_options)


__all__ = ["ALIASES", "Editor", "EditFn", "FAMILY", "FAMILY_SCHEDULER", "FAMILY_SCHEDULER_OPTIONS", "KINDS", "MODULES",
           "PIPELINE_DEFAULTS", "SD3_KINDS", "STREAMS", "as_keys", "broadcast_uncond", "editor_module", "embed_prompts",
           "encode", "finish", "get_noise", "get_step_noise", "jitted", "latent_shape", "make_editor", "plan_for",
           "schedulers", "starts_from_noise", "unet_branches"]
