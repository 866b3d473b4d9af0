"""Customization on the miniature world: does a layer-1 defense stop DreamBooth / LoRA from learning a subject?

The "identity" is a subject of the procedural world (:func:`world.subjects`: a shape in two colours with a pattern
and a mark, seen in several views). The defender perturbs its views against a surrogate text-to-image model
(:func:`protect`: DLADiff layer 1, the Anti-DreamBooth baselines ASPL / FSMG, or the random-noise control at the
same budget); the attacker fine-tunes a model on the views with "a photo of <token> <shape>" (DreamBooth on the
UNet, or LoRA on its attention projections; :func:`editors.finetune.finetune`), samples that prompt, and the
oracle scores subject reproduction on pixels (:func:`subject_success`, the pixel analogue of DLADiff's ISM).

References: DLADiff §4.1-4.2 (Alg. 1, the static surrogate then ADFT); Anti-DreamBooth (Van Le et al., ICCV 2023)
``attacks/aspl.py::main`` and ``attacks/fsmg.py::main`` (through :mod:`defenses.dladiff.baselines`); DreamBooth
(Ruiz et al., CVPR 2023) and LoRA (Hu et al., ICLR 2022) as diffusers' ``train_dreambooth.py`` /
``train_dreambooth_lora.py`` run them (:mod:`editors.finetune`). The learning rates are scaled to the miniature
models (the paper's SD-2.1 settings are 5e-6 / 5e-7 / 1e-4).
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from tdae_jax.data import io as dio
from tdae_jax.defenses.dladiff import adft, baselines, dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.miniature import oracle, protection, vocab, world

METHODS = ("none", "noise", "dladiff", "aspl", "fsmg")
ATTACKERS = ("dreambooth", "lora")


@dataclasses.dataclass(frozen=True)
class DefenseConfig:
    """Layer-1 settings, scaled to the miniature models (DLADiff's eta and step eta/4; 1e-4 where SD uses 5e-6)."""

    epochs: int = 10  # ADFT / ASPL outer epochs
    lr: float = 1e-4  # every surrogate fine-tuning: DSUR, ADFT stage 3, ASPL
    static_steps: int = 100  # DSUR: DreamBooth of the static surrogate on the clean views
    fsmg_steps: int = 60  # FSMG's PGD steps against the static surrogate (ASPL's 6 per epoch x 10 epochs)


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """The attacker's fine-tuning and sampling, and the oracle's threshold."""

    method: str = "dreambooth"  # dreambooth (UNet) | lora (rank 4 on the attention projections)
    steps: int = 200
    batch_size: int = 4
    lr: float = 1e-4
    samples: int = 16
    sample_steps: int = 10  # DDIM
    guidance: float = 3.0
    min_px: int = 12  # pixels each subject colour must cover (32 px samples)

    def __post_init__(self):
        if self.method not in ATTACKERS:
            raise ValueError(f"attacker must be one of {ATTACKERS}, got {self.method!r}")


def subject_success(img, sub: world.Subject, min_px: int) -> bool:
    """Both subject colours cover >= ``min_px`` pixels (``oracle.classify``) and no other colour does."""
    labels = oracle.classify(img)
    counts = {c: int((labels == vocab.COLOURS.index(c)).sum()) for c in vocab.COLOURS}
    own = {sub.colour, sub.colour2}
    return all(counts[c] >= min_px for c in own) and all(n < min_px for c, n in counts.items() if c not in own)


def eligible_subjects(seed: int, n: int, views: int, min_px: int, size: int = 32, pool: int = 4) -> dict:
    """The first ``n`` subjects of the world's stream ``seed`` whose every clean view the oracle accepts (at 32 px
    a few colour pairs blur into each other), out of ``pool * n`` candidates (at most one per rare token of the
    vocabulary). Returns :func:`world.subjects`'s dict restricted to them, plus ``index`` (their place in the
    stream, the subject's id)."""
    subj = world.subjects(seed, min(pool * n, len(vocab.SUBJECT_TOKENS)), views, size=size)
    keep = [i for i, sub in enumerate(subj["subjects"])
            if all(subject_success(v, sub, min_px) for v in subj["images"][i])][:n]
    if len(keep) < n:
        raise ValueError(f"only {len(keep)} of {len(subj['subjects'])} subjects of world seed {seed} pass the oracle on their "
                         f"own views (need {n})")
    out = {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in subj.items()}
    out["index"] = keep
    return out


def static_surrogate(sur, views_uint8, prompt: str, cfg: DefenseConfig, key):
    """DSUR's static surrogate (DreamBooth on the clean views): the UNet DLADiff and FSMG attack."""
    x0 = views_uint8.astype(np.float32) / 255.0
    scfg = dsur.static_config(cfg.static_steps, cfg.lr, len(x0))
    return dsur.train_static(sur, x0, prompt, scfg, jax.random.fold_in(key, 1)).surrogate.params["unet"]


def protect(method: str, sur, views_uint8, prompt: str, eps: float, key, cfg: DefenseConfig, static=None,
            view_ids=None):
    """One subject's views (uint8 ``[V,H,W,3]``) protected by ``method`` at ``eps`` ([0,1] units) -> uint8.

    ``static``: the static surrogate's UNet (:func:`static_surrogate`) for dladiff / fsmg (trained here when not
    given); ``view_ids``: the views' ids, seeding the noise control."""
    if method == "none":
        return views_uint8
    if method == "noise":
        return protection.noise_control(views_uint8, eps, view_ids)
    x0 = views_uint8.astype(np.float32) / 255.0
    uid = np.arange(len(x0), dtype=np.int32)
    emb = np.asarray(ft.embed_ids(sur, sur.tokenize([prompt] * len(x0))))
    if method in ("dladiff", "fsmg") and static is None:
        static = static_surrogate(sur, views_uint8, prompt, cfg, key)
    if method == "dladiff":
        layers = dsur.select_layers(sur, x0.shape[1], resolution=x0.shape[1] // sur.downsample)
        acfg = adft.ADFTConfig(eps=eps, step_size=eps / 4, epochs=cfg.epochs, lr=cfg.lr, layers=layers)
        delta = adft.protect(sur, static, x0, uid, emb, acfg, key)[0].perturb.delta
    elif method in ("aspl", "fsmg"):
        bcfg = baselines.BaselineConfig(method=method, eps=eps, step_size=eps / 4, epochs=cfg.epochs, lr=cfg.lr,
                                        pgd_steps=6 if method == "aspl" else cfg.fsmg_steps)
        p, _ = (baselines.aspl(sur, x0, uid, emb, x0, uid, emb, bcfg, key) if method == "aspl"
                else baselines.fsmg(sur, static, x0, uid, emb, bcfg, key))
        delta = p.delta
    else:
        raise ValueError(f"unknown defense {method!r} (one of {METHODS})")
    return dio.quantize_protected(views_uint8, np.asarray(delta), eps)


def attack(victim, views_uint8, prompt: str, sub: world.Subject, key, cfg: AttackConfig):
    """Fine-tune ``victim`` on the views, sample the prompt: ``(share of samples reproducing sub, samples)``."""
    tcfg = ft.FinetuneConfig(method=cfg.method, steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr)
    res = ft.finetune(victim, views_uint8.astype(np.float32) / 255.0, prompt, tcfg, key)
    imgs = ft.sample(res.surrogate, prompt, cfg.samples, jax.random.fold_in(key, 9), steps=cfg.sample_steps,
                     guidance_scale=cfg.guidance)
    imgs = np.round(np.clip(imgs, 0, 1) * 255).astype(np.uint8)
    return float(np.mean([subject_success(im, sub, cfg.min_px) for im in imgs])), imgs
