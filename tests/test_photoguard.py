"""PhotoGuard's diffusion attack (objectives/photoguard.py): the unrolled chain is the victim editor's DDIM loop
(same step count as diffusers' img2img, same noise given the same draws), eta > 0 follows DDIMScheduler.step,
``grad_reps`` averages independent passes, ``--remat`` changes memory only, and the inpainting conditioning is
the inpainting editor's (mid-gray fill, nearest mask)."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax import configs, editors, models
from tdae_jax.objectives import common, photoguard

FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}  # behaviour, not speed: compile cheaply
B, H, K, S = 2, 16, 4, 0.5  # K = 4 inference steps at strength 0.5: 2 DDIM steps run


def _cfg(**kw):
    base = dict(name="pgd", denoise_steps=K, pgd_strength=S, pgd_grad_reps=1, pgd_eta=0.0)
    return configs.Objective(**{**base, **kw})


def _draw(fn, keys):
    """``fn(keys)`` (random draws) as one cheaply compiled program: run eagerly, each draw compiles on its own."""
    return jax.jit(fn, compiler_options=FAST)(keys)


@pytest.fixture(scope="module")
def world():
    sur = models.tiny("sd")
    x = _draw(lambda k: jax.random.uniform(k, (B, H, H, 3)), jax.random.key(0))
    emb, uncond = editors.embed_prompts(sur, ["a red car", "snow on a hill"])
    keys = jax.random.split(jax.random.key(3), B)
    return sur, {"x0": x, "uncond": uncond}, emb, keys


def _loss(sur, cfg, world, grad=False):
    _, batch, emb, keys = world
    fn = photoguard.make_diffusion(sur, cfg)
    if grad:
        f = jax.value_and_grad(lambda d: fn(d, batch, emb, keys).sum())
        return jax.jit(f, compiler_options=FAST)(jnp.zeros_like(batch["x0"]))
    return jax.jit(fn, compiler_options=FAST)(jnp.zeros_like(batch["x0"]), batch, emb, keys)


_LOSSES = {}


def _single_pass(world, eta):
    if eta not in _LOSSES:
        _LOSSES[eta] = np.asarray(_loss(world[0], _cfg(pgd_eta=eta), world))
    return _LOSSES[eta]


def _shape(sur):
    return (sur.latent_channels, H // sur.downsample, H // sur.downsample)


def test_step_count_is_the_editors_and_diffusers_img2img():
    """diffusers keeps min(int(K s), K) of K steps (get_timesteps); the attack runs those very timesteps."""
    pytest.importorskip("torch")  # diffusers' schedulers are torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    sur = models.tiny("sd")
    sched = DDIMScheduler.from_config(sur.static.scheduler_config)
    for steps, strength in [(4, 0.5), (4, 0.8), (4, 1.0), (10, 0.7), (4, 0.2)]:
        ours = photoguard.ddim_timesteps(sur, steps, strength)
        ed = editors.Editor(kind="img2img", scheduler="ddim", num_inference_steps=steps, strength=strength)
        np.testing.assert_array_equal(ours, editors.plan_for(ed.resolve(sur), sur).timesteps)
        sched.set_timesteps(steps)
        ref, n = StableDiffusionImg2ImgPipeline.get_timesteps(types.SimpleNamespace(scheduler=sched), steps,
                                                               strength, "cpu")
        np.testing.assert_array_equal(ours, ref.numpy())
        assert len(ours) == n == min(int(steps * strength), steps)
    np.testing.assert_array_equal(photoguard.ddim_timesteps(sur, 4, 0.8), [501, 251, 1])  # 3 of 4, as diffusers
    assert photoguard.ddim_timesteps(sur, 4, 1.0).shape == (4,)
    assert photoguard.attack_strength("sd", None) == 0.8 and photoguard.attack_strength("inpaint", None) == 1.0
    assert photoguard.attack_strength("ip2p", None) is None  # from pure noise, the whole schedule


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_chain_is_the_ddim_editor_fed_the_same_noise(world, eta):
    """One pass = ||D(img2img editor, DDIM, K steps, strength s, eta) - gray||_2 with the objective's draws."""
    sur, batch, emb, keys = world
    loss = _single_pass(world, eta)
    shape = _shape(sur)
    n_steps = len(photoguard.ddim_timesteps(sur, K, S))
    noise = _draw(lambda keys: {
        "encode": jax.vmap(lambda k: jax.random.normal(k, shape))(common.posterior_sample_keys(keys)),
        "latents": common.draw_noise(keys, 1, shape)[0],
        "steps": common.draw_noise(keys, n_steps, shape, photoguard.STEP_NOISE_STREAM)}, keys)
    ed = editors.make_editor("img2img", sur, scheduler="ddim", num_inference_steps=K, strength=S, eta=eta,
                             output="latent", compiler_options=FAST)
    z = ed(batch["x0"], emb, batch["uncond"], keys, noise=noise)
    ref = jax.jit(lambda z: common.safe_l2(sur.decode(z) - 0.5), compiler_options=FAST)(z)
    np.testing.assert_allclose(loss, np.asarray(ref), rtol=2e-5)
    assert np.all(np.isfinite(loss))
    if eta > 0:  # the step noise enters: another chain than eta = 0
        assert np.abs(loss - _single_pass(world, 0.0)).max() > 1e-4


def test_eta0_equals_the_previous_ddim_path(world):
    """eta = 0 is the deterministic DDIM update the attack ran before (x0 estimate, then the eps direction),
    with diffusers' final alpha (alphas_cumprod[0]: SD's set_alpha_to_one=false) at the last step."""
    sur, batch, emb, keys = world
    acp = sur.alphas_cumprod
    ratio = sur.num_train_timesteps // K
    ts = [int(t) for t in (np.arange(K) * ratio)[::-1] + 1][K - int(K * S):]  # leading spacing, steps_offset 1

    def previous(x):
        z0 = common.encode_sample(sur, x, keys)
        z = sur.add_noise(z0, common.draw_noise(keys, 1, z0.shape[1:])[0], jnp.full((B,), ts[0]))
        for i, t in enumerate(ts):
            e = sur.guided_eps(z, jnp.full((B,), t), emb, batch["uncond"], {}, 7.5)
            a_t, a_p = acp[t], acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
            z = jnp.sqrt(a_p) * (z - jnp.sqrt(1 - a_t) * e) / jnp.sqrt(a_t) + jnp.sqrt(1 - a_p) * e
        return common.safe_l2(sur.decode(z) - 0.5)

    ref = jax.jit(previous, compiler_options=FAST)(batch["x0"])
    np.testing.assert_allclose(_single_pass(world, 0.0), np.asarray(ref), rtol=2e-5)


def test_grad_reps_average_independent_passes(world):
    """reps = R: the mean of R one-pass losses, pass r keyed by rep_keys(keys, R)[r] (pass 0 = the keys)."""
    sur, batch, emb, keys = world
    reps = 3
    loss = np.asarray(_loss(sur, _cfg(pgd_eta=1.0, pgd_grad_reps=reps), world))
    one = jax.jit(photoguard.make_diffusion(sur, _cfg(pgd_eta=1.0)), compiler_options=FAST)
    rk = photoguard.rep_keys(keys, reps)
    assert rk.shape == (reps, B)
    passes = np.stack([np.asarray(one(jnp.zeros_like(batch["x0"]), batch, emb, rk[r])) for r in range(reps)])
    np.testing.assert_allclose(passes[0], _single_pass(world, 1.0), rtol=1e-6)
    np.testing.assert_allclose(loss, passes.mean(0), rtol=2e-5)
    assert np.abs(passes[1] - passes[0]).min() > 1e-5 and np.abs(passes[2] - passes[1]).min() > 1e-5  # independent


def test_remat_changes_nothing_but_memory(world):
    """--remat on (each step and each pass checkpointed) / off: the same loss and gradient (up to rounding)."""
    sur, batch, emb, keys = world
    one = (sur, {"x0": batch["x0"][:1]}, emb[:1], keys[:1])  # one image, no guidance: a cheaper compile
    (l_on, g_on), (l_off, g_off) = (
        _loss(sur, _cfg(pgd_eta=1.0, pgd_grad_reps=2, guidance_scale=1.0, remat=r), one, grad=True)
        for r in (True, False))
    np.testing.assert_allclose(np.asarray(l_on), np.asarray(l_off), rtol=1e-6)
    g_on, g_off = np.asarray(g_on), np.asarray(g_off)
    assert np.isfinite(float(l_on)) and np.abs(g_on).max() > 0
    np.testing.assert_allclose(g_on, g_off, rtol=1e-4, atol=1e-5 * np.abs(g_off).max())


@pytest.fixture(scope="module")
def inpaint_world():
    sur = models.tiny("inpaint")
    x = _draw(lambda k: jax.random.uniform(k, (B, H, H, 3)), jax.random.key(5))
    mask = np.zeros((B, H, H, 1), np.float32)
    mask[0, 3:11, 5:14] = 1.0  # off the 2x latent grid on purpose: the resize rule matters
    mask[1, 8:, :7] = 0.7  # >= 0.5: repainted
    emb, uncond = editors.embed_prompts(sur, ["a red car", "snow on a hill"])
    return sur, {"x0": x, "uncond": uncond, "mask": jnp.asarray(mask)}, emb, jax.random.split(jax.random.key(6), B)


def test_inpaint_fill_and_mask_are_the_editors(inpaint_world):
    """Masked image = mid-gray (0 in [-1, 1]) inside the binarized mask, mask at latent size by nearest."""
    sur, batch, _, _ = inpaint_world
    x, mask = batch["x0"], batch["mask"]
    cond = jax.jit(lambda x: common.conditioning(sur, x, batch), compiler_options=FAST)(x)
    m = (np.asarray(mask) >= 0.5).astype(np.float32)
    f = sur.downsample
    np.testing.assert_array_equal(np.asarray(cond["mask"]), np.transpose(m[:, ::f, ::f], (0, 3, 1, 2)))
    gray = jax.jit(lambda x: sur.encode(jnp.where(m > 0, 0.5, x)), compiler_options=FAST)(x)
    np.testing.assert_allclose(np.asarray(cond["masked_latents"]), np.asarray(gray), rtol=1e-5, atol=1e-6)
    black = jax.jit(lambda x: sur.encode(x * (1 - m)), compiler_options=FAST)(x)
    assert np.abs(np.asarray(black) - np.asarray(gray)).max() > 1e-3  # the old black fill was another input


def test_inpaint_chain_is_the_inpaint_editor(inpaint_world):
    """The pgd loss on the inpainting surrogate (strength 1: from pure noise, as PhotoGuard's attack_forward)
    equals the inpainting editor (DDIM, K steps) fed the objective's draws, masked latents included."""
    sur, batch, emb, keys = inpaint_world
    cfg = _cfg(denoise_steps=2, pgd_strength=None)
    loss = jax.jit(photoguard.make_diffusion(sur, cfg), compiler_options=FAST)(jnp.zeros_like(batch["x0"]), batch,
                                                                               emb, keys)
    shape = _shape(sur)

    def draws(keys):
        masked_keys = jax.vmap(lambda k: jax.random.fold_in(k, common.MASKED_IMAGE_STREAM))(keys)
        return {"masked": jax.vmap(lambda k: jax.random.normal(k, shape))(common.posterior_sample_keys(masked_keys)),
                "latents": common.draw_noise(keys, 1, shape)[0]}

    noise = _draw(draws, keys)
    ed = editors.make_editor("inpaint", sur, scheduler="ddim", num_inference_steps=2, output="latent",
                             compiler_options=FAST)
    z = ed(batch["x0"], emb, batch["uncond"], keys, mask=batch["mask"], noise=noise)
    ref = jax.jit(lambda z: common.safe_l2(sur.decode(z) - 0.5), compiler_options=FAST)(z)
    np.testing.assert_allclose(np.asarray(loss), np.asarray(ref), rtol=2e-5)


def test_bad_settings_are_refused():
    sur = models.tiny("ip2p")
    with pytest.raises(ValueError, match="pure noise"):
        photoguard.make_diffusion(sur, _cfg(pgd_strength=0.5))
    with pytest.raises(ValueError, match="pgd_grad_reps"):
        photoguard.make_diffusion(sur, _cfg(pgd_strength=None, pgd_grad_reps=0))
    with pytest.raises(ValueError, match="pgd_eta"):
        photoguard.make_diffusion(sur, _cfg(pgd_strength=None, pgd_eta=-1.0))
    d = configs.Objective()
    assert (d.pgd_grad_reps, d.pgd_eta, d.pgd_strength) == (10, 1.0, None)  # PhotoGuard's code; editor default


@pytest.mark.parametrize("argv,problem", [
    (["--surrogate=ip2p", "--pgd_strength=0.5"], "pure noise"),
    (["--surrogate=sd3", "--pgd_eta=1"], "no DDIM eta"),
    (["--surrogate=sd", "--pgd_grad_reps=0"], "pgd_grad_reps"),
    (["--surrogate=sd", "--pgd_strength=1.5"], "pgd_strength"),
    (["--surrogate=sd", "--pgd_strength=0.6", "--pgd_eta=0", "--pgd_grad_reps=3"], None),
])
def test_flags_reach_the_objective_or_are_usage_errors(argv, problem):
    from experiments import common as ecommon
    from experiments import tdae as cli

    cli.FLAGS.unparse_flags()
    cli.FLAGS(["tdae", "--objective=pgd", *argv])
    if problem:
        with pytest.raises(ValueError, match=problem):
            ecommon.run_config_from_flags(cli.FLAGS)
    else:
        obj = ecommon.run_config_from_flags(cli.FLAGS).objective
        assert (obj.pgd_strength, obj.pgd_eta, obj.pgd_grad_reps) == (0.6, 0.0, 3)
    cli.FLAGS.unparse_flags()
