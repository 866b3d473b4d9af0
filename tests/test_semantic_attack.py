"""The Semantic Attack host (Lo et al., CVPR 2024; tdae_jax/objectives/semantic_attention.py): target words map to
their token positions, the spatial mask counts only the selected attention queries (Eq. 4-5), the grid timesteps
are diffusers' DDIM grid, and the loss on the tiny InstructPix2Pix surrogate is finite with a nonzero gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax import configs, models, prng
from tdae_jax.objectives import common
from tdae_jax.objectives import semantic_attention as sa


@pytest.fixture(scope="module")
def sur():
    return models.tiny("ip2p")


def _text(tok, row, positions):
    return "".join(tok.convert_ids_to_tokens([int(row[p]) for p in positions])).replace("</w>", " ").strip()


def test_target_tokens_are_the_words_positions(sur):
    tok = sur.static.tokenizer
    ids = sur.tokenize(["make the circle red", "paint the bored cat red", "add snow"])
    content = sa.content_token_mask(ids, tok)
    mask, missing = sa.target_token_mask(ids, tok, ["circle", " red"])
    first = np.flatnonzero(mask[0])
    assert len(tok("circle", add_special_tokens=False).input_ids) > 1  # a multi-token word is covered whole
    assert _text(tok, ids[0], first) == "circle red" and np.all(content[0, first] == 1)
    # "red" inside "bored" (same BPE pieces "re d</w>") is not a word match; the final "red" is
    second = np.flatnonzero(mask[1])
    assert _text(tok, ids[1], second) == "red"
    np.testing.assert_array_equal(second, np.flatnonzero(content[1])[-len(second):])
    assert missing == [2]  # no target word: the row keeps every content token (the pipeline warns)
    np.testing.assert_array_equal(mask[2], content[2])
    phrase, missing = sa.target_token_mask(ids, tok, ["circle red"])  # a multi-word target
    np.testing.assert_array_equal(phrase[0], mask[0])
    assert missing == [1, 2]
    everything, missing = sa.target_token_mask(ids, tok, ())
    np.testing.assert_array_equal(everything, content)
    assert missing == []


def test_grid_timesteps_are_the_ddim_grid_and_deterministic(sur):
    torch_sched = pytest.importorskip("diffusers").DDIMScheduler
    ref = torch_sched.from_config(dict(sur.static.scheduler_config))
    ref.set_timesteps(10)  # siiyayu/SemanticAttack: scheduler.set_timesteps(num_diffusion_steps=10)
    grid = sa.grid_timesteps(sur, 10)
    np.testing.assert_array_equal(grid, ref.timesteps.numpy())
    uid = jnp.asarray(prng.uids(["a", "b", "c"]))
    k0, k1 = (prng.image_keys(prng.base_key(0), uid, step) for step in (0, 1))
    cfg = configs.Objective(name="sa", timesteps=10)
    t0, t1 = np.asarray(sa._timesteps(sur, cfg, k0)), np.asarray(sa._timesteps(sur, cfg, k1))
    np.testing.assert_array_equal(t0, t1)  # the same grid at every iteration
    np.testing.assert_array_equal(t0, np.repeat(grid[:, None], 3, axis=1))  # and for every image
    rnd = configs.Objective(name="sa", timesteps=10, sa_timesteps="random")
    assert not np.array_equal(sa._timesteps(sur, rnd, k0), sa._timesteps(sur, rnd, k1))


def _softmax_maps(rng, b, q, t):
    return jax.nn.softmax(jnp.asarray(rng.standard_normal((b, q, t)), jnp.float32), axis=-1)


def test_mask_counts_only_the_selected_queries():
    rng = np.random.default_rng(0)
    maps = {"fine/attn2": _softmax_maps(rng, 2, 64, 6), "coarse/attn2": _softmax_maps(rng, 2, 16, 6)}
    tok = jnp.asarray([[0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 0, 0]], jnp.float32)
    mask = jnp.zeros((2, 8, 8)).at[0, :, :4].set(1.0).at[1, :3, :].set(1.0)

    def loss(m):
        return sa.masked_l1(sa.aggregate(m, tok, (8, 8)), mask, len(m)).sum()

    g = jax.grad(loss)(maps)["fine/attn2"].reshape(2, 8, 8, 6)
    inside = np.asarray(mask, bool)[..., None] & (np.asarray(tok)[:, None, None, :] > 0)
    assert np.all(np.asarray(g)[~inside] == 0)  # masked-out queries and unselected tokens: no contribution
    assert np.all(np.asarray(g)[inside] != 0)
    # changing a masked-out query's attention leaves the loss exactly unchanged; a selected one changes it
    bumped = dict(maps, **{"fine/attn2": maps["fine/attn2"].at[0, 7, :].set(0.0).at[1, 63, :].set(0.0)})
    assert float(loss(bumped)) == float(loss(maps))
    assert float(loss(dict(maps, **{"fine/attn2": maps["fine/attn2"].at[0, 0, 1].add(0.5)}))) > float(loss(maps))
    # Eq. 4: the threshold is relative to each image's own maximum
    att = jnp.asarray(rng.uniform(0, 1, (2, 8, 8)), jnp.float32)
    m4 = sa.attention_mask(att, 0.5)
    np.testing.assert_array_equal(m4, np.asarray(att) > 0.5 * np.asarray(att).max(axis=(1, 2), keepdims=True))
    np.testing.assert_array_equal(sa.attention_mask(att * jnp.asarray([1.0, 10.0])[:, None, None], 0.5), m4)


def _batch(sur, words=("circle",)):
    rng = np.random.default_rng(1)
    x0 = jnp.asarray(rng.integers(0, 256, (2, 32, 32, 3)) / 255.0, jnp.float32)
    ids = sur.tokenize(["make the circle red", "a blue circle on snow"])
    tok, missing = sa.target_token_mask(ids, sur.static.tokenizer, words)
    assert missing == []
    return {"x0": x0, "uid": jnp.asarray(prng.uids(["a", "b"])), "emb": sur.embed_ids(ids),
            "uncond": sur.embed_ids(sur.tokenize(["", ""])), "token_mask": jnp.asarray(tok)}


def test_region_mask_loss_moves_only_through_the_region(sur):
    batch = _batch(sur)
    keys = prng.image_keys(prng.base_key(3), batch["uid"], 0)
    loss_fn = sa.make_sa(sur, configs.Objective(name="sa", timesteps=1, sa_mask="region"))
    value = jax.jit(lambda d, m: loss_fn(d, {**batch, "mask": m}, batch["emb"], keys))  # [B]
    delta = jnp.asarray(np.random.default_rng(2).uniform(-0.03, 0.03, batch["x0"].shape), jnp.float32)
    left = jnp.zeros((2, 32, 32, 1)).at[:, :, :16].set(1.0)
    v0, vl, vr, v1 = (np.asarray(value(delta, m)) for m in (0 * left, left, 1 - left, 1 + 0 * left))
    np.testing.assert_array_equal(v0, 0.0)  # no query selected: no loss (the mask has no gradient path either)
    np.testing.assert_allclose(v1, vl + vr, rtol=1e-5)  # Eq. 5 adds up over disjoint regions
    assert np.all(vl > 0) and np.all(vl < v1)


def test_default_loss_is_eq4_eq5_finite_with_a_gradient(sur):
    batch = _batch(sur)
    keys = prng.image_keys(prng.base_key(4), batch["uid"], 0)
    cfg = configs.Objective(name="sa", timesteps=1)  # defaults: clean-image attention mask, DDIM grid
    assert (cfg.sa_mask, cfg.sa_timesteps) == ("attention", "grid")
    loss_fn = sa.make_sa(sur, cfg)

    def by_hand(x0):  # at delta = 0: Att of the clean image, M = Eq. 4 of that same map, then Eq. 5
        z0 = common.encode_sample(sur, x0, keys)
        t = jnp.full((2,), int(sa.grid_timesteps(sur, 1)[0]))
        noise = common.draw_noise(keys, 1, z0.shape[1:])[0]
        _, maps = sur.unet_out(sur.add_noise(z0, noise, t), t, batch["emb"], attention=sa.is_cross_attention,
                               **common.conditioning(sur, x0, batch))
        att = sa.aggregate(maps, batch["token_mask"], z0.shape[-2:])
        return sa.masked_l1(att, sa.attention_mask(att, 0.5), len(maps))

    @jax.jit
    def run(d):
        value, grad = jax.value_and_grad(lambda dd: loss_fn(dd, batch, batch["emb"], keys).sum())(d)
        return value, grad, by_hand(batch["x0"])

    value, grad, hand = run(jnp.zeros_like(batch["x0"]))
    assert np.isfinite(float(value)) and float(value) > 0
    assert np.isfinite(np.asarray(grad)).all()
    assert np.all(np.abs(np.asarray(grad)).reshape(2, -1).max(axis=1) > 0)  # each image moves
    np.testing.assert_allclose(float(value), float(hand.sum()), rtol=1e-5)


def test_bad_sa_flags_are_usage_errors(tmp_path, capsys):
    from experiments import tdae as cli

    base = ["tdae", f"--images={tmp_path}", f"--workdir={tmp_path / 'w'}"]
    assert cli.run_cli(base + ["--objective=pge", "--sa_tokens=dog"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--sa_tokens" in err and "--objective=sa" in err
    assert cli.run_cli(base + ["--objective=sa", "--sa_mask_threshold=1.5"]) == 2
    assert "--sa_mask_threshold" in capsys.readouterr().err
    assert cli.run_cli(base + ["--objective=sa", "--sa_mask=everywhere"]) == 2
    assert not (tmp_path / "w").exists()


def test_sa_flags_reach_the_config():
    from experiments import common as ecommon
    from experiments import tdae as cli

    cli.FLAGS.unparse_flags()
    cli.FLAGS(["tdae", "--objective=sa", "--sa_tokens=red car,dog", "--sa_mask=none", "--sa_timesteps=random",
               "--sa_mask_threshold=0.3"])
    obj = ecommon.run_config_from_flags(cli.FLAGS).objective
    assert (obj.sa_tokens, obj.sa_mask, obj.sa_timesteps, obj.sa_mask_threshold) == (("red car", "dog"), "none",
                                                                                      "random", 0.3)
    sa.check_config(obj)


def test_text_entries_build_the_token_mask_where_the_family_has_token_ids(sur):
    """The protect batch's text side: ``emb`` / ``uncond`` from the surrogate, SA's mask of ``--sa_tokens`` (a
    prompt without the word keeps all its content tokens and is reported); a family without CLIP token ids (SD3)
    gets no mask."""
    texts = ["make the dog red", "add snow"]
    text, missing = sa.text_entries(sur, texts, ("dog",))
    assert set(text) == {"emb", "uncond", "token_mask"} and missing == [1]
    ids = sur.tokenize(texts)
    np.testing.assert_array_equal(text["emb"], np.asarray(sur.embed_ids(ids)))
    mask, _ = sa.target_token_mask(ids, sur.static.tokenizer, ("dog",))
    np.testing.assert_array_equal(text["token_mask"], mask)
    assert text["token_mask"][0].sum() == len(sa.word_positions(ids[0], sur.static.tokenizer, "dog")) >= 1

    class NoTokenIds:  # the SD3 adapter's contract: text entries, no token ids
        def text_batch(self, prompts, embed=None):
            return {"emb": np.zeros((len(prompts), 3, 4)), "pooled": np.zeros((len(prompts), 2))}

    text, missing = sa.text_entries(NoTokenIds(), texts, ("dog",))
    assert set(text) == {"emb", "pooled"} and missing == []
