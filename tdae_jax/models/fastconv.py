"""Stride-2 3x3 convolutions whose input gradient is four stride-1 convolutions (polyphase) on XLA:CPU.

The SD VAE encoder and UNet downsample with ``nn.Conv(kernel 3x3, strides 2)``. The gradient of a strided
convolution w.r.t. its input is a transposed convolution, which XLA:CPU runs as an lhs-dilated convolution on
its generic path (``convolution-base-dilated``, outside its YNNPACK kernels): 3/4 of the taps multiply
inserted zeros, and it cost 6.3 % of a PhotoGuard encoder step at 512 px and 7.8 % at 256 px, batch 4
(docs/benchmarks.md). Split by output parity instead, every input pixel ``2m + r`` receives taps of one parity
only (``y[i] = sum_a xpad[2i + a] k[a]``):

    dxpad[2m]     = g[m] k[0] + g[m-1] k[2]      (a 2-tap stride-1 convolution of g)
    dxpad[2m + 1] = g[m] k[1]                    (a 1-tap one)

in each spatial dimension, so four stride-1 convolutions with 2x2 / 2x1 / 1x2 / 1x1 sub-kernels (all on
XLA:CPU's fast path, no multiplications by zero), interleaved. The forward pass and the kernel gradient
are ``lax.conv_general_dilated``'s own; only the input gradient changes, and only on CPU
(``lax.platform_dependent``: GPU/TPU keep their native transposed convolution). Same function to float32
rounding (tests/test_fastconv.py).

``polyphase_downsampling()`` is a Flax method interceptor that routes every eligible ``nn.Conv`` (3x3, strides
2, no dilation or groups, NHWC) of the model being applied through :func:`conv3x3_s2`; ``Surrogate`` applies
its VAE and UNet under it, the SD3 VAE encoder (``sd3_vae.moments``) too.
"""
from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DN = ("NHWC", "HWIO", "NHWC")
_DN_T = ("NHWC", "HWOI", "NHWC")  # the same kernel array read with input/output features swapped


def _forward(x, k, pads, precision):
    return lax.conv_general_dilated(x, k, (2, 2), pads, dimension_numbers=_DN, precision=precision)


def conv3x3_s2(x: jax.Array, k: jax.Array, pads: tuple, precision=None) -> jax.Array:
    """``lax.conv_general_dilated(x, k, (2, 2), pads)`` for NHWC ``x`` and HWIO ``k`` of shape
    ``[3, 3, Ci, Co]``; ``pads`` = ``((top, bottom), (left, right))``."""
    return _conv(x, k, tuple(map(tuple, pads)), precision, tuple(x.shape))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, k, pads, precision, x_shape):
    return _forward(x, k, pads, precision)


def _fwd(x, k, pads, precision, x_shape):
    # symbolic_zeros=True: x, k arrive as CustomVJPPrimal(value, perturbed). The input is kept for the backward
    # pass only when the kernel gradient is wanted: an attack on frozen weights saves no activation here.
    y = _forward(x.value, k.value, pads, precision)
    return y, (x.value if k.perturbed else None, k.value)


def _bwd(pads, precision, x_shape, res, g):
    x, k = res
    if isinstance(g, jax.custom_derivatives.SymbolicZero):
        g = jnp.zeros(g.shape, g.dtype)
    dk = None if x is None else jax.vjp(lambda k_: _forward(x, k_, pads, precision), k)[1](g)[0]

    def xla_dx(g_, k_):  # XLA's transposed convolution (native on GPU/TPU)
        zeros = jnp.zeros(x_shape, k_.dtype)  # the map x -> conv(x, k) is linear: its VJP needs no x
        return jax.vjp(lambda x_: _forward(x_, k_, pads, precision), zeros)[1](g_)[0]

    def poly_dx(g_, k_):
        return polyphase_input_grad(g_, k_, x_shape, pads, precision)

    dx = lax.platform_dependent(g, k, cpu=poly_dx, default=xla_dx)
    return dx.astype(k.dtype), dk


_conv.defvjp(_fwd, _bwd, symbolic_zeros=True)


def polyphase_input_grad(g: jax.Array, k: jax.Array, x_shape: tuple, pads: tuple, precision=None) -> jax.Array:
    """Gradient w.r.t. ``x`` of ``conv(x, k, stride 2, pads)`` given the output gradient ``g`` (NHWC)."""
    n, ho, wo, _ = g.shape
    (pt, pb), (pl, pr) = pads
    hp, wp = x_shape[1] + pt + pb, x_shape[2] + pl + pr  # padded input extent
    # per dimension: even positions take taps (2, 0) over (g[m-1], g[m]) -> pad g by one on both sides;
    # odd positions take tap 1 over g[m]
    taps = {0: slice(None, None, -2), 1: slice(1, 2)}  # even: (k[2], k[0]); odd: (k[1],)
    phase = {}
    for r in (0, 1):
        for s in (0, 1):
            sub = k[taps[r]][:, taps[s]]
            gp = jnp.pad(g, ((0, 0), (1 - r, 1 - r), (1 - s, 1 - s), (0, 0)))
            phase[r, s] = lax.conv_general_dilated(gp, sub, (1, 1), "VALID", dimension_numbers=_DN_T,
                                                   precision=precision)
    # even phases cover rows 0, 2, ..., 2*ho (ho + 1 of them); odd phases rows 1, ..., 2*ho - 1 (ho)
    grow = lambda a, dh, dw: jnp.pad(a, ((0, 0), (0, dh), (0, dw), (0, 0)))  # noqa: E731
    top = jnp.stack([phase[0, 0], grow(phase[0, 1], 0, 1)], axis=3)            # [n, ho+1, wo+1, 2, c]
    bot = jnp.stack([grow(phase[1, 0], 1, 0), grow(phase[1, 1], 1, 1)], axis=3)
    full = jnp.stack([top, bot], axis=2).reshape(n, 2 * ho + 2, 2 * wo + 2, -1)
    full = full[:, : min(hp, 2 * ho + 1), : min(wp, 2 * wo + 1)]  # rows past 2*ho + 2 get no gradient
    full = jnp.pad(full, ((0, 0), (0, hp - full.shape[1]), (0, wp - full.shape[2]), (0, 0)))
    return full[:, pt: pt + x_shape[1], pl: pl + x_shape[2]]


def _explicit_pads(padding, x_shape):
    """``nn.Conv.padding`` as ((top, bottom), (left, right)) for a 3x3 stride-2 window, or None."""
    if isinstance(padding, str):
        p = padding.upper()
        if p == "VALID":
            return ((0, 0), (0, 0))
        if p == "SAME":
            return tuple(lax.padtype_to_pads(x_shape[1:3], (3, 3), (2, 2), "SAME"))
        return None
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    try:
        pads = tuple((int(a), int(b)) for a, b in padding)
    except (TypeError, ValueError):
        return None
    return pads if len(pads) == 2 else None


def _pair(v, default):
    v = default if v is None else v
    return (v, v) if isinstance(v, int) else tuple(v)


def _eligible(m: nn.Module) -> bool:
    return (type(m) is nn.Conv and _pair(m.kernel_size, None) == (3, 3) and _pair(m.strides, 1) == (2, 2)
            and m.feature_group_count == 1 and _pair(m.input_dilation, 1) == (1, 1)
            and _pair(m.kernel_dilation, 1) == (1, 1) and getattr(m, "shared_weights", True)
            and getattr(m, "mask", None) is None and getattr(m, "conv_general_dilated", None) is None
            and getattr(m, "conv_general_dilated_cls", None) is None)


def _interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not _eligible(m) or kwargs or len(args) != 1:
        return next_fun(*args, **kwargs)
    x = args[0]
    if x.ndim != 4 or not m.has_variable("params", "kernel"):  # init traces the plain module
        return next_fun(*args, **kwargs)
    pads = _explicit_pads(m.padding, x.shape)
    if pads is None:
        return next_fun(*args, **kwargs)
    kernel = m.get_variable("params", "kernel")
    bias = m.get_variable("params", "bias") if m.use_bias else None
    x, kernel, bias = m.promote_dtype(x, kernel, bias, dtype=m.dtype)
    y = conv3x3_s2(x, kernel, pads, m.precision)
    return y if bias is None else y + bias.reshape(1, 1, 1, -1)


@contextlib.contextmanager
def polyphase_downsampling():
    """Within this context, eligible ``nn.Conv`` calls of any module apply go through :func:`conv3x3_s2`."""
    with nn.intercept_methods(_interceptor):
        yield
