"""Image metrics of TDAE §IV-A: PSNR, SSIM, VIFp, FSIM (``image``) and LPIPS (``lpips``).

All take ``a, b: [B, H, W, 3] float32 in [0, 1]`` (``a`` = test image, e.g. edit(protected);
``b`` = reference, e.g. edit(clean)) and return one score per image, ``[B]``.
"""
from tdae_jax.metrics.image import HIGHER_IS_MORE_SIMILAR, METRICS, compute_all, fsim, psnr, ssim, vifp
from tdae_jax.metrics.lpips import LPIPS, load_lpips_params, lpips, make_lpips_fn, params_from_torch_state_dict

__all__ = ["psnr", "ssim", "vifp", "fsim", "compute_all", "METRICS", "HIGHER_IS_MORE_SIMILAR",
           "LPIPS", "lpips", "load_lpips_params", "params_from_torch_state_dict", "make_lpips_fn"]
