"""DisDiff (Liu et al., "Disrupting Diffusion: Token-Level Attention Erasure Attack against Diffusion-based
Customization", ACM MM 2024, arXiv 2405.20584) as a DLADiff layer-1 baseline, under DLADiff's budget.

Reference: ``riolys/DisDiff``. Restated here, not copied:

- ``attacks/disdiff.py``: ``main`` (ASPL's outer loop, built on Anti-DreamBooth's ``attacks/aspl.py``),
  ``train_one_epoch``, ``pgd_attack`` (the CAE term and the MSS step), ``custom_function_cos`` (MSS's weight);
- ``show_attention.py``: ``Attmap.forward``, ``_get_attention_map``, ``_compute_energy_loss`` (``--loss_func=energy``);
- ``utils/ptp_utils.py``: ``AttentionStore``, ``register_attention_control``, ``aggregate_attention`` (how the maps
  are captured and averaged);
- ``time_feature.py``: ``select_timestep``, SimAC's adaptive greedy time-interval search, run once before the
  epochs by ``--use_search``;
- ``scripts/disdiff.sh``: the recipe (``--use_CAE --att_param=0.1 --loss_func=energy --use_MSS --use_search``,
  ASPL's 50 / 3 / 6 / 3 schedule, lr 5e-7, text encoder and prior 1.0 trained). ``utils/aande.py`` is diffusers'
  Attend-and-Excite pipeline; the attack does not import it.

Per epoch (``main``; the loop is :func:`baselines.alternate`)::

    f = train(f, X_clean, clean_steps)       # no copy: train_one_epoch trains f itself (ASPL trains a copy)
    repeat pgd_steps: delta <- step below, against f
    f = train(f, x + delta, adv_steps)

PGD step (``pgd_attack``), per image i, on one draw (t_i, eps_i, VAE sample)::

    t_i ~ U(S_i)                                  S_i: the timesteps the search kept (all T without it)
    L_cond,i = mean || eps_i - UNet_f(noise(Enc(x_i + delta_i), t_i, eps_i), t_i, c) ||^2
    A_i      = mean over the cross-attention layers with 16 x 16 maps of the head-averaged maps  [Q, tokens]
    P_i[q,k] = softmax_{k in C}( tau A_i[q,k] )   C: the prompt's content tokens, tau = 100
    L_CAE,i  = ( 1 - sum_q sum_{k in S} P_i[q,k]^2 / sum_q sum_{k in C} P_i[q,k]^2 )^2     S: "sks"'s tokens
    delta_i <- Pi( delta_i + alpha * w(t_i) * sign grad_delta sum_j (L_cond,j + lambda L_CAE,j) )
    w(t)     = (1 + cos(pi t / (T - 1))) / 2      (the Merit Sampling Scheduler), lambda = 0.1

Ascending ``(1 - E)^2`` with the energy share ``E`` in [0, 1] lowers ``E``: the identifier's share of the
cross-attention energy is erased. As every objective here is minimized, the step descends
``-sum_i (L_cond,i + lambda L_CAE,i)`` with ADFT's image optimizer (:func:`adft.image_optimizer`: sign, or the raw
gradient with ``update="raw"``), its update scaled per image by ``w(t_i)``, then :func:`defenses.pgd.project`.

The search (``select_timestep``), per image, on theta_pre (before any training), with a throwaway copy x' of the
image: while more than ``keep`` = 100 timesteps remain (at most ``--max_steps`` 50 rounds): draw 5 candidates
t_c ~ U(S) with fresh noise, score each by ``||grad_x' L_cond(x', t_c)||_1``; remove ``[d - 20, d + 20)`` from S
where d = the lowest-scoring candidate clamped to ``[20, T - 20]``; take one PGD step (alpha, eps) on x' at the
highest-scoring candidate. S then feeds every PGD step; x' is discarded.

Keys: PGD step ``k`` (the global counter ``PerturbState.step``) of image ``u`` uses ``image_keys("disdiff/pgd",
u, k)``: stream 1 picks t in S_i (with S_i = all T it is exactly ASPL's uniform draw), 2 the noise, 3 the VAE
sample (:func:`editors.finetune.diffusion_draw`). The search's round ``r`` uses counters ``r (K + 1) + c`` for its
K candidates and ``r (K + 1) + K`` for its PGD step, on the ``"disdiff/search"`` stream.

Choices of this port, where the code is ambiguous or the setting differs:

1. Per-image CAE. ``aggregate_attention(select=0)`` reshapes the ``(batch x heads)`` maps into one group, so the
   reference's L_CAE is one scalar of the batch-averaged map; here each image has its own L_CAE (its maps averaged
   over heads and layers), summed with L_cond over the batch. The reference's gradient on image i is
   ``(1/B)(grad L_cond,i + lambda L_CAE'(mean map) grad A_i)``; per image it is the same expression at A_i, so
   lambda keeps its meaning.
2. Layers: every cross-attention (``attn2``) map of side ``resolution`` = 16 (:func:`dsur.select_layers`):
   SD-2.1-base at 512 px ``down_blocks_2`` + ``up_blocks_1`` (the reference's ``from_where`` lists "mid" too, but its
   8 x 8 maps fail the 16 x 16 filter); the tiny surrogate at 32 px ``down_blocks_0`` + ``up_blocks_1``. The mean
   over layers of head-averaged maps equals the reference's mean over (layer, head) when every selected layer
   has the same number of heads (SD-2.1-base at 16 x 16: 20 each).
3. Tokens: the target is a word (``token="sks"``, every occurrence, all its sub-tokens) where the reference
   hard-codes position 4 (``token2ignore=[4]``, "sks" in "a photo of sks person"); C is the prompt's non-special
   tokens where the reference takes positions ``1..len(prompt.split())``. Both are the same set for that prompt
   with CLIP's tokenizer (one token per word); the tiny tokenizer splits words, and every piece counts.
4. Only the script's ``--loss_func=energy`` is ported (``l1`` / ``energy2`` and the targeted ``--target_image_path``
   term are unused by ``disdiff.sh``).
5. Shared surrogate: ``shared_surrogate=True`` follows ``train_one_epoch`` (the deep copy is commented out, and
   ``main`` copies nothing), so f is trained on X_clean and on x + delta in turn; ``False`` attacks a copy as ASPL.
   The trainings keep ASPL's port choices (full batch, clipping 1.0: :mod:`baselines`).
6. The search runs the images as one batch (the reference: one image at a time); an image whose set is down to
   ``keep`` is frozen. Half-width and clamp are one parameter, ``search_window`` (the reference hard-codes +-20
   and clamps with ``--delta_t``, 20 in the script). Ties go to the first candidate (the reference's strict
   ``<`` / ``>``). If ``search_steps`` rounds end with more than ``keep`` left, the remaining set is used (the
   reference then appends nothing for that image, shifting ``time_seq[i]`` onto the next image's set). Scores are
   gradients w.r.t. the [0,1] image (the reference's [-1,1]: a factor 1/2 on every score, same choice). The search
   embeds the prompt with theta_pre's text encoder, as the reference (no training yet).
7. Units: [0,1] pixels. ``step_size`` 2.5e-3 (``--pgd_alpha=5e-3`` on [-1,1]); the budget is DLADiff's eta 7/255
   (``--pgd_eps=5e-2`` on [-1,1] = 0.025 in the reference). The reference runs bf16 weights (``--dtype`` here).
8. One compiled step: the search's gradients are :func:`disdiff_step`'s with lambda = 0 and no MSS (lambda and
   the MSS switch are traced), so the search computes attention maps it does not use (16 x 16 ones: cheap) and
   DisDiff compiles one image step in all.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tdae_jax import prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses.dladiff import adft, baselines, dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.objectives import semantic_attention as sa
from tdae_jax.parallel import mesh as meshlib

STREAMS = ("disdiff/pgd", "disdiff/search")


@dataclasses.dataclass(frozen=True)
class DisDiffConfig:
    """DisDiff's own settings (the loop, budget and trainings are ASPL's :class:`baselines.BaselineConfig`); the
    reference's value (``scripts/disdiff.sh`` / the code) in each comment."""

    att_weight: float = 0.1  # --att_param=0.1 (lambda); 0 = no CAE term
    temperature: float = 100.0  # _compute_energy_loss: softmax(map * 100)
    token: str = "sks"  # token2ignore=[4]: "sks" in --instance_prompt="a photo of sks person"
    resolution: int = 16  # _get_attention_map(attention_res=16)
    mss: bool = True  # --use_MSS: step alpha * (1 + cos(pi t / (T - 1))) / 2
    search: bool = True  # --use_search: time_feature.select_timestep (SimAC)
    search_steps: int = 50  # --max_steps
    search_candidates: int = 5  # select_timestep: range(0, 5)
    search_window: int = 20  # --delta_t=20 and the hard-coded +-20 window
    search_keep: int = 100  # select_timestep: stop at len(res_time_seq) <= 100
    shared_surrogate: bool = True  # train_one_epoch trains f itself (no deep copy)

    def __post_init__(self):
        if self.att_weight < 0 or self.temperature <= 0 or self.resolution < 1:
            raise ValueError(f"need att_weight >= 0, temperature > 0, resolution >= 1 (got {self.att_weight}, "
                             f"{self.temperature}, {self.resolution})")
        if not self.token.strip():
            raise ValueError("DisDiff's target token is empty")
        if min(self.search_steps, self.search_window) < 0 or self.search_candidates < 1:
            raise ValueError("need search_steps >= 0, search_window >= 0, search_candidates >= 1")
        if self.search_keep < max(1, 2 * self.search_window):
            raise ValueError(f"search_keep ({self.search_keep}) must be >= 1 and >= 2 * search_window (a round "
                             "removes up to 2 * search_window timesteps and must leave one)")


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the compiled PGD step depends on (a static jit argument): budget, update, layers, temperature. The
    CAE weight and the MSS switch are traced arguments of the step, so the search (lambda = 0, no MSS) and the
    attack share one compilation."""

    eps: float
    step_size: float
    update: str
    latent_sample: bool
    layers: dsur.AttentionLayers
    temperature: float


def step_config(cfg: baselines.BaselineConfig, dcfg: DisDiffConfig, layers: dsur.AttentionLayers) -> StepConfig:
    return StepConfig(cfg.eps, cfg.step_size, cfg.update, cfg.latent_sample, layers, dcfg.temperature)


# ------------------------------------------------------------------------------------------------ CAE
def token_masks(surrogate, prompt: str, token: str) -> tuple[np.ndarray, np.ndarray]:
    """``(target [T], content [T])`` float32 over ``prompt``'s token ids: ``token``'s positions (every
    occurrence, all its pieces) and the non-special tokens. A prompt without ``token`` is a ``ValueError``."""
    ids = surrogate.tokenize([prompt])
    tok = surrogate.static.tokenizer
    content = sa.content_token_mask(ids, tok)[0]
    pos = sa.word_positions(ids[0], tok, token)
    if not pos:
        raise ValueError(f"DisDiff's target token {token!r} is not in the prompt {prompt!r}")
    target = np.zeros_like(content)
    target[pos] = 1.0
    return target, content


def cross_map_mean(maps: dict) -> jax.Array:
    """``[B,Q,T]``: the mean over layers of the head-averaged cross-attention maps ``{path: [B,Q,T]}`` (paths
    ending in ``attn2``, all of one resolution; other paths ignored): ``aggregate_attention``'s average (shared
    with Anti-Diffusion's semantic disturbance term, ``dladiff/antidiffusion.py``)."""
    cross = [maps[k].astype(jnp.float32) for k in sorted(maps) if k.endswith(dsur.CROSS)]
    if not cross or len({m.shape for m in cross}) != 1:
        raise ValueError(f"need cross-attention maps of one shape, got {[(k, maps[k].shape) for k in maps]}")
    return sum(cross) / len(cross)


def erasure_loss(maps: dict, target, content, temperature: float = 100.0) -> jax.Array:
    """L_CAE per image ``[B]`` (module docstring; ``_compute_energy_loss``) from head-averaged cross-attention
    maps ``{path: [B,Q,T]}`` (:func:`cross_map_mean`), ``target`` / ``content`` ``[B,T]`` token masks."""
    avg = cross_map_mean(maps)  # [B,Q,T]
    keep = jnp.asarray(content)[:, None, :] > 0
    prob = jax.nn.softmax(jnp.where(keep, temperature * avg, -jnp.inf), axis=-1) * keep
    energy = jnp.square(prob)
    share = jnp.sum(energy * jnp.asarray(target)[:, None, :], axis=(1, 2)) / jnp.sum(energy, axis=(1, 2))
    return jnp.square(1.0 - share)


def cond_and_maps(sur, x, emb, keys, t, layers: dsur.AttentionLayers, latent_sample: bool = True):
    """``(L_cond [B], maps)``: the diffusion loss at timesteps ``t [B]`` and the selected attention maps of the
    same UNet forward (``pgd_attack``'s AttentionStore is filled by the forward that gives ``model_pred``)."""
    z0, noise, t = ft.diffusion_draw(sur, x, keys, latent_sample, t=t)
    out, maps = sur.unet_out(sur.add_noise(z0, noise, t), t, emb, attention=layers)
    return ft.diffusion_error(sur, out, z0, noise, t), maps


# ------------------------------------------------------------------------------------------------ MSS + timesteps
def mss_weight(t, num_train_timesteps: int) -> jax.Array:
    """The Merit Sampling Scheduler's step factor ``(1 + cos(pi t / (T - 1))) / 2`` (``custom_function_cos``):
    1 at t = 0, 1/2 at the middle, 0 at t = T - 1."""
    t = jnp.asarray(t, jnp.float32)
    return 0.5 * (jnp.cos(t / (num_train_timesteps - 1) * jnp.pi) + 1.0)


def sample_timesteps(keys, tmask) -> jax.Array:
    """``[B] int32``: per image, a uniform draw among its retained timesteps ``tmask [B,T]`` (``ts[randint(len(ts))]``
    of ``pgd_attack``): index ``j ~ U{0..n_i-1}`` from stream 1 of ``keys``, then the j-th retained timestep.
    With every timestep retained this is :func:`editors.finetune.diffusion_draw`'s own draw."""
    m = jnp.asarray(tmask).astype(jnp.int32)
    j = jax.vmap(lambda k, n: jax.random.randint(jax.random.fold_in(k, 1), (), 0, n))(keys, m.sum(-1))
    return jnp.argmax(jnp.cumsum(m, axis=-1) > j[:, None], axis=-1).astype(jnp.int32)


def remove_window(tmask: np.ndarray, centre, window: int) -> np.ndarray:
    """``select_timestep``'s removal: per image, ``[d - window, d + window)`` with ``d`` = ``centre`` clamped to
    ``[window, T - window]`` leaves the retained set ``tmask [B,T]`` (bool)."""
    n = tmask.shape[-1]
    d = np.clip(np.asarray(centre), window, n - window)[:, None]
    idx = np.arange(n)[None]
    return np.asarray(tmask, bool) & ~((idx >= d - window) & (idx < d + window))


def search_choice(cands, scores) -> tuple[np.ndarray, np.ndarray]:
    """``(removed, selected)`` ``[B]``: per image, the candidate (``cands [K,B]``) of lowest and of highest score
    (``scores [K,B]``), the first one on ties (``select_timestep``'s strict comparisons)."""
    cands, scores = np.asarray(cands), np.asarray(scores)
    cols = np.arange(cands.shape[1])
    return cands[np.argmin(scores, 0), cols], cands[np.argmax(scores, 0), cols]


# ------------------------------------------------------------------------------------------------ steps
def disdiff_step(p: adft.PerturbState, base_sur, unet, batch: dict, key, att_weight, mss, cfg: StepConfig):
    """One DisDiff PGD step against ``unet`` (module docstring): ascent on ``L_cond + att_weight L_CAE``, the
    update scaled by MSS's ``w(t)`` where ``mss`` (both traced scalars). ``batch``: ``x0 [B,H,W,3]``, ``uid [B]``,
    ``emb [B,T,D]``, ``tmask [B,T_train]`` (retained timesteps), ``target`` / ``content`` ``[B,T]``. Returns
    ``(PerturbState, metrics)``, all ``[B]`` and taken before the step: ``disdiff/cond``, ``disdiff/att``,
    ``disdiff/t``, ``disdiff/weight`` (the step factor), ``disdiff/grad_l1`` (``||grad||_1``, the search's score)
    and ``budget/linf`` (after it)."""
    keys = prng.image_keys(key, batch["uid"], p.step)
    t = sample_timesteps(keys, batch["tmask"])
    sur = base_sur.replace(params={**base_sur.params, "unet": unet})
    x0 = batch["x0"]

    def neg(delta):
        lc, maps = cond_and_maps(sur, x0 + delta, batch["emb"], keys, t, cfg.layers, cfg.latent_sample)
        la = erasure_loss(maps, batch["target"], batch["content"], cfg.temperature)
        return -jnp.sum(lc + att_weight * la), (lc, la)

    (_, (lc, la)), g = jax.value_and_grad(neg, has_aux=True)(p.delta)
    w = jnp.where(mss, mss_weight(t, sur.num_train_timesteps), 1.0)
    updates, opt_state = adft.image_optimizer(cfg).update(g, p.opt_state, p.delta)
    delta = pgd_lib.project(optax.apply_updates(p.delta, updates * w[:, None, None, None]), x0, cfg.eps)
    p = adft.PerturbState(delta, opt_state, p.step + 1)
    return p, {"disdiff/cond": lc, "disdiff/att": la, "disdiff/t": t, "disdiff/weight": w,
               "disdiff/grad_l1": jnp.sum(jnp.abs(g), axis=tuple(range(1, g.ndim))),
               "budget/linf": pgd_lib.per_image_linf(delta)}


step_jit = jax.jit(disdiff_step, static_argnames=("cfg",), donate_argnums=(0,))


def _at(p: adft.PerturbState, counter: int, mesh) -> adft.PerturbState:
    """A fresh state (own buffers: the step donates it) at ``p.delta`` whose keys are those of ``counter``."""
    own = jax.tree.map(lambda a: jnp.array(a, copy=True), (p.delta, p.opt_state))
    return adft.PerturbState(*own, meshlib.replicate(jnp.asarray(counter, jnp.int32), mesh))


def search_timesteps(surrogate, batch: dict, cfg: StepConfig, dcfg: DisDiffConfig, base_key, mesh) -> np.ndarray:
    """``select_timestep`` (SimAC) on theta_pre (module docstring): the retained timesteps ``[B, T] bool``.
    ``batch``: the PGD batch (sharded over ``mesh``; its ``tmask`` is replaced). Every gradient is a
    :func:`disdiff_step` with ``att_weight = 0`` and no MSS: a candidate's score is its ``grad_l1`` at a ``t``
    the step draws from the retained set; the round's PGD step is one with only the chosen ``t`` retained."""
    b, n_t, k = batch["x0"].shape[0], surrogate.num_train_timesteps, dcfg.search_candidates
    base, unet = meshlib.replicate(surrogate, mesh), meshlib.replicate(surrogate.params["unet"], mesh)
    key = adft.stream_key(base_key, STREAMS[1])
    p = adft._place_perturb(adft.init_perturb(batch["x0"], cfg), mesh)  # x' - x of the reference
    tmask = np.ones((b, n_t), bool)

    def step(counter, mask):
        bt = {**batch, "tmask": meshlib.shard_batch(jnp.asarray(mask), mesh)}
        return step_jit(_at(p, counter, mesh), base, unet, bt, key, 0.0, False, cfg)

    for r in range(dcfg.search_steps):
        active = tmask.sum(-1) > dcfg.search_keep
        if not active.any():
            break
        draws = [step(r * (k + 1) + c, tmask)[1] for c in range(k)]
        removed, selected = search_choice([np.asarray(m["disdiff/t"]) for m in draws],
                                          [np.asarray(m["disdiff/grad_l1"]) for m in draws])
        tmask = np.where(active[:, None], remove_window(tmask, removed, dcfg.search_window), tmask)
        moved, _ = step(r * (k + 1) + k, np.arange(n_t)[None] == selected[:, None])
        keep = meshlib.shard_batch(jnp.asarray(active)[:, None, None, None], mesh)
        p = p._replace(delta=jnp.where(keep, moved.delta, p.delta))
    return tmask


# ------------------------------------------------------------------------------------------------ the loop
def protect(surrogate, x0, uid, emb, x_clean, uid_clean, emb_clean, cfg: baselines.BaselineConfig,
            dcfg: DisDiffConfig, base_key, *, mesh=None, on_epoch=None, ids=None, prior: dict | None = None):
    """DisDiff on one identity (``main``): ``x0 [B,H,W,3]`` to protect, ``x_clean [M,H,W,3]`` (set_A) for the
    surrogate's clean steps; ``cfg`` holds ASPL's schedule, budget and trainings (``ids`` / ``prior`` as
    :func:`baselines.aspl`: default ``cfg.prompt`` tokenized and class images sampled on ``"disdiff/class"``).
    Returns ``(PerturbState, history)``: ``disdiff/cond``, ``disdiff/att``, ``disdiff/t`` (per epoch, per step,
    ``[B]``), ``disdiff/train_clean``, ``disdiff/train_adv`` and ``disdiff/kept`` (``[B, T] bool``: the timesteps the
    search kept)."""
    b = np.shape(x0)[0]
    layers = dsur.select_layers(surrogate, np.shape(x0)[1], dcfg.resolution, kinds=(dsur.CROSS,))
    target, content = token_masks(surrogate, cfg.prompt, dcfg.token)
    scfg, kp = step_config(cfg, dcfg, layers), adft.stream_key(base_key, STREAMS[0])
    extra = {"tmask": np.ones((b, surrogate.num_train_timesteps), bool), "target": np.repeat(target[None], b, 0),
             "content": np.repeat(content[None], b, 0)}
    if dcfg.search:
        smesh = ft.data_mesh(math.gcd(b, np.shape(x_clean)[0]), mesh)  # alternate's: one compiled step for both
        sbatch = baselines._shard(x0, uid, emb, smesh)
        sbatch.update(meshlib.shard_batch({k: jnp.asarray(v) for k, v in extra.items()}, smesh))
        extra["tmask"] = search_timesteps(surrogate, sbatch, scfg, dcfg, base_key, smesh)

    def attack(p, base, unet, batch):
        out = {"cond": [], "att": [], "t": []}
        for _ in range(cfg.pgd_steps):
            p, m = step_jit(p, base, unet, batch, kp, dcfg.att_weight, dcfg.mss, scfg)
            for name in out:
                out[name].append(np.asarray(m[f"disdiff/{name}"]))
        return p, out

    p, hist = baselines.alternate(surrogate, x0, uid, emb, x_clean, uid_clean, emb_clean, cfg, base_key, attack,
                                  prefix="disdiff", copy_surrogate=not dcfg.shared_surrogate, extra=extra, mesh=mesh,
                                  on_epoch=on_epoch, ids=ids, prior=prior)
    hist["disdiff/kept"] = extra["tmask"]
    return p, hist


def curves(hist: dict, dcfg: DisDiffConfig) -> dict:
    """Per-image curves ``[B, steps]`` of a :func:`protect` history: ``loss`` = the ascended
    ``L_cond + lambda L_CAE``, and its two terms."""
    cat = lambda name: np.concatenate([np.stack(ep, 1) for ep in hist[f"disdiff/{name}"]], 1)  # noqa: E731
    cond, att = cat("cond"), cat("att")
    return {"loss": cond + dcfg.att_weight * att, "disdiff/cond": cond, "disdiff/att": att}
