"""Per-timestep diffusion-loss hosts: AdvDM, the eps-discrepancy standalone loss, TDAE v1, SDS, Mist, ACE.

All are *minimized* over the image perturbation; each averages over ``cfg.timesteps`` K draws of
(t, eps) per image (TDAE spec §9: K = 10), drawn from the per-image keys.

- AdvDM (Liang et al., ICML 2023; Mist v1 mode 0): maximize the denoising loss
  ``E_t ||eps - eps_theta(z_t, t, c)||^2`` -> O = -that.
- eps_discrepancy (TDAE spec §3 "standalone default" L_std, DANP): the same quantity averaged over K
  uniformly drawn timesteps; for InstructPix2Pix the UNet sees ``[z_t || E_mode(x)]``.
- tdae_v1 (XD111ds/TDAE v1 pseudo-code): minimize ``MSE(eps_theta(z_mean, t, c), r)``, r ~ N(0, I), on
  the clean (un-noised) mean latent.
- SDS (Xue et al., ICLR 2024, Diff-Protect ``pgd_sds``, g_mode "-"): the UNet is not differentiated;
  the gradient w.r.t. z is ``eps_theta(z_t) - eps`` pushed back through the encoder:
  O = sum(stop_gradient(eps_theta - eps) * z).
- Mist (Liang & Wu; ``mist_v3.py`` mode 2): minimize ``MSE_sum(E(x), E(x_tgt)) - w * L_sem``.
- ACE (Zheng et al., arXiv 2310.04687; Mist-v2 mode ``lunet``): minimize ``MSE(eps_theta(z_t,t,c), z_tgt)``.

The Mist/ACE target pattern (Mist's ``MIST.png`` is not shipped) is a procedural high-contrast
pattern: project default, documented in the flagfiles.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from tdae_jax.configs import Objective
from tdae_jax.models.surrogate import Surrogate
from tdae_jax.objectives import common


def target_pattern(h: int, w: int) -> jax.Array:
    """``[H,W,3]`` in [0,1]: a deterministic high-frequency pattern (checker x diagonal stripes x colour)."""
    yy, xx = jnp.meshgrid(jnp.arange(h), jnp.arange(w), indexing="ij")
    checker = ((yy // 8 + xx // 8) % 2).astype(jnp.float32)
    stripes = 0.5 + 0.5 * jnp.sin((xx + yy) * (2 * jnp.pi / 6.0))
    return jnp.stack([checker, stripes, 1.0 - checker * stripes], axis=-1)


def _noised(sur: Surrogate, x, keys, k, t_range=(0, None)):
    """Latents of x (posterior sample), K timesteps and noises, per image."""
    z0 = common.encode_sample(sur, x, keys)
    t = common.draw_timesteps(keys, k, sur.num_train_timesteps, t_range[0], t_range[1])  # [B,K]
    noise = common.draw_noise(keys, k, z0.shape[1:])  # [K,B,...]
    return z0, jnp.swapaxes(t, 0, 1), noise


def _mean_over_k(fn, ts, noises, remat: bool):
    """(1/K) sum_k fn(t_k, noise_k), scanned (and rematerialized) so memory does not grow with K."""
    body = jax.checkpoint(fn) if remat else fn

    def step(acc, tn):
        return acc + body(*tn), None

    # One scan over all K from a zero accumulator (0 + f_0 is f_0 exactly): the body is traced and compiled
    # once, not once more for a peeled first term (less compile time and XLA temp memory, same speed:
    # `python benchmarks/loop_bench.py --k-mean 4`, docs/benchmarks.md).
    zero = jax.tree.map(jnp.zeros_like, jax.eval_shape(body, ts[0], noises[0]))
    acc, _ = jax.lax.scan(step, zero, (ts, noises))
    return acc / ts.shape[0]


def make_advdm(sur: Surrogate, cfg: Objective):
    """AdvDM / eps-discrepancy: O = -(1/K) sum_k ||eps_k - eps_theta(z_{t_k}, t_k, e)||^2 (per-image mean)."""

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z0, ts, noises = _noised(sur, x, keys, cfg.timesteps)

        def one(t, n):
            e = sur.eps(sur.add_noise(z0, n, t), t, emb, **cond)
            return common.per_image_mean((e - n) ** 2)

        return -_mean_over_k(one, ts, noises, cfg.remat)

    return loss_fn


def make_tdae_v1(sur: Surrogate, cfg: Objective):
    """TDAE v1 pseudo-code loss: minimize MSE(eps_theta(z_mean, t, c), r), r ~ N(0,I) per call."""

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z = sur.encode(x)
        ts = jnp.swapaxes(common.draw_timesteps(keys, cfg.timesteps, sur.num_train_timesteps), 0, 1)
        rs = common.draw_noise(keys, cfg.timesteps, z.shape[1:], stream=5)

        def one(t, r):
            return common.per_image_mean((sur.eps(z, t, emb, **cond) - r) ** 2)

        return _mean_over_k(one, ts, rs, cfg.remat)

    return loss_fn


def make_sds(sur: Surrogate, cfg: Objective):
    """SDS(-): the UNet residual, not differentiated, pushed back through the encoder."""

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = jax.lax.stop_gradient(common.conditioning(sur, x, batch))
        z0, ts, noises = _noised(sur, x, keys, cfg.timesteps)

        def one(t, n):
            e = sur.eps(sur.add_noise(jax.lax.stop_gradient(z0), n, t), t, emb, **cond)
            return common.per_image_sum(jax.lax.stop_gradient(e - n) * z0) / z0[0].size

        return _mean_over_k(one, ts, noises, False)

    return loss_fn


def _target_latent(sur: Surrogate, x: jax.Array) -> jax.Array:
    """E(x_tgt) of Mist/ACE's target pattern at x's size, one per image, held constant (no gradient)."""
    tgt = target_pattern(x.shape[1], x.shape[2])[None].repeat(x.shape[0], 0)
    return jax.lax.stop_gradient(sur.encode(tgt))


def make_mist(sur: Surrogate, cfg: Objective):
    """Mist v1 fused: O = MSE_sum(E(x), E(x_tgt)) / n - w * L_sem (both per image; n = latent size)."""

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z_tgt = _target_latent(sur, x)
        z0, ts, noises = _noised(sur, x, keys, cfg.timesteps)
        textural = common.per_image_mean((z0 - z_tgt) ** 2)

        def one(t, n):
            e = sur.eps(sur.add_noise(z0, n, t), t, emb, **cond)
            return common.per_image_mean((e - n) ** 2)

        semantic = _mean_over_k(one, ts, noises, cfg.remat)
        return textural - cfg.mist_weight * semantic

    return loss_fn


def make_ace(sur: Surrogate, cfg: Objective):
    """ACE: O = (1/K) sum_k MSE(eps_theta(z_t, t, e), z_tgt), z_tgt = latent of the target pattern."""

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        z_tgt = _target_latent(sur, x)
        z0, ts, noises = _noised(sur, x, keys, cfg.timesteps)

        def one(t, n):
            e = sur.eps(sur.add_noise(z0, n, t), t, emb, **cond)
            return common.per_image_mean((e - z_tgt) ** 2)

        return _mean_over_k(one, ts, noises, cfg.remat)

    return loss_fn
