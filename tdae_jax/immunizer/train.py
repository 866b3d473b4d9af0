"""The immunizer's training step: TDAE's objective (Algorithm 1: host loss + FDM flatness penalty + DPD
counter-prompt rounds) with the network parameters, not a per-image perturbation, as the optimized variables.

Amortization after DiffVax (Ozden et al., arXiv:2411.17957, §3.2; ozdentarikcan/DiffVax
``src/diffvax/immunization/diffvax_immunization.py``, ``train_immunization_all_images_batch``: one Adam step
per batch on ``loss1 + alpha * loss2``, the edit-failure term plus an L1 imperceptibility term). Here the
imperceptibility term is not needed (the budget is enforced by construction, ``net.py``) and the edit-failure
term is TDAE's: for a batch of images x_i with text conditioning c_i, delta_i = g_theta(x_i) and

    J(theta) = 1/B sum_i [ O(delta_i; e_i, xi_i) + lam * ||grad_delta O(delta_i; e_i, xi_i)||_2 ]     (TDAE Eq. 5)

with O the host objective (minimized; ``objectives.make_objective``), xi_i the per-image randomness
(``prng.image_keys(key, uid, step)``: keys depend on image id and step only) and e_i the text conditioning:
e_i = c_i, or on a DPD step (n % S == 0, n = step + 1 as Algorithm 1 counts) the counter-prompt
c_i + dp_i of ``dpd.run_round`` (TDAE Eq. 11: M projected sign steps on the embedding that make the edit of
the immunized image succeed again, delta frozen). The batch changes every step, so a counter-prompt is used in
the step that computed it only (the authors' v1 pseudo-code, XD111ds/TDAE ``tdae.py`` ``getAvgGrad``:
``c_adv`` is used in the iteration that computed it).

The gradient is the chain rule through the network: ``dJ/dtheta = (d delta/d theta)^T dJ/d delta`` (one VJP of
``g_theta``), where ``dJ/d delta`` per image is exactly what the per-image defense feeds its sign-PGD: the
estimate of ``defenses.fdm.estimator`` (off = grad O; ``finite_difference`` = Eq. 9's g_FDM with s held
constant; ``exact`` = grad O + lam H s; ``exact_gog`` = the grad of J by reverse-over-reverse). The estimate
is divided by B (J is a mean of per-image terms). Parameters are updated by adam after global-norm clipping.

``train_step(state, batch, key, model) -> (state, metrics)`` is pure: ``model`` is any pytree the loss is built
from (the surrogate: an argument of the compiled step, not a constant; ``make_loss(model)`` is called inside the
trace), ``key`` a typed base key. ``batch``: ``x0 [B,H,W,3] float32 in [0,1]``, ``uid [B] int32``, and what the
host reads (``emb [B,T,D]``, ``uncond``, ``token_mask``). ``metrics`` are scalars (means over the batch):

- ``loss``: O at g(x) before the update; ``objective``: O + lam ||grad O|| (J with the exact norm; = loss
  with FDM off); ``grad_norm``: ||grad_delta O||; ``fdm/z``: Eq. 8's z (NaN outside ``finite_difference``).
- ``dpd/round``: 1.0 on a DPD step; ``dpd/loss_before``, ``dpd/loss_after``: the text side's -O at dp = 0
  and after the M steps (NaN on other steps); ``dpd/text_linf``: max |dp| used.
- ``budget/linf``: max |delta|; ``train/grad_norm``: global norm of dJ/dtheta before clipping.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tdae_jax import configs, prng
from tdae_jax.defenses import dpd as dpd_lib
from tdae_jax.defenses import fdm as fdm_lib
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.immunizer import net as net_lib

METRIC_KEYS = ("loss", "objective", "grad_norm", "fdm/z", "dpd/round", "dpd/loss_before", "dpd/loss_after",
               "dpd/text_linf", "budget/linf", "train/grad_norm")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What the immunizer minimizes and how. ``fdm``: the flatness penalty (mode ``off`` = host alone);
    ``dpd``: counter-prompt rounds (``enabled``, period S, steps M, step eta, budget eps_p); ``lr``: adam's
    learning rate; ``clip_norm``: global-norm clipping of the parameter gradient."""

    net: net_lib.NetConfig = net_lib.NetConfig()
    fdm: configs.FDM = configs.FDM(mode="finite_difference")
    dpd: configs.DPD = configs.DPD()
    lr: float = 1e-3
    clip_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0 or self.clip_norm <= 0:
            raise ValueError(f"lr and clip_norm must be > 0, got {self.lr}, {self.clip_norm}")
        if self.dpd.enabled and (self.dpd.period < 1 or self.dpd.steps < 1):
            raise ValueError(f"DPD needs period >= 1 and steps >= 1, got {self.dpd.period}, {self.dpd.steps}")


class TrainState(NamedTuple):
    """Training state (a pytree, replicated over the mesh).

    params:    the :class:`net.Immunizer`'s Flax parameters.
    opt_state: optax state of :func:`optimizer` (clipping has none; adam's step count and moments).
    step:      int32 scalar, completed training steps (Algorithm 1's n - 1).
    """

    params: Any
    opt_state: Any
    step: jax.Array


def optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.lr))


def init_state(cfg: TrainConfig, key: jax.Array) -> TrainState:
    """Fresh state; the parameters are drawn from the ``immunizer/init`` stream of the run's base key."""
    k = prng.split_named(key, "immunizer/init")["immunizer/init"]
    params = net_lib.init_params(cfg.net, k)
    return TrainState(params, optimizer(cfg).init(params), jnp.zeros((), jnp.int32))


def counter_prompt(loss_fn, delta, batch, keys, dpd: configs.DPD, n):
    """``(e, metrics)``: the text conditioning of this step and the DPD metrics ([B] each).

    On a DPD step (``lax.cond``, traced once) ``e = emb + dpd.run_round(...)`` at the frozen ``delta``; else
    ``e = emb`` (``emb`` None for hosts without text: DPD must be off)."""
    emb = batch.get("emb")
    nan_b = jnp.full(batch["x0"].shape[:1], jnp.nan, jnp.float32)
    if not dpd.enabled:
        return emb, {"dpd/round": jnp.zeros_like(nan_b), "dpd/loss_before": nan_b, "dpd/loss_after": nan_b,
                     "dpd/text_linf": jnp.zeros_like(nan_b)}
    if emb is None:
        raise ValueError("DPD is enabled but the batch has no 'emb' (text conditioning) to perturb")

    def do_round(_):
        r = dpd_lib.run_round(loss_fn, delta, batch, emb, keys, dpd)
        return r.text_delta.astype(emb.dtype), r.loss_before.astype(jnp.float32), r.loss_after.astype(jnp.float32)

    ran = dpd_lib.is_round(n, dpd.period)
    td, before, after = jax.lax.cond(ran, do_round, lambda _: (jnp.zeros_like(emb), nan_b, nan_b), None)
    return emb + td, {"dpd/round": jnp.broadcast_to(ran.astype(jnp.float32), nan_b.shape),
                      "dpd/loss_before": before, "dpd/loss_after": after,
                      "dpd/text_linf": pgd_lib.per_image_linf(td).astype(jnp.float32)}


def param_grads(cfg: TrainConfig, make_loss: Callable, params, batch, base_key, step, model):
    """``(dJ/dtheta, per-image metrics)`` at ``params`` for training step ``step`` (module docstring)."""
    loss_fn = make_loss(model)
    x0 = batch["x0"]
    keys = prng.image_keys(base_key, batch["uid"], step)
    module = net_lib.Immunizer(cfg.net)
    delta, pullback = jax.vjp(lambda p: module.apply(p, x0), params)
    e, dpd_m = counter_prompt(loss_fn, jax.lax.stop_gradient(delta), batch, keys, cfg.dpd, step + 1)
    est = fdm_lib.estimator(cfg.fdm)(loss_fn, delta, batch, e, keys)
    (grads,) = pullback((est.direction / x0.shape[0]).astype(delta.dtype))
    lam = 0.0 if cfg.fdm.mode == "off" else cfg.fdm.lam
    f32 = lambda v: jnp.asarray(v, jnp.float32)  # noqa: E731
    per_image = {"loss": f32(est.loss), "objective": f32(est.loss + lam * est.grad_norm),
                 "grad_norm": f32(est.grad_norm), "fdm/z": f32(est.z), **dpd_m,
                 "budget/linf": f32(pgd_lib.per_image_linf(delta))}
    return grads, per_image


def make_train_step(cfg: TrainConfig, make_loss: Callable):
    """The pure ``train_step(state, batch, key, model) -> (state, metrics)`` (module docstring).

    ``make_loss(model) -> loss_fn(delta, batch, emb, keys) -> [B]`` (minimized, per image), e.g.
    ``lambda sur: objectives.make_objective(name, sur, objective_cfg)``.
    """
    opt = optimizer(cfg)
    if cfg.fdm.mode not in fdm_lib.MODES:
        raise ValueError(f"FDM mode must be one of {fdm_lib.MODES}, got {cfg.fdm.mode!r}")

    def train_step(state: TrainState, batch: dict, key: jax.Array, model: Any = None):
        grads, per_image = param_grads(cfg, make_loss, state.params, batch, key, state.step, model)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {k: jnp.mean(v) for k, v in per_image.items()}
        metrics["dpd/text_linf"] = jnp.max(per_image["dpd/text_linf"])
        metrics["budget/linf"] = jnp.max(per_image["budget/linf"])
        metrics["train/grad_norm"] = optax.tree.norm(grads).astype(jnp.float32)
        return TrainState(params, opt_state, state.step + 1), metrics

    return train_step
