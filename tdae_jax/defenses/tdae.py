"""Algorithm 1 of TDAE (appendix): one pure, jit-able step = [DPD round every S iterations] + FDM update.

    n = step + 1                                   (Algorithm 1 counts n = 1..N)
    keys = prng.image_keys(base_key, uid, step)    (one key per image; every gradient of the step shares it)
    if DPD on and n % S == 0:  text_delta = dpd.run_round(...)      (Eq. 11; a ``lax.cond``, not a Python branch)
    e = emb + text_delta  (DPD on)  |  emb  (DPD off)               (Eq. 12)
    d = estimator(loss_fn, delta, batch, e, keys)   plain | FDM finite_difference | exact | exact_gog | TPA
    delta = project(delta + sign_pgd.update(d))                      (Eq. 2/9, Algorithm 1's last lines)

``make_step`` returns ``(init_fn, step_fn)``:

- ``init_fn(batch, base_key=None) -> ProtectState`` (``pgd.init_state``; base_key seeds the random start).
- ``step_fn(state, batch, base_key) -> (state, metrics)``: pure, traced once for the whole run (the step
  counter is in the state; DPD is a ``lax.cond`` inside the compiled step). Meant for
  ``jax.jit(step_fn, in_shardings=..., out_shardings=..., donate_argnums=0)``.

``batch``: ``x0 [B,H,W,3] float32 in [0,1]``, ``uid [B] int32``, optional ``emb [B,T,D]`` (the text
conditioning, passed to ``loss_fn`` as its ``emb`` argument; None when absent), plus whatever the
objective reads.

``metrics`` (each ``[B]``, per image):

- ``loss``: objective O (minimized) at the current delta with this step's e, before the update.
- ``grad_norm``: ||grad O||_2 at the current delta (exactly 0 means the step cannot move, as at delta = 0;
  the caller should fail loudly at iteration 1 unless a random start is used).
- ``fdm/z``: the paper's z = L(probe) - L(delta) (finite difference; TPA: the mean over neighbours);
  NaN in the modes without a finite difference (off, exact, exact_gog).
- ``dpd/round``: 1.0 if a DPD round ran this step, else 0.0.
- ``dpd/loss_before``, ``dpd/loss_after``: the text-side loss -O (Eq. 11, minimized by DPD; it should
  fall) at text_delta = 0 and after the M steps, on the same keys. **NaN on steps without a round**
  (and always NaN with DPD off): nothing is carried over, so a mean over a run needs ``nanmean``.
- ``dpd/text_linf``: max |text_delta| used in this step (0 with DPD off).
- ``budget/linf``: max |delta| after the update (<= eps up to one float rounding).

TPA (``tpa.enabled``) replaces the FDM estimator; enabling both TPA and an FDM mode is an error.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from tdae_jax import configs, prng
from tdae_jax.defenses import dpd as dpd_lib
from tdae_jax.defenses import fdm as fdm_lib
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses import tpa as tpa_lib
from tdae_jax.defenses.pgd import ProtectState

METRIC_KEYS = (
    "loss",
    "grad_norm",
    "fdm/z",
    "dpd/round",
    "dpd/loss_before",
    "dpd/loss_after",
    "dpd/text_linf",
    "budget/linf",
)


def make_estimator(*, budget: configs.Budget, fdm: configs.FDM, tpa: configs.TPA | None):
    """The gradient estimator the configs pick: ``(loss_fn, delta, batch, emb, keys) -> fdm.Estimate``."""
    if tpa is not None and tpa.enabled:
        if fdm.mode != "off":
            raise ValueError(f"TPA and FDM mode {fdm.mode!r} are both enabled; TPA replaces FDM, pick one")
        return tpa_lib.estimator(tpa, budget.eps)
    return fdm_lib.estimator(fdm)


def make_step(
    loss_fn: Callable,
    *,
    budget: configs.Budget,
    pgd: configs.PGD,
    fdm: configs.FDM | None = None,
    tpa: configs.TPA | None = None,
    dpd: configs.DPD | None = None,
):
    """Builds Algorithm 1's ``(init_fn, step_fn)`` for a per-image objective.

    Args:
      loss_fn: ``(delta [B,H,W,3], batch, emb [B,T,D] | None, keys [B]) -> [B]`` float, minimized;
        each row depends on its own row only; all randomness from ``keys``.
      budget: L_inf image budget eps.
      pgd: image step alpha, N (for the linear decay), random start.
      fdm: gradient estimator (default: off = plain host gradient).
      tpa: TPA baseline (replaces FDM when enabled).
      dpd: Dynamic Prompt Defense (needs ``batch['emb']``).
    Returns:
      ``(init_fn(batch, base_key=None) -> ProtectState, step_fn(state, batch, base_key) -> (state, metrics))``.
    """
    fdm = fdm or configs.FDM()
    dpd = dpd or configs.DPD()
    estimate = make_estimator(budget=budget, fdm=fdm, tpa=tpa)
    opt = tpa_lib.image_optimizer(tpa, pgd)  # pgd.optimizer(pgd), or with the official TPA's momentum trace
    if dpd.enabled and (dpd.period < 1 or dpd.steps < 1):
        raise ValueError(f"DPD needs period >= 1 and steps >= 1, got period={dpd.period}, steps={dpd.steps}")

    def init_fn(batch: dict, base_key: jax.Array | None = None) -> ProtectState:
        state = pgd_lib.init_state(batch, budget=budget, pgd=pgd, dpd=dpd, base_key=base_key)
        return state._replace(opt_state=opt.init(state.delta))

    def step_fn(state: ProtectState, batch: dict, base_key: jax.Array):
        x0 = batch["x0"]
        emb = batch.get("emb")
        n = state.step + 1
        keys = prng.image_keys(base_key, batch["uid"], state.step)
        nan_b = jnp.full(x0.shape[:1], jnp.nan, jnp.float32)

        if dpd.enabled:
            if emb is None:
                raise ValueError("DPD is enabled but the batch has no 'emb' (text conditioning) to perturb")

            def do_round(operand):
                text_delta, dpd_state = operand
                r = dpd_lib.run_round(loss_fn, state.delta, batch, emb, keys, dpd)
                return (r.text_delta.astype(text_delta.dtype), r.opt_state,
                        r.loss_before.astype(jnp.float32), r.loss_after.astype(jnp.float32))

            def keep(operand):
                text_delta, dpd_state = operand
                return text_delta, dpd_state, nan_b, nan_b

            ran = dpd_lib.is_round(n, dpd.period)
            text_delta, dpd_state, before, after = jax.lax.cond(
                ran, do_round, keep, (state.text_delta, state.dpd_opt_state))
            e = emb + text_delta
            dpd_round = jnp.broadcast_to(ran.astype(jnp.float32), x0.shape[:1])
        else:
            text_delta, dpd_state, before, after, e = state.text_delta, state.dpd_opt_state, nan_b, nan_b, emb
            dpd_round = jnp.zeros(x0.shape[:1], jnp.float32)

        est = estimate(loss_fn, state.delta, batch, e, keys)
        updates, opt_state = opt.update(est.direction, state.opt_state, state.delta)
        delta = pgd_lib.project(optax.apply_updates(state.delta, updates), x0, budget.eps)

        new_state = ProtectState(
            delta=delta,
            opt_state=opt_state,
            text_delta=text_delta,
            dpd_opt_state=dpd_state,
            step=state.step + 1,
        )
        f32 = lambda v: v.astype(jnp.float32)  # noqa: E731
        metrics = {
            "loss": f32(est.loss),
            "grad_norm": f32(est.grad_norm),
            "fdm/z": f32(est.z),
            "dpd/round": dpd_round,
            "dpd/loss_before": before,
            "dpd/loss_after": after,
            "dpd/text_linf": f32(pgd_lib.per_image_linf(text_delta)),
            "budget/linf": f32(pgd_lib.per_image_linf(delta)),
        }
        return new_state, metrics

    return init_fn, step_fn
