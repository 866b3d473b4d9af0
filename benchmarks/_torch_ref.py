"""PyTorch reference for ``step_bench.py encoder``: the PhotoGuard encoder attack (PGE) as an eager loop.

One step, the same computation as ``objectives.photoguard.make_encoder`` (targeted, zero target) inside
``defenses.tdae.make_step`` with FDM off:

    delta.requires_grad; mu = AutoencoderKL.encode(2(x0 + delta) - 1).latent_dist.mean
    loss = sum_i sqrt(sum mu_i^2 + 1e-24)  (common.safe_l2 per image i, summed: one gradient for the batch)
    loss.backward(); delta <- clip(delta - alpha*sign(grad), -eps, eps); delta <- clip(x0 + delta, 0, 1) - x0

The VAE's parameters are frozen (``requires_grad_(False)``), as in a fair attack loop: autograd then
computes only the input gradient, which is all that JAX computes too (XLA drops the unused weight
gradients). Only this module imports torch.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL


def build_vae(config: dict, seed: int, out_dir) -> AutoencoderKL:
    """diffusers ``AutoencoderKL(**config)`` with torch's seeded default init, saved (safetensors, diffusers
    layout) to ``out_dir`` so the Flax side loads the identical weights with ``models.sd.load_vae``."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**config).eval()
    vae.requires_grad_(False)
    vae.save_pretrained(str(out_dir), safe_serialization=True)
    return vae


class EncoderPGD:
    """Eager sign-PGD on ``||mu_E(x0 + delta)||_2`` for NHWC numpy images (converted to NCHW once)."""

    def __init__(self, vae: AutoencoderKL, x0_nhwc: np.ndarray, eps: float, alpha: float):
        self.vae, self.eps, self.alpha = vae, eps, alpha
        device = next(vae.parameters()).device
        self.x0 = torch.from_numpy(np.ascontiguousarray(np.transpose(x0_nhwc, (0, 3, 1, 2)))).to(device)
        self.delta = torch.zeros_like(self.x0)

    def step(self) -> float:
        """One iteration; returns the loss at the delta it started from (the sum of the JAX ``metrics['loss']``).
        ``float`` of the loss waits for the device, so on a GPU the step is timed to its end."""
        delta = self.delta.detach().requires_grad_(True)
        mu = self.vae.encode((self.x0 + delta) * 2.0 - 1.0).latent_dist.mean
        loss = torch.sqrt(torch.sum((mu * mu).flatten(1), dim=1) + 1e-24).sum()
        loss.backward()
        with torch.no_grad():
            d = (delta - self.alpha * delta.grad.sign()).clamp(-self.eps, self.eps)
            self.delta = (self.x0 + d).clamp(0.0, 1.0) - self.x0
        loss = float(loss.detach())
        if self.delta.is_cuda:
            torch.cuda.synchronize()
        return loss

    def delta_nhwc(self) -> np.ndarray:
        return np.transpose(self.delta.cpu().numpy(), (0, 2, 3, 1))


def info(device: str = "cpu") -> dict:
    out = {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_mkldnn": bool(torch.backends.mkldnn.is_available()), "torch_device": device}
    if device.startswith("cuda"):
        out.update(torch_gpu=torch.cuda.get_device_name(device), cudnn_tf32=torch.backends.cudnn.allow_tf32,
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32)
    return out


def set_tf32(enabled: bool) -> None:
    """TF32 for torch's CUDA convolutions and matmuls (torch's defaults: convolutions on, matmuls off). JAX's
    default precision lets XLA:GPU use TF32 for float32 convolutions too; with ``--matmul-precision highest``
    (full float32 in JAX) the benchmark turns torch's TF32 off to match."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled
