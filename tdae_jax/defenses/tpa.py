"""TPA flatness baseline (Fan et al., NeurIPS 2024, arXiv:2311.06423, TPA Eq. 5 and 10; TDAE spec §5).

Paper form (L maximized):

    min_delta  -L(delta) + lam * E_{Delta~U(-b,b)} ||grad L(delta + Delta)||_2                  (TPA Eq. 5)
    g_TPA = -grad L(delta) + (lam/N) sum_i [grad L(delta+Delta_i + k*u_i) - grad L(delta+Delta_i)] / k,
    u_i = grad L(delta+Delta_i) / ||grad L(delta+Delta_i)||                                      (TPA Eq. 10)

In the minimized-O convention of tdae_jax (O = -L, see ``fdm``): u_i = -unit(grad O_i), so

    g_TPA = grad O(delta) - (beta/N) sum_i [grad O(delta+Delta_i - k*unit(grad O_i)) - grad O(delta+Delta_i)],

with beta = lam/k. Cost: 2N+1 gradients per step (one at the centre, two per neighbour), all with the
same per-image keys (same xi); the neighbours Delta_i are drawn per image from a named sub-stream of
the image key, so they are batch-layout independent. Neighbours run sequentially in a
``lax.fori_loop`` (memory of one gradient). With N = 1 and b = 0 this is FDM's finite difference with
sign(z) = +1 (TDAE spec §6.2: "TPA with N = 1 and Delta = 0").

Project defaults (spec §5): N = 10, b = eps, k = h = 0.05, beta = 0.3.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax import configs, prng
from tdae_jax.defenses.fdm import Estimate, LossFn, sq_norm, unit, value_and_grad

STREAM = "tpa/neighbours"


def neighbours(keys: jax.Array, i, shape, dtype, b: float) -> jax.Array:
    """``[B,*shape]`` neighbour offsets Delta_i ~ U(-b, b), per image key."""
    salt = prng.image_uid(STREAM)

    def one(k):
        k = jax.random.fold_in(jax.random.fold_in(k, salt), i)
        return jax.random.uniform(k, shape, dtype, -b, b)

    return jax.vmap(one)(keys)


def dir_tpa(loss_fn: LossFn, delta, batch, emb, keys, *, n: int, b: float, k: float, beta: float) -> Estimate:
    """TPA Eq. 10 direction for a minimized objective. 2N+1 gradients.

    ``Estimate.z`` is the mean over neighbours of L(probe_i) - L(delta+Delta_i) = O_i - O(probe_i)
    (diagnostic only: TPA has no sign(z)).
    """
    if n < 1:
        raise ValueError(f"TPA n must be >= 1, got {n}")
    if k <= 0 or b < 0:
        raise ValueError(f"TPA needs k > 0 and b >= 0, got k={k}, b={b}")
    vg = value_and_grad(loss_fn, batch, emb, keys)
    l0, g0 = vg(delta)

    def body(i, carry):
        acc, zacc = carry
        nb = delta + neighbours(keys, i, delta.shape[1:], delta.dtype, b)
        li, gi = vg(nb)
        lp, gp = vg(nb - k * unit(gi))
        return acc + (gp - gi), zacc + (li - lp)

    acc, zacc = jax.lax.fori_loop(0, n, body, (jnp.zeros_like(g0), jnp.zeros_like(l0)))
    direction = g0 - (beta / n) * acc
    return Estimate(direction, l0, jnp.sqrt(sq_norm(g0)), zacc / n)


def estimator(tpa: configs.TPA, eps: float):
    """``(loss_fn, delta, batch, emb, keys) -> Estimate``; ``tpa.b = None`` means b = eps."""
    b = eps if tpa.b is None else float(tpa.b)
    return lambda f, d, bt, e, ks: dir_tpa(f, d, bt, e, ks, n=tpa.n, b=b, k=tpa.k, beta=tpa.beta)
