"""Pieces shared by the host objectives: per-image noise draws, the family-aware UNet call, and PhotoGuard's
target images and repeated passes (``photoguard.py`` and ``photoguard_flow.py`` both use them).

An objective is ``loss_fn(delta, batch, emb, keys) -> [B]``, the per-image value to **minimize**
over the image perturbation (docs/design.md convention 2). TDAE's maximized disruption loss L enters as
``O = -L`` (TDAE Eq. 1 maximizes L). All randomness comes from ``keys: [B]`` (one typed key per image), so
two evaluations at different deltas within one FDM iteration share xi (the same t, noise and VAE sample).

``batch`` keys used here: ``x0 [B,H,W,3]`` (clean image), ``uncond [B,T,D]`` (empty-prompt
embedding, for classifier-free guidance), ``mask [B,H,W,1]`` (inpainting, 1 = region to fill),
``token_mask [B,T]`` (tokens whose attention SA suppresses); SD3 (``models/sd3.py``): ``pooled [B,P]`` and
``uncond_pooled [B,P]``, the fixed pooled projections of the prompt and of the negative prompt.

SD3 timesteps: the integer draws of ``draw_timesteps`` are indices of SD3's shifted training grid
(``SD3.timestep``: ``t -> 1000 σ``, ``σ = shift((t + 1) / 1000)``), so the objectives need no change.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax.models.surrogate import Surrogate


def draw_timesteps(keys: jax.Array, k: int, num_train_timesteps: int, low: int = 0, high: int | None = None):
    """``[B, k] int32`` timesteps, uniform in [low, high) (default the whole schedule), one stream per image."""
    high = num_train_timesteps if high is None else high
    return jax.vmap(lambda kk: jax.random.randint(jax.random.fold_in(kk, 1), (k,), low, high))(keys)


def draw_noise(keys: jax.Array, k: int, shape: tuple[int, ...], stream: int = 2) -> jax.Array:
    """``[k, B, *shape]`` standard normal noise, per image (independent of the batch layout)."""
    per_image = jax.vmap(lambda kk: jax.random.normal(jax.random.fold_in(kk, stream), (k,) + shape))(keys)
    return jnp.swapaxes(per_image, 0, 1)


def posterior_sample_keys(keys: jax.Array) -> jax.Array:
    return jax.vmap(lambda kk: jax.random.fold_in(kk, 3))(keys)


def encode_sample(sur: Surrogate, x: jax.Array, keys: jax.Array) -> jax.Array:
    """Scaled latents with per-image posterior noise (``latent_dist.sample()``)."""
    mean, std = sur.moments(x)
    noise = jax.vmap(lambda kk, m: jax.random.normal(kk, m.shape, m.dtype))(posterior_sample_keys(keys), mean)
    return sur.normalize(mean + std * noise)  # SD3: (z - shift_factor) * scaling_factor


def conditioning(sur: Surrogate, x: jax.Array, batch: dict, keys: jax.Array | None = None) -> dict:
    """Family-specific UNet conditioning computed from the (perturbed) image ``x``.

    ip2p: ``image_latents = E_mode(x)`` (unscaled, as the pipeline does); inpaint: the mask at latent
    resolution and the scaled latents of the masked image, as the inpainting editor computes them
    (:func:`inpaint_conditioning`; ``keys``: sample them rather than take the posterior mean); sd3: the fixed
    pooled projections ``batch["pooled"]`` / ``batch["uncond_pooled"]`` (DPD perturbs only ``emb``).
    """
    fam = sur.family
    if fam == "sd":
        return {}
    if fam == "sd3":
        if "pooled" not in batch:
            raise ValueError("SD3 surrogate: the batch has no 'pooled' projection (SD3.text_batch builds it)")
        return {"pooled": batch["pooled"], "uncond_pooled": batch.get("uncond_pooled")}
    if fam == "ip2p":
        return {"image_latents": sur.encode_mode(x)}
    if fam == "inpaint":
        return inpaint_conditioning(sur, x, batch, keys)
    raise ValueError(f"unknown family {fam!r}")


MASKED_IMAGE_STREAM = 6  # posterior draw of the masked image's latents (distinct from streams 1-3 and tdae_v1's 5)


def inpaint_conditioning(sur: Surrogate, x: jax.Array, batch: dict, keys: jax.Array | None = None) -> dict:
    """The 9-channel UNet's extra inputs, as the inpainting editor (``editors/inpaint.py``) computes them.

    diffusers' ``StableDiffusionInpaintPipeline`` (and its Flax twin, ``pipeline_flax_stable_diffusion_inpaint``)
    binarize the mask at 0.5 and mask the image in [-1, 1] (``image * (mask < 0.5)``): the region to repaint
    becomes 0 in [-1, 1], i.e. mid-gray 0.5 in [0, 1] (not black); the mask goes to latent resolution by
    ``F.interpolate``'s default nearest rule (source index = destination index x factor). PhotoGuard's
    ``prepare_mask_and_masked_image`` (MadryLab/photoguard notebooks/utils.py) does the same. ``keys`` None:
    the masked image's posterior mean; keys ``[B]``: one posterior sample (``latent_dist.sample()``, as the
    editor and PhotoGuard's ``attack_forward``), from the per-image stream ``MASKED_IMAGE_STREAM``.
    """
    from tdae_jax.editors import inpaint as inpaint_editor  # the editor's own mask preparation

    m, mask_lat = inpaint_editor.prepare_mask(inpaint_mask(batch, x), x, sur.downsample)
    masked_image = jnp.where(m > 0, 0.5, x)
    if keys is None:
        masked = sur.encode(masked_image)
    else:
        stream = jax.vmap(lambda k: jax.random.fold_in(k, MASKED_IMAGE_STREAM))(keys)
        masked = encode_sample(sur, masked_image, stream)
    return {"mask": mask_lat.astype(masked.dtype), "masked_latents": masked}


def inpaint_mask(batch: dict, x: jax.Array) -> jax.Array:
    """``[B,H,W,1]`` inpainting mask; default: the centre half of the image (project default)."""
    if "mask" in batch:
        return batch["mask"]
    b, h, w, _ = x.shape
    yy = (jnp.arange(h) >= h // 4) & (jnp.arange(h) < 3 * h // 4)
    xx = (jnp.arange(w) >= w // 4) & (jnp.arange(w) < 3 * w // 4)
    m = (yy[:, None] & xx[None, :]).astype(x.dtype)
    return jnp.broadcast_to(m[None, :, :, None], (b, h, w, 1))


def per_image_mean(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).mean(axis=1)


def per_image_sum(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0], -1).sum(axis=1)


def safe_l2(a: jax.Array, tiny: float = 1e-12) -> jax.Array:
    """Per-image L2 norm with a finite gradient at 0."""
    return jnp.sqrt(per_image_sum(a * a) + tiny * tiny)


# --------------------------------------------- PhotoGuard's targets and repeated passes (photoguard[_flow].py)
# ``Objective.target`` values (``--target``) of the hosts that read one (``objectives.accepts_target``): ``zero``
# = the zero latent (encoder attack: MadryLab/photoguard notebooks/demo_simple_attack_img2img.ipynb ``pgd``
# minimizes ``latent_dist.mean.norm()``) or the zero image in [-1, 1], i.e. mid-gray (diffusion attack);
# ``gray`` / ``black``: an image of that colour (its posterior mean for the encoder attack).
TARGETS = ("zero", "gray", "black")


def target_image(x0: jax.Array, target: str) -> jax.Array:
    """The ``[B,H,W,3]`` target image of PhotoGuard's attacks for ``target`` (``gray`` or ``black``)."""
    if target == "gray":
        return jnp.full_like(x0, 0.5)
    if target == "black":
        return jnp.zeros_like(x0)
    raise ValueError(f"unknown image target {target!r} ({' | '.join(TARGETS)}; 'zero' is handled by the caller)")


REP_STREAM = 0x5052  # per-image key stream of the passes r >= 1 (``rep_keys``)


def rep_keys(keys: jax.Array, reps: int) -> jax.Array:
    """``[reps, B]`` per-pass keys: pass 0 uses the per-image keys themselves (one pass = the plain objective),
    pass ``r >= 1`` uses ``fold_in(fold_in(key, REP_STREAM), r)``: independent draws, per image."""
    extra = jax.vmap(lambda r: jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, REP_STREAM), r))(keys))(
        jnp.arange(1, reps, dtype=jnp.uint32))
    return jnp.concatenate([keys[None], extra], axis=0)


def average_over_reps(one_pass, reps: int, remat: bool):
    """``loss_fn(delta, batch, emb, keys) -> [B]``: the mean of ``one_pass`` over ``reps`` independent passes.

    PhotoGuard's ``super_l2`` / ``super_linf`` average ``grad_reps`` gradients of ``compute_grad``; the gradient
    of the mean loss is that average. The passes run in one ``lax.scan``; with ``remat`` each pass is
    ``jax.checkpoint``-ed, so the backward pass keeps one pass's activations at a time (memory independent of
    ``reps``; the price is one more forward per pass). ``reps = 1`` is ``one_pass`` itself.
    """
    if reps < 1:
        raise ValueError(f"pgd_grad_reps must be >= 1, got {reps}")
    if reps == 1:
        return one_pass

    def loss_fn(delta, batch, emb, keys):
        def body(total, k):
            return total + one_pass(delta, batch, emb, k), None

        body = jax.checkpoint(body) if remat else body
        total, _ = jax.lax.scan(body, jnp.zeros((batch["x0"].shape[0],), jnp.float32), rep_keys(keys, reps))
        return total / reps

    return loss_fn
