"""The pieces every editor module shares: the :class:`Editor` configuration and its pipeline defaults, the
per-image noise streams, and the encode / guided-UNet / decode steps (the editors' package docstring,
``editors/__init__.py``, describes the editors; it re-exports every name here, so ``editors.Editor`` etc. stay).

The editor modules (``img2img``, ``ip2p``, ``inpaint``, ``sd3_img2img``) import this module, not the package,
so that the package can import them without a cycle. The defaults restate diffusers 0.39.0's
``StableDiffusionImg2ImgPipeline`` / ``StableDiffusionInstructPix2PixPipeline`` / ``StableDiffusionInpaintPipeline``
``__call__`` signatures and ``prepare_latents``, as the package docstring says.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from tdae_jax.editors import schedulers

KINDS = ("img2img", "ip2p", "inpaint")
ALIASES = {"sdedit": "img2img", "instructpix2pix": "ip2p", "inpainting": "inpaint", "sd3": "sd3_img2img"}
FAMILY = {"img2img": "sd", "ip2p": "ip2p", "inpaint": "inpaint"}
PIPELINE_DEFAULTS = {  # diffusers 0.39.0 __call__ defaults
    "img2img": {"num_inference_steps": 50, "strength": 0.8},
    "ip2p": {"num_inference_steps": 100, "strength": None},
    "inpaint": {"num_inference_steps": 50, "strength": 1.0},
}
# Editors whose pipeline starts from pure noise at strength >= 1 (diffusers' inpainting ``is_strength_max``);
# img2img noises the image's latents even at strength 1; InstructPix2Pix (no strength) always starts from noise.
NOISE_AT_FULL_STRENGTH = ("inpaint",)
FAMILY_SCHEDULER = {"sd": "pndm", "ip2p": "euler_ancestral", "inpaint": "ddim"}
# Options of the shipped SD configs that a bare scheduler config (tiny / miniature models) may lack: SD's PNDM
# skips the PRK warm-up. Applied when the model's config does not set them; explicit options win.
FAMILY_SCHEDULER_OPTIONS = {"pndm": {"skip_prk_steps": True}}
STREAMS = {"encode": 1, "latents": 2, "masked": 3, "steps": 4}


def starts_from_noise(kind: str, strength: float | None) -> bool:
    """Whether the ``kind`` editor's chain starts from pure noise at ``strength`` (None: the editor has none)."""
    return strength is None or (kind in NOISE_AT_FULL_STRENGTH and strength >= 1.0)


@dataclasses.dataclass(frozen=True)
class Editor:
    """Victim-editor configuration (hashable: it is a static jit argument). ``None`` = the pipeline default.

    ``latent_sample``: how img2img / inpaint encode images, ``"sample"`` (diffusers: ``latent_dist.sample``)
    or ``"mean"``. ``scheduler_options``: extra ``from_config`` keys, e.g. ``{"timestep_spacing": "trailing"}``.
    ``output``: ``"image"`` (``[B,H,W,3]`` in [0,1], clipped as ``postprocess`` does) or ``"latent"``.
    """

    kind: str = "img2img"
    scheduler: str | None = None
    num_inference_steps: int | None = None
    strength: float | None = None
    guidance_scale: float = 7.5
    image_guidance_scale: float = 1.5
    eta: float = 0.0
    latent_sample: str = "sample"
    scheduler_options: Any = ()
    output: str = "image"
    remat: bool = False

    def __post_init__(self):
        kind = ALIASES.get(self.kind, self.kind)
        if kind not in KINDS:
            raise ValueError(f"unknown editor {self.kind!r}; known: {KINDS} (aliases {sorted(ALIASES)})")
        object.__setattr__(self, "kind", kind)
        opts = self.scheduler_options
        opts = tuple(sorted(dict(opts).items())) if isinstance(opts, Mapping) else tuple(tuple(p) for p in opts)
        object.__setattr__(self, "scheduler_options", opts)
        if self.scheduler is not None:
            object.__setattr__(self, "scheduler", schedulers.canonical(self.scheduler))
        if self.latent_sample not in ("sample", "mean"):
            raise ValueError(f"latent_sample must be 'sample' or 'mean', got {self.latent_sample!r}")
        if self.output not in ("image", "latent"):
            raise ValueError(f"output must be 'image' or 'latent', got {self.output!r}")
        if self.kind == "ip2p" and self.strength is not None:
            raise ValueError("InstructPix2Pix has no strength (it starts from pure noise)")
        if self.strength is not None and not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.num_inference_steps is not None and self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {self.num_inference_steps}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")

    def resolve(self, surrogate) -> "Editor":
        """Fill every ``None`` from the pipeline defaults and the surrogate's scheduler config."""
        if surrogate.family != FAMILY[self.kind]:
            raise ValueError(f"editor {self.kind!r} needs a {FAMILY[self.kind]!r} surrogate "
                             f"(UNet with the matching input channels), got family {surrogate.family!r}")
        d = PIPELINE_DEFAULTS[self.kind]
        sched, opts, model_cfg = self.scheduler, dict(self.scheduler_options), surrogate.static.scheduler_config
        if sched is None:  # the model's scheduler class, else (none or unsupported) the family's shipped sampler
            sched = schedulers.CLASS_NAMES.get(model_cfg.get("_class_name"), FAMILY_SCHEDULER[surrogate.family])
        shipped = FAMILY_SCHEDULER_OPTIONS.get(sched, {})
        opts = {**{k: v for k, v in shipped.items() if k not in model_cfg}, **opts}
        return dataclasses.replace(
            self, scheduler=sched, scheduler_options=tuple(sorted(opts.items())),
            num_inference_steps=self.num_inference_steps or d["num_inference_steps"],
            strength=d["strength"] if self.strength is None else self.strength)


def plan_for(config: Editor, surrogate) -> schedulers.Plan:
    """The sampling schedule of a resolved ``config`` on ``surrogate`` (host-side, cheap)."""
    st = surrogate.static
    cfg = schedulers.resolve_config(config.scheduler, st.scheduler_config, st.prediction_type,
                                    dict(config.scheduler_options))
    return schedulers.make_plan(config.scheduler, cfg, st.alphas_cumprod, config.num_inference_steps,
                                config.strength, config.eta)


# ------------------------------------------------------------------------------------------------ shared pieces
def as_keys(keys, batch: int) -> jax.Array:
    """``[B]`` typed keys from typed keys or raw ``[B, 2] uint32`` key data."""
    keys = keys if isinstance(keys, jax.Array) else jnp.asarray(keys)
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
        keys = jax.random.wrap_key_data(keys)
    if keys.shape != (batch,):
        raise ValueError(f"need one key per image: keys.shape={keys.shape}, batch={batch}")
    return keys


def latent_shape(surrogate, images) -> tuple[int, int, int]:
    b, h, w, _ = images.shape
    f = surrogate.downsample
    if h % f or w % f:
        raise ValueError(f"image size {h}x{w} is not a multiple of the VAE factor {f}")
    return surrogate.latent_channels, h // f, w // f


def get_noise(noise: Mapping | None, name: str, keys: jax.Array, shape) -> jax.Array:
    """Injected ``noise[name]`` ``[B,*shape]``, else one N(0, I) draw per image from ``fold_in(key, stream)``."""
    if noise is not None and noise.get(name) is not None:
        return jnp.asarray(noise[name], jnp.float32)
    s = STREAMS[name]
    return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, s), shape, jnp.float32))(keys)


def get_step_noise(noise: Mapping | None, keys: jax.Array, plan: schedulers.Plan, shape) -> jax.Array | None:
    """``[N,B,*shape]`` per-step noise of a stochastic scheduler (step ``i`` of image ``b``:
    ``fold_in(fold_in(keys[b], 4), i)``)."""
    if not plan.stochastic:
        return None
    if noise is not None and noise.get("steps") is not None:
        return jnp.asarray(noise["steps"], jnp.float32)
    steps = jnp.arange(plan.num_steps)

    def per_image(k):
        k = jax.random.fold_in(k, STREAMS["steps"])
        return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(k, i), shape, jnp.float32))(steps)

    return jnp.swapaxes(jax.vmap(per_image)(keys), 0, 1)


def encode(surrogate, images, eps=None) -> jax.Array:
    """Scaled latents ``[B,C,h,w]``: posterior mean (``eps=None``) or ``mean + std*eps`` (``latent_dist.sample``)."""
    mean, std = surrogate.moments(images)
    z = mean if eps is None else mean + std * eps
    return z * surrogate.static.scaling_factor


def unet_branches(surrogate, z, t, embs: Sequence[jax.Array], **conds: Sequence[jax.Array]) -> jax.Array:
    """One UNet call over ``K`` guidance branches, interleaved per image (``[B*K]`` rows, image-major, so a
    batch-sharded ``z`` stays local). ``conds``: extra inputs of ``unet_out``, one ``[B,...]`` per branch.
    Returns ``[B, K, C, h, w]``."""
    b, k = z.shape[0], len(embs)
    flat = lambda xs: jnp.stack(xs, 1).reshape((b * k,) + xs[0].shape[1:])  # noqa: E731
    out = surrogate.unet_out(flat([z] * k), t, flat(list(embs)), **{n: flat(list(v)) for n, v in conds.items()})
    return out.reshape((b, k) + out.shape[1:]).astype(jnp.float32)


def finish(surrogate, z, config: Editor) -> jax.Array:
    if config.output == "latent":
        return z
    return jnp.clip(surrogate.decode(z).astype(jnp.float32), 0.0, 1.0)


def broadcast_uncond(uncond_emb, emb) -> jax.Array:
    u = jnp.asarray(uncond_emb)
    u = u[None] if u.ndim == 2 else u
    return jnp.broadcast_to(u, emb.shape).astype(emb.dtype)
