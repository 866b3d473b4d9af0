"""Anti-DreamBooth baselines (Van Le et al., ICCV 2023; ``VinAIResearch/Anti-DreamBooth``
``attacks/aspl.py``), run under DLADiff's budget for a like-for-like comparison (DLADiff §5.1: "same
hyperparameter settings": eta 7/255, sign step 5e-3, both in [0,1] units here).

ASPL, per outer epoch (``epochs``, ADB: 50)::

    f_sur = copy(f); train(f_sur, X_clean, ``clean_steps``)          # ADB: 3 steps (+ prior in ADB's script)
    repeat ``pgd_steps`` (ADB: 6): delta <- Pi(delta + s sign grad L_cond(f_sur, x + delta))
    train(f, x + delta, ``adv_steps``)                                 # ADB: 3 steps, on the perturbed images

FSMG: ``f_sur = DreamBooth(theta_pre, X_clean)`` once (ADB: 1000 steps; project: the DSUR config), then
``pgd_steps`` (ADB: 100) of the same PGD against the fixed ``f_sur``.

Training is :func:`editors.finetune.train_step` (UNet only, AdamW re-created on every call as ADB's
``train_one_epoch`` does; ADB also trains the text encoder and uses
a prior, lr 5e-7; both are flags of :class:`BaselineConfig`). The PGD step is ADFT's stage 2
(:func:`adft.stage2_jit`) on its own key stream. Outputs are ``(PerturbState, history)`` as in ADFT.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

from tdae_jax.defenses.dladiff import adft
from tdae_jax.editors import finetune as ft
from tdae_jax.parallel import mesh as meshlib


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    method: str = "aspl"  # aspl | fsmg
    eps: float = 7.0 / 255.0
    step_size: float = 5e-3
    epochs: int = 50  # ASPL outer epochs
    clean_steps: int = 3
    pgd_steps: int = 6  # per ASPL epoch; FSMG: total
    adv_steps: int = 3
    lr: float = 5e-7
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    latent_sample: bool = True
    update: str = "sign"

    def __post_init__(self):
        if self.method not in ("aspl", "fsmg"):
            raise ValueError(f"method must be 'aspl' or 'fsmg', got {self.method!r}")

    def train(self, steps: int, batch: int) -> ft.FinetuneConfig:
        return ft.FinetuneConfig(method="dreambooth", steps=steps, batch_size=batch, lr=self.lr,
                                 weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                                 latent_sample=self.latent_sample)


def aspl(surrogate, x0, uid, emb, x_clean, uid_clean, emb_clean, cfg: BaselineConfig, base_key, *, mesh=None,
         on_epoch=None):
    """ASPL on one identity: ``x0 [B,H,W,3]`` to protect, ``x_clean [M,H,W,3]`` (set_A) for the surrogate copy.
    Returns ``(PerturbState, history)``."""
    b = np.shape(x0)[0]
    mesh = mesh_c = ft.data_mesh(math.gcd(b, np.shape(x_clean)[0]), mesh)  # one mesh for both batches
    batch = meshlib.shard_batch({"x0": jnp.asarray(x0, jnp.float32), "uid": jnp.asarray(uid, jnp.int32),
                                 "emb": jnp.asarray(emb)}, mesh)
    clean = meshlib.shard_batch({"x0": jnp.asarray(x_clean, jnp.float32), "uid": jnp.asarray(uid_clean, jnp.int32),
                                 "emb": jnp.asarray(emb_clean)}, mesh_c)
    base = meshlib.replicate(surrogate, mesh)
    p = adft._place_perturb(adft.init_perturb(x0, cfg), mesh)
    tr_adv, tr_clean = cfg.train(cfg.adv_steps, b), cfg.train(cfg.clean_steps, np.shape(x_clean)[0])
    frozen = ft.frozen_part(base, tr_adv)
    f = meshlib.replicate(ft.init_state(surrogate, tr_adv), mesh)
    hist = {"aspl/cond": [], "aspl/train_clean": [], "aspl/train_adv": []}
    kp = adft.stream_key(base_key, "aspl/pgd")
    for ep in range(cfg.epochs):
        # ADB's train_one_epoch builds a fresh AdamW on every call: the optimizer state never persists
        f_sur = meshlib.replicate(_fresh(_copy(f.trainable), _copy(f.step), tr_clean), mesh)  # own buffers
        f_sur, l_clean = adft.train_on(f_sur, frozen, clean["x0"], clean["uid"], clean["emb"], base_key, tr_clean,
                                       mesh_c, stream="aspl/clean")
        conds = []
        for _ in range(cfg.pgd_steps):
            p, m = adft.stage2_jit(p, base, f_sur.trainable["unet"], batch, kp, adft.pgd_view(cfg))
            conds.append(np.asarray(m["adft/cond"]))
        x_adv = jnp.clip(batch["x0"] + p.delta, 0.0, 1.0)
        f = meshlib.replicate(_fresh(f.trainable, f.step, tr_adv), mesh)
        f, l_adv = adft.train_on(f, frozen, x_adv, batch["uid"], batch["emb"], base_key, tr_adv, mesh,
                                 stream="aspl/adv")
        hist["aspl/cond"].append(conds)
        hist["aspl/train_clean"].append(l_clean)
        hist["aspl/train_adv"].append(l_adv)
        if on_epoch is not None:
            on_epoch(ep + 1, p, hist)
    return p, hist


def fsmg(surrogate, fixed_unet, x0, uid, emb, cfg: BaselineConfig, base_key, *, mesh=None):
    """FSMG: ``pgd_steps`` of PGD on L_cond against ``fixed_unet`` (DreamBooth'd on clean photos; see
    :func:`dsur.train_static`). Returns ``(PerturbState, history)``."""
    mesh = ft.data_mesh(np.shape(x0)[0], mesh)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x0, jnp.float32), "uid": jnp.asarray(uid, jnp.int32),
                                 "emb": jnp.asarray(emb)}, mesh)
    base = meshlib.replicate(surrogate, mesh)
    unet = meshlib.replicate(fixed_unet, mesh)
    p = adft._place_perturb(adft.init_perturb(x0, cfg), mesh)
    conds, kp = [], adft.stream_key(base_key, "fsmg/pgd")
    for _ in range(cfg.pgd_steps):
        p, m = adft.stage2_jit(p, base, unet, batch, kp, adft.pgd_view(cfg))
        conds.append(np.asarray(m["adft/cond"]))
    return p, {"fsmg/cond": conds}


def _fresh(trainable, step, tcfg) -> ft.TrainState:
    return ft.TrainState(trainable, ft.optimizer(tcfg).init(trainable), step)


def _copy(tree):
    import jax

    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
