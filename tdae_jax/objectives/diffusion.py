"""Per-timestep diffusion-loss hosts: AdvDM (alias ``eps_discrepancy``), TDAE v1, SDS(+/-), Mist, ACE.

All are *minimized* over the image perturbation; the UNet-based terms average over ``cfg.timesteps`` K draws
of (t, eps) per image (K = 10 by default, as XD111ds/TDAE v1 ``tdae.py``), drawn from the per-image keys.

- AdvDM (Liang et al., ICML 2023; Mist v1 mode 0): maximize the denoising loss
  ``E_t ||eps - eps_theta(z_t, t, c)||^2`` -> O = -that, with ``z_0`` a posterior sample of E(x) (scaled),
  ``z_t`` its q-sample, ``c`` the run's prompt embedding (InstructPix2Pix: UNet input ``[z_t || E_mode(x)]``),
  the squared error averaged per pixel and over K uniformly drawn timesteps.
- eps_discrepancy: the same function as ``advdm`` (registered to ``make_advdm``; nothing else differs). It is
  the project default for a standalone run (L_std, following the DANP idea, arXiv:2512.14333, of widening the gap
  between injected and predicted noise); it is not a loss taken from DANP's code. Two differences from the
  formula E||eps - eps_theta||^2: the squared error is a per-pixel mean (not a squared norm: a factor n, the latent
  size), and for InstructPix2Pix the noised latent is E(x + delta) itself, not E(y_0) of an edited target.
- tdae_v1 (XD111ds/TDAE v1 pseudo-code): minimize ``MSE(eps_theta(z_mean, t, c), r)``, r ~ N(0, I), on
  the clean (un-noised) mean latent.
- SDS(-) ``sds`` / ``sds_minus`` and SDS(+) ``sds_plus`` (Xue et al., ICLR 2024; xavihart/Diff-Protect
  ``code/attacks.py`` ``Linf_PGD.pgd_sds``): the UNet is not differentiated; the gradient w.r.t. z is
  ``eps_theta(z_t) - eps`` pushed back through the encoder. ``g_mode`` "+" steps *along* that gradient
  (x += alpha sign(g)), "-" against it; as minimized objectives: O_- = +S, O_+ = -S with
  ``S = sum(stop_gradient(eps_theta - eps) * z) / n``.
- Mist (Liang & Wu; psyker-team/mist ``mist_v3.py`` ``target_model.forward``, mode 2): minimize
  ``MSE_sum(E(x), E(x_tgt)) - w * L_sem`` (see :func:`make_mist`).
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
    """AdvDM (registry ``advdm`` and its alias ``eps_discrepancy``): O = -(1/K) sum_k mean((eps_k -
    eps_theta(z_{t_k}, t_k, e))^2), a per-pixel mean per image; z_0 a posterior sample of E(x) (mist_v3.py
    mode 0: ``-loss_semantic``)."""

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


def _sds(sur: Surrogate, cfg: Objective, sign: float):
    """``sign * S`` per image, ``S = sum(stop_gradient(eps_theta(z_t, t, e) - eps) * z_0) / n`` averaged over K.

    Diff-Protect (xavihart/Diff-Protect ``code/attacks.py``, ``Linf_PGD.pgd_sds``) computes, without a graph,
    ``g = eps_pred - noise`` at one t ~ U{0..T-1}, back-propagates it through the encoder only
    (``z.backward(gradient=g)``) and steps ``x += g_dir * alpha * sign(dx)``, ``g_dir = +1`` for ``g_mode`` "+",
    -1 for "-". The gradient of S is that same ``dx`` (divided by n, the latent size: a project scale that sign
    steps ignore), so minimizing ``-S`` is SDS(+) and minimizing ``+S`` is SDS(-). Differences: one posterior
    draw z_0 serves the UNet input and the encoder backward pass (Diff-Protect encodes twice), and K draws
    are averaged (Diff-Protect: one).
    """

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = jax.lax.stop_gradient(common.conditioning(sur, x, batch))
        z0, ts, noises = _noised(sur, x, keys, cfg.timesteps)

        def one(t, n):
            e = sur.eps(sur.add_noise(jax.lax.stop_gradient(z0), n, t), t, emb, **cond)
            return common.per_image_sum(jax.lax.stop_gradient(e - n) * z0) / z0[0].size

        return sign * _mean_over_k(one, ts, noises, False)

    return loss_fn


def make_sds(sur: Surrogate, cfg: Objective):
    """SDS(-) (Diff-Protect ``g_mode="-"``): O = +S, descends the SDS direction (registry ``sds``, ``sds_minus``)."""
    return _sds(sur, cfg, 1.0)


def make_sds_plus(sur: Surrogate, cfg: Objective):
    """SDS(+) (Diff-Protect ``g_mode="+"``): O = -S, ascends the SDS direction (registry ``sds_plus``)."""
    return _sds(sur, cfg, -1.0)


def _target_latent(sur: Surrogate, x: jax.Array) -> jax.Array:
    """ACE: E(x_tgt) (posterior mean) of the target pattern at x's size, one per image, held constant."""
    tgt = target_pattern(x.shape[1], x.shape[2])[None].repeat(x.shape[0], 0)
    return jax.lax.stop_gradient(sur.encode(tgt))


# Per-image key streams of Mist's extra posterior draws (distinct from common's streams 1-3 and tdae_v1's 5).
MIST_SEMANTIC_STREAM = 0x4D53  # the semantic term's own encoding of x (mist_separate_draws)
MIST_TARGET_STREAM = 0x4D54  # the target image's encoding


def substream(keys: jax.Array, stream: int) -> jax.Array:
    """``[B]`` keys ``fold_in(key, stream)``: an independent per-image stream."""
    return jax.vmap(lambda k: jax.random.fold_in(k, stream))(keys)


def mist_target_image(h: int, w: int) -> jax.Array:
    """``[H,W,3]`` in [0,1]: Mist's target as it enters the encoder, at the input size.

    mist_v3.py loads ``MIST.png`` with ``load_image_from_path(path, input_size)`` (PIL bicubic resize to the
    input size: 8-bit values) and maps it like the input, ``/127.5 - 1``. Here the procedural
    :func:`target_pattern` is drawn at the input size and snapped to the 8-bit grid; the surrogate's encoder
    maps [0,1] to [-1,1] exactly as it does for x.
    """
    return jnp.round(target_pattern(h, w) * 255.0) / 255.0


def mist_target_latent(sur: Surrogate, x: jax.Array, keys: jax.Array) -> jax.Array:
    """``zy = s * E(x_tgt).sample()`` per image, s the VAE's scaling factor (SD 1.x: 0.18215; ldm's
    ``get_first_stage_encoding`` of a posterior sample), from its own key stream; a constant of delta."""
    tgt = jnp.broadcast_to(mist_target_image(x.shape[1], x.shape[2])[None], x.shape)
    return jax.lax.stop_gradient(common.encode_sample(sur, tgt, substream(keys, MIST_TARGET_STREAM)))


def make_mist(sur: Surrogate, cfg: Objective):
    """Mist v1 fused (mode 2): O = sum((zx - zy)^2) - w * L_sem, per image; w = ``cfg.mist_weight`` (Mist: 1e4).

    Restated from psyker-team/mist ``mist_v3.py``: ``target_model.forward`` returns
    ``self.fn(zx, zy) - loss_semantic * self.rate`` with ``fn = nn.MSELoss(reduction="sum")`` and
    ``rate = 10 ** (args.rate + 3)`` (default 1e4); ``get_components`` encodes with ldm's
    ``get_first_stage_encoding(encode_first_stage(.))``, i.e. scale_factor 0.18215 (here the VAE's scaling
    factor) x a posterior *sample*, for x (zx) and for the target (zy, its own draw). The semantic loss is
    ``LatentDiffusion.forward`` (``ddpmAttack.py``) on a *separate* encoding of x
    (``get_components(pre_process(x))``: a second posterior draw; the RandomCrop to the input size is the
    identity with one block): t ~ U{0..999}, L_sem = per-pixel mean of
    ``(eps_theta(z_t, t, c) - eps)^2`` (logvar 0, ELBO weight 0). The attack (``LinfPGDAttack``, targeted)
    minimizes it.

    Here: textural term = per-image sum over the scaled latent; L_sem averaged over K (t, eps) draws (Mist:
    K = 1); ``cfg.mist_separate_draws`` True (Mist) encodes x twice with independent posterior noise, False
    shares one draw between the two terms (then L_sem is exactly AdvDM's). ``c`` is the run's prompt embedding
    (Mist: the fixed prompt "a painting"); InstructPix2Pix adds its image condition E_mode(x).
    """

    def loss_fn(delta, batch, emb, keys):
        x = batch["x0"] + delta
        cond = common.conditioning(sur, x, batch)
        zy = mist_target_latent(sur, x, keys)
        zx, ts, noises = _noised(sur, x, keys, cfg.timesteps)
        textural = common.per_image_sum((zx - zy) ** 2)
        z_sem = (common.encode_sample(sur, x, substream(keys, MIST_SEMANTIC_STREAM))
                 if cfg.mist_separate_draws else zx)

        def one(t, n):
            e = sur.eps(sur.add_noise(z_sem, n, t), t, emb, **cond)
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
