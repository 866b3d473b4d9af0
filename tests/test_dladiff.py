"""DLADiff layer 1 (DSUR + attention loss + ADFT) and the ASPL / FSMG / DisDiff / Anti-Diffusion baselines on the
tiny SD surrogate.

Shapes (2 images of 32 px, 2-device mesh) and the cached surrogate are those of test_finetune and
test_experiment_dladiff, so the compiled train / stage steps are shared within one pytest process.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax.defenses.dladiff import adft, antidiffusion, baselines, disdiff, dsur
from tdae_jax.editors import finetune as ft
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.pipeline import _tiny, _tiny_variant

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def sur():
    return _tiny("sd")


@pytest.fixture(scope="module")
def data(sur):
    x = np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
    emb = np.repeat(np.asarray(ft.embed_ids(sur, sur.tokenize([PROMPT]))), 2, 0)
    return x, np.array([11, 12], np.int32), emb


@pytest.fixture(scope="module")
def layers(sur):
    return dsur.select_layers(sur, 32, 16)


def _stage1(sur, static_unet, x, uid, emb, cfg, steps, fixed_keys=False):
    """``steps`` stage-1 steps; returns the final state and L_att before each step ``[steps, B]``.
    ``fixed_keys``: every step (and one final probe) uses step 0's (t, eps, VAE draw), so the values are
    comparable: a deterministic ascent on one sample of L_att."""
    mesh = ft.data_mesh(2)
    batch = meshlib.shard_batch({"x0": jnp.asarray(x), "uid": jnp.asarray(uid), "emb": jnp.asarray(emb)}, mesh)
    p = adft._place_perturb(adft.init_perturb(x, cfg), mesh)
    base, su = meshlib.replicate(sur, mesh), meshlib.replicate(static_unet, mesh)
    dyn = meshlib.replicate(sur.params["unet"], mesh)
    att, key = [], adft.stream_key(jax.random.key(0), "adft/stage1")
    for _ in range(steps + int(fixed_keys)):
        if fixed_keys:  # a fresh buffer each time: the step donates its state
            p = p._replace(step=meshlib.replicate(jnp.zeros((), jnp.int32), mesh))
        p, m = adft.stage1_jit(p, base, su, dyn, batch, key, cfg.trace_key())
        att.append(np.asarray(m["adft/att"]))
    return p, np.stack(att)


def test_select_layers(sur, layers):
    assert layers.prefixes == ("down_blocks_0", "up_blocks_1")  # the tiny UNet's 16x16 maps at 32 px
    assert layers("down_blocks_0/attentions_0/transformer_blocks_0/attn2")
    assert not layers("mid_block/attentions_0/transformer_blocks_0/attn1")
    assert dsur.select_layers(sur, 32, 8).prefixes == ("mid_block",)
    with pytest.raises(ValueError, match="no attention block"):
        dsur.select_layers(sur, 32, 4)
    assert dsur.select_layers(sur, 32, prefixes=["mid_block"], kinds=["attn2"]).kinds == ("attn2",)


def test_attention_loss_zero_when_static_equals_dynamic(sur, data, layers):
    x, uid, emb = data
    cfg = adft.ADFTConfig(layers=layers)
    p, att = _stage1(sur, sur.params["unet"], x, uid, emb, cfg, 1)
    assert np.all(att[0] == 0.0)  # same UNet, same image, same t / eps / VAE draw
    assert np.all(np.asarray(p.delta) == 0.0)  # zero gradient at the minimum: sign(0) = 0, no move


def test_stage1_increases_attention_loss_within_budget(sur, data, layers):
    x, uid, emb = data
    rng = np.random.default_rng(5)  # a static UNet that differs from theta_pre (numpy: no per-shape compiles)
    static = jax.tree.map(lambda a: np.asarray(a) + 0.02 * rng.standard_normal(a.shape).astype(np.float32),
                          sur.params["unet"])
    cfg = adft.ADFTConfig(layers=layers)  # eta 7/255, step 5e-3: 4 steps stay inside the budget
    p, att = _stage1(sur, static, x, uid, emb, cfg, 4, fixed_keys=True)
    assert np.all(att[-1] > att[0]), att  # ascent on L_att, per image, at the same (t, eps, draw)
    assert np.mean(np.diff(att, axis=0) > 0) >= 0.75, att
    d = np.asarray(p.delta)
    assert np.abs(d).max() <= cfg.eps + 1e-6 and (x + d).min() >= 0 and (x + d).max() <= 1


def test_attention_loss_is_sum_of_squares():
    a = {"x/attn1": jnp.ones((2, 3, 3)), "x/attn2": jnp.zeros((2, 3, 4))}
    b = {"x/attn1": jnp.zeros((2, 3, 3)), "x/attn2": jnp.full((2, 3, 4), 0.5)}
    np.testing.assert_allclose(np.asarray(dsur.attention_loss(a, b, w_cross=2.0, w_self=1.0)),
                               [9 + 2 * 12 * 0.25] * 2)


def test_adft_epoch_end_to_end(sur, data, layers):
    x, uid, emb = data
    static = dsur.train_static(sur, x, PROMPT, dsur.static_config(steps=1, lr=1e-3, batch_size=2),
                               jax.random.key(2), uids=uid)
    s_unet = jax.device_get(static.state.trainable["unet"])
    cfg = adft.ADFTConfig(layers=layers, epochs=1, iter1=1, iter2=1, iter3=1, lr=1e-3)
    seen = []
    state, hist = adft.protect(sur, static.state.trainable["unet"], x, uid, emb, cfg, jax.random.key(3),
                               on_epoch=lambda ep, st, h: seen.append(ep))
    assert seen == [1] and len(hist["adft/att"][0]) == 1 and len(hist["adft/cond"][0]) == 1
    assert len(hist["adft/train"][0]) == 1 and np.isfinite(hist["adft/train"][0]).all()
    d = np.asarray(state.perturb.delta)
    assert 0 < np.abs(d).max() <= cfg.eps + 1e-6 and (x + d).min() >= 0 and (x + d).max() <= 1
    assert int(state.perturb.step) == 2 and int(state.dynamic.step) == 1
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                         state.dynamic.trainable["unet"], sur.params["unet"])
    assert any(jax.tree.leaves(moved)), "stage 3 must update UNet_d"
    same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), static.state.trainable["unet"], s_unet)
    assert all(jax.tree.leaves(same)), "UNet_s stays frozen"


def test_baselines_keep_budget(sur, data):
    x, uid, emb = data
    cfg = baselines.BaselineConfig(epochs=1, clean_steps=1, pgd_steps=1, adv_steps=1, lr=1e-3)
    p, h = baselines.aspl(sur, x, uid, emb, x, uid, emb, cfg, jax.random.key(4))
    d = np.asarray(p.delta)
    assert 0 < np.abs(d).max() <= cfg.eps + 1e-6 and len(h["aspl/cond"][0]) == 1
    cfg = baselines.BaselineConfig(method="fsmg", pgd_steps=2)
    p, h = baselines.fsmg(sur, sur.params["unet"], x, uid, emb, cfg, jax.random.key(4))
    d = np.asarray(p.delta)
    assert 0 < np.abs(d).max() <= cfg.eps + 1e-6 and len(h["fsmg/cond"]) == 2


def test_fsmg_surrogate_is_adb_dreambooth(sur, data):
    """ADB's FSMG surrogate: DreamBooth moves the UNet and (text encoder trained) the prompt's embedding."""
    x, uid, emb = data
    cfg = baselines.BaselineConfig(method="fsmg", fsmg_surrogate="adb", fsmg_surrogate_steps=1, lr=1e-3,
                                   train_text_encoder=True, prior_weight=1.0, num_class_images=2, class_steps=2)
    unet, emb1 = baselines.fsmg_surrogate(sur, x, uid, cfg, jax.random.key(4))
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)), unet, sur.params["unet"])
    assert any(jax.tree.leaves(moved)), "DreamBooth must update the surrogate's UNet"
    assert emb1.shape == emb[:1].shape and not np.allclose(emb1, emb[:1]), "the trained text encoder re-embeds"
    with pytest.raises(ValueError, match="fsmg_surrogate"):
        baselines.BaselineConfig(fsmg_surrogate="static")


def _np_erasure(maps, target_pos, content_pos, tau):
    """DisDiff's ``Attmap`` restated in numpy for one image: the layers' maps ``[L,Q,T]`` averaged, the content
    tokens sliced out, ``softmax(tau x map)`` over them, ``(1 - E_target / E_all)^2`` of the squared maps."""
    m = tau * np.mean(maps, axis=0)[:, content_pos]
    prob = np.exp(m - m.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    cols = [content_pos.index(i) for i in target_pos]
    return (1.0 - np.sum(prob[:, cols] ** 2) / np.sum(prob ** 2)) ** 2


def test_disdiff_erasure_term_is_the_identifiers_energy_share(sur):
    """L_CAE on hand-made maps: the target is the identifier "sks" (all its tokens, here split by the tiny
    tokenizer; position 4 of the reference's CLIP ids), C the prompt's non-special tokens; the value is the numpy
    restatement's; attention on special tokens does not count; more attention on "sks" lowers it (erasure)."""
    target, content = disdiff.token_masks(sur, PROMPT, "sks")
    ids = sur.tokenize([PROMPT])[0]
    tpos, cpos = list(np.flatnonzero(target)), list(np.flatnonzero(content))
    pieces = sur.static.tokenizer.convert_ids_to_tokens([int(i) for i in ids[tpos]])
    assert "".join(pieces).replace("</w>", "") == "sks" and pieces[-1].endswith("</w>")
    assert cpos[0] == 1 and ids[cpos[-1] + 1] == sur.static.tokenizer.eos_token_id and set(tpos) < set(cpos)
    rng = np.random.default_rng(3)
    raw = rng.dirichlet(np.full(ids.shape[0], 0.3), size=(2, 2, 16)).astype(np.float32)  # [L,B,Q,T] probabilities
    maps = {"down_blocks_0/attn2": raw[0], "up_blocks_1/attn2": raw[1], "down_blocks_0/attn1": raw[0] * 0 + 1.0}
    tb, cb = np.repeat(target[None], 2, 0), np.repeat(content[None], 2, 0)
    got = np.asarray(disdiff.erasure_loss(maps, tb, cb, 100.0))
    want = [_np_erasure(raw[:, i], tpos, cpos, 100.0) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert 0 < got.min() and got.max() < 1
    special = raw.copy()
    special[..., 0] += 5.0  # BOS: not a content token
    special[..., cpos[-1] + 1:] += 5.0  # EOS and padding
    maps_s = {"down_blocks_0/attn2": special[0], "up_blocks_1/attn2": special[1]}
    np.testing.assert_allclose(np.asarray(disdiff.erasure_loss(maps_s, tb, cb, 100.0)), got, rtol=1e-5)
    more = raw.copy()
    more[..., tpos] += 0.05
    maps_m = {"down_blocks_0/attn2": more[0], "up_blocks_1/attn2": more[1]}
    assert np.all(np.asarray(disdiff.erasure_loss(maps_m, tb, cb, 100.0)) < got)
    with pytest.raises(ValueError, match="not in the prompt"):
        disdiff.token_masks(sur, "a photo of a person", "sks")


def test_disdiff_scheduler_follows_the_reference_rules(sur):
    """MSS: ``custom_function_cos(t, 999)``; the search: ``select_timestep``'s window removal (clamped to
    [20, 980], +-20, restated as its loop) and its min / max choice (first on ties); the PGD draw: uniform over the
    retained timesteps, and with all retained exactly :func:`finetune.diffusion_draw`'s t."""
    t = np.array([0, 1, 250, 499, 500, 998, 999])
    np.testing.assert_allclose(np.asarray(disdiff.mss_weight(t, 1000)), 0.5 * (np.cos(t / 999 * np.pi) + 1),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(disdiff.mss_weight([0, 999], 1000)), [1.0, 0.0], atol=1e-7)

    mask = np.ones((4, 1000), bool)
    mask[3, 100:130] = False  # an earlier removal, overlapped by this one
    centre = np.array([3, 990, 500, 120])
    want = mask.astype(np.int64)
    for i, d in enumerate(centre):  # the reference's per-image loop
        d = 20 if d < 20 else (1000 - 20 if d > 1000 - 20 else d)
        want[i, d - 20:d + 20] -= 1
    want = np.clip(want, 0, 1).astype(bool)
    got = disdiff.remove_window(mask, centre, 20)
    np.testing.assert_array_equal(got, want)
    assert list(got.sum(1)) == [960] * 4

    cands = np.array([[7, 1, 5], [8, 2, 6], [9, 3, 6]])  # [K=3, B=3]
    scores = np.array([[1.0, 5.0, 2.0], [0.5, 5.0, 2.0], [3.0, 5.0, 1.0]])
    removed, selected = disdiff.search_choice(cands, scores)
    np.testing.assert_array_equal(removed, [8, 1, 6])
    np.testing.assert_array_equal(selected, [9, 1, 5])

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(9), i))(jnp.arange(400))
    kept = np.zeros((400, 1000), bool)
    kept[:, 300:340] = kept[:, 900:910] = True
    ts = np.asarray(disdiff.sample_timesteps(keys, kept))
    assert np.all(kept[np.arange(400), ts]) and len(set(ts.tolist())) > 40  # only retained ones, all of them
    full = np.asarray(disdiff.sample_timesteps(keys, np.ones((400, 1000), bool)))
    ref = np.asarray(ft.diffusion_draw(sur, None, keys, z0=jnp.zeros((400, 1)))[2])  # ASPL's draw of t
    np.testing.assert_array_equal(full, ref)
    with pytest.raises(ValueError, match="search_keep"):
        disdiff.DisDiffConfig(search_keep=30, search_window=20)


def test_disdiff_keeps_budget(sur, data):
    """One DisDiff epoch (a two-round search, then 3 PGD steps; no training steps, which are ASPL's and run in the
    flagfile test): the perturbation moves, within the L_inf budget and [0,1]; each step reports L_cond, L_CAE and
    its t, drawn from the timesteps the search kept."""
    x, uid, emb = data
    cfg = baselines.BaselineConfig(method="disdiff", epochs=1, clean_steps=0, pgd_steps=3, adv_steps=0)
    dcfg = disdiff.DisDiffConfig(search_steps=2)
    p, h = disdiff.protect(sur, x, uid, emb, x, uid, emb, cfg, dcfg, jax.random.key(4))
    d = np.asarray(p.delta)
    assert 0 < np.abs(d).max() <= cfg.eps + 1e-6 and (x + d).min() >= 0 and (x + d).max() <= 1
    kept = h["disdiff/kept"]
    assert int(p.step) == 3 and np.all((880 <= kept.sum(-1)) & (kept.sum(-1) <= 960))  # 2 x 40 removed (overlap)
    assert len(h["disdiff/cond"][0]) == 3 and len(h["disdiff/att"][0]) == 3
    att = np.stack(h["disdiff/att"][0])
    assert np.all((att > 0) & (att < 1)) and np.isfinite(np.stack(h["disdiff/cond"][0])).all()
    ts = np.stack(h["disdiff/t"][0])  # [steps, B]
    assert np.all(kept[np.arange(2), ts]) and np.unique(ts).size > 1
    c = disdiff.curves(h, dcfg)
    np.testing.assert_allclose(c["loss"], c["disdiff/cond"] + 0.1 * c["disdiff/att"], rtol=1e-6)
    assert c["loss"].shape == (2, 3)


def _np_disturbance(per_head, scale):
    """Anti-Diffusion's SDL restated in numpy for one image from per-head maps ``[L,H,Q,T]``, as ``protect_epoch``
    takes it: ``aggregate_attention`` stacks the (layer, head) maps and averages them, ``* 1e+2``, ``clamp(0, 1)``,
    then the mean-reduced MSE to a zero map."""
    stacked = per_head.reshape(-1, *per_head.shape[2:])  # [L*H, Q, T]
    avg = stacked.sum(0) / stacked.shape[0]
    return np.mean((np.clip(avg * scale, 0.0, 1.0) - 0.0) ** 2)


def test_antidiffusion_semantic_disturbance_matches_numpy():
    """SDL on hand-made maps (2 layers x 2 heads, 16 queries, 77 tokens, probabilities over the tokens; some
    entries above 1/100, most below): the numpy restatement's value per image from the head-averaged maps the
    surrogate captures (layers with equally many heads); self-attention maps are ignored; an entry clipped at 1
    carries no gradient, one below it carries 2 scale^2 A / (Q T) / L."""
    rng = np.random.default_rng(5)
    per_head = rng.dirichlet(np.full(77, 0.2), size=(2, 2, 2, 16)).astype(np.float32)  # [L,B,H,Q,T]
    maps = {"down_blocks_0/attn2": per_head[0].mean(1), "up_blocks_1/attn2": per_head[1].mean(1),
            "down_blocks_0/attn1": np.ones((2, 16, 16), np.float32)}
    got = np.asarray(antidiffusion.semantic_disturbance(maps, 100.0))
    want = [_np_disturbance(per_head[:, i], 100.0) for i in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    avg = (maps["down_blocks_0/attn2"] + maps["up_blocks_1/attn2"]) / 2
    assert 0.05 < np.mean(avg >= 0.01) < 0.5 and 0 < got.min() and got.max() < 1  # both regimes present
    g = np.asarray(jax.grad(lambda m: jnp.sum(antidiffusion.semantic_disturbance({**maps, "up_blocks_1/attn2": m},
                                                                                  100.0)))(maps["up_blocks_1/attn2"]))
    np.testing.assert_array_equal(g[avg > 0.0101], 0.0)
    low = avg < 0.0099
    np.testing.assert_allclose(g[low], (2 * 100.0 ** 2 * avg / (16 * 77) / 2)[low], rtol=1e-4)
    with pytest.raises(ValueError, match="one shape"):
        antidiffusion.semantic_disturbance({"a/attn2": np.ones((1, 4, 77)), "b/attn2": np.ones((1, 16, 77))})


def test_antidiffusion_keeps_budget_and_phase_ball(sur, data):
    """Two PGD phases of 2 steps of 1e-3 (no prompt tuning or fine-tuning steps: PTO's step is tested in
    test_dladiff_direction, the fine-tuning is ASPL's and runs in the flagfile test) with a phase radius of 1.5e-3:
    the first phase stops at 1.5e-3, the second, re-centred where the first ended, goes beyond it (at most 3e-3),
    all within the budget and [0,1]; each step reports L_cond and SDL, the curve is L_cond - SDL."""
    x, uid, _ = data
    cfg = baselines.BaselineConfig(method="antidiffusion", epochs=1, step_size=1e-3)
    acfg = antidiffusion.AntiDiffusionConfig(pgd_steps=2, tune_steps=0, pto_steps=0, phase_eps=1.5e-3)
    linf = []
    p, h = antidiffusion.protect(sur, x, uid, cfg, acfg, jax.random.key(4),
                                 on_epoch=lambda ep, p, h: linf.append(float(np.abs(np.asarray(p.delta)).max())))
    d = np.asarray(p.delta)
    assert linf[0] == pytest.approx(1.5e-3, abs=1e-6) and 1.5e-3 + 1e-4 < linf[1] <= 3e-3 + 1e-6
    assert np.abs(d).max() <= cfg.eps and (x + d).min() >= 0 and (x + d).max() <= 1
    assert int(p.step) == 4 and [len(ph) for ph in h["antidiffusion/cond"]] == [2, 2]
    assert h["antidiffusion/pto"] == [[]] and h["antidiffusion/train"] == [[]]  # 0 steps: nothing compiled
    np.testing.assert_allclose(h["antidiffusion/emb"], np.asarray(ft.embed_ids(sur, sur.tokenize([""]))))
    c = antidiffusion.curves(h, acfg)
    assert c["loss"].shape == (2, 4) and np.isfinite(c["loss"]).all()
    np.testing.assert_allclose(c["loss"], c["antidiffusion/cond"] - c["antidiffusion/sdl"], rtol=1e-6)
    with pytest.raises(ValueError, match="UNet alone"):
        antidiffusion.protect(sur, x, uid, baselines.BaselineConfig(train_text_encoder=True), acfg, jax.random.key(4))


def test_memory_efficient_attention_is_the_same_function(sur, data, layers):
    """``Surrogate.memory_efficient`` (chunked attention under jax.checkpoint, the 512 px memory fix) keeps
    params and function: eps, the DSUR maps, L_att (Eq. 8) and its gradient agree with full attention."""
    x, uid, emb = data
    mea = sur.memory_efficient()
    assert mea.static.unet.use_memory_efficient_attention and not sur.static.unet.use_memory_efficient_attention
    assert mea.params is sur.params and mea.memory_efficient() is mea
    rng = np.random.default_rng(7)
    static_params = jax.tree.map(lambda a: np.asarray(a) + 0.02 * rng.standard_normal(a.shape).astype(np.float32),
                                 sur.params["unet"])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.asarray(uid))
    x_adv = jnp.clip(jnp.asarray(x) + 0.02, 0, 1)

    def objective(s, xa):
        static_sur = s.replace(params={**s.params, "unet": static_params})
        return dsur.l_att(static_sur, s, jnp.asarray(x), xa, jnp.asarray(emb), keys, layers).sum()

    def probe(s):
        z = jax.random.normal(jax.random.key(1), (2, 4, 16, 16))
        eps, maps = s.unet_out(z, jnp.array([10, 500]), jnp.asarray(emb), attention=layers)
        return eps, maps, *jax.value_and_grad(objective, argnums=1)(s, x_adv)

    full, chunked = jax.jit(probe)(sur), jax.jit(probe)(mea)
    eps_f, maps_f, l_f, g_f = full
    eps_c, maps_c, l_c, g_c = chunked
    assert len(maps_f) == 6 and set(maps_f) == set(maps_c)  # attn1 + attn2 of 3 blocks at 16x16
    np.testing.assert_allclose(np.asarray(eps_c), np.asarray(eps_f), rtol=1e-5, atol=1e-5)
    for k in maps_f:
        np.testing.assert_allclose(np.asarray(maps_c[k]), np.asarray(maps_f[k]), rtol=1e-5, atol=1e-6)
    assert float(l_f) > 0
    np.testing.assert_allclose(float(l_c), float(l_f), rtol=1e-4)
    g_f, g_c = np.asarray(g_f), np.asarray(g_c)
    assert np.abs(g_f).max() > 0
    np.testing.assert_allclose(g_c, g_f, rtol=1e-3, atol=1e-4 * np.abs(g_f).max())


def test_mixed_precision_master_weights(sur, data, layers):
    """``Surrogate.mixed_precision`` (bf16 compute, the GPU/TPU memory option): frozen VAE/text weights stored
    in bf16, UNet kept as float32 master; the modules really compute in bf16 (eps differs from float32 by
    bf16 rounding, not more); latents and losses come back float32 and within bf16 noise of float32's; a
    frozen bf16 UNet_s and its float32 master compute identically (L_att = 0 at delta = 0); an ADFT training
    step keeps UNet_d and AdamW's state float32. (Forward passes and one training step only: bf16 compiles
    slowly on CPU. The bf16 image gradient is checked by the CLI test in test_experiment_tdae.py.)"""
    x, uid, emb = data
    mp = _tiny_variant("sd", False, "bfloat16")  # == sur.mixed_precision("bfloat16"), cached as the CLI's
    assert mp.static.name == sur.mixed_precision("bfloat16").static.name == sur.static.name + "+bfloat16"
    assert sur.mixed_precision("float32") is sur and mp.mixed_precision(jnp.bfloat16) is mp
    assert mp.compute_dtype == jnp.bfloat16 and sur.compute_dtype == jnp.float32
    kinds = {k: _dtypes(mp.params[k]) for k in ("vae", "text_encoder", "unet")}
    assert kinds == {"vae": {"bfloat16"}, "text_encoder": {"bfloat16"}, "unet": {"float32"}}
    assert mp.params["unet"] is sur.params["unet"]
    frozen = mp.frozen_unet(sur.params["unet"])
    assert _dtypes(frozen) == {"bfloat16"}

    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.asarray(uid))
    e = jnp.asarray(emb)

    @jax.jit
    def probe(s, static_unet):
        z = jax.random.normal(jax.random.key(1), (2, 4, 16, 16))
        s_static = s.replace(params={**s.params, "unet": static_unet})
        la = dsur.l_att(s_static, s, jnp.asarray(x), jnp.asarray(x), e, keys, layers)
        return s.eps(z, jnp.array([10, 500]), e), s.encode(jnp.asarray(x)), la, ft.diffusion_loss(s, x, e, keys)

    (eps32, _, _, lc32), (eps16, z16, la, lc16) = probe(sur, sur.params["unet"]), probe(mp, frozen)
    assert all(a.dtype == jnp.float32 for a in (eps16, z16, la, lc16))
    eps32, eps16 = np.asarray(eps32), np.asarray(eps16)
    rel = np.abs(eps16 - eps32).max() / np.abs(eps32).max()
    assert 1e-4 < rel < 0.1, rel  # bf16 rounding (8-bit mantissa): present, and small
    np.testing.assert_allclose(np.asarray(lc16), np.asarray(lc32), rtol=0.05)  # L_cond, float32 reduction
    assert np.all(np.asarray(la) == 0.0)  # frozen bf16 copy == float32 master cast at use

    cfg = adft.ADFTConfig(layers=layers, epochs=1, iter1=0, iter2=0, iter3=1, lr=1e-3)  # stage 3 alone
    runs = {n: adft.protect(s, s.frozen_unet(sur.params["unet"]), x, uid, emb, cfg, jax.random.key(3))
            for n, s in (("fp32", sur), ("bf16", mp))}
    state, hist = runs["bf16"]
    assert _dtypes(state.dynamic.trainable) == {"float32"}  # the master moved, in float32
    assert _dtypes(state.dynamic.opt_state) <= {"float32", "int32"}
    moved = jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), np.asarray(b)),
                         state.dynamic.trainable["unet"], sur.params["unet"])
    assert any(jax.tree.leaves(moved))
    np.testing.assert_allclose(hist["adft/train"][0], runs["fp32"][1]["adft/train"][0], rtol=0.05)


def _dtypes(tree) -> set:
    return {str(a.dtype) for a in jax.tree.leaves(tree)}
