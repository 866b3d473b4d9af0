"""TPA flatness baseline (Fan et al., NeurIPS 2024, arXiv:2311.06423, TPA Eq. 5 and 10; TDAE §IV, Table IV).

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
sign(z) = +1 (FDM's Eq. 9 is TPA with N = 1 and Delta = 0).

Project defaults (TDAE gives none; FDM's h and beta): N = 10, b = eps, k = h = 0.05, beta = 0.3.

Two estimators (``configs.TPA.estimator``, ``--tpa_estimator``):

- ``paper`` (default, above): TPA Eq. 10, the form the TDAE paper writes for its TPA baseline (TDAE
  "Eq. 3"); the default because the TDAE comparison is stated in that form.
- ``official``: what the authors' released code computes (github.com/fmy266/TPA,
  ``toolkit/adv/attack.py``, class ``TAEFEP``, methods ``step`` and ``get_optim``; driven by
  ``FAA/produce_advs.py``). Its ``step`` minimizes ``-CE`` (untargeted), i.e. already a minimized O. Per
  copy i it draws Delta_i ~ U(-b, b) (``(rand - 0.5) * 2 * 0.031 * noise_magn``), takes the gradient at the
  neighbour, then the gradient at the *sign* probe ``delta + Delta_i + k * sign(grad O_i)`` (a step toward
  higher O, i.e. lower CE), and keeps only the probe gradient (no difference, no 1/k: the ``/ k`` is
  commented out there). The estimate is the convex mix

      g_off = (1 - alpha) * grad O(delta) + (alpha/N) sum_i grad O(delta + Delta_i + k*sign(grad O_i)).

  To first order this is (1-alpha) g0 + alpha*mean g_i + alpha*k*mean H_i sign(g_i): like Eq. 10, a
  gradient-norm penalty, but with a sign probe, a neighbour-averaged base gradient and no lambda/k.
  Its update is ``torch.optim.SGD(lr=step_size, momentum=0.9)`` applied to ``grad.sign()``
  (``BaseAttack.grad_transform``), then the L_inf clip: m <- mu*m + sign(g_off) (m_1 = sign(g_1)),
  delta <- Pi(delta - step_size*m). That is ``optax.trace`` (same recursion, same first step) between
  the sign and the step: :func:`image_optimizer`, whose trace lives in ``ProtectState.opt_state``.
  Official defaults: alpha = 0.8, mu = 0.9, N = ``copies`` = 10, k = ``forward_step_size`` = 0.05 and
  b = 0.031*16 = 0.496, both in ImageNet-normalised units (about 0.011 and 0.11 in [0,1] pixel units,
  i.e. about 0.18 and 1.8 times its eps = 0.27 normalised ~ 16/255), step eps/10, 20 iterations (10 in
  an earlier revision). Here n, b and k are shared with ``paper`` (b = None means eps), so ``k`` is an
  L_inf sign step per pixel in this mode: pass a k below eps (e.g. ~0.18 eps) to match the official
  geometry.
  Not restated: the official start U(0, 1/200) (normalised units; see ``PGD.random_start``), its
  batch-mean CE (a positive per-batch factor, invisible after the sign; here per-image sums), and
  its clip to the L_inf ball only (here also x0 + delta in [0, 1], as for every method).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from tdae_jax import configs, prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses.fdm import Estimate, LossFn, sq_norm, unit, value_and_grad

STREAM = "tpa/neighbours"
ESTIMATORS = ("paper", "official")


def neighbours(keys: jax.Array, i, shape, dtype, b: float) -> jax.Array:
    """``[B,*shape]`` neighbour offsets Delta_i ~ U(-b, b), per image key."""
    salt = prng.image_uid(STREAM)

    def one(k):
        k = jax.random.fold_in(jax.random.fold_in(k, salt), i)
        return jax.random.uniform(k, shape, dtype, -b, b)

    return jax.vmap(one)(keys)


def _over_neighbours(vg, delta, keys, n: int, b: float, probe, term):
    """Over the N neighbours Delta_i: ``(sum_i term(g_i, g(probe_i)), sum_i O_i - O(probe_i))`` with
    ``g_i = grad O(delta + Delta_i)`` and ``probe_i = probe(delta + Delta_i, g_i)``; a ``fori_loop``, so memory
    is that of one gradient."""

    def body(i, carry):
        acc, zacc = carry
        nb = delta + neighbours(keys, i, delta.shape[1:], delta.dtype, b)
        li, gi = vg(nb)
        lp, gp = vg(probe(nb, gi))
        return acc + term(gi, gp), zacc + (li - lp)

    zeros = (jnp.zeros_like(delta), jnp.zeros(delta.shape[:1], jnp.result_type(delta.dtype, jnp.float32)))
    return jax.lax.fori_loop(0, n, body, zeros)


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
    acc, zacc = _over_neighbours(vg, delta, keys, n, b, lambda x, g: x - k * unit(g), lambda gi, gp: gp - gi)
    direction = g0 - (beta / n) * acc
    return Estimate(direction, l0, jnp.sqrt(sq_norm(g0)), zacc / n)


def dir_tpa_official(loss_fn: LossFn, delta, batch, emb, keys, *, n: int, b: float, k: float,
                     alpha: float) -> Estimate:
    """The official code's estimate g_off (module docstring; fmy266/TPA ``TAEFEP.step``). 2N+1 gradients.

    Same neighbours Delta_i (same stream) and same per-image keys as :func:`dir_tpa`. ``Estimate.z`` is
    the mean over neighbours of O_i - O(probe_i) (diagnostic; the official code has no z).
    """
    if n < 1:
        raise ValueError(f"TPA n must be >= 1, got {n}")
    if k <= 0 or b < 0 or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"official TPA needs k > 0, b >= 0 and 0 <= alpha <= 1, got k={k}, b={b}, alpha={alpha}")
    vg = value_and_grad(loss_fn, batch, emb, keys)
    l0, g0 = vg(delta)
    acc, zacc = _over_neighbours(vg, delta, keys, n, b, lambda x, g: x + k * jnp.sign(g), lambda gi, gp: gp)
    direction = (1.0 - alpha) * g0 + (alpha / n) * acc
    return Estimate(direction, l0, jnp.sqrt(sq_norm(g0)), zacc / n)


def _check(tpa: configs.TPA) -> None:
    if tpa.estimator not in ESTIMATORS:
        raise ValueError(f"TPA estimator must be one of {ESTIMATORS}, got {tpa.estimator!r}")


def estimator(tpa: configs.TPA, eps: float):
    """``(loss_fn, delta, batch, emb, keys) -> Estimate``; ``tpa.b = None`` means b = eps."""
    _check(tpa)
    b = eps if tpa.b is None else float(tpa.b)
    if tpa.estimator == "official":
        return lambda f, d, bt, e, ks: dir_tpa_official(f, d, bt, e, ks, n=tpa.n, b=b, k=tpa.k, alpha=tpa.alpha)
    return lambda f, d, bt, e, ks: dir_tpa(f, d, bt, e, ks, n=tpa.n, b=b, k=tpa.k, beta=tpa.beta)


def image_optimizer(tpa: configs.TPA | None, pgd: configs.PGD) -> optax.GradientTransformation:
    """The image-side chain for a run: ``pgd.optimizer(pgd)`` unless TPA ``official`` is enabled, which
    puts the official heavy-ball trace between the sign and the step (``TAEFEP.get_optim``: SGD with
    momentum ``tpa.momentum`` on the signed estimate): sign -> ``optax.trace(mu)`` -> scale by -alpha_i,
    with alpha_i the PGD config's schedule (``none`` or PhotoGuard's ``linear``)."""
    if tpa is not None:
        _check(tpa)
    if tpa is None or not tpa.enabled or tpa.estimator != "official":
        return pgd_lib.optimizer(pgd)
    if not 0.0 <= tpa.momentum <= 1.0:
        raise ValueError(f"TPA momentum must be in [0, 1], got {tpa.momentum}")
    pgd_lib.optimizer(pgd)  # validates step_size and decay
    a = float(pgd.step_size)
    schedule = pgd_lib.linear_decay(a, pgd.steps) if pgd.step_decay == "linear" else (lambda count: a)
    return optax.chain(optax.scale_by_sign(), optax.trace(decay=float(tpa.momentum)),
                       optax.scale_by_schedule(lambda count: -schedule(count)))
