"""PhotoGuard (Salman et al., ICML 2023, arXiv:2302.06588): the encoder and the diffusion attacks.

Encoder attack (PGE, a TDAE host, §IV): push the VAE posterior mean of the protected image
towards a target latent. ``targeted`` (the PhotoGuard img2img notebook): minimize
``||mu_E(x+delta) - z_tgt||_2`` with ``z_tgt = mu_E(target)`` (target ``zero``: the zero latent, as the
notebook; ``gray``: a mid-gray image, as the inpainting demo). ``untargeted``: minimize
``-||mu_E(x+delta) - mu_E(x)||_2^2`` (needs a random start: its gradient is 0 at delta = 0).

Diffusion attack (PGD), after MadryLab/photoguard ``notebooks/demo_complex_attack_inpainting.ipynb``
(functions ``attack_forward``, ``compute_grad``, ``super_l2`` / ``super_linf``; restated, not copied):
``attack_forward`` runs the inpainting pipeline differentiably with ``num_inference_steps=4`` DDIM steps,
classifier-free guidance 7.5 and ``scheduler.step(..., eta=eta)``, then the VAE decoder; ``compute_grad``
takes the gradient of ``||image - target||_2`` (target: the zero tensor in [-1, 1], mid-gray here); the
executed ``super_l2`` call averages ``grad_reps=10`` such gradients per iteration, each a fresh stochastic pass
(new start noise, VAE posterior sample and, with ``eta=1``, DDIM step noise). Here:

- ``cfg.pgd_grad_reps`` passes, averaged as a loss (its gradient is the averaged gradient) in one
  ``lax.scan`` (:func:`average_over_reps`); pass ``r`` draws from ``rep_keys(keys, R)[r]``.
- ``cfg.pgd_eta``: DDIM eta, diffusers' ``DDIMScheduler.step``: ``sigma_t = eta * sqrt((1 - a_prev) /
  (1 - a_t) * (1 - a_t / a_prev))``, ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps +
  sigma_t n_i`` with ``n_i`` drawn per image and step (stream ``STEP_NOISE_STREAM``).
- The chain is the victim editor's own DDIM loop (``editors/schedulers.py``: the same plan and step as
  ``editors.make_editor(kind, sur, scheduler="ddim", num_inference_steps=K, strength=s, eta=eta)``), so it
  back-propagates exactly the steps that editor runs. At strength ``s`` diffusers' img2img
  (``StableDiffusionImg2ImgPipeline.get_timesteps``) keeps ``min(int(K s), K)`` of the K steps: at K = 4 and
  s = 0.8, ``int(3.2) = 3`` steps (timesteps 501, 251, 1 of 751, 501, 251, 1 with SD's leading spacing and
  ``steps_offset=1``): 3 of 4 is diffusers' own count, not an off-by-one, and the attack runs the same 3. It
  also runs 0 steps where the editor does (``K s < 1``: the edit is the VAE round trip), and its last step
  uses the scheduler's final alpha (``alphas_cumprod[0]`` with SD's ``set_alpha_to_one=false``), as diffusers.
- Strength (``cfg.pgd_strength``, None = the editor's default): SD img2img 0.8 (noise the posterior sample
  to the first kept timestep); inpainting 1.0, from pure noise as PhotoGuard's ``attack_forward`` (which
  never noises the image); InstructPix2Pix always from pure noise, conditioned on ``E_mode(x)``. The
  inpainting conditioning (mask, masked-image latents) is the editor's (``common.inpaint_conditioning``).
- ``cfg.remat``: each denoising step (and, with R > 1, each pass) is ``jax.checkpoint``-ed, so activation
  memory does not grow with K or R; off: nothing is rematerialized (faster, memory grows with K and R).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax import editors
from tdae_jax.configs import Objective
from tdae_jax.editors import schedulers
from tdae_jax.models.surrogate import Surrogate
from tdae_jax.objectives import common

STEP_NOISE_STREAM = 0x5053  # per-image key stream of the DDIM eta > 0 step noise
_EDITOR_KIND = {f: k for k, f in editors.FAMILY.items()}  # the victim editor each DDIM surrogate family stands for
# Shared with photoguard_flow.py, defined in common.py (re-exported: ``photoguard.TARGETS`` etc. stay importable)
TARGETS, REP_STREAM = common.TARGETS, common.REP_STREAM
rep_keys, average_over_reps = common.rep_keys, common.average_over_reps


def make_encoder(sur: Surrogate, cfg: Objective, targeted: bool = True):
    """PGE: Returns ``loss_fn(delta, batch, emb, keys) -> [B]`` (minimized; emb and keys unused)."""

    def loss_fn(delta, batch, emb, keys):
        del emb, keys
        x0 = batch["x0"]
        mu = sur.encode_mode(x0 + delta)
        if targeted:
            if cfg.target == "zero":
                tgt = jnp.zeros_like(mu)
            else:
                tgt = jax.lax.stop_gradient(sur.encode_mode(common.target_image(x0, cfg.target)))
            return common.safe_l2(mu - tgt)
        ref = jax.lax.stop_gradient(sur.encode_mode(x0))
        return -common.per_image_sum((mu - ref) ** 2)

    return loss_fn


def attack_strength(family: str, strength: float | None) -> float | None:
    """The img2img strength the unrolled chain runs at; ``None`` = from pure noise over the whole schedule.

    ``strength`` None: the victim editor's default (``editors.PIPELINE_DEFAULTS``: img2img 0.8, inpaint 1.0).
    InstructPix2Pix has no strength (its pipeline starts from pure noise, conditioned on ``E_mode(x)``).
    """
    kind = _EDITOR_KIND.get(family)
    if kind is None:
        raise ValueError(f"unknown family {family!r}")
    default = editors.PIPELINE_DEFAULTS[kind]["strength"]
    if default is None:  # the editor has no strength (InstructPix2Pix)
        if strength is not None and strength != 1.0:
            raise ValueError(f"pgd_strength={strength}: the {kind} editor edits from pure noise (no img2img strength)")
        return None
    if strength is None:
        return float(default)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"pgd_strength must be in [0, 1], got {strength}")
    return float(strength)


def attack_plan(sur: Surrogate, steps: int, strength: float | None, eta: float = 0.0) -> schedulers.Plan:
    """The DDIM schedule of a ``steps``-step edit at ``strength``: exactly the plan of the victim editor run with
    ``scheduler="ddim", num_inference_steps=steps`` (``DDIMScheduler.from_config`` of the model's scheduler
    config, diffusers' ``set_timesteps`` + img2img ``get_timesteps``). The guided model output is passed as
    epsilon (``Surrogate.eps`` converts any prediction type), so the plan is built for epsilon prediction."""
    cfg = schedulers.resolve_config("ddim", sur.static.scheduler_config, "epsilon")
    return schedulers.make_plan("ddim", cfg, sur.static.alphas_cumprod, steps, strength, eta)


def ddim_timesteps(sur: Surrogate, steps: int, strength: float | None) -> np.ndarray:
    """The UNet timesteps ``[n] int`` the attack back-propagates through: ``n = min(int(steps * strength), steps)``
    (diffusers' ``get_timesteps``), all ``steps`` when ``strength`` is None."""
    return attack_plan(sur, steps, strength).timesteps.astype(np.int64)


def _one_pass(sur: Surrogate, cfg: Objective, plan: schedulers.Plan, from_noise: bool):
    """One stochastic pass of PhotoGuard's ``attack_forward``: encode, K guided DDIM steps, decode, distance."""

    def one_pass(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch, keys)  # keys: a posterior draw where the family samples one
        shape = (sur.latent_channels, x.shape[1] // sur.downsample, x.shape[2] // sur.downsample)
        noise = common.draw_noise(keys, 1, shape)[0]
        if from_noise:  # InstructPix2Pix, inpainting at strength 1: noise * init_noise_sigma
            z = schedulers.start_from_noise(plan, noise)
        else:  # img2img: scheduler.add_noise(z0, noise, timesteps[0]) of a posterior sample
            z = schedulers.start_from_image(plan, common.encode_sample(sur, x, keys), noise)
        step_noise = common.draw_noise(keys, plan.num_steps, shape, STEP_NOISE_STREAM) if plan.stochastic else None
        uncond = batch.get("uncond")  # sur.guided_eps: no guidance when None or guidance_scale <= 1

        def model_fn(z_in, t):
            tt = jnp.full((z_in.shape[0],), t).astype(jnp.int32)  # DDIM timesteps are integers
            return sur.guided_eps(z_in, tt, emb, uncond, cond, cfg.guidance_scale, cfg.image_guidance_scale)

        z = schedulers.denoise(plan, model_fn, z, step_noise, remat=cfg.remat)
        y = sur.decode(z)
        tgt = common.target_image(batch["x0"], "gray" if cfg.target == "zero" else cfg.target)
        return common.safe_l2(y - tgt)

    return one_pass


def make_diffusion(sur: Surrogate, cfg: Objective):
    """PhotoGuard diffusion attack: ``loss_fn(delta, batch, emb, keys) -> [B]`` (minimized), the mean over
    ``cfg.pgd_grad_reps`` passes of ``||D(edit_K(x + delta, e)) - y_tgt||_2``, where ``edit_K`` is the victim
    editor's DDIM chain with ``K = cfg.denoise_steps`` inference steps at ``cfg.pgd_strength`` and DDIM
    ``eta = cfg.pgd_eta``; each denoising step is ``jax.checkpoint``-ed when ``cfg.remat``."""
    if sur.family == "sd3":  # rectified flow: K Euler steps of the SD3 img2img pipeline (photoguard_flow.py)
        from tdae_jax.objectives import photoguard_flow
        return photoguard_flow.make_diffusion(sur, cfg)
    if cfg.pgd_eta < 0:
        raise ValueError(f"pgd_eta must be >= 0, got {cfg.pgd_eta}")
    strength = attack_strength(sur.family, cfg.pgd_strength)
    plan = attack_plan(sur, max(1, cfg.denoise_steps), strength, cfg.pgd_eta)
    from_noise = editors.starts_from_noise(_EDITOR_KIND[sur.family], strength)
    return average_over_reps(_one_pass(sur, cfg, plan, from_noise), cfg.pgd_grad_reps, cfg.remat)
