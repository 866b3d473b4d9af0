"""Rectified-flow noise process and the FlowMatchEulerDiscreteScheduler, as pure functions (diffusers 0.39.0).

SD3 (Esser et al. 2024, arXiv 2403.03206, §2 and §5.3.2): ``z_t = (1 - σ) z_0 + σ ε`` with σ ∈ [0, 1]
(1 = pure noise); the transformer predicts the velocity ``v = ε - z_0`` at timestep ``t = 1000 σ``.
The released models shift the schedule by ``shift`` = 3: ``σ' = shift σ / (1 + (shift - 1) σ)``.

Relations used by epsilon-style objectives (``eps_from_velocity`` / ``x0_from_velocity``)::

    x̂0 = z_t - σ v̂          ε̂ = z_t + (1 - σ) v̂          ε̂ - ε = (1 - σ)(v̂ - v)

so an epsilon-MSE on SD3 equals the flow-matching velocity MSE weighted by ``(1 - σ)²``.

Host-side schedule arithmetic reproduces diffusers 0.39.0 bit for bit: the init grid is computed in
float32 (torch), ``set_timesteps`` in float64 (numpy) then cast to float32, timesteps = σ·1000 in
float32, a final σ = 0 appended. The Euler step runs in float32 and casts back.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class FlowMatchConfig:
    num_train_timesteps: int = 1000
    shift: float = 3.0

    @classmethod
    def from_dict(cls, d: dict) -> "FlowMatchConfig":
        unsupported = [k for k in ("use_dynamic_shifting", "invert_sigmas", "shift_terminal", "use_karras_sigmas",
                                   "use_exponential_sigmas", "use_beta_sigmas", "stochastic_sampling") if d.get(k)]
        if unsupported:
            raise ValueError(f"FlowMatchEulerDiscreteScheduler options not supported for SD3: {unsupported}")
        return cls(num_train_timesteps=int(d.get("num_train_timesteps", 1000)), shift=float(d.get("shift", 1.0)))


def shift_sigmas(sigmas, shift: float):
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def train_sigmas(cfg: FlowMatchConfig) -> np.ndarray:
    """The scheduler's init grid (index 0 = σ 1.0, index 999 = σ_min), float32: ``[num_train_timesteps]``."""
    n = cfg.num_train_timesteps
    t = np.linspace(1, n, n, dtype=np.float32)[::-1].copy()
    s = t / np.float32(n)
    return (np.float32(cfg.shift) * s / (np.float32(1) + np.float32(cfg.shift - 1) * s)).astype(np.float32)


def set_timesteps(cfg: FlowMatchConfig, num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps(n)``.

    Returns: (timesteps ``[n]`` float32 = 1000σ, sigmas ``[n + 1]`` float32 ending in 0).
    """
    grid = train_sigmas(cfg)
    n = cfg.num_train_timesteps
    ts = np.linspace(float(grid[0]) * n, float(grid[-1]) * n, num_inference_steps)
    sig = shift_sigmas(ts / n, cfg.shift).astype(np.float32)
    timesteps = (sig * np.float32(n)).astype(np.float32)
    return timesteps, np.concatenate([sig, np.zeros(1, np.float32)])


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """The img2img pipeline's first schedule index ``t_start`` (the pipeline runs ``n - t_start`` steps)."""
    init = min(num_inference_steps * strength, num_inference_steps)
    return int(max(num_inference_steps - init, 0))


def scale_noise(z0: jax.Array, noise: jax.Array, sigma) -> jax.Array:
    """``scheduler.scale_noise``: ``σ ε + (1 - σ) z0`` with σ scalar or per-image ``[B]``."""
    s = jnp.asarray(sigma, z0.dtype)
    s = s.reshape(s.shape + (1,) * (z0.ndim - s.ndim)) if s.ndim else s
    return s * noise + (1.0 - s) * z0


def euler_step(velocity: jax.Array, sigma, sigma_next, sample: jax.Array) -> jax.Array:
    """``scheduler.step``: ``z + (σ_next - σ) v`` in float32, cast to the velocity's dtype."""
    dt = jnp.asarray(sigma_next, jnp.float32) - jnp.asarray(sigma, jnp.float32)
    dt = dt.reshape(dt.shape + (1,) * (sample.ndim - dt.ndim)) if dt.ndim else dt
    return (sample.astype(jnp.float32) + dt * velocity.astype(jnp.float32)).astype(velocity.dtype)


def velocity_target(z0: jax.Array, noise: jax.Array) -> jax.Array:
    """The training target ``v = ε - z_0``."""
    return noise - z0


def _bcast(sigma, like):
    s = jnp.asarray(sigma, like.dtype)
    return s.reshape(s.shape + (1,) * (like.ndim - s.ndim)) if s.ndim else s


def x0_from_velocity(v: jax.Array, z_t: jax.Array, sigma) -> jax.Array:
    return z_t - _bcast(sigma, z_t) * v


def eps_from_velocity(v: jax.Array, z_t: jax.Array, sigma) -> jax.Array:
    return z_t + (1.0 - _bcast(sigma, z_t)) * v
