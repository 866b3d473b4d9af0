"""Direction of DLADiff's layer-1 image steps and the prior term of its / ASPL's training.

- ADFT stage 2 (DLADiff Alg. 1 lines 21-24), ASPL's PGD (Anti-DreamBooth ``attacks/aspl.py::pgd_attack``) and FSMG's
  PGD (``attacks/fsmg.py::main``) ascend L_cond: on one fixed draw (t, noise, VAE sample), one step raises L_cond
  for every image of the batch, and the same step with its sign flipped lowers it. The step is pinned to
  ``+step_size * sign(grad)`` of a gradient taken here.
- DisDiff's PGD (``riolys/DisDiff`` ``attacks/disdiff.py::pgd_attack``) ascends L_cond + lambda L_CAE with the
  MSS step ``step_size * w(t) * sign(grad)``: the same check, on the step's own values at one fixed draw.
- Anti-Diffusion's PGD (``whulizheng/Anti-Diffusion`` ``Defense/antidiffusion.py::protect_epoch``) ascends
  L_cond - SDL, i.e. descends J = SDL - L_cond: on one fixed draw a step lowers J for every image and the flipped
  step raises it; its prompt tuning (``tunning_prompts``) is an AdamW step that lowers L_cond on its fixed draw.
- Eq. 9's prior term (DLADiff) / DreamBooth's prior preservation (ASPL): the training loss is ``L_inst`` at
  ``prior_weight = 0`` (prior images ignored) and ``L_inst + lambda L_prior`` with prior images, both recomputed
  here from :func:`editors.finetune.diffusion_loss` with the keys written out.

Shapes (2 images of 32 px, 2-device mesh) and the tiny surrogate are test_dladiff's, so compiled steps are shared.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax import prng
from tdae_jax.defenses import pgd as pgd_lib
from tdae_jax.defenses.dladiff import adft, antidiffusion, baselines, disdiff, dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.pipeline import _tiny

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def sur():
    return _tiny("sd")


@pytest.fixture(scope="module")
def data(sur):
    # inside [0.1, 0.9]: one step of 5e-3 is never clipped to [0,1], so the flipped step is exactly -step
    x = 0.1 + 0.8 * np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    emb = np.repeat(np.asarray(ft.embed_ids(sur, sur.tokenize([PROMPT]))), 2, 0)
    return x, np.array([11, 12], np.int32), emb


@pytest.fixture(scope="module")
def layers(sur):
    return dsur.select_layers(sur, 32, 16)


def _jitter(tree, seed, scale=0.02):
    """Fixed weights that differ from theta_pre (a stand-in for a fine-tuned surrogate; numpy: no compiles)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: np.asarray(a) + scale * rng.standard_normal(a.shape).astype(np.float32), tree)


@jax.jit
def _cond(sur, unet, x, emb, keys):
    """L_cond per image ``[B]`` and its gradient w.r.t. the images, at the draw ``keys``."""
    s = sur.replace(params={**sur.params, "unet": unet})
    loss = lambda xx: ft.diffusion_loss(s, xx, emb, keys, True)  # noqa: E731
    return loss(x), jax.grad(lambda xx: jnp.sum(loss(xx)))(x)


def _one_step(kind, sur, unet, x, uid, emb, cfg, key):
    """One PGD step of ``kind`` from delta = 0 (step counter 0: the draw ``image_keys(key, uid, 0)``)."""
    mesh = ft.data_mesh(2)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x), "uid": jnp.asarray(uid), "emb": jnp.asarray(emb)}, mesh)
    p = adft._place_perturb(adft.init_perturb(x, cfg), mesh)
    base, unet = meshlib.replicate(sur, mesh), meshlib.replicate(unet, mesh)
    if kind == "adft":
        p, _ = adft.stage2_jit(p, base, unet, batch, key, adft.pgd_view(cfg))
    else:
        p, _ = baselines.pgd(p, base, unet, batch, key, cfg, 1)
    assert int(p.step) == 1
    return np.asarray(p.delta)


def _surrogate_for(kind, sur, emb):
    """The weights each step ascends against: ADFT stage 2 on UNet_d (theta_pre at epoch 0), ASPL on a
    trained copy f_sur whose text encoder re-embeds the prompt, FSMG on a fixed fine-tuned UNet."""
    if kind == "adft":
        return sur.params["unet"], emb, adft.ADFTConfig()
    if kind == "fsmg":
        return _jitter(sur.params["unet"], 5), emb, baselines.BaselineConfig(method="fsmg")
    te = _jitter(sur.params["text_encoder"], 6)
    emb_sur = np.asarray(ft.embed_ids(sur.replace(params={**sur.params, "text_encoder": te}),
                                      np.repeat(sur.tokenize([PROMPT]), 2, 0)))
    assert not np.allclose(emb_sur, emb)
    return _jitter(sur.params["unet"], 7), emb_sur, baselines.BaselineConfig(method="aspl")


@pytest.mark.parametrize("kind", ["adft", "aspl", "fsmg"])
def test_step_raises_cond_and_flipped_step_lowers_it(sur, data, kind):
    x, uid, emb0 = data
    unet, emb, cfg = _surrogate_for(kind, sur, emb0)
    key = adft.stream_key(jax.random.key(0), f"test/{kind}")
    keys = prng.image_keys(key, jnp.asarray(uid), 0)  # the draw of step 0, held fixed below
    delta = _one_step(kind, sur, unet, x, uid, emb, cfg, key)

    l0, g = (np.asarray(a) for a in _cond(sur, unet, jnp.asarray(x), jnp.asarray(emb), keys))
    up = cfg.step_size * np.sign(g)
    assert np.abs(g).max() > 0
    # the step is + step * sign(grad L_cond) (x + delta is rounded once in float32: compare to 1e-6)
    assert np.mean(np.abs(delta - up) < 1e-6) > 0.999, np.mean(np.abs(delta - up) < 1e-6)
    assert np.all(np.abs(np.abs(delta).max(axis=(1, 2, 3)) - cfg.step_size) < 1e-6)
    flipped = np.asarray(pgd_lib.project(jnp.asarray(-up), jnp.asarray(x), cfg.eps))  # same gradient, sign flipped
    np.testing.assert_allclose(flipped, -up, atol=1e-6)  # nothing clipped: the opposite step
    l_up = np.asarray(_cond(sur, unet, jnp.asarray(x + delta), jnp.asarray(emb), keys)[0])
    l_down = np.asarray(_cond(sur, unet, jnp.asarray(x + flipped), jnp.asarray(emb), keys)[0])
    assert np.all(l_up > l0), (l0, l_up)  # every image
    assert np.all(l_down < l0), (l0, l_down)


def _disdiff_probe(sur, unet, x, uid, emb, tmask, cfg, weight, key):
    """A DisDiff step from ``delta`` at step 0's draw (keys ``image_keys(key, uid, 0)``, t from ``tmask``):
    returns ``delta -> (L_cond + weight L_CAE before the step [B], delta after it, metrics)``."""
    dcfg = disdiff.DisDiffConfig()
    scfg = disdiff.step_config(cfg, dcfg, dsur.select_layers(sur, 32, 16, kinds=(dsur.CROSS,)))
    target, content = disdiff.token_masks(sur, PROMPT, dcfg.token)
    mesh = ft.data_mesh(2)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x), "uid": jnp.asarray(uid), "emb": jnp.asarray(emb),
                                 "tmask": jnp.asarray(tmask), "target": jnp.asarray(np.repeat(target[None], 2, 0)),
                                 "content": jnp.asarray(np.repeat(content[None], 2, 0))}, mesh)
    base, unet = meshlib.replicate(sur, mesh), meshlib.replicate(unet, mesh)

    def probe(delta):
        d = jnp.asarray(delta, jnp.float32)
        p = adft._place_perturb(adft.PerturbState(d, adft.image_optimizer(cfg).init(d), jnp.zeros((), jnp.int32)),
                                mesh)
        p, m = disdiff.step_jit(p, base, unet, batch, key, weight, dcfg.mss, scfg)
        m = {k: np.asarray(v) for k, v in m.items()}
        return m["disdiff/cond"] + weight * m["disdiff/att"], np.asarray(p.delta), m

    return probe


def test_disdiff_step_raises_its_objective_and_flipped_step_lowers_it(sur, data):
    """One DisDiff step against ASPL's kind of surrogate (trained UNet and text encoder), t drawn from a set the
    search could have kept: its size is ``step_size * w(t)`` (MSS) per image; L_cond + 0.1 L_CAE rises for every
    image on that draw and falls under the flipped step; with lambda = 1e3 the CAE term alone rises (the
    identifier's attention share is erased). The traced lambda: one compiled step for both."""
    x, uid, emb0 = data
    unet, emb, cfg = _surrogate_for("aspl", sur, emb0)
    tmask = np.zeros((2, 1000), bool)
    tmask[0, :400] = True
    tmask[1, 200:600] = True  # t <= 599: MSS weights >= 0.35, a visible step
    key = adft.stream_key(jax.random.key(0), "test/disdiff")
    probe = _disdiff_probe(sur, unet, x, uid, emb, tmask, cfg, 0.1, key)
    l0, delta, m = probe(np.zeros_like(x))
    t, w = m["disdiff/t"], m["disdiff/weight"]
    assert np.all(tmask[np.arange(2), t]) and np.all(m["disdiff/att"] > 0)
    np.testing.assert_allclose(w, 0.5 * (np.cos(t / 999 * np.pi) + 1), rtol=1e-6)
    size = cfg.step_size * w[:, None, None, None]
    assert np.mean(np.abs(np.abs(delta) - size) < 1e-6) > 0.999  # +-step * w(t) on (almost) every pixel
    flipped = np.asarray(pgd_lib.project(jnp.asarray(-delta), jnp.asarray(x), cfg.eps))
    np.testing.assert_allclose(flipped, -delta, atol=1e-6)  # nothing clipped: the opposite step
    (l_up, _, m_up), (l_down, _, _) = probe(delta), probe(flipped)
    np.testing.assert_array_equal(m_up["disdiff/t"], t)  # the same draw
    assert np.all(l_up > l0), (l0, l_up)
    assert np.all(l_down < l0), (l0, l_down)

    cae = _disdiff_probe(sur, unet, x, uid, emb, tmask, cfg, 1e3, key)
    _, delta_cae, m0 = cae(np.zeros_like(x))
    att_up = cae(delta_cae)[2]["disdiff/att"]
    assert np.all(att_up > m0["disdiff/att"]), (m0["disdiff/att"], att_up)


def _antidiffusion_probe(sur, unet, x, uid, emb, cfg, weight, key):
    """An Anti-Diffusion step from ``delta`` at step 0's draw (keys ``image_keys(key, uid, 0)``, no phase ball):
    returns ``delta -> (J = weight SDL - L_cond before the step [B], delta after it, metrics)``."""
    acfg = antidiffusion.AntiDiffusionConfig()
    scfg = antidiffusion.step_config(cfg, acfg, dsur.select_layers(sur, 32, 16, kinds=(dsur.CROSS,)))
    mesh = ft.data_mesh(2)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x), "uid": jnp.asarray(uid), "emb": jnp.asarray(emb),
                                 "anchor": jnp.zeros_like(jnp.asarray(x))}, mesh)
    base, unet = meshlib.replicate(sur, mesh), meshlib.replicate(unet, mesh)

    def probe(delta):
        d = jnp.asarray(delta, jnp.float32)
        p = adft._place_perturb(adft.PerturbState(d, adft.image_optimizer(cfg).init(d), jnp.zeros((), jnp.int32)),
                                mesh)
        p, m = antidiffusion.step_jit(p, base, unet, batch, key, weight, 0.0, scfg)
        m = {k: np.asarray(v) for k, v in m.items()}
        return m["antidiffusion/objective"], np.asarray(p.delta), m

    return probe


def test_antidiffusion_step_lowers_its_objective_and_flipped_step_raises_it(sur, data):
    """One Anti-Diffusion step (the demo's 2e-3 on [-1,1] = 1e-3 here) against a fine-tuned UNet and a tuned
    embedding (stand-ins): +-step on (almost) every pixel; J = SDL - L_cond falls for every image on that draw,
    and rises under the flipped step; with lambda = 1e3 the SDL term alone falls (the clipped cross-attention maps
    are driven towards zero). The traced lambda: one compiled step for both."""
    x, uid, _ = data
    unet = _jitter(sur.params["unet"], 7)
    emb = np.repeat(_jitter(np.asarray(ft.embed_ids(sur, sur.tokenize([""]))), 8), 2, 0)
    cfg = baselines.BaselineConfig(method="antidiffusion", step_size=1e-3)
    key = adft.stream_key(jax.random.key(0), "test/antidiffusion")
    probe = _antidiffusion_probe(sur, unet, x, uid, emb, cfg, 1.0, key)
    j0, delta, m = probe(np.zeros_like(x))
    np.testing.assert_allclose(j0, m["antidiffusion/sdl"] - m["antidiffusion/cond"], rtol=1e-6)
    assert np.all((m["antidiffusion/sdl"] > 0) & (m["antidiffusion/sdl"] <= 1))
    assert np.mean(np.abs(np.abs(delta) - cfg.step_size) < 1e-6) > 0.999
    flipped = np.asarray(pgd_lib.project(jnp.asarray(-delta), jnp.asarray(x), cfg.eps))
    np.testing.assert_allclose(flipped, -delta, atol=1e-6)  # nothing clipped: the opposite step
    (j_down, _, m_down), (j_up, _, _) = probe(delta), probe(flipped)
    np.testing.assert_array_equal(m_down["antidiffusion/t"], m["antidiffusion/t"])  # the same draw
    assert np.all(j_down < j0), (j0, j_down)
    assert np.all(j_up > j0), (j0, j_up)

    sdl = _antidiffusion_probe(sur, unet, x, uid, emb, cfg, 1e3, key)
    _, delta_sdl, s0 = sdl(np.zeros_like(x))
    s1 = sdl(delta_sdl)[2]["antidiffusion/sdl"]
    assert np.all(s1 < s0["antidiffusion/sdl"]), (s0["antidiffusion/sdl"], s1)


def test_antidiffusion_prompt_tuning_step_lowers_its_loss(sur, data):
    """PTO (``tunning_prompts``): one AdamW step on the shared embedding E [1,T,D] (lr 1e-3, torch's defaults:
    the first step is ``-lr (g / (|g| + 1e-8) + wd E)``) lowers the batch-mean L_cond at the call's fixed latents and draw,
    and the opposite move raises it."""
    x, uid, _ = data
    acfg = antidiffusion.AntiDiffusionConfig()
    mesh = ft.data_mesh(2)
    base, unet = meshlib.replicate(sur, mesh), meshlib.replicate(_jitter(sur.params["unet"], 7), mesh)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x), "uid": jnp.asarray(uid)}, mesh)
    z0 = antidiffusion.latents_jit(base, batch["x0"], batch["uid"], jax.random.key(1), 0, True)
    e0 = np.asarray(ft.embed_ids(sur, sur.tokenize([""])))
    key = adft.stream_key(jax.random.key(0), "test/pto")

    def probe(emb):  # (L_cond [B] at emb on step 0's draw, E after one step from emb)
        s = meshlib.replicate(antidiffusion.init_prompt_state(emb, acfg), mesh)
        s, m = antidiffusion.pto_jit(s, base, unet, {"z0": z0, "uid": batch["uid"]}, key)
        return np.asarray(m["antidiffusion/pto"]), np.asarray(s.emb)

    l0, e1 = probe(e0)
    move = e1 - e0
    adam = np.abs(move + acfg.pto_lr * acfg.pto_weight_decay * e0)  # lr |g| / (|g| + 1e-8): lr unless g ~ 1e-8
    assert adam.max() <= acfg.pto_lr * 1.001 and np.mean(np.abs(adam - acfg.pto_lr) < 1e-5) > 0.95
    l_down, l_up = probe(e1)[0], probe(e0 - move)[0]
    assert l_down.mean() < l0.mean() < l_up.mean(), (l0, l_down, l_up)


# ------------------------------------------------------------------------------------------------ prior term
def _keys(base, uid, draw):
    return jnp.stack([jax.random.fold_in(jax.random.fold_in(base, int(u)), int(d)) for u, d in zip(uid, draw)])


@jax.jit
def _loss_parts(sur, x, emb, keys, px, pemb, pkeys):
    inst = jnp.mean(ft.diffusion_loss(sur, x, emb, keys, True))
    return inst, jnp.mean(ft.diffusion_loss(sur, px, pemb, pkeys, True))


@pytest.fixture(scope="module")
def pool(sur):
    images = np.random.default_rng(9).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
    return adft.prior_pool(sur, images, baselines.CLASS_PROMPT)


def _expected(sur, x, uid, emb, pool, stream_key, step, text_encoder=None):
    """``(L_inst, L_prior)`` of training step ``step`` on ``x``, recomputed: draw ``j = step*B + i`` uses
    ``fold_in(fold_in(k, uid_i), j)`` and pool row ``j mod P`` with ``fold_in(fold_in(fold_in(k, 7), puid), j)``."""
    b = len(uid)
    draw = step * b + np.arange(b)
    rows = draw % len(pool["uid"])
    s = sur if text_encoder is None else sur.replace(params={**sur.params, "text_encoder": text_encoder})
    pemb = np.asarray(ft.embed_ids(s, pool["ids"][rows]))
    inst, prior = _loss_parts(s, jnp.asarray(x), jnp.asarray(emb), _keys(stream_key, uid, draw),
                              jnp.asarray(pool["x0"][rows]), jnp.asarray(pemb),
                              _keys(jax.random.fold_in(stream_key, 7), pool["uid"][rows], draw))
    return float(inst), float(prior)


def test_adft_stage3_prior_term(sur, data, layers, pool):
    """Eq. 9: stage 3's loss is L_cond + lambda L_prior, against both terms recomputed here (they differ, so a
    wrong lambda, a missing term or a swapped pair of draws shows). At lambda = 0 (the default) the term is not
    built at all (``adft.train_on``); lambda > 0 without a pool is refused (checked last)."""
    x, uid, emb = data
    base_key = jax.random.key(3)
    k3 = adft.stream_key(base_key, adft.STREAMS[2])
    inst, prior = _expected(sur, x, uid, emb, pool, k3, 0)
    assert prior > 0 and abs(prior - inst) > 1e-3 * inst
    cfg = adft.ADFTConfig(layers=layers, epochs=1, iter1=0, iter2=0, iter3=1, lr=1e-3, prior_weight=0.5)
    _, hist = adft.protect(sur, sur.params["unet"], x, uid, emb, cfg, base_key, prior=pool)
    np.testing.assert_allclose(hist["adft/train"][0][0], inst + 0.5 * prior, rtol=1e-5)
    with pytest.raises(ValueError, match="prior"):
        adft.protect(sur, sur.params["unet"], x, uid, emb, dataclasses.replace(cfg, prior_weight=1.0), base_key)


def test_text_encoder_training_with_prior(sur, data, pool):
    """ASPL's training (ADB ``train_one_epoch``: UNet + text encoder, prior 1.0): the loss of the first step is
    L_inst + L_prior through the text encoder's embeddings of the token ids, and both the UNet and the text
    encoder move; the UNet-only path is the plain ``train_step`` on the prompt embedding, bit for bit."""
    x, uid, emb = data
    cfg = baselines.BaselineConfig(lr=1e-3, train_text_encoder=True, prior_weight=1.0)
    tcfg = cfg.train(1, 2)
    mesh = ft.data_mesh(2)
    base = meshlib.replicate(sur, mesh)
    frozen = ft.frozen_part(base, tcfg)
    assert "text_encoder" not in frozen.params and "unet" not in frozen.params
    state = meshlib.replicate(ft.init_state(sur, tcfg), mesh)
    ids = np.repeat(sur.tokenize([PROMPT]), 2, 0)
    key = jax.random.key(8)
    state, losses = adft.train_on(state, frozen, jnp.asarray(x), jnp.asarray(uid), None, key, tcfg, mesh,
                                  stream="aspl/adv", prior=pool, ids=ids)
    inst, prior = _expected(sur, x, uid, emb, pool, adft.stream_key(key, "aspl/adv"), 0)
    np.testing.assert_allclose(losses[0], inst + prior, rtol=1e-5)
    for part in ("unet", "text_encoder"):
        moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                             state.trainable[part], sur.params[part])
        assert any(jax.tree.leaves(moved)), part
    with pytest.raises(ValueError, match="token ids"):
        adft.train_on(state, frozen, jnp.asarray(x), jnp.asarray(uid), None, key, tcfg, mesh, prior=pool)

    # UNet only, no prior: train_on == one hand-written train_step on the same batch, bit for bit
    ucfg = ft.FinetuneConfig(steps=1, batch_size=2, lr=1e-3, weight_decay=0.0)
    ufrozen = ft.frozen_part(base, ucfg)
    s0 = meshlib.replicate(ft.init_state(sur, ucfg), mesh)
    s0_copy = jax.tree.map(lambda a: jnp.array(a, copy=True), s0)
    s1, _ = adft.train_on(s0, ufrozen, jnp.asarray(x), jnp.asarray(uid), jnp.asarray(emb), key, ucfg, mesh)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x), "uid": jnp.asarray(uid), "draw": jnp.arange(2, dtype=jnp.int32),
                                 "emb": jnp.asarray(emb)}, mesh)
    s2, _ = ft.train_step_jit(s0_copy, ufrozen, batch, adft.stream_key(key, adft.STREAMS[2]), ucfg.trace_key())
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), s1.trainable, s2.trainable)
    assert all(jax.tree.leaves(same))


def test_aspl_with_text_encoder_and_prior_keeps_budget(sur, data, pool):
    x, uid, emb = data
    cfg = baselines.BaselineConfig(epochs=1, clean_steps=1, pgd_steps=2, adv_steps=1, lr=1e-3,
                                   train_text_encoder=True, prior_weight=1.0)
    ids = sur.tokenize([PROMPT])
    p, h = baselines.aspl(sur, x, uid, emb, x, uid, emb, cfg, jax.random.key(4), ids=ids, prior=pool)
    d = np.asarray(p.delta)
    assert 0 < np.abs(d).max() <= cfg.eps + 1e-6 and (x + d).min() >= 0 and (x + d).max() <= 1
    assert len(h["aspl/cond"][0]) == 2 and np.isfinite(h["aspl/train_adv"][0]).all()
    assert np.isfinite(h["aspl/train_clean"][0]).all()


def test_aspl_derives_prompt_ids_and_class_pool(sur, data):
    """Without ``ids=`` / ``prior=``, ASPL tokenizes ``cfg.prompt`` and samples its class pool from theta_pre on the
    ``aspl/class`` stream at the instance size (ADB ``main``): the same run as with those passed explicitly."""
    x, uid, emb = data
    cfg = baselines.BaselineConfig(epochs=1, clean_steps=1, pgd_steps=1, adv_steps=1, lr=1e-3, train_text_encoder=True,
                                   prior_weight=1.0, num_class_images=2, class_steps=2)
    key = jax.random.key(4)
    p_auto, h_auto = baselines.aspl(sur, x, uid, emb, x, uid, emb, cfg, key)
    pool = baselines.class_pool(sur, cfg, adft.stream_key(key, "aspl/class"), size=32, steps=2)
    p_set, h_set = baselines.aspl(sur, x, uid, emb, x, uid, emb, cfg, key, ids=sur.tokenize([PROMPT]), prior=pool)
    np.testing.assert_array_equal(np.asarray(p_auto.delta), np.asarray(p_set.delta))
    assert h_auto["aspl/train_adv"] == h_set["aspl/train_adv"] and np.abs(np.asarray(p_auto.delta)).max() > 0


def test_class_pool_samples_theta_pre(sur):
    """ADB ``main``'s class images: ``num_class_images`` DDIM samples of the class prompt from theta_pre, at the
    instance size, tokenized and embedded with the class prompt; uids clear of the instance images'."""
    cfg = baselines.BaselineConfig(num_class_images=2)
    pool = baselines.class_pool(sur, cfg, jax.random.key(5), size=32, steps=2, batch_size=2)
    assert pool["x0"].shape == (2, 32, 32, 3) and 0 <= pool["x0"].min() and pool["x0"].max() <= 1
    assert not np.array_equal(pool["x0"][0], pool["x0"][1])  # one noise draw per image
    np.testing.assert_array_equal(pool["ids"], np.repeat(sur.tokenize([baselines.CLASS_PROMPT]), 2, 0))
    np.testing.assert_allclose(pool["emb"][1], np.asarray(ft.embed_ids(sur, sur.tokenize([baselines.CLASS_PROMPT])))[0],
                               rtol=1e-6, atol=1e-6)
    assert pool["uid"].min() >= 1_000_003
    again = baselines.class_pool(sur, cfg, jax.random.key(5), size=32, steps=2, batch_size=2)
    np.testing.assert_array_equal(again["x0"], pool["x0"])  # derived from the key only


def test_anti_dreambooth_recipe_units():
    """ADB's ``--pgd_alpha=5e-3 --pgd_eps=5e-2`` act on [-1,1] pixels: half of each in [0,1] units."""
    ref = baselines.BaselineConfig.anti_dreambooth()
    assert ref.step_size == 5e-3 / 2 and ref.eps == 5e-2 / 2
    assert ref.train_text_encoder and ref.prior_weight == 1.0 and ref.num_class_images == 200 and ref.lr == 5e-7
    assert (ref.epochs, ref.clean_steps, ref.pgd_steps, ref.adv_steps) == (50, 3, 6, 3)
    assert baselines.BaselineConfig().step_size == ref.step_size
    tcfg = ref.train(3, 4)
    assert tcfg.train_text_encoder and tcfg.prior_weight == 1.0 and tcfg.weight_decay == 1e-2
    fs = baselines.fsmg_surrogate_config()
    assert (fs.steps, fs.batch_size, fs.lr, fs.prior_weight, fs.train_text_encoder) == (1000, 2, 5e-7, 1.0, True)
    with pytest.raises(ValueError):
        baselines.BaselineConfig(update="adam")
