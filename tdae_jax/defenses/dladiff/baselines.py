"""Anti-DreamBooth baselines (Van Le et al., ICCV 2023), run under DLADiff's budget for a like-for-like comparison
(DLADiff §5.1: "same hyperparameter settings": eta 7/255 in [0,1] units here).

Reference: ``VinAIResearch/Anti-DreamBooth``, ``attacks/aspl.py`` (``main``, ``train_one_epoch``, ``pgd_attack``),
``attacks/fsmg.py`` (``main``), ``train_dreambooth.py`` and the recipes ``scripts/attack_with_aspl.sh`` /
``scripts/attack_with_fsmg.sh``. Restated here, not copied.

ASPL (``aspl.py::main``), per outer epoch (``--max_train_steps`` 50)::

    f_sur = copy(f); train(f_sur, X_clean, ``clean_steps``)          # --max_f_train_steps 3
    repeat ``pgd_steps``: delta <- Pi(delta + s sign grad L_cond(f_sur, x + delta))   # --max_adv_train_steps 6
    f = train(f, x + delta, ``adv_steps``)                            # the same --max_f_train_steps 3

``train_one_epoch`` builds a fresh AdamW (betas 0.9/0.999, wd 1e-2, eps 1e-8) on every call, trains UNet and text
encoder (``--train_text_encoder`` in the script) on DreamBooth's loss with the prior term (``--with_prior_preservation
--prior_loss_weight=1.0``, 200 class images of "a photo of person" sampled from theta_pre by ``main``), lr
``--learning_rate=5e-7`` in the script (the argparse default, 5e-6, is not what ADB ran). ``pgd_attack`` embeds the
prompt with ``f_sur``'s text encoder and takes ``x <- clip(x0 + clip(x + alpha sign grad, +-eps), -1, 1)`` on the
batch-mean MSE (the sign of a per-image sum is the same).

Units: ADB works in [-1,1] pixels: ``--pgd_alpha=5e-3``, ``--pgd_eps=5e-2`` there are ``2.5e-3`` and ``0.025``
(6.4/255) in the [0,1] units of this package (a [-1,1] step of a is a/2 in [0,1]), so ``step_size`` defaults to
2.5e-3; ``eps`` stays DLADiff's 7/255 (``anti_dreambooth()`` gives ADB's own 0.025).

Deviations, each a choice of this port:
- ``train_text_encoder`` and ``prior_weight`` default off in ``BaselineConfig`` (ADB: on), so that callers that
  predate them keep their cost (sampling 200 class images from theta_pre is the expensive part);
  ``anti_dreambooth()`` and the command's ``dladiff_aspl.flags`` turn them on. ``aspl`` then tokenizes
  ``cfg.prompt`` and samples the class pool itself (:func:`class_pool`) unless ``ids=`` / ``prior=`` are given.
- Training steps use every instance image (full batch, plus as many class images); ADB's ``train_one_epoch`` takes
  one instance and one class image per step, restarting at index 0 on each call (with 3 steps and 4 images the 4th
  image is never trained on).
- ADB's ``clip_grad_norm_`` receives the ``itertools.chain`` already consumed by the AdamW constructor, so it clips
  nothing; ``max_grad_norm`` defaults to 1.0 (the intended value, shared with the other fine-tunings here) and
  ``max_grad_norm=0`` reproduces ADB's actual behaviour.

FSMG (``fsmg.py::main``): ``f_sur = DreamBooth(theta_pre, X_clean)`` once (``attack_with_fsmg.sh`` runs
``train_dreambooth.py``: 1000 steps, batch 2, lr 5e-7, text encoder trained, prior 1.0 with 200 class images;
:func:`fsmg_surrogate_config`), then ``pgd_steps`` (ADB: 100) of the same PGD against the fixed ``f_sur``, with the
prompt embedded by ``f_sur``'s text encoder. :func:`fsmg_surrogate` trains that surrogate
(``fsmg_surrogate="adb"``, the command's ``dladiff_fsmg.flags``); with ``fsmg_surrogate="dsur"`` the runner reuses
DSUR's static surrogate instead (UNet only, no prior, 400 steps, lr 5e-6, batch 4: the surrogate DLADiff's own
layer 1 gets), so that FSMG and DLADiff can be compared on one surrogate.

The PGD step of both is ADFT's stage 2 (:func:`adft.stage2_jit`, through :func:`pgd`) on its own key stream;
training is :func:`adft.train_on` (:func:`editors.finetune.train_step`). Outputs are ``(PerturbState, history)``.
ASPL's outer loop is :func:`alternate`, which DisDiff (``dladiff/disdiff.py``, built on ASPL) reuses with its own
image steps.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from tdae_jax.defenses.dladiff import adft
from tdae_jax.editors import finetune as ft
from tdae_jax.parallel import mesh as meshlib

CLASS_PROMPT = "a photo of person"  # ADB attack_with_aspl.sh --class_prompt; DLADiff §3.1 c'
INSTANCE_PROMPT = "a photo of sks person"  # ADB --instance_prompt; DLADiff §3.2


@dataclasses.dataclass(frozen=True)
class BaselineConfig:
    """ASPL / FSMG settings; ADB's value (script ``attack_with_aspl.sh``) in each comment, [0,1] pixel units."""

    method: str = "aspl"  # aspl | fsmg | disdiff (ASPL's loop, dladiff/disdiff.py) | antidiffusion (its own loop)
    eps: float = 7.0 / 255.0  # DLADiff's budget (ADB --pgd_eps 5e-2 in [-1,1] = 0.025)
    step_size: float = 2.5e-3  # ADB --pgd_alpha 5e-3 in [-1,1]
    epochs: int = 50  # --max_train_steps
    clean_steps: int = 3  # --max_f_train_steps
    pgd_steps: int = 6  # --max_adv_train_steps (per ASPL epoch); FSMG: total (ADB 100)
    adv_steps: int = 3  # --max_f_train_steps (ADB uses the same count for both trainings)
    lr: float = 5e-7  # --learning_rate
    weight_decay: float = 1e-2  # train_one_epoch's AdamW
    max_grad_norm: float = 1.0  # ADB: 1.0 intended, a no-op in effect (module docstring); 0 = off
    latent_sample: bool = True  # latent_dist.sample()
    update: str = "sign"
    train_text_encoder: bool = False  # ADB: True; needs aspl(ids=)
    prior_weight: float = 0.0  # ADB: 1.0 (--prior_loss_weight); needs aspl(prior=)
    num_class_images: int = 200  # --num_class_images
    class_prompt: str = CLASS_PROMPT
    class_steps: int = 50  # DDIM steps of each class image (ADB: the SD pipeline's default, 50 steps)
    prompt: str = INSTANCE_PROMPT  # --instance_prompt: tokenized for the text encoder when aspl(ids=) is not given
    fsmg_surrogate: str = "dsur"  # FSMG's fixed surrogate: adb (fsmg_surrogate()) | dsur (DLADiff's static one)
    fsmg_surrogate_steps: int = 1000  # attack_with_fsmg.sh --max_train_steps
    fsmg_surrogate_batch: int = 2  # attack_with_fsmg.sh --train_batch_size

    def __post_init__(self):
        if self.method not in ("aspl", "fsmg", "disdiff", "antidiffusion"):
            raise ValueError(f"method must be 'aspl', 'fsmg', 'disdiff' or 'antidiffusion', got {self.method!r}")
        if self.update not in ("sign", "raw"):
            raise ValueError(f"update must be 'sign' or 'raw', got {self.update!r}")
        if self.fsmg_surrogate not in ("adb", "dsur"):
            raise ValueError(f"fsmg_surrogate must be 'adb' or 'dsur', got {self.fsmg_surrogate!r}")
        if self.prior_weight < 0 or self.num_class_images < 1 or self.class_steps < 1:
            raise ValueError(f"need prior_weight >= 0, num_class_images >= 1 and class_steps >= 1 (got "
                             f"{self.prior_weight}, {self.num_class_images}, {self.class_steps})")

    @classmethod
    def anti_dreambooth(cls, **overrides) -> "BaselineConfig":
        """ADB's own ASPL recipe (``attack_with_aspl.sh``): eps 0.05 / step 5e-3 in [-1,1], text encoder and
        prior (1.0, 200 class images) on; ``overrides`` replace fields."""
        ref = dict(eps=0.025, step_size=2.5e-3, epochs=50, clean_steps=3, pgd_steps=6, adv_steps=3, lr=5e-7,
                   weight_decay=1e-2, train_text_encoder=True, prior_weight=1.0, num_class_images=200)
        return cls(**{**ref, **overrides})

    def train(self, steps: int, batch: int) -> ft.FinetuneConfig:
        return ft.FinetuneConfig(method="dreambooth", steps=steps, batch_size=batch, lr=self.lr,
                                 weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                                 train_text_encoder=self.train_text_encoder, prior_weight=self.prior_weight,
                                 latent_sample=self.latent_sample)


def fsmg_surrogate_config(steps: int = 1000, batch_size: int = 2, lr: float = 5e-7, prior_weight: float = 1.0,
                          train_text_encoder: bool = True, latent_sample: bool = True) -> ft.FinetuneConfig:
    """ADB's FSMG surrogate (``attack_with_fsmg.sh`` -> ``train_dreambooth.py``: 1000 steps, batch 2, lr 5e-7,
    constant schedule, AdamW wd 1e-2, clip 1.0, text encoder trained, prior 1.0 with 200 class images). Train it
    with ``ft.finetune(sur, x_clean, prompt, cfg, key, prior_images=class_images, prior_prompt=CLASS_PROMPT)``; FSMG's
    PGD then uses ``result.surrogate.params["unet"]`` and ``ft.embed_ids(result.surrogate, ids)``."""
    return ft.FinetuneConfig(method="dreambooth", steps=steps, batch_size=batch_size, lr=lr, weight_decay=1e-2,
                             max_grad_norm=1.0, train_text_encoder=train_text_encoder, prior_weight=prior_weight,
                             latent_sample=latent_sample)


def fsmg_surrogate(surrogate, x_clean, uid_clean, cfg: BaselineConfig, base_key, *, mesh=None, log=None):
    """FSMG's fixed surrogate as ``fsmg.py::main`` gets it: DreamBooth on the clean photos ``x_clean [M,H,W,3]``
    with :func:`fsmg_surrogate_config` (``cfg.fsmg_surrogate_steps``, ``cfg.fsmg_surrogate_batch``, ``cfg.lr``;
    text encoder and prior term as ``cfg.train_text_encoder`` / ``cfg.prior_weight``, the class images sampled from
    theta_pre as ADB's ``train_dreambooth.py`` does). Returns ``(unet params, emb [1,T,D])``: the UNet the PGD
    attacks and the instance prompt embedded by the trained text encoder (theta_pre's when it was not trained)."""
    tcfg = fsmg_surrogate_config(cfg.fsmg_surrogate_steps, cfg.fsmg_surrogate_batch, cfg.lr, cfg.prior_weight,
                                 cfg.train_text_encoder, cfg.latent_sample)
    tcfg = dataclasses.replace(tcfg, max_grad_norm=cfg.max_grad_norm, weight_decay=cfg.weight_decay)
    images = None
    if cfg.prior_weight > 0:
        images = ft.sample(surrogate, cfg.class_prompt, cfg.num_class_images, adft.stream_key(base_key, "fsmg/class"),
                           cfg.class_steps, size=np.shape(x_clean)[1])
    res = ft.finetune(surrogate, x_clean, cfg.prompt, tcfg, adft.stream_key(base_key, "fsmg/surrogate"),
                      uids=uid_clean, prior_images=images, prior_prompt=cfg.class_prompt, mesh=mesh, log=log)
    trained = res.surrogate
    return trained.params["unet"], np.asarray(ft.embed_ids(trained, trained.tokenize([cfg.prompt])))


def class_pool(surrogate, cfg: BaselineConfig, key, *, size: int | None = None, steps: int = 50,
               batch_size: int = 4) -> dict:
    """ADB ``main``'s class images: ``cfg.num_class_images`` samples of ``cfg.class_prompt`` from theta_pre
    (:func:`editors.finetune.sample`, DDIM ``steps``, CFG 7.5; ADB: the pipeline's default sampler), as an
    :func:`adft.prior_pool`. ``size``: their side, the instance images' (ADB's dataset resizes the class images
    to ``--resolution``); default the UNet's native size."""
    images = ft.sample(surrogate, cfg.class_prompt, cfg.num_class_images, key, steps, size=size,
                       batch_size=batch_size)
    return adft.prior_pool(surrogate, images, cfg.class_prompt)


def pgd(p: adft.PerturbState, base, unet, batch: dict, key, cfg: BaselineConfig, steps: int):
    """``steps`` PGD ascent steps on L_cond against ``unet`` (ADB ``pgd_attack``; the FSMG loop of ``fsmg.py``):
    ``delta <- Pi(delta + step_size * sign grad_delta L_cond)``. ``batch``: ``x0``, ``uid``, ``emb`` sharded.
    Returns ``(PerturbState, [L_cond before each step, [B]])``."""
    conds = []
    for _ in range(steps):
        p, m = adft.stage2_jit(p, base, unet, batch, key, adft.pgd_view(cfg))
        conds.append(np.asarray(m["adft/cond"]))
    return p, conds


def aspl(surrogate, x0, uid, emb, x_clean, uid_clean, emb_clean, cfg: BaselineConfig, base_key, *, mesh=None,
         on_epoch=None, ids=None, prior: dict | None = None):
    """ASPL on one identity: ``x0 [B,H,W,3]`` to protect, ``x_clean [M,H,W,3]`` (set_A) for the surrogate copy.

    ``ids``: the instance prompt's token ids ``[T]`` or ``[1,T]``, used with ``cfg.train_text_encoder`` (the
    trained text encoder re-embeds the prompt for training and PGD); default ``cfg.prompt`` tokenized.
    ``prior``: the class-image pool (:func:`class_pool` / :func:`adft.prior_pool`), used by both trainings with
    ``cfg.prior_weight > 0``; default :func:`class_pool` at the instance size on the ``"aspl/class"`` stream
    (ADB ``main`` samples them before the attack). Returns ``(PerturbState, history)``."""
    kp = adft.stream_key(base_key, "aspl/pgd")

    def attack(p, base, unet, batch):
        p, conds = pgd(p, base, unet, batch, kp, cfg, cfg.pgd_steps)
        return p, {"cond": conds}

    p, hist = alternate(surrogate, x0, uid, emb, x_clean, uid_clean, emb_clean, cfg, base_key, attack, prefix="aspl",
                        mesh=mesh, on_epoch=on_epoch, ids=ids, prior=prior)
    hist.setdefault("aspl/cond", [])  # epochs = 0
    return p, hist


def alternate(surrogate, x0, uid, emb, x_clean, uid_clean, emb_clean, cfg: BaselineConfig, base_key, attack, *,
              prefix: str = "aspl", copy_surrogate: bool = True, extra: dict | None = None, mesh=None,
              on_epoch=None, ids=None, prior: dict | None = None):
    """ASPL's outer loop (``aspl.py::main``), shared with the methods built on it (DisDiff). Per epoch: a
    surrogate trained ``cfg.clean_steps`` on ``x_clean``, ``attack`` against it, then ``f`` trained
    ``cfg.adv_steps`` on ``x0 + delta``; every training call starts a fresh AdamW (``train_one_epoch``).

    ``attack(p, base, unet, batch) -> (p, {name: value})``: the epoch's image steps against the surrogate's UNet;
    ``batch`` holds ``x0``, ``uid``, ``emb`` (re-embedded by the surrogate's text encoder when it trains) and the
    arrays of ``extra`` (host ``[B,...]``, sharded like ``x0``). ``copy_surrogate``: the surrogate is a copy of
    ``f`` (ASPL); False trains ``f`` itself on the clean photos, then on the perturbed ones (DisDiff's
    ``train_one_epoch`` copies nothing). Streams and history keys are named ``<prefix>/...``: history holds
    ``<prefix>/<name>`` per epoch for each attack output, ``<prefix>/train_clean`` and ``<prefix>/train_adv``.
    Returns ``(PerturbState, history)``."""
    ids, prior = _recipe_inputs(surrogate, np.shape(x0)[1], cfg, base_key, ids, prior, f"{prefix}/class")
    b, n_clean = np.shape(x0)[0], np.shape(x_clean)[0]
    mesh = ft.data_mesh(math.gcd(b, n_clean), mesh)  # one mesh for both batches
    batch = _shard(x0, uid, emb, mesh)
    if extra:
        batch.update(meshlib.shard_batch({k: jnp.asarray(v) for k, v in extra.items()}, mesh))
    clean = _shard(x_clean, uid_clean, emb_clean, mesh)
    ids1 = None if ids is None else np.asarray(ids, np.int32).reshape(1, -1)
    ids_b, ids_c = (None, None) if ids1 is None else (np.repeat(ids1, b, 0), np.repeat(ids1, n_clean, 0))
    base = meshlib.replicate(surrogate, mesh)
    p = adft._place_perturb(adft.init_perturb(x0, cfg), mesh)
    tr_adv, tr_clean = cfg.train(cfg.adv_steps, b), cfg.train(cfg.clean_steps, n_clean)
    frozen = ft.frozen_part(base, tr_adv)
    f = meshlib.replicate(ft.init_state(surrogate, tr_adv), mesh)
    hist = {f"{prefix}/train_clean": [], f"{prefix}/train_adv": []}
    for ep in range(cfg.epochs):
        # train_one_epoch builds a fresh AdamW on every call: no optimizer state persists
        src = (_copy(f.trainable), _copy(f.step)) if copy_surrogate else (f.trainable, f.step)  # own buffers
        f_sur = meshlib.replicate(_fresh(*src, tr_clean), mesh)
        f_sur, l_clean = adft.train_on(f_sur, frozen, clean["x0"], clean["uid"], clean["emb"], base_key, tr_clean,
                                       mesh, stream=f"{prefix}/clean", prior=prior, ids=ids_c)
        p, out = attack(p, base, f_sur.trainable["unet"], _pgd_batch(batch, frozen, f_sur, ids_b, mesh))
        x_adv = jnp.clip(batch["x0"] + p.delta, 0.0, 1.0)
        f = f if copy_surrogate else f_sur
        f = meshlib.replicate(_fresh(f.trainable, f.step, tr_adv), mesh)
        f, l_adv = adft.train_on(f, frozen, x_adv, batch["uid"], batch["emb"], base_key, tr_adv, mesh,
                                 stream=f"{prefix}/adv", prior=prior, ids=ids_b)
        for name, value in out.items():
            hist.setdefault(f"{prefix}/{name}", []).append(value)
        hist[f"{prefix}/train_clean"].append(l_clean)
        hist[f"{prefix}/train_adv"].append(l_adv)
        if on_epoch is not None:
            on_epoch(ep + 1, p, hist)
    return p, hist


def fsmg(surrogate, fixed_unet, x0, uid, emb, cfg: BaselineConfig, base_key, *, mesh=None):
    """FSMG: ``cfg.pgd_steps`` of PGD on L_cond against ``fixed_unet`` (DreamBooth'd on clean photos: ADB's
    recipe is :func:`fsmg_surrogate`, the alternative :func:`dsur.train_static`'s). ``emb``: the
    prompt embedded by that surrogate's text encoder (theta_pre's when only the UNet was trained).
    Returns ``(PerturbState, history)``."""
    mesh = ft.data_mesh(np.shape(x0)[0], mesh)
    batch = _shard(x0, uid, emb, mesh)
    base = meshlib.replicate(surrogate, mesh)
    unet = meshlib.replicate(fixed_unet, mesh)
    p = adft._place_perturb(adft.init_perturb(x0, cfg), mesh)
    p, conds = pgd(p, base, unet, batch, adft.stream_key(base_key, "fsmg/pgd"), cfg, cfg.pgd_steps)
    return p, {"fsmg/cond": conds}


def _recipe_inputs(surrogate, size: int, cfg: BaselineConfig, base_key, ids, prior, stream: str = "aspl/class"):
    """``(ids, prior)`` for :func:`alternate`: the given ones, else those ``cfg`` needs (``None`` when unused);
    the class pool is sampled on ``stream``."""
    if cfg.train_text_encoder and ids is None:
        ids = surrogate.tokenize([cfg.prompt])
    if cfg.prior_weight > 0 and not prior:
        prior = class_pool(surrogate, cfg, adft.stream_key(base_key, stream), size=size, steps=cfg.class_steps)
    return ids, prior


def _shard(x, uid, emb, mesh) -> dict:
    return meshlib.shard_batch({"x0": jnp.asarray(x, jnp.float32), "uid": jnp.asarray(uid, jnp.int32),
                                "emb": jnp.asarray(emb)}, mesh)


def _pgd_batch(batch: dict, frozen, f_sur: ft.TrainState, ids_b, mesh) -> dict:
    """The PGD batch; with a trained text encoder the prompt is re-embedded by ``f_sur``'s (``pgd_attack``)."""
    if "text_encoder" not in f_sur.trainable:
        return batch
    sur = frozen.replace(params={**frozen.params, **f_sur.trainable})
    return {**batch, "emb": meshlib.shard_batch(ft.embed_ids(sur, jnp.asarray(ids_b)), mesh)}


def _fresh(trainable, step, tcfg) -> ft.TrainState:
    return ft.TrainState(trainable, ft.optimizer(tcfg).init(trainable), step)


def _copy(tree):
    return jax.tree.map(lambda a: jnp.array(a, copy=True), tree)
