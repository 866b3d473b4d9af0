"""DPD, Dynamic Prompt Defense (TDAE §III-D, Eq. 11-12, and Algorithm 1's DPD branch).

Every S outer iterations (n % S == 0, n = 1..N as in Algorithm 1) the image perturbation is frozen,
the text perturbation is reset to 0 and M sign steps of size eta find a counter-prompt that makes the
edit of the *immunized* image benign again:

    min_{||dp||_inf <= eps_p}  L(f(x0 + dv, c + dp), y0)                                 (Eq. 11)

L is the paper's maximized disruption loss; with tdae_jax's minimized objective O = -L the text side
**minimizes -O** (it maximizes the objective the image side minimizes). The image side then runs
Eq. 5/8 with e = c + dp (Eq. 12); e is kept until the next round (before the first one, e = c).

- The update is the image side's sign-descent chain (``pgd.sign_pgd(eta)``) in a ``lax.fori_loop``.
- Projection after every step: the L_inf ball of radius eps_p, then (``clamp_to_range``, v1's
  ``clamp(c_adv, c.min(), c.max())``) c + dp clamped to [min c, max c], per image over (T, D).
- SD3 (``DPD.eps_t5`` set; project default): ``emb`` is ``prompt_embeds`` = [CLIP rows ``:clip_tokens`` |
  T5 rows]. The CLIP rows get eps_p, the T5 rows eps_t5; the range clamp is per segment (the CLIP one over its
  non-padding channels); the CLIP rows' structural zero padding (channels that are 0 on every CLIP row of c,
  2048:4096 in SD3) stays exactly 0. The pooled projection is not a DPD variable (it stays in the batch).
- Randomness: all M steps use one key per image, a named sub-stream ``dpd`` of the iteration's image
  key (fixed xi inside the round, like FDM's g1/g2), so ``loss_before``/``loss_after`` are comparable.
  ``DPD.resample_noise`` draws a fresh sub-key per inner step instead (before/after stay on the
  step-0 key).
- Per image: the text loss is summed over images before ``grad``, each row depends on its own row.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from tdae_jax import configs, prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses.fdm import LossFn

STREAM = "dpd"


class Round(NamedTuple):
    """Result of one DPD round.

    text_delta:  [B,T,D] the counter-prompt perturbation (|.| <= eps_p).
    opt_state:   the text chain's optax state after the round.
    loss_before: [B] text-side loss -O at text_delta = 0 (start of the round).
    loss_after:  [B] text-side loss -O at the returned text_delta, same keys as ``loss_before``.
    """

    text_delta: jax.Array
    opt_state: object
    loss_before: jax.Array
    loss_after: jax.Array


def optimizer(dpd: configs.DPD) -> optax.GradientTransformation:
    """Text-side chain: the image side's sign descent with a constant step eta."""
    return pgd_lib.sign_pgd(dpd.step_size, max(dpd.steps, 1), "none")


def is_round(step_n: jax.Array, period: int) -> jax.Array:
    """Whether iteration ``step_n`` (counting from 1, Algorithm 1's n) runs a DPD round."""
    return jnp.equal(jnp.mod(step_n, period), 0)


def segmented(emb: jax.Array, dpd: configs.DPD | None) -> bool:
    """Whether ``emb [B,T,D]`` is budgeted per segment (SD3: ``dpd.eps_t5`` set and T5 rows present)."""
    return dpd is not None and dpd.eps_t5 is not None and emb.ndim == 3 and emb.shape[1] > dpd.clip_tokens


def _clip_rows(emb: jax.Array, dpd: configs.DPD) -> jax.Array:
    return (jnp.arange(emb.shape[1]) < dpd.clip_tokens)[None, :, None]  # [1,T,1]


def clip_padding(emb: jax.Array, dpd: configs.DPD) -> jax.Array:
    """``[B,1,D]`` True on the CLIP segment's structural zero padding (0 on every CLIP row of c)."""
    return jnp.all(emb[:, : dpd.clip_tokens] == 0, axis=1, keepdims=True)


def emb_range(emb: jax.Array, dpd: configs.DPD | None = None) -> tuple[jax.Array, jax.Array]:
    """Per-image [min c, max c] over all non-batch axes, shaped to broadcast: ([B,1,..], [B,1,..]).
    Segmented (``dpd.eps_t5`` set): per segment, ``[B,T,1]`` (CLIP rows: over the non-padding channels)."""
    if not segmented(emb, dpd):
        axes = tuple(range(1, emb.ndim))
        return jnp.min(emb, axis=axes, keepdims=True), jnp.max(emb, axis=axes, keepdims=True)
    n, pad = dpd.clip_tokens, clip_padding(emb, dpd)
    clip, t5 = emb[:, :n], emb[:, n:]
    lo_c = jnp.min(jnp.where(pad, jnp.inf, clip), axis=(1, 2), keepdims=True)
    hi_c = jnp.max(jnp.where(pad, -jnp.inf, clip), axis=(1, 2), keepdims=True)
    lo_t, hi_t = jnp.min(t5, axis=(1, 2), keepdims=True), jnp.max(t5, axis=(1, 2), keepdims=True)
    rows = _clip_rows(emb, dpd)
    return jnp.where(rows, lo_c, lo_t), jnp.where(rows, hi_c, hi_t)


def project_text(text_delta: jax.Array, emb: jax.Array, dpd: configs.DPD, lo=None, hi=None) -> jax.Array:
    """L_inf ball of radius eps_p (segmented: eps_p on the CLIP rows, eps_t5 on the T5 rows), then
    (optionally) emb + text_delta clamped to the per-image (per-segment) range; segmented: the CLIP
    padding is held at 0."""
    seg = segmented(emb, dpd)
    if seg:
        rows = _clip_rows(emb, dpd)
        eps = jnp.where(rows, dpd.eps, dpd.eps_t5).astype(text_delta.dtype)
        text_delta = jnp.clip(text_delta, -eps, eps)
    else:
        text_delta = optax.projections.projection_linf_ball(text_delta, dpd.eps)
    if dpd.clamp_to_range:
        if lo is None or hi is None:
            lo, hi = emb_range(emb, dpd)
        text_delta = jnp.clip(emb + text_delta, lo, hi) - emb
    if seg:
        text_delta = jnp.where(rows & clip_padding(emb, dpd), jnp.zeros_like(text_delta), text_delta)
    return text_delta


def round_keys(keys: jax.Array) -> jax.Array:
    """[B] keys of the DPD sub-stream for this iteration."""
    salt = prng.image_uid(STREAM)
    return jax.vmap(lambda k: jax.random.fold_in(k, salt))(keys)


def run_round(loss_fn: LossFn, delta, batch, emb, keys, dpd: configs.DPD) -> Round:
    """One DPD round: reset dp = 0, then M projected sign steps minimizing -O over dp.

    Args:
      loss_fn: ``(delta, batch, emb, keys) -> [B]`` objective, minimized on the image side.
      delta: [B,H,W,3] image perturbation (frozen during the round).
      batch: the batch dict.
      emb: [B,T,D] the clean text conditioning c.
      keys: [B] the iteration's image keys (the round uses their ``dpd`` sub-stream).
      dpd: config (steps M >= 1, step_size eta, eps eps_p, clamp_to_range, resample_noise).
    """
    if dpd.steps < 1:
        raise ValueError(f"DPD steps must be >= 1, got {dpd.steps}")
    opt = optimizer(dpd)
    base = round_keys(keys)

    def step_keys(m):
        if not dpd.resample_noise:
            return base
        return jax.vmap(lambda k: jax.random.fold_in(k, m))(base)

    lo, hi = emb_range(emb, dpd) if dpd.clamp_to_range else (None, None)

    def text_loss(td, ks):
        return -loss_fn(delta, batch, emb + td, ks)

    def summed(td, ks):
        v = text_loss(td, ks)
        return jnp.sum(v), v

    vg = jax.value_and_grad(summed, has_aux=True)

    def body(m, carry):
        td, st, before = carry
        (_, v), g = vg(td, step_keys(m))
        updates, st = opt.update(g, st, td)
        td = project_text(optax.apply_updates(td, updates), emb, dpd, lo, hi)
        before = jnp.where(m == 0, v, before)
        return td, st, before

    td0 = jnp.zeros_like(emb)
    v_shape = jax.eval_shape(text_loss, td0, base)
    init = (td0, opt.init(td0), jnp.zeros(v_shape.shape, v_shape.dtype))
    td, st, before = jax.lax.fori_loop(0, dpd.steps, body, init)
    after = text_loss(td, step_keys(0))
    return Round(td, st, before, after)
