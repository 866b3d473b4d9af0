"""Sign-PGD on the image under an L_inf budget (TDAE §III-B, Eq. 1-2; Algorithm 1's update lines).

    delta <- Pi_{||.||_inf <= eps, x0 + . in [0,1]}(delta - alpha_i * sign(d))

where ``d`` is the gradient (or FDM/TPA direction) of an objective that is **minimized** (docs/design.md
convention 2: every objective returns a value to minimize; the paper's maximized L is -objective).

- :func:`sign_pgd` is the update as an optax chain: ``scale_by_sign`` then scale by ``-alpha_i``. The
  same transform serves the text side of DPD (TDAE Eq. 11).
- ``decay='linear'`` is PhotoGuard's schedule ``a_i = a - (a - a/100) / N * i`` (i = 0..N-1, the
  optimizer's own step count), MadryLab/photoguard notebooks; held at its floor a/100 for i >= N (a
  longer run never gets a zero or negative step).
- :func:`project` is the budget: the L_inf ball (``optax.projections.projection_linf_ball``) then the
  [0,1] range of ``x0 + delta`` (Algorithm 1, last two lines). It is applied after every update.
- :class:`ProtectState` is the whole optimisation state of a batch; ``init_state`` builds it, with an
  optional seeded random start ``U(-r*eps, r*eps)`` keyed by image uid (project guard: grad = 0 at delta = 0).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from tdae_jax import configs, prng

DECAYS = ("none", "linear")


class ProtectState(NamedTuple):
    """Optimisation state of one batch (a pytree; leading axis of the arrays = images).

    delta:         [B,H,W,3] image perturbation, |delta| <= eps and x0 + delta in [0,1].
    opt_state:     optax state of :func:`sign_pgd` on ``delta`` (a step count, replicated).
    text_delta:    [B,T,D] DPD text-embedding perturbation; zeros when DPD is off. When the batch has no
                   ``emb`` it is a [B,1,1] zero placeholder (keeps the pytree shape static).
    dpd_opt_state: optax state of the DPD text-side chain (reset at every DPD round).
    step:          int32 scalar, number of completed iterations (Algorithm 1's n - 1).
    """

    delta: jax.Array
    opt_state: Any
    text_delta: jax.Array
    dpd_opt_state: Any
    step: jax.Array


def linear_decay(step_size: float, steps: int):
    """PhotoGuard's linear decay ``a_i = a - (a - a/100) / N * i`` as an optax schedule of ``i``.

    Exact for i < N (PhotoGuard runs i = 0..N-1); floored at a/100 beyond.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1 for a decaying schedule, got {steps}")
    a = float(step_size)
    slope = (a - a / 100.0) / float(steps)

    def schedule(count):
        return jnp.maximum(a - slope * jnp.asarray(count, jnp.float32), a / 100.0)

    return schedule


def sign_pgd(step_size: float, steps: int = 1, decay: str = "none") -> optax.GradientTransformation:
    """Sign-descent chain: ``sign(g)`` then scale by ``-schedule(i)``.

    Args:
      step_size: alpha (image: [0,1] pixel units; text: raw embedding units).
      steps: N, the horizon of the ``linear`` decay (unused for ``none``).
      decay: ``none`` (constant alpha) or ``linear`` (PhotoGuard).
    Returns:
      an ``optax.GradientTransformation``; ``updates`` are added with ``optax.apply_updates``.
    """
    if decay not in DECAYS:
        raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size}")
    if decay == "none":
        a = float(step_size)
        return optax.chain(optax.scale_by_sign(), optax.scale_by_schedule(lambda count: -a))
    schedule = linear_decay(step_size, steps)
    return optax.chain(optax.scale_by_sign(), optax.scale_by_schedule(lambda count: -schedule(count)))


def optimizer(pgd: configs.PGD) -> optax.GradientTransformation:
    """The image-side chain of a :class:`configs.PGD` config."""
    return sign_pgd(pgd.step_size, pgd.steps, pgd.step_decay)


def project(delta: jax.Array, x0: jax.Array, eps: float) -> jax.Array:
    """Budget projection: L_inf ball of radius ``eps``, then ``x0 + delta`` clipped to [0,1].

    Args:
      delta: [B,H,W,3] perturbation.
      x0: [B,H,W,3] float in [0,1], the clean images.
      eps: L_inf radius in [0,1] units.
    Returns:
      [B,H,W,3] with |delta| <= eps (up to one rounding of x0 + delta) and x0 + delta in [0,1].
    """
    delta = optax.projections.projection_linf_ball(delta, eps)
    return jnp.clip(x0 + delta, 0.0, 1.0) - x0


def per_image_linf(x: jax.Array) -> jax.Array:
    """``[B]`` max |x| over all non-batch axes."""
    return jnp.max(jnp.abs(x), axis=tuple(range(1, x.ndim)))


def random_start(base_key: jax.Array, uid: jax.Array, x0: jax.Array, eps: float, r: float) -> jax.Array:
    """Seeded ``U(-r*eps, r*eps)`` start, projected; keyed by image uid only (batch-layout free)."""
    stream = prng.split_named(base_key, "pgd/random_start")["pgd/random_start"]
    keys = prng.image_keys(stream, uid, 0)
    lim = r * eps
    d = jax.vmap(lambda k: jax.random.uniform(k, x0.shape[1:], x0.dtype, -lim, lim))(keys)
    return project(d, x0, eps)


def init_state(
    batch: dict,
    *,
    budget: configs.Budget,
    pgd: configs.PGD,
    dpd: configs.DPD | None = None,
    base_key: jax.Array | None = None,
) -> ProtectState:
    """Initial :class:`ProtectState` for a batch.

    Args:
      batch: dict with ``x0: [B,H,W,3] float in [0,1]``, ``uid: [B] int32`` and optionally
        ``emb: [B,T,D]`` (the text conditioning DPD perturbs).
      budget, pgd, dpd: configs. ``pgd.random_start = r > 0`` draws delta ~ U(-r*eps, r*eps).
      base_key: typed run key; required when ``pgd.random_start > 0``.
    """
    x0 = jnp.asarray(batch["x0"])
    b = x0.shape[0]
    if pgd.random_start > 0:
        if base_key is None:
            raise ValueError("pgd.random_start > 0 needs base_key (the start is seeded, never random)")
        delta = random_start(base_key, batch["uid"], x0, budget.eps, pgd.random_start)
    else:
        delta = jnp.zeros_like(x0)
    emb = batch.get("emb")
    text_delta = jnp.zeros_like(emb) if emb is not None else jnp.zeros((b, 1, 1), x0.dtype)
    dpd = dpd or configs.DPD()
    text_opt = sign_pgd(dpd.step_size, max(dpd.steps, 1), "none")
    return ProtectState(
        delta=delta,
        opt_state=optimizer(pgd).init(delta),
        text_delta=text_delta,
        dpd_opt_state=text_opt.init(text_delta),
        step=jnp.zeros((), jnp.int32),
    )
