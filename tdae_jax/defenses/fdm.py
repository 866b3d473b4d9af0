"""FDM, the FlatGrad Defense Mechanism (TDAE §III-C, Eq. 5-10), as gradient estimators.

Sign convention. The paper *maximizes* a disruption loss L and minimizes (Eq. 5)

    J(delta) = -L(delta) + lam * ||grad L(delta)||_2 .

tdae_jax objectives are *minimized* (docs/design.md convention 2): ``O = -L``. Since grad O = -grad L and
||grad O|| = ||grad L||, the same J reads

    J(delta) = O(delta) + lam * ||grad O(delta)||_2 ,     grad J = grad O + lam * H_O s_O ,

with s_O = grad O / ||grad O|| and H_O the Hessian of O (H_O s_O = H_L s_L: both signs flip). Every
estimator below returns a *descent* direction for J, fed to the sign-PGD chain (``pgd.sign_pgd``).

Modes (``configs.FDM.mode``):

- ``off``: plain host gradient ``grad O`` (TDAE Eq. 2; 1 gradient).
- ``finite_difference`` (paper Algorithm 1, Eq. 6-9; 2 gradients, same keys = same xi): with L = -O,
  s = grad L/||grad L|| (Eq. 6; s = 0 when the gradient is 0), the probe is the paper's
  delta + h*s_L = delta - h*s_O (not re-clipped),
  z = L(probe) - L(delta) = O(delta) - O(probe)                                   (Eq. 8)
  g_FDM = -grad L1 + beta*sign(z)*(grad L2 - grad L1)
        = grad O1 - beta*sign(z)*(grad O2 - grad O1),      beta = lam/h              (Eq. 9)
  As h -> 0, -(grad O(delta - h s_O) - grad O(delta))/h -> H_O s_O and sign(z) -> +1, so this tends
  to ``exact`` with lam = beta*h. beta = 0 gives plain PGD bit for bit.
- ``exact`` (Eq. 5 differentiated, forward-over-reverse): g = grad O and H_O s by one ``jax.linearize`` of the
  gradient (1 gradient + 1 jvp of it); direction = g + lam*H_O s, s held constant.
- ``exact_gog`` (reverse-over-reverse, the reference): ``jax.grad`` of O + lam*safe_norm(grad O).

Per-image everything: O returns ``[B]``; per-image gradients are the gradient of the sum (each row of
the loss depends on its own row only); norms, s, z and sign(z) are per image. lam = ``FDM.lam`` =
beta*h (0.015 with the §9 defaults). The norm is never differentiated at 0 (:func:`safe_norm`).

Precision. The authors' pseudo-code (XD111ds/TDAE ``tdae.py``, main loop ``TDAE``: ``δv' ← δv + h*s``,
``z ← L2 - L1``, ``gFDM ← -g1 + (λ/h) sign(z) (g2 - g1)``) states no dtype. Here the perturbation, the probe,
both gradients, z and the difference g2 - g1 are held in float32 or wider (:func:`dir_fd` promotes a narrower
delta, loss or gradient), so nothing in this module rounds the probe away. What a loss computes inside is
the surrogate's business: a bfloat16 surrogate rounds ``x0 + delta - h*s`` to bf16 at its first layer, and at
512 px the per-pixel probe (h/sqrt(HWC) ~ 6e-5) is ~1/50 of a bf16 step, so g2 - g1 is rounding noise; the
command therefore refuses ``finite_difference`` with ``--dtype=bfloat16`` (``pipeline.validate``), while
``exact`` / ``exact_gog`` (derivatives, no difference of nearby values) are accepted.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from tdae_jax import configs

MODES = ("off", "finite_difference", "exact", "exact_gog")
# sqrt(sum g^2 + TINY^2): TINY^2 = 1e-24 is a normal float32, so the norm's gradient at g = 0 is 0.
TINY = 1e-12

LossFn = Callable[..., jax.Array]  # loss_fn(delta, batch, emb, keys) -> [B], minimized


class Estimate(NamedTuple):
    """A gradient estimate for a batch.

    direction: [B,...] descent direction (gradient of the minimized J), fed to sign-PGD.
    loss:      [B] objective O at the current delta (before the update).
    grad_norm: [B] ||grad O||_2 at the current delta (exactly 0 when the gradient is 0: §6.4 guard).
    z:         [B] the paper's z = L(probe) - L(delta) (finite-difference modes; NaN otherwise).
    """

    direction: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    z: jax.Array


def _bcast(v: jax.Array, like: jax.Array) -> jax.Array:
    """[B] -> [B,1,...,1] to broadcast against ``like``."""
    return v.reshape(v.shape + (1,) * (like.ndim - 1))


def sq_norm(x: jax.Array) -> jax.Array:
    """[B] sum of squares over the non-batch axes."""
    return jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim)))


def safe_norm(x: jax.Array) -> jax.Array:
    """[B] per-image sqrt(sum x^2 + TINY^2): differentiable everywhere, gradient 0 at x = 0."""
    return jnp.sqrt(sq_norm(x) + TINY**2)


def unit(g: jax.Array) -> jax.Array:
    """Per-image g / ||g||_2 (Eq. 6); exactly 0 where g == 0."""
    return g / _bcast(safe_norm(g), g)


def value_and_grad(loss_fn: LossFn, batch, emb, keys):
    """``delta -> ([B] loss, [B,...] per-image gradient)`` of a per-image objective."""

    def summed(d):
        per_image = loss_fn(d, batch, emb, keys)
        return jnp.sum(per_image), per_image

    def vg(d):
        (_, per_image), g = jax.value_and_grad(summed, has_aux=True)(d)
        return per_image, g

    return vg


def _nan_like(v: jax.Array) -> jax.Array:
    return jnp.full_like(v, jnp.nan)


def at_least_f32(x: jax.Array) -> jax.Array:
    """``x`` in float32, or unchanged when already float32 or wider (float64 under ``jax_enable_x64``)."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def dir_plain(loss_fn: LossFn, delta, batch, emb, keys) -> Estimate:
    """Host gradient grad O (FDM off). 1 gradient."""
    v, g = value_and_grad(loss_fn, batch, emb, keys)(delta)
    return Estimate(g, v, jnp.sqrt(sq_norm(g)), _nan_like(v))


def dir_fd(loss_fn: LossFn, delta, batch, emb, keys, *, beta: float, h: float) -> Estimate:
    """Paper Eq. 6-9 (Algorithm 1), per image, in the minimized-O convention (module docstring).

    2 gradients at the same ``keys``: g1 at delta, g2 at the probe delta - h*s_O. delta, the probe, the
    losses, the gradients and their difference are at least float32 (module docstring, "Precision").
    """
    vg = value_and_grad(loss_fn, batch, emb, keys)
    delta = at_least_f32(delta)
    l1, g1 = map(at_least_f32, vg(delta))
    s = unit(g1)
    l2, g2 = map(at_least_f32, vg(delta - h * s))
    z = l1 - l2  # = L(probe) - L(delta) with L = -O
    direction = g1 - beta * _bcast(jnp.sign(z), g1) * (g2 - g1)
    return Estimate(direction, l1, jnp.sqrt(sq_norm(g1)), z)


def dir_exact_hvp(loss_fn: LossFn, delta, batch, emb, keys, *, lam: float) -> Estimate:
    """grad O + lam * H_O s with s = grad O/||grad O|| held constant (Eq. 5's gradient), forward-over-reverse.

    One ``jax.linearize`` of the per-image gradient: its primal output is (O, grad O) and its linear map
    applied to s gives H_O s (the Hessian of the summed loss is block-diagonal over images).
    """
    vg = value_and_grad(loss_fn, batch, emb, keys)
    (v, g), lin = jax.linearize(vg, delta)
    s = unit(g)
    _, hs = lin(s)
    return Estimate(g + lam * hs, v, jnp.sqrt(sq_norm(g)), _nan_like(v))


def dir_exact_gog(loss_fn: LossFn, delta, batch, emb, keys, *, lam: float) -> Estimate:
    """``jax.grad`` of sum_i [O_i + lam*safe_norm(grad O)_i] (reverse-over-reverse, the reference)."""
    vg = value_and_grad(loss_fn, batch, emb, keys)

    def j(d):
        v, g = vg(d)
        return jnp.sum(v) + lam * jnp.sum(safe_norm(g)), (v, g)

    (_, (v, g)), direction = jax.value_and_grad(j, has_aux=True)(delta)
    return Estimate(direction, v, jnp.sqrt(sq_norm(g)), _nan_like(v))


def estimator(fdm: configs.FDM) -> Callable[..., Estimate]:
    """``(loss_fn, delta, batch, emb, keys) -> Estimate`` for a :class:`configs.FDM` config."""
    if fdm.mode not in MODES:
        raise ValueError(f"FDM mode must be one of {MODES}, got {fdm.mode!r}")
    if fdm.mode == "off":
        return dir_plain
    if fdm.mode == "finite_difference":
        if fdm.h <= 0:
            raise ValueError(f"FDM h must be > 0, got {fdm.h}")
        return lambda f, d, b, e, k: dir_fd(f, d, b, e, k, beta=fdm.beta, h=fdm.h)
    if fdm.mode == "exact":
        return lambda f, d, b, e, k: dir_exact_hvp(f, d, b, e, k, lam=fdm.lam)
    return lambda f, d, b, e, k: dir_exact_gog(f, d, b, e, k, lam=fdm.lam)
