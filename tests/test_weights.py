"""Torch-free weight IO: tiny() -> save_diffusers -> create() round trip, and clear errors for broken dirs."""
import json
import shutil

import flax
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from tdae_jax import models
from tdae_jax.models import sd, weights
from tdae_jax.models.weights import WeightsError

UNET_FILE = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def tiny_sd():
    return models.tiny("sd", seed=0)


@pytest.fixture(scope="module")
def saved(tiny_sd, tmp_path_factory):
    return models.save(tiny_sd, tmp_path_factory.mktemp("tiny_sd"))


@pytest.fixture
def broken(saved, tmp_path):
    """A fresh copy of the saved directory to damage."""
    return shutil.copytree(saved, tmp_path / "copy")


def flat(params):
    return flax.traverse_util.flatten_dict(flax.core.unfreeze(params))


def edit_safetensors(path, fn):
    state = dict(weights.read_safetensors(path))
    fn(state)
    safetensors.numpy.save_file(state, str(path), metadata={"format": "pt"})


def test_roundtrip_identical(tiny_sd, saved):
    s2 = models.load("sd", saved)
    a, b = flat(tiny_sd.params), flat(s2.params)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg="/".join(k))
    for name in ("vae", "unet"):
        assert getattr(tiny_sd.static, name) == getattr(s2.static, name), name
    meta = ("architectures", "dtype", "torch_dtype")
    cfg1, cfg2 = (
        {k: v for k, v in m.static.text_encoder.config.to_dict().items() if k not in meta} for m in (tiny_sd, s2))
    assert cfg1 == cfg2
    np.testing.assert_array_equal(s2.static.alphas_cumprod, tiny_sd.static.alphas_cumprod)
    assert (s2.static.prediction_type, s2.static.scaling_factor) == ("epsilon", tiny_sd.static.scaling_factor)
    prompts = ["a photo of a dog", "add a hat"]
    np.testing.assert_array_equal(s2.tokenize(prompts), tiny_sd.tokenize(prompts))
    emb = tiny_sd.embed_text(prompts)
    np.testing.assert_array_equal(np.asarray(s2.embed_text(prompts)), np.asarray(emb))
    x = jax.random.uniform(jax.random.key(0), (2, 16, 8, 3))  # [2,4,8,4] latents: width == latent channels
    z = tiny_sd.encode(x)
    assert z.shape == (2, 4, 8, 4) and tiny_sd.decode(z).shape == x.shape
    np.testing.assert_array_equal(np.asarray(s2.encode(x)), np.asarray(z))
    np.testing.assert_array_equal(np.asarray(s2.decode(z)), np.asarray(tiny_sd.decode(z)))
    t = jnp.array([10, 900])
    np.testing.assert_array_equal(np.asarray(s2.eps(z, t, emb)), np.asarray(tiny_sd.eps(z, t, emb)))


def test_tokenizer_and_schedule(tiny_sd):
    ids = tiny_sd.tokenize(["a photo of a cat", ""])
    tok = tiny_sd.static.tokenizer
    assert ids.shape == (2, 77) and ids.dtype == np.int32
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[1, 1:] == tok.eos_token_id).all()
    from diffusers import FlaxDDPMScheduler

    for kind in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule=kind)
        ref = FlaxDDPMScheduler(**cfg).create_state().common.alphas_cumprod
        np.testing.assert_allclose(sd.alphas_cumprod(cfg), np.asarray(ref), rtol=2e-5, err_msg=kind)
    zsnr = sd.alphas_cumprod(dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                  rescale_betas_zero_snr=True))
    assert zsnr[-1] == pytest.approx(0.0, abs=1e-12) and np.all(np.diff(zsnr) < 0)


def test_missing_tensor(broken):
    edit_safetensors(broken / "unet" / UNET_FILE, lambda s: s.pop("conv_in.weight"))
    with pytest.raises(WeightsError, match=r"unet/diffusion_pytorch_model\.safetensors.*"
                                           r"missing tensor 'conv_in\.weight'.*\(32, 4, 3, 3\)"):
        models.load("sd", broken)


def test_wrong_shape(broken):
    name = "time_embedding.linear_1.weight"
    edit_safetensors(broken / "unet" / UNET_FILE, lambda s: s.__setitem__(name, np.ascontiguousarray(s[name].T)))
    with pytest.raises(WeightsError) as e:
        models.load("sd", broken)
    msg = str(e.value)
    assert f"unet/{UNET_FILE}: tensor '{name}' has shape (32, 128), expected (128, 32)" in msg, msg


def test_extra_tensor(broken):
    path = broken / "vae" / UNET_FILE
    edit_safetensors(path, lambda s: s.__setitem__("decoder.extra_block.weight", np.zeros((3, 3), np.float32)))
    with pytest.raises(WeightsError) as e:
        models.load("sd", broken)
    assert f"vae/{UNET_FILE}: unexpected tensor 'decoder.extra_block.weight' with shape (3, 3)" in str(e.value)
    # a known non-persistent buffer is tolerated
    edit_safetensors(path, lambda s: s.pop("decoder.extra_block.weight"))
    text = broken / "text_encoder" / "model.safetensors"
    edit_safetensors(text, lambda s: s.__setitem__("text_model.embeddings.position_ids", np.arange(77)[None]))
    models.load("sd", broken)


def test_pickle_refused(broken):
    (broken / "vae" / UNET_FILE).unlink()
    (broken / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04 never unpickled")
    with pytest.raises(WeightsError, match=r"vae/diffusion_pytorch_model\.bin: pickle checkpoint refused.*safetensors"):
        models.load("sd", broken)


def test_no_weights_and_family_mismatch(broken):
    with pytest.raises(WeightsError, match=r"unet/config\.json: in_channels=4, but family 'ip2p' needs 8"):
        models.load("ip2p", broken)
    (broken / "text_encoder" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"text_encoder: no weights found .*model\.safetensors"):
        models.load("sd", broken)


def test_unsupported_config(broken):
    cfg_path = broken / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "class_embed_type": "timestep", "_private_key": 1}))
    with pytest.raises(WeightsError, match=r"unet/config\.json: unsupported class_embed_type='timestep'"):
        models.load("sd", broken)


def test_bf16_sharded_and_msgpack(tiny_sd, broken):
    """Text encoder as a bf16 two-shard safetensors checkpoint, then as Flax msgpack."""
    d = broken / "text_encoder"
    state = weights.read_safetensors(d / "model.safetensors")
    (d / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in shards.items():
        safetensors.numpy.save_file({k: state[k].astype(ml_dtypes.bfloat16) for k in keys}, str(d / shard),
                                    metadata={"format": "pt"})
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {k: s for s, ks in shards.items() for k in ks}}))
    module, params = sd.load_text_encoder(d)
    ref = flat(tiny_sd.params["text_encoder"])
    for k, v in flat(params).items():
        assert v.dtype == jnp.float32
        np.testing.assert_array_equal(np.asarray(v), np.asarray(ref[k]).astype(ml_dtypes.bfloat16).astype(np.float32))
    for f in d.glob("model*"):
        f.unlink()
    (d / "flax_model.msgpack").write_bytes(flax.serialization.to_bytes(tiny_sd.params["text_encoder"]))
    _, params = sd.load_text_encoder(d, dtype=jnp.bfloat16)
    for k, v in flat(params).items():
        assert v.dtype == jnp.bfloat16 and v.shape == ref[k].shape
