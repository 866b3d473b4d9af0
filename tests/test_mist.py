"""The Mist host (objectives/diffusion.py ``make_mist``) against Mist's own definition.

- Parity: Mist's fused loss restated in PyTorch from psyker-team/mist ``mist_v3.py`` (``target_model.forward``,
  mode 2: ``MSELoss(reduction="sum")(zx, zy) - rate * loss_semantic``; ldm ``get_first_stage_encoding`` =
  scale x posterior sample; ``ddpmAttack.py`` ``LatentDiffusion.p_losses`` = per-pixel MSE of the noise) on the
  SAME tiny SD weights (saved in diffusers layout, loaded by diffusers' PyTorch classes), the same images,
  timesteps, diffusion noise and posterior noise: loss and gradient w.r.t. the image agree, one image at a time
  on the PyTorch side (as Mist runs) against one batched JAX call (so the reduction is per image).
- On a trained miniature surrogate the textural term is not negligible: Mist's gradient is not AdvDM's.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax import configs, models, objectives, prng
from tdae_jax.objectives import common, diffusion

B, H, K, RATE = 2, 32, 2, 1e4  # images, pixels, (t, eps) draws, Mist's rate (10 ** (1 + 3))
# max|ours - ref| / max|ref|, float32 on both sides. The loss agrees to 1e-5; the gradient (two VAE encoder and K
# UNet backward passes, the semantic part scaled by 1e4) measured up to ~1.3e-5: float32 accumulation order of the
# convolutions (XLA vs PyTorch), so it is held to 1e-4 (a missing term or a wrong reduction is off by >= 1e-2).
TOL_LOSS, TOL_GRAD = 1e-5, 1e-4
FAST = {"xla_backend_optimization_level": 0}  # these tests check values, not speed: compile cheaply


def _rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_target_image_is_an_8bit_image_at_the_input_size():
    t = np.asarray(diffusion.mist_target_image(40, 24))
    assert t.shape == (40, 24, 3) and t.min() >= 0.0 and t.max() <= 1.0
    np.testing.assert_allclose(t * 255.0, np.round(t * 255.0), atol=1e-4)  # a PNG's values, as Mist loads MIST.png
    assert t.std() > 0.2  # a high-contrast pattern, not a flat target


def _torch_mist(torch, vae, unet, x01, tgt01, emb, draws, sqrt_acp, sqrt_1m_acp):
    """One image: Mist's fused loss (mist_v3.py target_model.forward, mode 2), restated in PyTorch.

    ``draws``: posterior noises ``n_x`` (zx), ``n_y`` (zy), ``n_s`` (the semantic term's own encoding), timesteps
    ``t [K]`` and diffusion noises ``eps [K, C, h, w]``. The semantic loss is LatentDiffusion's training loss with
    logvar 0 and ELBO weight 0, averaged over the K draws (Mist: K = 1).
    """
    fn = torch.nn.functional

    def first_stage(img01, n):  # get_first_stage_encoding(encode_first_stage(img / 127.5 - 1))
        post = vae.encode(img01 * 2.0 - 1.0).latent_dist
        return vae.config.scaling_factor * (post.mean + post.std * n)

    zx = first_stage(x01, draws["n_x"])
    with torch.no_grad():
        zy = first_stage(tgt01, draws["n_y"])
    z = first_stage(x01, draws["n_s"])
    semantic = 0.0
    for k in range(K):
        t, eps = draws["t"][k:k + 1], draws["eps"][k:k + 1]
        z_t = sqrt_acp[t].view(-1, 1, 1, 1) * z + sqrt_1m_acp[t].view(-1, 1, 1, 1) * eps  # q_sample
        semantic = semantic + fn.mse_loss(unet(z_t, t, emb).sample, eps)  # reduction "mean"
    return fn.mse_loss(zx, zy, reduction="sum") - RATE * semantic / K


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A tiny SD surrogate and the same weights in diffusers' PyTorch classes."""
    if os.environ.get("TDAE_REQUIRE_PARITY") == "1":
        import torch  # CI: the reference checks must run, never skip
    else:
        torch = pytest.importorskip("torch")
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sur = models.tiny("sd", seed=3)
    out = models.save(sur, tmp_path_factory.mktemp("mist") / "tiny_sd")
    vae = AutoencoderKL.from_pretrained(out / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(out / "unet").eval()
    for p in list(vae.parameters()) + list(unet.parameters()):
        p.requires_grad_(False)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    return torch, sur, vae, unet, sched


def _jax_draws(keys, latent_shape):
    """The per-image draws make_mist takes from ``keys`` (the streams documented in objectives/diffusion.py)."""
    def posterior(ks):
        return np.asarray(jax.vmap(lambda k: jax.random.normal(k, latent_shape))(common.posterior_sample_keys(ks)))

    return {"n_x": posterior(keys),
            "n_y": posterior(diffusion.substream(keys, diffusion.MIST_TARGET_STREAM)),
            "n_s": posterior(diffusion.substream(keys, diffusion.MIST_SEMANTIC_STREAM)),
            "t": np.asarray(common.draw_timesteps(keys, K, 1000)),  # [B, K]
            "eps": np.swapaxes(np.asarray(common.draw_noise(keys, K, latent_shape)), 0, 1)}  # [B, K, ...]


def test_mist_matches_mist_v3_in_pytorch(reference):
    torch, sur, vae, unet, sched = reference
    rng = np.random.default_rng(5)
    x0 = jnp.asarray(rng.integers(0, 256, (B, H, H, 3)) / 255.0, jnp.float32)
    delta = jnp.asarray(rng.uniform(-8, 8, x0.shape) / 255.0, jnp.float32)  # a point inside a budget, not 0
    emb = sur.embed_text(["a painting"] * B)  # Mist's style prompt
    keys = prng.image_keys(prng.base_key(7), jnp.asarray(prng.uids(["p", "q"])), 3)
    batch = {"x0": x0}

    f = objectives.make_objective("mist", sur, configs.Objective(name="mist", timesteps=K))  # Mist's defaults
    loss, grad = jax.jit(lambda d: (f(d, batch, emb, keys), jax.grad(lambda e: f(e, batch, emb, keys).sum())(d)),
                         compiler_options=FAST)(delta)
    assert configs.Objective().mist_separate_draws  # the default is Mist's: two encodings of x
    draws = _jax_draws(keys, (4, H // 2, H // 2))
    assert sched["beta_schedule"] == "scaled_linear" and sched["num_train_timesteps"] == 1000
    # ldm make_beta_schedule("linear") = diffusers' scaled_linear: betas = linspace(sqrt(b0), sqrt(b1), T) ** 2
    betas = np.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1.0 - betas)
    sqrt_acp, sqrt_1m_acp = (torch.tensor(np.sqrt(a), dtype=torch.float32) for a in (acp, 1.0 - acp))
    x01 = np.transpose(np.asarray(x0 + delta), (0, 3, 1, 2))
    tgt = np.array(np.transpose(np.asarray(diffusion.mist_target_image(H, H)), (2, 0, 1))[None])
    errors = []
    for i in range(B):
        d = {k: torch.from_numpy(np.array(v[i])) for k, v in draws.items()}
        d = {k: (v.long() if k == "t" else v[None] if k != "eps" else v) for k, v in d.items()}
        x = torch.from_numpy(np.array(x01[i:i + 1])).requires_grad_(True)
        ref = _torch_mist(torch, vae, unet, x, torch.from_numpy(tgt), torch.from_numpy(np.array(emb[i:i + 1])),
                          d, sqrt_acp, sqrt_1m_acp)
        (ref_grad,) = torch.autograd.grad(ref, x)
        err_v, err_g = _rel(loss[i], ref.item()), _rel(np.transpose(grad[i], (2, 0, 1)), ref_grad[0].numpy())
        print(f"[mist parity] image {i}: loss {float(loss[i]):.6g} (ref {ref.item():.6g}) rel err {err_v:.1e}; "
              f"gradient rel err {err_g:.1e}")
        errors.append((i, err_v, err_g))
    assert all(ev <= TOL_LOSS and eg <= TOL_GRAD for _, ev, eg in errors), errors


def test_mist_gradient_is_not_advdm_on_a_trained_surrogate():
    """On the shipped miniature InstructPix2Pix surrogate at 64 px, with the semantic term on the SAME draws as
    AdvDM's (so it is exactly 1e4 x AdvDM's gradient), Mist's summed textural term turns the gradient away from
    AdvDM's: a textural term n times too small (a per-pixel mean) would leave cosine ~ 1."""
    from tdae_jax.miniature import shipped

    sur = shipped.load("ip2p_a")
    x0 = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 64, 64, 3)) / 255.0, jnp.float32)
    emb = sur.embed_text(["make it red"])
    keys = prng.image_keys(prng.base_key(0), jnp.asarray(prng.uids(["a"])), 0)

    def grad(name):
        cfg = configs.Objective(name=name, timesteps=1, remat=False, mist_separate_draws=False)
        f = objectives.make_objective(name, sur, cfg)
        return jax.grad(lambda d: f(d, {"x0": x0}, emb, keys).sum())(jnp.zeros_like(x0)).reshape(1, -1)

    g_mist, g_advdm = jax.jit(lambda: (grad("mist"), grad("advdm")), compiler_options=FAST)()
    assert np.all(np.isfinite(g_mist)) and np.all(np.isfinite(g_advdm))
    assert np.all(np.linalg.norm(g_advdm, axis=1) > 0)
    cos = np.sum(g_mist * g_advdm, 1) / np.linalg.norm(g_mist, axis=1) / np.linalg.norm(g_advdm, axis=1)
    print(f"[mist vs advdm] cosine: {cos}")
    assert np.all(cos < 0.99), cos


def test_mist_separate_draws_is_refused_for_other_hosts():
    """--nomist_separate_draws with another host would be silently ignored: a usage error (pure check)."""
    from tdae_jax import pipeline

    def cfg(name, separate):
        return pipeline.RunConfig(images="x", workdir="w", objective=configs.Objective(
            name=name, mist_separate_draws=separate))

    pipeline.validate(cfg("mist", False))
    pipeline.validate(cfg("advdm", True))  # the default is accepted by every host
    with pytest.raises(pipeline.UsageError, match="--mist_separate_draws is read by objective 'mist' only"):
        pipeline.validate(cfg("advdm", False))
