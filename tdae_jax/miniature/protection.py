"""Protect held-out scenes against a miniature editor and edit them again (issue 4 item 5).

The library side of ``experiments/miniature_protection.py`` (and of tests/test_miniature_protection.py): a
defense spec ``host[_fdm|_tdae]`` runs through the same compiled, sharded ``Protector`` as ``experiments.tdae``;
``edit`` is the editors' own evaluation sampler (10 DDIM steps, no guidance, fixed noise).
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


def parse_spec(spec: str) -> tuple[str, str]:
    """"advdm_tdae" -> ("advdm", "tdae"); "pge_untargeted" -> ("pge_untargeted", "")."""
    for variant in ("fdm", "tdae"):
        if spec.endswith("_" + variant):
            return spec[: -len(variant) - 1], variant
    return spec, ""


def protect(sur, x0_uint8, instructions, eps, spec, steps, denoise_steps=4):
    host, variant = parse_spec(spec)
    # the miniature editors sample without guidance (scales 1): the pgd host back-propagates that sampler
    obj = configs.Objective(name=host, timesteps=2, denoise_steps=denoise_steps, guidance_scale=1.0,
                            image_guidance_scale=1.0)
    loss_fn = objectives.make_objective(host, sur, obj)
    fdm = configs.FDM(mode="finite_difference" if variant in ("fdm", "tdae") else "off")
    dpd = configs.DPD(enabled=variant == "tdae", period=10, steps=5)
    init_fn, step_fn = tdae.make_step(loss_fn, budget=configs.Budget(eps), fdm=fdm, dpd=dpd,
                                      pgd=configs.PGD(step_size=max(eps / 8, 1 / 255), steps=steps))
    p = Protector(init_fn, step_fn, meshlib.make_mesh(), 8)
    x0 = x0_uint8.astype(np.float32) / 255.0
    ids = [f"scene{i}" for i in range(len(x0))]
    out = []
    for i in range(0, len(x0), 8):
        sl = slice(i, i + 8)
        tok = sur.tokenize(instructions[sl])
        batch = {"x0": x0[sl], "uid": prng.uids(ids[sl]), "emb": np.asarray(sur.embed_ids(tok)),
                 "uncond": np.asarray(sur.embed_ids(sur.tokenize([""] * len(tok))))}
        delta, _, _ = p.run(batch, len(tok), steps, prng.base_key(0))
        out.append(dio.quantize_protected(x0_uint8[sl], delta, eps))
    return np.concatenate(out)


def edit(sur, images_uint8, instructions, edit_steps):
    ids = jnp.asarray(sur.tokenize(instructions))
    y = sample.ip2p_edit(sur, jnp.asarray(images_uint8, jnp.float32) / 255.0, ids, jax.random.key(7),
                         num_steps=edit_steps)
    return np.round(np.asarray(y) * 255.0).astype(np.uint8)
