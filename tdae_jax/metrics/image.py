"""Full-reference image metrics in JAX: PSNR, SSIM, VIFp, FSIM(c) (TDAE §IV-A).

Protection efficacy compares ``a = edit(protected)`` (the test image) with ``b = edit(clean)`` (the
reference); imperceptibility compares ``a = protected`` with ``b = original``. Every function takes
``a, b: [B, H, W, 3] float32 in [0, 1]`` and returns ``[B]`` float32, one score per image: each is a
single-image function ``jax.vmap``-ed over the batch, so a score depends only on its own pair (a
batch gives what the images give one by one, to float rounding). Each validates shapes in Python and
calls a ``jax.jit``-compiled core with every option passed explicitly (one compilation per shape and
option set); each can also be called inside a jit or differentiated. Convolutions run at
``Precision.HIGHEST`` so scores do not depend on the accelerator's default (bf16) conv precision.

References the ports are tested against (``tests/test_metrics.py``):

- PSNR, SSIM: scikit-image 0.26 ``peak_signal_noise_ratio`` / ``structural_similarity``.
- VIFp, FSIMc: ``piq`` 0.8.0 ``vif_p`` / ``fsim`` (the algorithms transcribed here, with their
  constants, from piq's code, which follows the authors' MATLAB releases).
"""
from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["psnr", "ssim", "vifp", "fsim", "compute_all", "METRICS", "HIGHER_IS_MORE_SIMILAR"]

_HI = lax.Precision.HIGHEST
_F32_EPS = float(np.finfo(np.float32).eps)


def _check(a: jax.Array, b: jax.Array, min_size: int = 1) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[-1] != 3:
        raise ValueError(f"expected two [B, H, W, 3] image batches of equal shape, got {a.shape} and {b.shape}")
    if min(a.shape[1:3]) < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size}, got {a.shape[1]}x{a.shape[2]}")


def _corr2d(x: jax.Array, k: np.ndarray, pad: int = 0) -> jax.Array:
    """Cross-correlation of each channel of ``x: [H, W, C]`` with ``k: [kh, kw]`` (zero padding ``pad``;
    ``pad=0`` is 'valid'), as ``torch.nn.functional.conv2d`` computes it."""
    c = x.shape[-1]
    rhs = jnp.broadcast_to(jnp.asarray(k, jnp.float32)[:, :, None, None], k.shape + (1, c))
    out = lax.conv_general_dilated(
        x[None], rhs, (1, 1), [(pad, pad), (pad, pad)], dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=c, precision=_HI)
    return out[0]


# ----------------------------------------------------------------------------------------------- PSNR
def psnr(a: jax.Array, b: jax.Array, data_range: float = 1.0, max_db: float | None = None) -> jax.Array:
    """Peak signal-to-noise ratio, ``10 log10(R^2 / MSE)`` with the MSE over all pixels and channels.

    Args:
      a, b: ``[B, H, W, 3] float32 in [0, data_range]``.
      data_range: R (1 for [0, 1] images).
      max_db: ``None`` (default) keeps ``+inf`` for identical images (MSE = 0), as scikit-image does;
        a number caps the score there (e.g. 100 dB), so averages over a set stay finite.
    Returns:
      ``[B]`` PSNR in dB (higher = more similar).
    """
    _check(a, b)
    return _psnr(a, b, data_range=float(data_range), max_db=None if max_db is None else float(max_db))


@functools.partial(jax.jit, static_argnames=("data_range", "max_db"))
def _psnr(a, b, data_range, max_db):
    mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
    out = 10.0 * jnp.log10(data_range ** 2 / mse)
    return out if max_db is None else jnp.minimum(out, max_db)


# ----------------------------------------------------------------------------------------------- SSIM
def _gaussian_1d(sigma: float, radius: int) -> np.ndarray:
    """scipy.ndimage's Gaussian taps: ``exp(-x^2 / 2 sigma^2)`` on ``[-radius, radius]``, normalized."""
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * x ** 2 / sigma ** 2)
    return w / w.sum()


def _ssim1(a, b, data_range, k1, k2, sigma):
    # skimage: truncate 3.5 -> radius int(3.5 sigma + 0.5) = 5 -> 11x11 window; the SSIM map is averaged
    # after cropping `radius` pixels at each border, i.e. exactly over the 'valid' filter positions, so
    # skimage's reflect padding never reaches the mean and a valid-mode filter is an exact port.
    g = _gaussian_1d(sigma, int(3.5 * sigma + 0.5))
    # One separable (as ndimage.gaussian_filter) depthwise pass over all 5 moments x 3 channels.
    z = jnp.concatenate([a, b, a * a, b * b, a * b], axis=-1)
    ux, uy, uxx, uyy, uxy = jnp.split(_corr2d(_corr2d(z, g[:, None]), g[None, :]), 5, axis=-1)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return jnp.mean(s)  # mean over the map of each channel, then over channels (equal sizes)


def ssim(a: jax.Array, b: jax.Array, data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03,
         sigma: float = 1.5) -> jax.Array:
    """Mean structural similarity (Wang et al., IEEE TIP 2004), Gaussian-weighted.

    Matches ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, data_range=1,
    gaussian_weights=True, use_sample_covariance=False)``: 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, population (co)variances,
    ``SSIM = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2))``
    averaged over the map (border of 5 px excluded) of each RGB channel, then over channels.

    Args:
      a, b: ``[B, H, W, 3] float32 in [0, data_range]``, H, W >= 11.
    Returns:
      ``[B]`` SSIM in [-1, 1] (1 for identical images).
    """
    _check(a, b, min_size=2 * int(3.5 * sigma + 0.5) + 1)
    return _ssim(a, b, data_range=float(data_range), k1=float(k1), k2=float(k2), sigma=float(sigma))


@functools.partial(jax.jit, static_argnames=("data_range", "k1", "k2", "sigma"))
def _ssim(a, b, data_range, k1, k2, sigma):
    f = functools.partial(_ssim1, data_range=data_range, k1=k1, k2=k2, sigma=sigma)
    return jax.vmap(f)(a.astype(jnp.float32), b.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------- VIFp
def _luma(x: jax.Array) -> jax.Array:
    """``[..., 3]`` RGB -> ``[..., 1]`` Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601)."""
    return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2])[..., None]


def _gaussian_2d(size: int, sigma: float) -> np.ndarray:
    """piq.functional.gaussian_filter: normalized 2-D Gaussian on ``size`` taps centred at (size-1)/2."""
    c = np.arange(size, dtype=np.float32) - (size - 1) / 2.0
    g = np.exp(-(c[None, :] ** 2 + c[:, None] ** 2) / (2 * sigma ** 2))
    return (g / g.sum()).astype(np.float32)


def _vifp1(x, y, sigma_n_sq):
    eps = 1e-8
    x, y = _luma(x) * 255.0, _luma(y) * 255.0
    # (Co)variances are shift-invariant and VIF uses nothing else: removing the mean luminance of the
    # reference (same shift for both) cuts float32 cancellation in E[x^2] - E[x]^2 at the 255 scale.
    shift = jnp.mean(y)
    x, y = x - shift, y - shift
    num = den = 0.0
    for scale in range(4):
        size = 2 ** (4 - scale) + 1
        k = _gaussian_2d(size, size / 5)
        if scale > 0:  # blur ('valid') and keep every second row/column
            x, y = jnp.split(_corr2d(jnp.concatenate([x, y], -1), k)[::2, ::2], 2, axis=-1)
        mu_x, mu_y, e_xx, e_yy, e_xy = jnp.split(_corr2d(jnp.concatenate([x, y, x * x, y * y, x * y], -1), k), 5, -1)
        s_xx = jax.nn.relu(e_xx - mu_x * mu_x)
        s_yy = jax.nn.relu(e_yy - mu_y * mu_y)
        s_xy = e_xy - mu_x * mu_y
        g = s_xy / (s_yy + eps)
        s_v = s_xx - g * s_xy
        g = jnp.where(s_yy >= eps, g, 0.0)
        s_v = jnp.where(s_yy >= eps, s_v, s_xx)
        s_yy = jnp.where(s_yy >= eps, s_yy, 0.0)
        g = jnp.where(s_xx >= eps, g, 0.0)
        s_v = jnp.where(s_xx >= eps, s_v, 0.0)
        s_v = jnp.where(g >= 0, s_v, s_xx)
        g = jax.nn.relu(g)
        s_v = jnp.where(s_v > eps, s_v, eps)
        num = num + jnp.sum(jnp.log10(1.0 + g * g * s_yy / (s_v + sigma_n_sq)))
        den = den + jnp.sum(jnp.log10(1.0 + s_yy / sigma_n_sq))
    return (num + eps) / (den + eps)


def vifp(a: jax.Array, b: jax.Array, sigma_n_sq: float = 2.0) -> jax.Array:
    """Visual information fidelity, pixel domain (Sheikh & Bovik, IEEE TIP 2006; LIVE ``vifvec`` pixel
    variant), as ``piq.vif_p(a, b, data_range=1)``.

    On the luminance Y (scaled to [0, 255]), over 4 scales (Gaussian windows of 17, 9, 5, 3 taps,
    sigma = taps / 5, 'valid' filtering, dyadic downsampling between scales), with the GSM channel
    ``a = g b + v``: ``g = s_ab / s_b^2``, ``s_v^2 = s_a^2 - g s_ab`` and HVS noise sigma_n^2 = 2,
    ``VIF = sum log10(1 + g^2 s_b^2 / (s_v^2 + sigma_n^2)) / sum log10(1 + s_b^2 / sigma_n^2)``.
    Not symmetric: ``a`` is the distorted/test image, ``b`` the reference. A flat reference (no variance
    anywhere) gives 0/0, guarded to 1 by the eps terms, as in piq.

    Args:
      a, b: ``[B, H, W, 3] float32 in [0, 1]``, H, W >= 41.
    Returns:
      ``[B]`` VIFp (1 for identical images; lower = less information of b preserved in a).
    """
    _check(a, b, min_size=41)
    return _vifp(a, b, sigma_n_sq=float(sigma_n_sq))


@functools.partial(jax.jit, static_argnames=("sigma_n_sq",))
def _vifp(a, b, sigma_n_sq):
    f = functools.partial(_vifp1, sigma_n_sq=sigma_n_sq)
    return jax.vmap(f)(a.astype(jnp.float32), b.astype(jnp.float32))


# ----------------------------------------------------------------------------------------------- FSIM
@functools.lru_cache(maxsize=16)
def _log_gabor_bank(h: int, w: int, scales: int, orientations: int, min_length: float, mult: float,
                    sigma_f: float, delta_theta: float):
    """The frequency-domain log-Gabor bank of piq's ``_construct_filters`` (Kovesi's phasecong2) and the
    image-independent noise statistics of ``_phase_congruency``, computed once per shape in float64.

    Returns ``filters [O, S, H, W]`` (0 frequency at [0, 0]) and per-orientation ``em_n`` (mean squared
    filter value at the smallest scale, summed), ``sum_an2`` and ``sum_ai_aj`` (spatial filter energies).
    """
    def axis(n):
        return (np.arange(-(n - 1) / 2, n / 2) / (n - 1)) if n % 2 else (np.arange(-n / 2, n / 2) / n)

    gx, gy = np.meshgrid(axis(h), axis(w), indexing="ij")
    radius = np.sqrt(gx ** 2 + gy ** 2)
    theta = np.arctan2(-gy, gx)
    lp = np.fft.ifftshift(1.0 / (1.0 + (radius / 0.45) ** (2 * 15)))  # Butterworth low-pass, cutoff .45, n 15
    radius, theta = np.fft.ifftshift(radius), np.fft.ifftshift(theta)
    radius[0, 0] = 1.0
    log_gabor = []
    for s in range(scales):
        f0 = 1.0 / (min_length * mult ** s)
        lg = np.exp(-np.log(radius / f0) ** 2 / (2 * math.log(sigma_f) ** 2)) * lp
        lg[0, 0] = 0.0
        log_gabor.append(lg)
    theta_sigma = math.pi / (orientations * delta_theta)
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    spread = []
    for o in range(orientations):
        ang = o * math.pi / orientations
        ds = sin_t * math.cos(ang) - cos_t * math.sin(ang)
        dc = cos_t * math.cos(ang) + sin_t * math.sin(ang)
        spread.append(np.exp(-np.arctan2(ds, dc) ** 2 / (2 * theta_sigma ** 2)))
    filters = np.stack([[spread[o] * log_gabor[s] for s in range(scales)] for o in range(orientations)])
    spatial = np.real(np.fft.ifft2(filters)) * math.sqrt(h * w)  # [O, S, H, W]
    em_n = np.sum(filters[:, 0] ** 2, axis=(-2, -1))
    sum_an2 = np.sum(spatial ** 2, axis=(1, 2, 3))
    sum_ai_aj = sum(np.sum(spatial[:, s:s + 1] * spatial[:, s + 1:], axis=(1, 2, 3)) for s in range(scales - 1))
    return (filters.astype(np.float32), em_n.astype(np.float32), sum_an2.astype(np.float32),
            np.asarray(sum_ai_aj, np.float32))


def _phase_congruency(lum: jax.Array, bank, k: float) -> jax.Array:
    """Phase congruency PC_2 (Kovesi 1999/2003, as in FSIM's MATLAB code) of ``lum: [H, W]`` -> ``[H, W]``."""
    filters, em_n, sum_an2, sum_ai_aj = bank
    o = filters.shape[0]
    eo = jnp.fft.ifft2(jnp.fft.fft2(lum)[None, None] * filters)  # [O, S, H, W] complex
    even, odd = jnp.real(eo), jnp.imag(eo)
    an = jnp.sqrt(even ** 2 + odd ** 2)
    sum_e, sum_o = even.sum(axis=1, keepdims=True), odd.sum(axis=1, keepdims=True)
    x_energy = jnp.sqrt(sum_e ** 2 + sum_o ** 2) + _F32_EPS
    mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
    energy = jnp.sum(even * mean_e + odd * mean_o - jnp.abs(even * mean_o - odd * mean_e), axis=1)  # [O, H, W]
    # Noise: median of |E_0|^2 at the smallest scale -> Rayleigh noise model. torch.median returns the
    # lower of the two middle values for an even count; so does sorted[(n - 1) // 2].
    e2 = (an[:, 0] ** 2).reshape(o, -1)
    median_e2n = jnp.sort(e2, axis=-1)[:, (e2.shape[-1] - 1) // 2]
    noise_power = (-median_e2n / math.log(0.5)) / em_n
    noise_energy2 = 2 * noise_power * sum_an2 + 4 * noise_power * sum_ai_aj
    tau = jnp.sqrt(noise_energy2 / 2)
    threshold = (tau * math.sqrt(math.pi / 2) + k * jnp.sqrt((2 - math.pi / 2) * tau ** 2)) / 1.7
    energy = jnp.maximum(energy - threshold[:, None, None], 0.0)
    return (energy.sum(axis=0) + _F32_EPS) / (an.sum(axis=(0, 1)) + _F32_EPS)


def _similarity(x, y, c):
    return (2.0 * x * y + c) / (x * x + y * y + c)


def _fsim1(x, y, chromatic, k, bank, pool):
    x, y = x * 255.0, y * 255.0
    if pool > 1:  # avg_pool2d(kernel = stride = pool), floor mode
        hh, ww = (x.shape[0] // pool) * pool, (x.shape[1] // pool) * pool
        x, y = (z[:hh, :ww].reshape(hh // pool, pool, ww // pool, pool, 3).mean(axis=(1, 3)) for z in (x, y))
    yiq = np.array([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]], np.float32)
    to_yiq = lambda z: [yiq[i, 0] * z[..., 0] + yiq[i, 1] * z[..., 1] + yiq[i, 2] * z[..., 2] for i in range(3)]
    (xl, xi, xq), (yl, yi, yq) = to_yiq(x), to_yiq(y)
    pc_x, pc_y = _phase_congruency(xl, bank, k), _phase_congruency(yl, bank, k)
    scharr = np.array([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]], np.float32) / 16

    # Scharr x / y responses of both luminances in one conv (zero padding 1): [H, W, 4].
    kernels = np.stack([scharr, scharr.T, scharr, scharr.T], axis=-1)[:, :, None, :]
    gr = lax.conv_general_dilated(jnp.stack([xl, yl], -1)[None], jnp.asarray(kernels), (1, 1), [(1, 1), (1, 1)],
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2,
                                  precision=_HI)[0]
    gm_x, gm_y = jnp.sqrt(gr[..., 0] ** 2 + gr[..., 1] ** 2), jnp.sqrt(gr[..., 2] ** 2 + gr[..., 3] ** 2)
    pc_max = jnp.maximum(pc_x, pc_y)
    score = _similarity(gm_x, gm_y, 160.0) * _similarity(pc_x, pc_y, 0.85) * pc_max
    if chromatic:
        score = score * jnp.abs(_similarity(xi, yi, 200.0) * _similarity(xq, yq, 200.0)) ** 0.03
    return score.sum() / pc_max.sum()


def fsim(a: jax.Array, b: jax.Array, chromatic: bool = True, scales: int = 4, orientations: int = 4,
         min_length: int = 6, mult: int = 2, sigma_f: float = 0.55, delta_theta: float = 1.2,
         k: float = 2.0) -> jax.Array:
    """Feature similarity index FSIMc (Zhang, Zhang, Mou & Zhang, IEEE TIP 2011), as ``piq.fsim(a, b,
    data_range=1, chromatic=True)``.

    Images at [0, 255] are average-pooled by ``max(1, round(min(H, W) / 256))`` and converted to YIQ.
    Phase congruency PC of Y uses 4 scales x 4 orientations of log-Gabor filters (min wavelength 6,
    mult 2, sigma_f 0.55, angular ratio 1.2, noise threshold k = 2); gradient magnitude G of Y uses the
    Scharr operator. With ``S(u, v; T) = (2uv + T) / (u^2 + v^2 + T)``:
    ``FSIMc = sum S(PC; .85) S(G; 160) [S(I; 200) S(Q; 200)]^.03 PC_m / sum PC_m``, ``PC_m = max(PC_a, PC_b)``.
    ``chromatic=False`` gives FSIM (no I/Q term).

    Args:
      a, b: ``[B, H, W, 3] float32 in [0, 1]``.
    Returns:
      ``[B]`` FSIM(c) (1 for identical images; lower = less similar).
    """
    _check(a, b)
    return _fsim(a, b, chromatic=bool(chromatic), scales=int(scales), orientations=int(orientations),
                 min_length=float(min_length), mult=float(mult), sigma_f=float(sigma_f),
                 delta_theta=float(delta_theta), k=float(k))


@functools.partial(jax.jit, static_argnames=("chromatic", "scales", "orientations", "min_length", "mult",
                                             "sigma_f", "delta_theta", "k"))
def _fsim(a, b, chromatic, scales, orientations, min_length, mult, sigma_f, delta_theta, k):
    pool = max(1, round(min(a.shape[1:3]) / 256))
    bank = _log_gabor_bank(a.shape[1] // pool, a.shape[2] // pool, scales, orientations, min_length, mult,
                           sigma_f, delta_theta)
    f = functools.partial(_fsim1, chromatic=chromatic, k=k, bank=bank, pool=pool)
    return jax.vmap(f)(a.astype(jnp.float32), b.astype(jnp.float32))


# ------------------------------------------------------------------------------------------ all at once
METRICS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "psnr": psnr, "ssim": ssim, "vifp": vifp, "fsim": fsim}
HIGHER_IS_MORE_SIMILAR = {"psnr": True, "ssim": True, "vifp": True, "fsim": True, "lpips": False}


def compute_all(a: jax.Array, b: jax.Array, lpips_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                psnr_max_db: float | None = None) -> dict[str, jax.Array]:
    """All §11 metrics of ``a`` (test image, e.g. edit(protected)) against ``b`` (reference, edit(clean)).

    Args:
      a, b: ``[B, H, W, 3] float32 in [0, 1]``, H, W >= 41 (VIFp's smallest size).
      lpips_fn: optional ``(a, b) -> [B]`` (e.g. ``tdae_jax.metrics.lpips.make_lpips_fn(params)``);
        adds ``"lpips"`` when given.
      psnr_max_db: cap for PSNR of identical images (``None``: ``+inf``).
    Returns:
      ``{"psnr", "ssim", "vifp", "fsim"[, "lpips"]}`` -> ``[B]`` float32 arrays.
    """
    out = {"psnr": psnr(a, b, max_db=psnr_max_db), "ssim": ssim(a, b), "vifp": vifp(a, b), "fsim": fsim(a, b)}
    if lpips_fn is not None:
        out["lpips"] = lpips_fn(a, b)
    return out
