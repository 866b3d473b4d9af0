"""DLADiff layer 1: ADFT, three stages per epoch (DLADiff §4.1.2, Eq. 9; Algorithm 1 of the appendix).

    Stage 1 (iter1 steps): delta <- Pi(delta + s * sign grad_delta L_att(theta_s, theta_d, x, delta))
    Stage 2 (iter2 steps): delta <- Pi(delta + s * sign grad_delta L_cond(theta_d, x + delta))
    Stage 3 (iter3 steps): theta_d <- AdamW(theta_d, grad L_cond(theta_d, x + delta))   (perturbed data only)

Both image stages are *ascent*; as every objective here is minimized, they descend ``-L`` with
:func:`defenses.pgd.sign_pgd` (``update="raw"``: the paper's literal raw-gradient step, for ablation) and
:func:`defenses.pgd.project` (L_inf ball, then ``x + delta`` in [0,1]). Stage 3 is
:func:`editors.finetune.train_step` with ``FinetuneConfig(lr, weight_decay)`` (UNet only; the prior term of
Eq. 9 is ``prior_weight`` with class images passed as ``protect(..., prior=prior_pool(...))``, off by default:
Alg. 1 uses L_cond). Each stage is one jit-compiled function (module
level, static config), traced once per shapes; the epoch loop is plain Python.

Keys: stage 1 and 2 step ``k`` (global PGD counter) of image ``u`` use
``fold_in(fold_in(fold_in(base, stage), u), k)``; stage 3 uses ``finetune.draw_keys`` on its own stream.
Units: budgets and steps in [0,1] pixel units (project reading of DLADiff §5.1): eta_ft = 7/255, sigma_ft = 5e-3.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdae_jax import prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses.dladiff import dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.parallel import mesh as meshlib

STREAMS = ("adft/stage1", "adft/stage2", "adft/stage3")


@dataclasses.dataclass(frozen=True)
class ADFTConfig:
    """ADFT hyper-parameters (DLADiff §5.1; docs/dladiff.md). ``layers``: the resolved :class:`dsur.AttentionLayers`."""

    eps: float = 7.0 / 255.0
    step_size: float = 5e-3
    epochs: int = 50
    iter1: int = 3
    iter2: int = 3
    iter3: int = 3
    lr: float = 5e-7
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    layers: dsur.AttentionLayers | None = None
    w_cross: float = 1.0
    w_self: float = 1.0
    update: str = "sign"  # sign | raw
    latent_sample: bool = True
    prior_weight: float = 0.0  # lambda of Eq. 9's prior term in stage 3 (Alg. 1: 0); > 0 needs protect(prior=)

    def __post_init__(self):
        if self.update not in ("sign", "raw"):
            raise ValueError(f"update must be 'sign' or 'raw', got {self.update!r}")
        if not 0 < self.eps < 1:
            raise ValueError(f"eps must be in (0, 1) ([0,1] pixel units), got {self.eps}")
        if min(self.epochs, self.iter1, self.iter2, self.iter3) < 0:
            raise ValueError("epochs and iter1/2/3 must be >= 0")

    def trace_key(self) -> "ADFTConfig":
        """What the compiled stage steps depend on (iteration counts and the stage-3 optimizer are not)."""
        return ADFTConfig(eps=self.eps, step_size=self.step_size, epochs=0, iter1=0, iter2=0, iter3=0, lr=1.0,
                          weight_decay=0.0, layers=self.layers, w_cross=self.w_cross, w_self=self.w_self,
                          update=self.update, latent_sample=self.latent_sample)

    def stage3(self, batch_size: int) -> ft.FinetuneConfig:
        return ft.FinetuneConfig(method="dreambooth", steps=self.iter3, batch_size=batch_size, lr=self.lr,
                                 weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                                 prior_weight=self.prior_weight, latent_sample=self.latent_sample)


class PerturbState(NamedTuple):
    delta: jax.Array  # [B,H,W,3]
    opt_state: Any
    step: jax.Array  # global PGD counter (stage 1 + stage 2 steps so far)


class ADFTState(NamedTuple):
    perturb: PerturbState
    dynamic: ft.TrainState  # UNet_d params + AdamW state


def pgd_view(cfg) -> "ADFTConfig":
    """An ADFT trace key from any config with eps/step_size/update/latent_sample (the baselines')."""
    return ADFTConfig(eps=cfg.eps, step_size=cfg.step_size, epochs=0, iter1=0, iter2=0, iter3=0, lr=1.0,
                      weight_decay=0.0, update=cfg.update, latent_sample=cfg.latent_sample)


def image_optimizer(cfg) -> optax.GradientTransformation:
    if cfg.update == "sign":
        return pgd_lib.sign_pgd(cfg.step_size)
    return optax.scale(-cfg.step_size)


def init_perturb(x0, cfg) -> PerturbState:
    delta = jnp.zeros_like(jnp.asarray(x0))
    return PerturbState(delta, image_optimizer(cfg).init(delta), jnp.zeros((), jnp.int32))


def init_state(surrogate, x0, cfg: ADFTConfig) -> ADFTState:
    """delta = 0; UNet_d = theta_pre (the surrogate's UNet, copied; DLADiff Alg. 1)."""
    return ADFTState(init_perturb(x0, cfg), ft.init_state(surrogate, cfg.stage3(np.shape(x0)[0])))


def stream_key(base_key, stream: str):
    """The key of a named stream (derived outside the compiled steps, so one compilation serves every stream)."""
    return prng.split_named(base_key, stream)[stream]


def _pgd_apply(cfg, p: PerturbState, grad, x0) -> PerturbState:
    updates, opt_state = image_optimizer(cfg).update(grad, p.opt_state, p.delta)
    delta = pgd_lib.project(optax.apply_updates(p.delta, updates), x0, cfg.eps)
    return PerturbState(delta, opt_state, p.step + 1)


def stage1_step(p: PerturbState, base_sur, static_unet, dynamic_unet, batch: dict, key, cfg):
    """One PGD ascent step on L_att (both UNets frozen). ``batch``: ``x0 [B,H,W,3]``, ``uid [B]``, ``emb [B,T,D]``;
    ``key``: the stage's stream key (:func:`stream_key`). Returns ``(PerturbState, {"adft/att": [B] before the
    step, "budget/linf": [B]})``."""
    keys = prng.image_keys(key, batch["uid"], p.step)
    s_sur = base_sur.replace(params={**base_sur.params, "unet": static_unet})
    d_sur = base_sur.replace(params={**base_sur.params, "unet": dynamic_unet})
    x0 = batch["x0"]

    def neg(delta):
        la = dsur.l_att(s_sur, d_sur, x0, x0 + delta, batch["emb"], keys, cfg.layers, cfg.w_cross, cfg.w_self,
                        cfg.latent_sample)
        return -jnp.sum(la), la

    (_, la), g = jax.value_and_grad(neg, has_aux=True)(p.delta)
    p = _pgd_apply(cfg, p, g, x0)
    return p, {"adft/att": la, "budget/linf": pgd_lib.per_image_linf(p.delta)}


def stage2_step(p: PerturbState, base_sur, unet, batch: dict, key, cfg):
    """One PGD ascent step on L_cond against ``unet`` (ASPL-style; also the FSMG/ASPL baselines' step)."""
    keys = prng.image_keys(key, batch["uid"], p.step)
    sur = base_sur.replace(params={**base_sur.params, "unet": unet})
    x0 = batch["x0"]

    def neg(delta):
        lc = ft.diffusion_loss(sur, x0 + delta, batch["emb"], keys, cfg.latent_sample)
        return -jnp.sum(lc), lc

    (_, lc), g = jax.value_and_grad(neg, has_aux=True)(p.delta)
    p = _pgd_apply(cfg, p, g, x0)
    return p, {"adft/cond": lc, "budget/linf": pgd_lib.per_image_linf(p.delta)}


stage1_jit = jax.jit(stage1_step, static_argnames=("cfg",), donate_argnums=(0,))
stage2_jit = jax.jit(stage2_step, static_argnames=("cfg",), donate_argnums=(0,))


def train_on(dynamic: ft.TrainState, frozen, x, uid, emb, base_key, ftcfg: ft.FinetuneConfig, mesh,
             stream: str = STREAMS[2], prior: dict | None = None, ids=None):
    """``ftcfg.steps`` full-batch training steps of a UNet on ``x [B,H,W,3]`` (stage 3; ASPL's two trainings).

    ``emb [B,T,D]``: the prompt's embedding; with ``ftcfg.train_text_encoder`` the token ids ``ids [B,T]`` are
    used instead (the text encoder is part of ``dynamic``). ``prior``: a class-image pool (:func:`prior_pool`)
    for Eq. 9's / DreamBooth's prior term, used when ``ftcfg.prior_weight > 0`` (ignored at 0): draw ``j`` of
    the run takes pool row ``j mod P``, so each step pairs ``B`` instance images with ``B`` class images, as
    diffusers' ``train_dreambooth.py`` concatenates them. Returns ``(state, [losses])``."""
    if ftcfg.prior_weight > 0 and not prior:
        raise ValueError("prior_weight > 0 needs prior (class) images: pass prior=prior_pool(...)")
    if ftcfg.train_text_encoder and ids is None:
        raise ValueError("training the text encoder needs the prompt's token ids (ids=)")
    key = stream_key(base_key, stream)
    b = x.shape[0]
    text = {"ids": jnp.asarray(ids)} if ftcfg.train_text_encoder else {"emb": emb}
    losses = []
    for _ in range(ftcfg.steps):
        draw = int(dynamic.step) * b + np.arange(b, dtype=np.int32)
        batch = {"x0": x, "uid": uid, "draw": jnp.asarray(draw), **text}
        if ftcfg.prior_weight > 0:
            batch.update(prior_rows(prior, draw, ftcfg.train_text_encoder))
        batch = meshlib.shard_batch(batch, mesh)
        dynamic, m = ft.train_step_jit(dynamic, frozen, batch, key, ftcfg.trace_key())
        losses.append(float(m["loss"]))
    return dynamic, losses


def prior_pool(surrogate, images, prompt: str, uid_offset: int = 1_000_003) -> dict:
    """The class-image pool of the prior term: ``{"x0": [P,H,W,3], "uid": [P], "ids": [P,T], "emb": [P,T,D]}``
    (host arrays) for ``images`` in [0,1] (e.g. ``ft.sample(theta_pre, "a photo of person", 200, key)``, as
    Anti-DreamBooth's ``main`` generates them) with the class ``prompt``. Uids start at ``uid_offset`` so
    their keys never collide with the instance images'."""
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"prior images must be [P,H,W,3] with P >= 1, got {images.shape}")
    n = images.shape[0]
    ids = np.repeat(surrogate.tokenize([prompt]), n, 0)
    emb = np.repeat(np.asarray(ft.embed_ids(surrogate, ids[:1])), n, 0)
    return {"x0": images, "uid": uid_offset + np.arange(n, dtype=np.int32), "ids": ids, "emb": emb}


def prior_rows(prior: dict, draw, text_ids: bool) -> dict:
    """The prior part of a training batch for global draws ``draw [B]``: pool row ``draw mod P``."""
    idx = np.asarray(draw) % len(prior["uid"])
    rows = {"prior_x0": prior["x0"][idx], "prior_uid": np.asarray(prior["uid"])[idx]}
    if text_ids:
        rows["prior_ids"] = np.asarray(prior["ids"])[idx]
    else:
        rows["prior_emb"] = np.asarray(prior["emb"])[idx]
    return rows


def run_epoch(state: ADFTState, base_sur, static_unet, batch: dict, base_key, cfg: ADFTConfig, mesh,
              frozen=None, prior: dict | None = None) -> tuple[ADFTState, dict]:
    """One ADFT epoch (stages 1-3). ``batch`` arrays must already be sharded over ``mesh`` (``shard_batch``);
    ``prior``: the class-image pool of stage 3's prior term (``cfg.prior_weight > 0``, :func:`prior_pool`).
    Returns the new state and ``{"adft/att": [iter1][B], "adft/cond": [iter2][B], "adft/train": [iter3]}``."""
    if cfg.layers is None:
        raise ValueError("ADFTConfig.layers is not resolved (dsur.select_layers)")
    p, dyn = state
    hist = {"adft/att": [], "adft/cond": [], "adft/train": []}
    key_cfg = cfg.trace_key()
    k1, k2 = stream_key(base_key, STREAMS[0]), stream_key(base_key, STREAMS[1])
    for _ in range(cfg.iter1):
        p, m = stage1_jit(p, base_sur, static_unet, dyn.trainable["unet"], batch, k1, key_cfg)
        hist["adft/att"].append(np.asarray(m["adft/att"]))
    for _ in range(cfg.iter2):
        p, m = stage2_jit(p, base_sur, dyn.trainable["unet"], batch, k2, pgd_view(cfg))
        hist["adft/cond"].append(np.asarray(m["adft/cond"]))
    if cfg.iter3:
        x_adv = jnp.clip(batch["x0"] + p.delta, 0.0, 1.0)
        frozen = ft.frozen_part(base_sur, cfg.stage3(x_adv.shape[0])) if frozen is None else frozen
        dyn, losses = train_on(dyn, frozen, x_adv, batch["uid"], batch["emb"], base_key, cfg.stage3(x_adv.shape[0]),
                               mesh, prior=prior)
        hist["adft/train"] = losses
    return ADFTState(p, dyn), hist


def protect(surrogate, static_unet, x0, uid, emb, cfg: ADFTConfig, base_key, *, mesh=None,
            state: ADFTState | None = None, start_epoch: int = 0,
            on_epoch: Callable[[int, ADFTState, dict], None] | None = None,
            prior: dict | None = None) -> tuple[ADFTState, dict]:
    """Run ADFT for ``cfg.epochs`` epochs on one identity's images ``x0 [B,H,W,3]`` in [0,1].

    Args:
      surrogate: theta_pre (VAE, text encoder, pretrained UNet = UNet_d's start).
      static_unet: UNet_s params (from :func:`dsur.train_static`).
      uid: ``[B] int32`` image uids; emb: ``[B,T,D]`` the prompt's embedding ("a photo of sks person").
      state/start_epoch: resume (``on_epoch(epoch, state, hist)`` is the checkpoint hook).
      prior: class images of Eq. 9's prior term (:func:`prior_pool`; "a photo of person" in DLADiff §3.1),
        required when ``cfg.prior_weight > 0``; stage 3 then minimizes ``L_inst + lambda L_prior``.
    Returns:
      ``(state, history)`` with ``history[name]`` a list over epochs.
    """
    if cfg.prior_weight > 0 and cfg.iter3 and not prior:
        raise ValueError("ADFTConfig.prior_weight > 0 needs prior (class) images: protect(prior=prior_pool(...))")
    mesh = ft.data_mesh(np.shape(x0)[0], mesh)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x0, jnp.float32), "uid": jnp.asarray(uid, jnp.int32),
                                 "emb": jnp.asarray(emb)}, mesh)
    base = meshlib.replicate(surrogate, mesh)
    static_unet = meshlib.replicate(static_unet, mesh)
    state = place_state(init_state(surrogate, x0, cfg) if state is None else state, mesh)
    frozen = ft.frozen_part(base, cfg.stage3(np.shape(x0)[0]))
    history: dict[str, list] = {}
    for ep in range(start_epoch, cfg.epochs):
        state, h = run_epoch(state, base, static_unet, batch, base_key, cfg, mesh, frozen, prior)
        for k, v in h.items():
            history.setdefault(k, []).append(v)
        if on_epoch is not None:
            on_epoch(ep + 1, state, h)
    return state, history


def place_state(state: ADFTState, mesh) -> ADFTState:
    """delta sharded over ``data``; counters, UNet_d and its optimizer state replicated."""
    return ADFTState(_place_perturb(state.perturb, mesh), meshlib.replicate(state.dynamic, mesh))


def _place_perturb(p: PerturbState, mesh) -> PerturbState:
    return PerturbState(meshlib.shard_batch(p.delta, mesh), meshlib.replicate(p.opt_state, mesh),
                        meshlib.replicate(p.step, mesh))
