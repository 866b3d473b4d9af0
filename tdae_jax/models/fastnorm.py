"""GroupNorm with per-channel sums and a hand-written backward pass on XLA:CPU.

Every ResNet block of the SD VAE and UNet starts with ``nn.GroupNorm(32)`` (Wu & He 2018):

    y = (x - mu_g) / sqrt(var_g + eps) * gamma + beta,   mu_g, var_g over the pixels and channels of group g

Flax computes ``mu_g`` and ``var_g`` = E[x^2] - mu_g^2 (``use_fast_variance``) as reductions over the
(pixels, channels-of-the-group) axes of a ``[n, ..., G, C/G]`` view, and autodiff's backward pass materializes
``x - mu``, its products and their group reductions as separate full-size loops. On XLA:CPU that made GroupNorm
+ SiLU cost 1.4-1.6x PyTorch's kernels over the encoder's 22 norms (docs/benchmarks.md, "PhotoGuard encoder step").
Here the statistics are per-channel column sums (``sum_p x``, ``sum_p x^2`` over the pixels: a contiguous,
vectorized reduction) folded into the G groups afterwards, and the input gradient is the closed form

    xh = (x - mu) r,  r = (var + eps)^-1/2,   dx = r (dxh - mean_g(dxh) - xh mean_g(dxh xh)),   dxh = dy gamma

from two more column sums (``sum_p dy``, and ``sum_p dy x`` from which ``mu sum_p dy`` is taken, so no ``x - mu``
is materialized), which also give ``dgamma`` and ``dbeta``, and one loop. The forward pass is the same on every
backend; the hand-written backward runs on CPU only (``lax.platform_dependent``; GPU/TPU differentiate the
forward pass as before). The backward is itself made of differentiable ops, so FDM's gradient of a gradient norm
goes through it. Same function as Flax's to float32 rounding (tests/test_fastnorm.py).

``fast_group_norm()`` is a Flax method interceptor that routes every eligible ``nn.GroupNorm`` (groups by
``num_groups``, scale and bias, Flax's default statistics) of the model being applied through
:func:`group_norm`; ``Surrogate`` applies its VAE and UNet under it (the UNet's transformer norms keep their
PyTorch-epsilon override in ``sd.py``).
"""
from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, groups: int, eps: float,
               dtype=None) -> jax.Array:
    """``nn.GroupNorm(groups, epsilon=eps)`` applied to ``x`` of shape ``[n, ..., C]`` with parameters
    ``scale``, ``bias`` of shape ``[C]``; statistics in at least float32, result in ``dtype`` (default: the
    promoted dtype of ``x``, ``scale``, ``bias``, as Flax)."""
    dtype = jnp.dtype(dtype if dtype is not None else jnp.result_type(x, scale, bias))
    return _gn(x, scale, bias, int(groups), float(eps), dtype)


def _stats_dtype(x):
    return jnp.promote_types(x.dtype, jnp.float32)


def _colsum(a, b=None):
    """``sum_p a[n, p, c] (* b[n, p, c])`` -> ``[n, C]``, written as a contraction: XLA:CPU 0.10 runs the same
    product-then-``sum(axis=1)`` as a YNNPACK reduction about 70x slower (185 vs 2.7 ms at 256 px x 128 ch)."""
    return jnp.einsum("npc->nc", a) if b is None else jnp.einsum("npc,npc->nc", a, b)


def _per_group(t, groups):
    """``[n, C]`` per-channel sums -> ``[n, C]`` sums over each channel's group."""
    n, c = t.shape
    return jnp.repeat(t.reshape(n, groups, c // groups).sum(-1), c // groups, axis=1)


def _stats(x, groups, eps):
    """Per-channel ``mu`` and ``r = (var + eps)^-1/2`` of shape ``[n, C]``, and the flattened float input."""
    n, c = x.shape[0], x.shape[-1]
    xf = x.reshape(n, -1, c).astype(_stats_dtype(x))
    count = xf.shape[1] * (c // groups)
    mu = _per_group(_colsum(xf), groups) / count
    var = jnp.maximum(_per_group(_colsum(xf, xf), groups) / count - jnp.square(mu), 0.0)
    return xf, mu, lax.rsqrt(var + eps)


def _forward(x, scale, bias, groups, eps, dtype):
    xf, mu, r = _stats(x, groups, eps)
    y = (xf - mu[:, None]) * (r * scale)[:, None] + bias
    return y.reshape(x.shape).astype(dtype), (mu, r)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _gn(x, scale, bias, groups, eps, dtype):
    return _forward(x, scale, bias, groups, eps, dtype)[0]


def _fwd(x, scale, bias, groups, eps, dtype):
    y, (mu, r) = _forward(x, scale, bias, groups, eps, dtype)
    return y, (x, scale, bias, mu, r)


def closed_form_vjp(dy, x, scale, bias, mu, r, groups):
    """(dx, dscale, dbias) of GroupNorm from the forward's statistics: two column sums and one loop."""
    n, c = x.shape[0], x.shape[-1]
    xf = x.reshape(n, -1, c).astype(mu.dtype)
    g = dy.reshape(n, -1, c).astype(mu.dtype)
    count = xf.shape[1] * (c // groups)
    s_dy = _colsum(g)                                # sum_p dy       [n, C]  (-> dbias)
    s_dyxh = (_colsum(g, xf) - mu * s_dy) * r        # sum_p dy * xh  [n, C]  (-> dscale)
    mean_dxh = _per_group(s_dy * scale, groups) / count
    k = r * r * _per_group(s_dyxh * scale, groups) / count   # r^2 mean_g(dxh xh)
    dx = g * (r * scale)[:, None] - xf * k[:, None] + (mu * k - r * mean_dxh)[:, None]
    return (dx.reshape(x.shape).astype(x.dtype), s_dyxh.sum(0).astype(scale.dtype),
            s_dy.sum(0).astype(bias.dtype))


def autodiff_vjp(dy, x, scale, bias, groups, eps, dtype):
    """(dx, dscale, dbias) of GroupNorm by differentiating :func:`_forward` (what GPU/TPU run)."""
    return jax.vjp(lambda *a: _forward(*a, groups, eps, dtype)[0], x, scale, bias)[1](dy)


def _bwd(groups, eps, dtype, res, dy):
    x, scale, bias, mu, r = res
    return tuple(lax.platform_dependent(
        dy, x, scale, bias, mu, r,
        cpu=lambda *a: closed_form_vjp(*a, groups),
        default=lambda dy, x, scale, bias, mu, r: autodiff_vjp(dy, x, scale, bias, groups, eps, dtype)))


_gn.defvjp(_fwd, _bwd)


def _eligible(m: nn.Module, args, kwargs) -> bool:
    return (type(m) is nn.GroupNorm and len(args) == 1 and kwargs.get("mask") is None
            and set(kwargs) <= {"mask"} and m.num_groups is not None and m.group_size is None
            and m.reduction_axes is None and m.axis_name is None and m.use_bias and m.use_scale
            and m.use_fast_variance and getattr(m, "force_float32_reductions", True)
            and args[0].ndim >= 3 and args[0].shape[-1] % m.num_groups == 0
            and m.has_variable("params", "scale"))  # init traces the plain module


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not _eligible(m, args, kwargs):
        return next_fun(*args, **kwargs)
    scale, bias = m.get_variable("params", "scale"), m.get_variable("params", "bias")
    return group_norm(args[0], scale, bias, m.num_groups, m.epsilon, m.dtype)


@contextlib.contextmanager
def fast_group_norm():
    """Within this context, eligible ``nn.GroupNorm`` calls of any module apply go through :func:`group_norm`."""
    with nn.intercept_methods(_interceptor):
        yield
