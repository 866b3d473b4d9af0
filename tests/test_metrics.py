"""tdae_jax.metrics.image against reference implementations (the metrics of TDAE §IV-A).

- PSNR, SSIM: scikit-image (the reference).
- VIFp, FSIMc: the reference is ``piq`` 0.8.0, but piq declares a hard dependency on torchvision,
  which cannot be installed beside torch 2.13.0 from PyPI. So ``_ref_vifp`` / ``_ref_fsim`` below are
  line-by-line transcriptions of piq 0.8.0's ``vif_p`` and ``fsim`` (Apache-2.0; which follow the
  authors' MATLAB releases), evaluated in torch float64. (Checked during development against piq's own
  code: identical to piq in float32, and the JAX port within 3e-4 of piq float32 / 7e-6 of float64 on
  images up to 384x400; piq's float32 VIFp is the less accurate of the two.)
"""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from tdae_jax.metrics import image as M

try:  # the [parity] extra; the VIFp/FSIM references need it
    import torch
    import torch.nn.functional as F
except ImportError:
    torch = F = None


def _require_torch():
    if torch is None:
        if os.environ.get("TDAE_REQUIRE_PARITY") == "1":
            pytest.fail("torch is required for the VIFp/FSIM reference checks (TDAE_REQUIRE_PARITY=1)")
        pytest.skip("torch not installed (pip install -e '.[parity]')")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    if torch is None:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small references: threads only contend (2 shared cores)
    yield
    torch.set_num_threads(n)


SIZES = [(64, 64), (48, 64), (45, 53)]  # square, non-square (spec), odd (FSIM's odd meshgrid branch)
SIZES_SLOW = SIZES[1:]  # VIFp/FSIM compile for a few seconds per shape: the non-square and the odd one


def _structured(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    yy, xx = yy / h, xx / w
    f = rng.uniform(2, 9, size=3)
    return np.stack([0.5 + 0.45 * np.sin(f[0] * xx * 2 + 3 * yy),                     # smooth wave
                     np.where((np.floor(xx * f[1]) + np.floor(yy * f[1])) % 2, 0.8, 0.15),  # checkerboard
                     np.clip(xx * yy * f[2] / 3, 0, 1)], axis=-1)                         # ramp


def _pairs(kind, h, w, seed, noise, b=4):  # one batch size everywhere: fewer compilations
    """``(test, reference)`` ``[b, h, w, 3]`` float32 in [0, 1]: reference + clipped Gaussian noise."""
    rng = np.random.default_rng(seed)
    ref = rng.random((b, h, w, 3)) if kind == "random" else np.stack([_structured(rng, h, w) for _ in range(b)])
    test = np.clip(ref + noise * rng.standard_normal(ref.shape), 0, 1)
    return test.astype(np.float32), ref.astype(np.float32)


CASES = [(kind, h, w, seed, noise) for kind in ("random", "structured") for (h, w) in SIZES
         for seed, noise in ((0, 0.03), (1, 0.2))]
CASES_SLOW = [c for c in CASES if c[1:3] in SIZES_SLOW]


def _nchw64(x):
    return torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------- reference VIFp (piq 0.8.0 vif_p, transcribed)
def _ref_gaussian(size, sigma, dtype):
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2.0
    g = coords ** 2
    g = (-(g.unsqueeze(0) + g.unsqueeze(1)) / (2 * sigma ** 2)).exp()
    return (g / g.sum()).view(1, 1, size, size)


def _ref_vifp(x, y, sigma_n_sq=2.0):
    """piq.vif_p(x, y, data_range=1, reduction='none'); x distorted, y reference, [N, 3, H, W]."""
    x, y = x * 255, y * 255
    x = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]
    y = (0.299 * y[:, 0] + 0.587 * y[:, 1] + 0.114 * y[:, 2])[:, None]
    eps = 1e-8
    x_vif, y_vif = 0, 0
    for scale in range(4):
        ks = 2 ** (4 - scale) + 1
        k = _ref_gaussian(ks, ks / 5, x.dtype)
        if scale > 0:
            x, y = F.conv2d(x, k)[:, :, ::2, ::2], F.conv2d(y, k)[:, :, ::2, ::2]
        mu_x, mu_y = F.conv2d(x, k), F.conv2d(y, k)
        sxx = torch.relu(F.conv2d(x ** 2, k) - mu_x * mu_x)
        syy = torch.relu(F.conv2d(y ** 2, k) - mu_y * mu_y)
        sxy = F.conv2d(x * y, k) - mu_x * mu_y
        g = sxy / (syy + eps)
        sv = sxx - g * sxy
        g = torch.where(syy >= eps, g, torch.zeros_like(g))
        sv = torch.where(syy >= eps, sv, sxx)
        syy = torch.where(syy >= eps, syy, torch.zeros_like(syy))
        g = torch.where(sxx >= eps, g, torch.zeros_like(g))
        sv = torch.where(sxx >= eps, sv, torch.zeros_like(sv))
        sv = torch.where(g >= 0, sv, sxx)
        g = torch.relu(g)
        sv = torch.where(sv > eps, sv, torch.ones_like(sv) * eps)
        x_vif = x_vif + torch.sum(torch.log10(1.0 + g ** 2 * syy / (sv + sigma_n_sq)), dim=[1, 2, 3])
        y_vif = y_vif + torch.sum(torch.log10(1.0 + syy / sigma_n_sq), dim=[1, 2, 3])
    return (x_vif + eps) / (y_vif + eps)


# --------------------------------------------------------------- reference FSIM (piq 0.8.0 fsim, transcribed)
def _ref_filters(h, w, dtype, scales=4, orientations=4, min_length=6, mult=2, sigma_f=0.55, delta_theta=1.2):
    theta_sigma = math.pi / (orientations * delta_theta)

    def axis(n):
        if n % 2:
            return torch.arange(-(n - 1) / 2, n / 2, dtype=dtype) / (n - 1)
        return torch.arange(-n / 2, n / 2, dtype=dtype) / n

    gx, gy = torch.meshgrid(axis(h), axis(w), indexing="ij")
    shift = lambda t: torch.roll(t, [-(s // 2) for s in t.shape], (0, 1))  # ifftshift
    radius = torch.sqrt(gx ** 2 + gy ** 2)
    theta = torch.atan2(-gy, gx)
    lp = shift(1.0 / (1.0 + (radius / 0.45) ** (2 * 15)))
    radius, theta = shift(radius), shift(theta)
    radius[0, 0] = 1
    log_gabor = []
    for s in range(scales):
        lg = torch.exp(-torch.log(radius / (1.0 / (min_length * mult ** s))) ** 2 / (2 * math.log(sigma_f) ** 2)) * lp
        lg[0, 0] = 0
        log_gabor.append(lg)
    log_gabor = torch.stack(log_gabor)
    spread = []
    for o in range(orientations):
        ang = o * math.pi / orientations
        ds = torch.sin(theta) * math.cos(ang) - torch.cos(theta) * math.sin(ang)
        dc = torch.cos(theta) * math.cos(ang) + torch.sin(theta) * math.sin(ang)
        spread.append(torch.exp(-torch.abs(torch.atan2(ds, dc)) ** 2 / (2 * theta_sigma ** 2)))
    spread = torch.stack(spread)
    return (spread.repeat_interleave(scales, dim=0) * log_gabor.repeat(orientations, 1, 1)).unsqueeze(0)


def _ref_phase_congruency(x, filters, scales=4, orientations=4, k=2.0):
    eps = torch.finfo(torch.float32).eps  # piq runs in float32; its EPS is float32's
    n, _, h, w = x.shape
    filters_ifft = torch.fft.ifft2(filters).real * math.sqrt(h * w)
    eo = torch.view_as_real(torch.fft.ifft2(torch.fft.fft2(x) * filters)).view(n, orientations, scales, h, w, 2)
    an = torch.sqrt(torch.sum(eo ** 2, dim=-1))
    em_n = (filters.view(1, orientations, scales, h, w)[:, :, :1] ** 2).sum(dim=[-2, -1], keepdims=True)
    sum_e, sum_o = eo[..., 0].sum(dim=2, keepdims=True), eo[..., 1].sum(dim=2, keepdims=True)
    x_energy = torch.sqrt(sum_e ** 2 + sum_o ** 2) + eps
    mean_e, mean_o = sum_e / x_energy, sum_o / x_energy
    even, odd = eo[..., 0], eo[..., 1]
    energy = (even * mean_e + odd * mean_o - torch.abs(even * mean_o - odd * mean_e)).sum(dim=2, keepdim=True)
    abs_eo = torch.sqrt(torch.sum(eo[:, :, :1] ** 2, dim=-1)).reshape(n, orientations, 1, 1, h * w)
    median_e2n = torch.median(abs_eo ** 2, dim=-1, keepdim=True).values
    noise_power = (-median_e2n / math.log(0.5)) / em_n
    filters_ifft = filters_ifft.view(1, orientations, scales, h, w)
    sum_an2 = torch.sum(filters_ifft ** 2, dim=-3, keepdim=True)
    sum_ai_aj = torch.zeros(n, orientations, 1, h, w, dtype=x.dtype)
    for s in range(scales - 1):
        sum_ai_aj = sum_ai_aj + (filters_ifft[:, :, s:s + 1] * filters_ifft[:, :, s + 1:]).sum(dim=-3, keepdim=True)
    sum_an2 = torch.sum(sum_an2, dim=[-1, -2], keepdim=True)
    sum_ai_aj = torch.sum(sum_ai_aj, dim=[-1, -2], keepdim=True)
    noise_energy2 = 2 * noise_power * sum_an2 + 4 * noise_power * sum_ai_aj
    tau = torch.sqrt(noise_energy2 / 2)
    t = (tau * math.sqrt(math.pi / 2) + k * torch.sqrt((2 - math.pi / 2) * tau ** 2)) / 1.7
    energy = torch.max(energy - t, torch.zeros_like(t))
    return ((energy.sum(dim=[1, 2]) + eps) / (an.sum(dim=[1, 2]) + eps)).unsqueeze(1)


def _ref_fsim(x, y, chromatic=True):
    """piq.fsim(x, y, data_range=1, chromatic=chromatic, reduction='none'), [N, 3, H, W]."""
    x, y = x * 255, y * 255
    ks = max(1, round(min(x.shape[-2:]) / 256))
    x, y = F.avg_pool2d(x, ks), F.avg_pool2d(y, ks)
    yiq = torch.tensor([[0.299, 0.587, 0.114], [0.5959, -0.2746, -0.3213], [0.2115, -0.5227, 0.3112]],
                       dtype=x.dtype).t()
    x_yiq = torch.matmul(x.permute(0, 2, 3, 1), yiq).permute(0, 3, 1, 2)
    y_yiq = torch.matmul(y.permute(0, 2, 3, 1), yiq).permute(0, 3, 1, 2)
    x_lum, y_lum = x_yiq[:, :1], y_yiq[:, :1]
    filters = _ref_filters(x_lum.shape[-2], x_lum.shape[-1], x.dtype)
    pc_x, pc_y = _ref_phase_congruency(x_lum, filters), _ref_phase_congruency(y_lum, filters)
    sch = torch.tensor([[[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]]], dtype=x.dtype) / 16
    kernels = torch.stack([sch, sch.transpose(-1, -2)])
    grad = lambda z: torch.sqrt(torch.sum(F.conv2d(z, kernels, padding=1) ** 2, dim=-3, keepdim=True))
    sim = lambda a, b, c: (2.0 * a * b + c) / (a ** 2 + b ** 2 + c)
    pc_max = torch.where(pc_x > pc_y, pc_x, pc_y)
    score = sim(grad(x_lum), grad(y_lum), 160) * sim(pc_x, pc_y, 0.85) * pc_max
    if chromatic:
        score = score * torch.abs(sim(x_yiq[:, 1:2], y_yiq[:, 1:2], 200) * sim(x_yiq[:, 2:], y_yiq[:, 2:], 200)) ** 0.03
    return score.sum(dim=[1, 2, 3]) / pc_max.sum(dim=[1, 2, 3])


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind,h,w,seed,noise", CASES)
def test_psnr_ssim_match_skimage(kind, h, w, seed, noise):
    a, b = _pairs(kind, h, w, seed, noise)
    got_p, got_s = np.asarray(M.psnr(a, b)), np.asarray(M.ssim(a, b))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    ref_p = [peak_signal_noise_ratio(b64[i], a64[i], data_range=1) for i in range(len(a))]
    ref_s = [structural_similarity(a64[i], b64[i], channel_axis=-1, data_range=1, gaussian_weights=True,
                                   use_sample_covariance=False) for i in range(len(a))]
    np.testing.assert_allclose(got_p, ref_p, rtol=0, atol=1e-4)
    np.testing.assert_allclose(got_s, ref_s, rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind,h,w,seed,noise", CASES_SLOW)
def test_vifp_fsim_match_piq_reference(kind, h, w, seed, noise):
    _require_torch()
    a, b = _pairs(kind, h, w, seed, noise)
    ta, tb = _nchw64(a), _nchw64(b)
    np.testing.assert_allclose(np.asarray(M.vifp(a, b)), _ref_vifp(ta, tb).numpy(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(np.asarray(M.fsim(a, b)), _ref_fsim(ta, tb).numpy(), rtol=0, atol=1e-4)
    if (h, w) == (48, 64):  # grey-level FSIM too
        np.testing.assert_allclose(np.asarray(M.fsim(a, b, chromatic=False)),
                                   _ref_fsim(ta, tb, chromatic=False).numpy(), rtol=0, atol=1e-4)


def test_fsim_average_pools_large_images():
    """min(H, W) = 384 -> piq pools by round(1.5) = 2 before FSIM."""
    _require_torch()
    a, b = _pairs("structured", 384, 392, 3, 0.1, b=1)
    np.testing.assert_allclose(np.asarray(M.fsim(a, b)), _ref_fsim(_nchw64(a), _nchw64(b)).numpy(), atol=1e-4)


def test_identical_images_give_ideal_scores():
    a = np.concatenate([_pairs("structured", 48, 64, 4, 0.0, b=2)[0], _pairs("random", 48, 64, 5, 0.0, b=2)[0]])
    out = M.compute_all(a, a.copy())
    assert set(out) == {"psnr", "ssim", "vifp", "fsim"}
    assert np.all(np.isposinf(np.asarray(out["psnr"])))
    np.testing.assert_array_equal(np.asarray(M.psnr(a, a, max_db=100.0)), 100.0)
    np.testing.assert_allclose(np.asarray(out["ssim"]), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out["vifp"]), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out["fsim"]), 1.0, atol=1e-6)


def test_batch_equals_one_by_one():
    a, b = _pairs("random", 48, 64, 6, 0.1)
    b[2] = a[2]  # one identical pair in the batch must not affect the others
    full = M.compute_all(a, b, psnr_max_db=100.0)
    for i in range(len(a)):
        one = M.compute_all(a[i:i + 1], b[i:i + 1], psnr_max_db=100.0)
        for k in full:
            np.testing.assert_allclose(np.asarray(full[k])[i], np.asarray(one[k])[0], rtol=1e-6, atol=1e-6,
                                       err_msg=k)


def test_more_noise_means_less_similar():
    rng = np.random.default_rng(7)
    ref = _structured(rng, 48, 64)
    z = rng.standard_normal(ref.shape)
    b = np.stack([ref] * 4).astype(np.float32)
    a = np.stack([np.clip(ref + s * z, 0, 1) for s in (0.01, 0.05, 0.1, 0.3)]).astype(np.float32)
    for name, v in M.compute_all(a, b).items():
        assert np.all(np.diff(np.asarray(v)) < 0), (name, v)


def test_sharded_batch_equals_unsharded():
    from tdae_jax.parallel.mesh import batch_sharding, make_mesh

    a, b = _pairs("random", 48, 64, 8, 0.1)
    sharding = batch_sharding(make_mesh(4))
    got = M.compute_all(jax.device_put(a, sharding), jax.device_put(b, sharding))
    want = M.compute_all(a, b)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), np.asarray(want[k]), rtol=1e-6, err_msg=k)


def test_bad_inputs_raise():
    a, b = _pairs("random", 48, 64, 9, 0.1)
    with pytest.raises(ValueError, match="equal shape"):
        M.ssim(a, b[:, :, :60])
    with pytest.raises(ValueError, match="equal shape"):
        M.psnr(a[..., :1], b[..., :1])
    with pytest.raises(ValueError, match="at least 41x41"):
        M.vifp(a[:, :40], b[:, :40])
    assert M.HIGHER_IS_MORE_SIMILAR["lpips"] is False and all(M.HIGHER_IS_MORE_SIMILAR[k] for k in M.METRICS)
    assert jnp.asarray(M.psnr(a, b)).shape == (4,)
