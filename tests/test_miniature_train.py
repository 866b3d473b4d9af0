"""Trainers of the miniature models: a few steps of each on tiny configs, finite losses, a
checkpoint that round-trips (a resumed run continues from the saved state), the tokenizer, the sampler."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tdae_jax.miniature import recipes, sample, vocab
from tdae_jax.miniature import train as T

VAE = T.VAEConfig(block_out_channels=(8, 16), norm_num_groups=4, size=16)
OPT = T.Optim(steps=3, lr=1e-3, warmup=1)


@pytest.fixture(scope="module")
def tok():
    return T.world_tokenizer(24)


def _leaves_equal(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_world_tokenizer_one_token_per_word(tok):
    for w in vocab.words():
        assert len(tok.tokenize(w)) == 1, w
    ids = T.tokenize(tok, ["make the red circle blue"])
    assert ids.shape == (1, 24) and ids[0, 0] == tok.bos_token_id and ids[0, 6] == tok.eos_token_id


def test_vae_trainer_finite_and_resumes(tmp_path):
    vae = T.make_vae(VAE)
    images = T.to_unit(np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    batches = T.batch_sampler({"image": images}, 4, seed=0)
    step = T.make_step(T.vae_loss(vae, VAE), OPT)
    init = lambda: T.init_state(T.init_params(vae, 0), OPT)  # noqa: E731
    kw = dict(key=jax.random.key(0), workdir=tmp_path, ckpt_every=1, log_every=1, meta={"t": 1}, log=lambda s: None)
    state, hist = T.train_loop(step, init(), batches, steps=2, **kw)
    assert int(state["step"]) == 2 and all(np.isfinite(h["loss"]) for h in hist) and "vae/kl" in hist[0]
    saved = jax.device_get(state)
    # a fresh state with the same meta resumes at step 2 (nothing left to do): the saved state comes back
    lines = []
    resumed, hist2 = T.train_loop(step, init(), batches, steps=2, **{**kw, "log": lines.append})
    assert any(line.startswith("resumed from step 2") for line in lines)
    assert int(resumed["step"]) == 2 and _leaves_equal(resumed["ema"], saved["ema"])
    assert _leaves_equal(resumed["opt_state"], saved["opt_state"]) and len(hist2) == len(hist)
    # and one more step continues from there; the training time is summed over both runs
    more, hist3 = T.train_loop(step, resumed, batches, steps=3, **kw)
    assert int(more["step"]) == 3 and hist3[:2] == hist
    assert hist3[-1]["elapsed_s"] >= hist[-1]["elapsed_s"] > 0


@pytest.mark.parametrize("family", ["ip2p", "sd"])
def test_diffusion_trainer_finite(family, tok):
    cfg = T.DiffusionConfig(family=family, block_out_channels=(32,), attention_top=True, attention_heads=2,
                            text_hidden=32, text_layers=1, text_heads=2, max_length=24)
    unet, text = T.make_unet(cfg, 4, 4), T.make_text_encoder(cfg, tok)
    params = {"unet": T.init_params(unet, 0), "text_encoder": T.init_params(text, 1)}
    rng = np.random.default_rng(0)
    arrays = {"z0": rng.standard_normal((8, 4, 4, 4)).astype(np.float32),
              "ids": T.tokenize(tok, ["make the red circle blue"] * 8)}
    if family == "ip2p":
        arrays["image_latents"] = rng.standard_normal((8, 4, 4, 4)).astype(np.float32)
    from tdae_jax.models import sd

    loss = T.diffusion_loss(unet, text, cfg, sd.alphas_cumprod(T.SCHEDULER), T.tokenize(tok, [""])[0])
    step = T.make_step(loss, OPT)
    state, hist = T.train_loop(step, T.init_state(params, OPT), T.batch_sampler(arrays, 4, 0), steps=2,
                               key=jax.random.key(0), log_every=1, log=lambda s: None)
    assert int(state["step"]) == 2 and all(np.isfinite(h["loss"]) for h in hist)
    assert not _leaves_equal(state["params"]["text_encoder"], params["text_encoder"])  # trained end to end


def test_sampler_and_save_load_roundtrip(tmp_path, tok):
    from tdae_jax import models
    from tdae_jax.miniature import world

    cfg = T.DiffusionConfig(block_out_channels=(32,), attention_top=True, attention_heads=2, text_hidden=32,
                            text_layers=1, text_heads=2, max_length=24)
    vae = T.make_vae(VAE, 0.5)
    unet, text = T.make_unet(cfg, 4, 8), T.make_text_encoder(cfg, tok)
    params = {"unet": T.init_params(unet, 0), "text_encoder": T.init_params(text, 1)}
    sur = recipes.build_surrogate("ip2p", vae, T.init_params(vae, 0), 0.5, unet, text, tok, params)
    models.save(sur, tmp_path / "m", dtype=np.float16)
    loaded = models.load("ip2p", tmp_path / "m")
    assert loaded.static.prediction_type == "sample" and loaded.static.scaling_factor == 0.5
    pairs = world.make_pairs(0, 2, 16, kinds=("recolour",))
    out = sample.edit_pairs(loaded, pairs, num_steps=2, batch=2, text_scale=2.0, image_scale=1.5)  # 3-way CFG
    assert out.shape == (2, 16, 16, 3) and out.dtype == np.uint8
    assert sample.timesteps(10).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert jnp.asarray(sample.timesteps(10, strength=0.5)).tolist() == [401, 301, 201, 101, 1]


def test_edge_loss_sees_outlines_not_offsets():
    """The gradient-difference term is 0 for the image itself and for a constant offset of it, and positive
    for a blurred copy (a square decoded as a blob)."""
    x = np.zeros((1, 16, 16, 3), np.float32)
    x[:, 4:12, 4:12] = [0.9, 0.1, 0.1]  # a red square
    blur = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1) + np.roll(x, 1, 2) + np.roll(x, -1, 2)) / 5
    assert float(T.edge_l1(jnp.asarray(x), jnp.asarray(x))) == 0.0
    assert float(T.edge_l1(jnp.asarray(x + 0.05), jnp.asarray(x))) < 1e-7
    assert float(T.edge_l1(jnp.asarray(blur), jnp.asarray(x))) > 0.01
