"""DLADiff layer 1 (DSUR + attention loss + ADFT) and the ASPL / FSMG / DisDiff / Anti-Diffusion baselines on the
tiny SD surrogate: layer selection, L_att, the loops (budget, history), the memory-efficient and mixed-precision
surrogates, the baselines' loss terms against numpy restatements, and the direction of every image step and the
prior term of the trainings:

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

One file, one set of shapes (2 images of 32 px, 2-device mesh) and the cached surrogate, so that each compiled
step (stage 1 / 2, the training steps, DisDiff's and Anti-Diffusion's steps, the class-image sampler) is compiled
once here and shared by every test that runs it; they are those of test_finetune and test_experiment_dladiff too,
which reuse them through the persistent compilation cache.
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
def inner(sur):
    """``data``'s shapes, images inside [0.1, 0.9]: one step of 5e-3 is never clipped to [0,1], so the flipped step
    of the direction tests is exactly -step."""
    x = 0.1 + 0.8 * np.random.default_rng(1).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)
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
    this file's direction tests, the fine-tuning is ASPL's and runs in the flagfile test) with a phase radius of 1.5e-3:
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


def _dsur_probe(s, static_unet, x, x_adv, emb, keys, layers):
    """What the memory-efficient and mixed-precision tests compare: eps and the DSUR maps at a fixed (z_t, t), L_att
    (Eq. 8) against ``static_unet`` at ``x_adv`` and its gradient w.r.t. ``x_adv``, the clean latent and L_cond at
    ``keys``. Weights and images are arguments (not constants of the compiled program)."""
    z = jax.random.normal(jax.random.key(1), (2, 4, 16, 16))
    t = jnp.array([10, 500])
    out, maps = s.unet_out(z, t, emb, attention=layers)
    static_sur = s.replace(params={**s.params, "unet": static_unet})
    l_att, g = jax.value_and_grad(lambda xa: dsur.l_att(static_sur, s, x, xa, emb, keys, layers).sum())(x_adv)
    return s.to_eps(out, z, t), maps, l_att, g, s.encode(x), ft.diffusion_loss(s, x, emb, keys)


_dsur_probe_jit = jax.jit(_dsur_probe, static_argnames=("layers",))


@pytest.fixture(scope="module")
def probe_args(sur, data):
    """:func:`_dsur_probe`'s inputs: a static UNet that differs from theta_pre (numpy: no per-shape compiles), the
    images, x_adv = x + 0.02 (in [0,1]), the prompt embedding and per-image keys."""
    x, uid, emb = data
    rng = np.random.default_rng(7)
    static_params = jax.tree.map(lambda a: np.asarray(a) + 0.02 * rng.standard_normal(a.shape).astype(np.float32),
                                 sur.params["unet"])
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(4), i))(jnp.asarray(uid))
    return static_params, jnp.asarray(x), jnp.clip(jnp.asarray(x) + 0.02, 0, 1), jnp.asarray(emb), keys


@pytest.fixture(scope="module")
def full_probe(sur, layers, probe_args):
    """:func:`_dsur_probe` of the float32, full-attention surrogate (the reference of both tests below)."""
    return jax.device_get(_dsur_probe_jit(sur, *probe_args, layers=layers))


def test_memory_efficient_attention_is_the_same_function(sur, layers, probe_args, full_probe):
    """``Surrogate.memory_efficient`` (chunked attention under jax.checkpoint, the 512 px memory fix) keeps
    params and function: eps, the DSUR maps, L_att (Eq. 8) and its gradient, and L_cond agree with full
    attention."""
    mea = sur.memory_efficient()
    assert mea.static.unet.use_memory_efficient_attention and not sur.static.unet.use_memory_efficient_attention
    assert mea.params is sur.params and mea.memory_efficient() is mea
    eps_f, maps_f, l_f, g_f, _, lc_f = full_probe
    eps_c, maps_c, l_c, g_c, _, lc_c = jax.device_get(_dsur_probe_jit(mea, *probe_args, layers=layers))
    assert len(maps_f) == 6 and set(maps_f) == set(maps_c)  # attn1 + attn2 of 3 blocks at 16x16
    np.testing.assert_allclose(np.asarray(eps_c), np.asarray(eps_f), rtol=1e-5, atol=1e-5)
    for k in maps_f:
        np.testing.assert_allclose(np.asarray(maps_c[k]), np.asarray(maps_f[k]), rtol=1e-5, atol=1e-6)
    assert float(l_f) > 0
    np.testing.assert_allclose(float(l_c), float(l_f), rtol=1e-4)
    g_f, g_c = np.asarray(g_f), np.asarray(g_c)
    assert np.abs(g_f).max() > 0
    np.testing.assert_allclose(g_c, g_f, rtol=1e-3, atol=1e-4 * np.abs(g_f).max())
    np.testing.assert_allclose(np.asarray(lc_c), np.asarray(lc_f), rtol=1e-4)


def test_mixed_precision_master_weights(sur, data, layers, full_probe):
    """``Surrogate.mixed_precision`` (bf16 compute, the GPU/TPU memory option): frozen VAE/text weights stored
    in bf16, UNet kept as float32 master; the modules really compute in bf16 (eps differs from float32 by
    bf16 rounding, not more); latents and losses come back float32 and within bf16 noise of float32's; a
    frozen bf16 UNet_s and its float32 master compute identically (L_att = 0 at delta = 0); an ADFT training
    step keeps UNet_d and AdamW's state float32. (Forward passes and one training step only: bf16 compiles
    slowly on CPU. The bf16 image gradient is checked by the CLI test in test_experiment_tdae.py.) The float32
    reference values are :func:`_dsur_probe`'s, at the same (z_t, t), images and keys."""
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

    eps32, _, _, _, z32, lc32 = full_probe
    eps16, z16, la, lc16 = probe(mp, frozen)
    assert all(a.dtype == jnp.float32 for a in (eps16, z16, la, lc16))
    z16 = np.asarray(z16)
    assert np.abs(z16 - z32).max() / np.abs(z32).max() < 0.1  # the bf16 VAE's latent: float32, near float32's
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


# ------------------------------------------------------------------------------------------- step directions
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
def test_step_raises_cond_and_flipped_step_lowers_it(sur, inner, kind):
    x, uid, emb0 = inner
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


def test_disdiff_step_raises_its_objective_and_flipped_step_lowers_it(sur, inner):
    """One DisDiff step against ASPL's kind of surrogate (trained UNet and text encoder), t drawn from a set the
    search could have kept: its size is ``step_size * w(t)`` (MSS) per image; L_cond + 0.1 L_CAE rises for every
    image on that draw and falls under the flipped step; with lambda = 1e3 the CAE term alone rises (the
    identifier's attention share is erased). The traced lambda: one compiled step for both."""
    x, uid, emb0 = inner
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


def test_antidiffusion_step_lowers_its_objective_and_flipped_step_raises_it(sur, inner):
    """One Anti-Diffusion step (the demo's 2e-3 on [-1,1] = 1e-3 here) against a fine-tuned UNet and a tuned
    embedding (stand-ins): +-step on (almost) every pixel; J = SDL - L_cond falls for every image on that draw,
    and rises under the flipped step; with lambda = 1e3 the SDL term alone falls (the clipped cross-attention maps
    are driven towards zero). The traced lambda: one compiled step for both."""
    x, uid, _ = inner
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


def test_antidiffusion_prompt_tuning_step_lowers_its_loss(sur, inner):
    """PTO (``tunning_prompts``): one AdamW step on the shared embedding E [1,T,D] (lr 1e-3, torch's defaults:
    the first step is ``-lr (g / (|g| + 1e-8) + wd E)``) lowers the batch-mean L_cond at the call's fixed latents and draw,
    and the opposite move raises it."""
    x, uid, _ = inner
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


@pytest.fixture(scope="module")
def pool(sur):
    images = np.random.default_rng(9).uniform(0, 1, (3, 32, 32, 3)).astype(np.float32)
    return adft.prior_pool(sur, images, baselines.CLASS_PROMPT)


def _expected(sur, x, uid, emb, pool, stream_key, step, text_encoder=None):
    """``(L_inst, L_prior)`` of training step ``step`` on ``x``, recomputed with :func:`_cond`: draw ``j = step*B + i``
    uses ``fold_in(fold_in(k, uid_i), j)`` and pool row ``j mod P`` with
    ``fold_in(fold_in(fold_in(k, 7), puid), j)``."""
    b = len(uid)
    draw = step * b + np.arange(b)
    rows = draw % len(pool["uid"])
    s = sur if text_encoder is None else sur.replace(params={**sur.params, "text_encoder": text_encoder})
    pemb = np.asarray(ft.embed_ids(s, pool["ids"][rows]))
    inst = _cond(s, s.params["unet"], jnp.asarray(x), jnp.asarray(emb), _keys(stream_key, uid, draw))[0]
    prior = _cond(s, s.params["unet"], jnp.asarray(pool["x0"][rows]), jnp.asarray(pemb),
                  _keys(jax.random.fold_in(stream_key, 7), pool["uid"][rows], draw))[0]
    return float(np.mean(inst)), float(np.mean(prior))


def test_adft_stage3_prior_term(sur, inner, layers, pool):
    """Eq. 9: stage 3's loss is L_cond + lambda L_prior, against both terms recomputed here (they differ, so a
    wrong lambda, a missing term or a swapped pair of draws shows). At lambda = 0 (the default) the term is not
    built at all (``adft.train_on``); lambda > 0 without a pool is refused (checked last)."""
    x, uid, emb = inner
    base_key = jax.random.key(3)
    k3 = adft.stream_key(base_key, adft.STREAMS[2])
    inst, prior = _expected(sur, x, uid, emb, pool, k3, 0)
    assert prior > 0 and abs(prior - inst) > 1e-3 * inst
    cfg = adft.ADFTConfig(layers=layers, epochs=1, iter1=0, iter2=0, iter3=1, lr=1e-3, prior_weight=0.5)
    _, hist = adft.protect(sur, sur.params["unet"], x, uid, emb, cfg, base_key, prior=pool)
    np.testing.assert_allclose(hist["adft/train"][0][0], inst + 0.5 * prior, rtol=1e-5)
    with pytest.raises(ValueError, match="prior"):
        adft.protect(sur, sur.params["unet"], x, uid, emb, dataclasses.replace(cfg, prior_weight=1.0), base_key)


def test_text_encoder_training_with_prior(sur, inner, pool):
    """ASPL's training (ADB ``train_one_epoch``: UNet + text encoder, prior 1.0): the loss of the first step is
    L_inst + L_prior through the text encoder's embeddings of the token ids, and both the UNet and the text
    encoder move; the UNet-only path is the plain ``train_step`` on the prompt embedding, bit for bit."""
    x, uid, emb = inner
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
    x, uid, emb = data  # the full [0,1] range: the [0,1] clip is exercised
    cfg = baselines.BaselineConfig(epochs=1, clean_steps=1, pgd_steps=2, adv_steps=1, lr=1e-3,
                                   train_text_encoder=True, prior_weight=1.0)
    ids = sur.tokenize([PROMPT])
    p, h = baselines.aspl(sur, x, uid, emb, x, uid, emb, cfg, jax.random.key(4), ids=ids, prior=pool)
    d = np.asarray(p.delta)
    assert 0 < np.abs(d).max() <= cfg.eps + 1e-6 and (x + d).min() >= 0 and (x + d).max() <= 1
    assert len(h["aspl/cond"][0]) == 2 and np.isfinite(h["aspl/train_adv"][0]).all()
    assert np.isfinite(h["aspl/train_clean"][0]).all()


def test_aspl_derives_prompt_ids_and_class_pool(sur, inner):
    """Without ``ids=`` / ``prior=``, ASPL tokenizes ``cfg.prompt`` and samples its class pool from theta_pre on the
    ``aspl/class`` stream at the instance size (ADB ``main``): the same run as with those passed explicitly."""
    x, uid, emb = inner
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
