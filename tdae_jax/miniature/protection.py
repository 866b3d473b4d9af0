"""Protect miniature-world scenes against a miniature editor, and edit them again.

The library side of the reproduction study (``tdae_jax/evaluate/study.py``), of
``experiments/miniature_protection.py`` and of tests/test_miniature_protection.py. A defense spec
``host[_fdm|_dpd|_tdae|_tpa]`` runs through the same compiled, sharded ``Protector`` as ``experiments.tdae``
(Algorithm 1 of TDAE: FDM's finite difference, DPD every 10 iterations, TPA's neighbourhood estimator);
``noise`` is the control: uniform noise on the 8-bit grid at the same L_inf budget. ``edit`` is the editors'
own evaluation sampler (10 DDIM steps, no guidance, fixed noise), ``sdedit`` a text-to-image model used as an
SDEdit img2img editor with the edited caption.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax import configs, objectives, prng
from tdae_jax.data import io as dio
from tdae_jax.defenses import tdae
from tdae_jax.miniature import sample
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.protect import Protector

VARIANTS = ("fdm", "dpd", "tdae", "tpa")


def parse_spec(spec: str) -> tuple[str, str]:
    """"advdm_tdae" -> ("advdm", "tdae"); "pge_untargeted" -> ("pge_untargeted", ""); "noise" -> ("noise", "")."""
    for variant in VARIANTS:
        if spec.endswith("_" + variant):
            return spec[: -len(variant) - 1], variant
    return spec, ""


def defense_configs(variant: str, beta: float | None = None):
    """(FDM, TPA, DPD) of a variant: the paper's defaults (beta 0.3, h 0.05; DPD every 10 iterations, 5 steps)."""
    fdm = configs.FDM(mode="finite_difference" if variant in ("fdm", "tdae") else "off",
                      beta=configs.FDM.beta if beta is None else beta)
    tpa = configs.TPA(enabled=variant == "tpa")
    dpd = configs.DPD(enabled=variant in ("dpd", "tdae"), period=10, steps=5)
    return fdm, tpa, dpd


def make_protector(sur, eps: float, spec: str, steps: int, denoise_steps: int = 4, beta: float | None = None,
                   batch_size: int = 8) -> Protector:
    """The compiled protector of ``spec`` (sign-PGD, step max(eps/8, 1/255), ``steps`` iterations)."""
    host, variant = parse_spec(spec)
    if variant in ("dpd", "tdae") and not objectives.uses_text(host):
        raise ValueError(f"{spec}: DPD perturbs the text embedding, which host {host!r} does not use")
    # The miniature protocol: the editors sample with deterministic DDIM (eta 0) and no guidance (scales 1), and the
    # pgd host back-propagates exactly that sampler, one pass per gradient (PhotoGuard's notebook averages 10
    # passes of an eta-1 chain, --pgd_grad_reps / --pgd_eta of experiments.tdae: 10x the cost, which 2 CPU cores
    # cannot pay over a 128-pair grid). K = 2 (t, eps) draws per gradient for the per-timestep hosts.
    obj = configs.Objective(name=host, timesteps=2, denoise_steps=denoise_steps, guidance_scale=1.0,
                            image_guidance_scale=1.0, pgd_grad_reps=1, pgd_eta=0.0)
    fdm, tpa, dpd = defense_configs(variant, beta)

    def build(model):
        return tdae.make_step(objectives.make_objective(host, model, obj), budget=configs.Budget(eps), fdm=fdm,
                              tpa=tpa, dpd=dpd, pgd=configs.PGD(step_size=max(eps / 8, 1 / 255), steps=steps))

    return Protector(build, sur, meshlib.make_mesh(), batch_size)


def protect(sur, x0_uint8, prompts, eps, spec, steps, denoise_steps=4, *, ids=None, beta=None, batch_size=8,
            done=None, on_batch=None, protector=None):
    """Protected uint8 images ``[n,H,W,3]`` (``max|x' - x| <= eps`` on the 8-bit grid).

    ``prompts``: the protector's text per image (the victim's instruction in the known-instruction threat
    model, another one in the blind one); ``ids``: per-image names that seed the PRNG (default ``scene<i>``), so
    an image's result does not depend on its batch. ``done``: ``{start: images}`` of batches already protected
    (skipped); ``on_batch(start, images)`` is called after each new batch (a caller saves it to resume);
    ``protector``: a compiled ``make_protector`` of the same settings to reuse (prompts are data, not settings).
    """
    if spec == "noise":
        return noise_control(x0_uint8, eps, ids)
    p = protector or make_protector(sur, eps, spec, steps, denoise_steps, beta, batch_size)
    x0 = x0_uint8.astype(np.float32) / 255.0
    ids = list(ids) if ids is not None else [f"scene{i}" for i in range(len(x0))]
    done, out = dict(done or {}), []
    for i in range(0, len(x0), p.batch_size):
        if i not in done:
            sl = slice(i, i + p.batch_size)
            batch = {"x0": x0[sl], "uid": prng.uids(ids[sl]), **text_batch(sur, prompts[sl])}
            delta, _, _ = p.run(batch, len(batch["uid"]), steps, prng.base_key(0))
            done[i] = dio.quantize_protected(x0_uint8[sl], delta, eps)
            if on_batch is not None:
                on_batch(i, done[i])
        out.append(done[i])
    return np.concatenate(out)


def text_batch(sur, prompts) -> dict:
    """The text side of a batch: ``emb``, ``uncond`` (empty prompt) and SA's ``token_mask`` (every content token)."""
    return objectives.semantic_attention.text_entries(sur, prompts)[0]


def noise_control(x0_uint8, eps: float, ids=None) -> np.ndarray:
    """Uniform random noise U(-eps, eps) per pixel, seeded per image id, snapped inside the budget on disk."""
    ids = list(ids) if ids is not None else [f"scene{i}" for i in range(len(x0_uint8))]
    deltas = [np.random.default_rng([0x6E6F, int(u)]).uniform(-eps, eps, x.shape).astype(np.float32)
              for u, x in zip(prng.uids(ids), x0_uint8)]
    return dio.quantize_protected(x0_uint8, np.stack(deltas), eps)


def edit(sur, images_uint8, instructions, edit_steps, seed: int = 7):
    """InstructPix2Pix edit, the same noise for every call with the same ``seed`` (clean and protected alike)."""
    ids = jnp.asarray(sur.tokenize(list(instructions)))
    y = sample.ip2p_edit(sur, jnp.asarray(images_uint8, jnp.float32) / 255.0, ids, jax.random.key(seed),
                         num_steps=edit_steps)
    return np.round(np.asarray(y) * 255.0).astype(np.uint8)


def sdedit(sur, images_uint8, captions, edit_steps, strength: float = 0.6, scale: float = 3.0, seed: int = 7):
    """SDEdit img2img of a text-to-image model with the edited caption (cross-family victim)."""
    ids = jnp.asarray(sur.tokenize(list(captions)))
    y = sample.text_to_image(sur, ids, jax.random.key(seed), num_steps=edit_steps, scale=scale,
                             images=jnp.asarray(images_uint8, jnp.float32) / 255.0, strength=strength)
    return np.round(np.asarray(y) * 255.0).astype(np.uint8)
