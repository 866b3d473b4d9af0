"""tdae_jax.models.clip (torch-free CLIPModel loading, JAX preprocessing) and tdae_jax.metrics.clip_sim.

Parity: a tiny random PyTorch ``transformers.CLIPModel`` saved with ``save_pretrained(safe_serialization=True)``
(plus the tiny BPE tokenizer) is loaded into Flax; ``get_image_features`` / ``get_text_features`` agree to a
relative error <= 1e-4 in float32. The metrics are checked against numpy and for their symmetry properties.
"""
import json
import shutil

import numpy as np
import pytest
import safetensors.numpy

from tdae_jax.metrics import clip_sim
from tdae_jax.models import clip
from tdae_jax.models.weights import WeightsError

TEXTS = ["a photo of a red car", "a painting of the house in snow", "dog"]


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def torch_clip(tmp_path_factory):
    """(directory, torch CLIPModel, tokenizer): a tiny random CLIPModel and its tokenizer, saved."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPModel

    from tdae_jax.models.sd import tiny_tokenizer

    tok = tiny_tokenizer(max_length=16)
    torch.manual_seed(0)
    model = CLIPModel(clip.tiny_config(len(tok), 16, tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a wrong layout or name cannot go unnoticed
        for name, p in model.named_parameters():
            if name.endswith("bias") or "layer_norm" in name or "layrnorm" in name or "layernorm" in name:
                p.add_(0.1 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("clip") / "clip"
    model.save_pretrained(d, safe_serialization=True)
    tok.save_pretrained(d)
    return d, model, tok


def test_features_match_pytorch(torch_clip):
    import torch

    d, model, tok = torch_clip
    scorer = clip.load(d)
    assert scorer.image_size == 32 and scorer.static.tokenizer is not None and scorer.static.max_length == 16
    pix = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)  # NCHW, preprocessed
    with torch.no_grad():
        ref_img = model.get_image_features(pixel_values=torch.from_numpy(pix)).numpy()
    ours_img = np.asarray(scorer.image_features(pix.transpose(0, 2, 3, 1)))
    enc = tok(TEXTS, padding="max_length", truncation=True, max_length=16, return_tensors="np")
    with torch.no_grad():
        ref_txt = model.get_text_features(input_ids=torch.from_numpy(enc["input_ids"]),
                                          attention_mask=torch.from_numpy(enc["attention_mask"])).numpy()
    ours_txt = np.asarray(scorer.text_features(enc["input_ids"], enc["attention_mask"]))
    err_img, err_txt = _rel(ours_img, ref_img), _rel(ours_txt, ref_txt)
    print(f"parity: image features rel err {err_img:.2e}, text features rel err {err_txt:.2e}")
    assert ours_img.shape == (3, 16) and ours_txt.shape == (3, 16)
    assert err_img <= 1e-4 and err_txt <= 1e-4
    # text_embeds tokenizes the same way and normalizes
    unit = ref_txt / np.linalg.norm(ref_txt, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(scorer.text_embeds(TEXTS)), unit, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(scorer.text_embeds(TEXTS)), axis=-1), 1.0, atol=1e-6)


def test_preprocessing(torch_clip):
    """image_size 32 on a 32x32 input: normalization only; a larger, non-square input follows
    CLIPImageProcessor (shortest side -> 32 bicubic, centre crop) up to PIL's uint8 rounding."""
    import torch
    from transformers import CLIPImageProcessor

    d, model, _ = torch_clip
    scorer = clip.load(d)
    x = np.random.default_rng(1).random((2, 32, 32, 3)).astype(np.float32)
    norm = (x - np.float32(clip.OPENAI_CLIP_MEAN)) / np.float32(clip.OPENAI_CLIP_STD)
    np.testing.assert_allclose(np.asarray(scorer.pixel_values(x)), norm, atol=1e-6)
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=torch.from_numpy(norm.transpose(0, 3, 1, 2))).numpy()
    np.testing.assert_allclose(np.asarray(scorer.image_embeds(x)), ref / np.linalg.norm(ref, axis=-1, keepdims=True),
                               atol=1e-5)
    # smooth 40x56 image (resize to 32x44, crop columns 6..38) vs the PIL-based processor
    yy, xx = np.mgrid[0:40, 0:56] / 40.0
    img = np.stack([0.5 + 0.4 * np.sin(2 * yy + xx), 0.5 + 0.4 * np.cos(3 * xx), 0.3 + 0.5 * yy * xx / 1.4], -1)
    u8 = np.round(img * 255).astype(np.uint8)
    proc = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ref_pix = proc(images=[u8], return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    ours = np.asarray(scorer.pixel_values(u8[None].astype(np.float32) / 255.0))[0]
    assert clip.resize_shape(40, 56, 32) == (32, 44) and ours.shape == (32, 32, 3)
    diff = np.abs(ours - ref_pix) * np.float32(clip.OPENAI_CLIP_STD)  # back in [0, 1] pixel units
    print(f"preprocessing vs CLIPImageProcessor (PIL): max abs diff {diff.max() * 255:.2f}/255")
    assert diff.max() < 3 / 255, diff.max()


def _corrupt(src, dst, edit):
    shutil.copytree(src, dst)
    state = safetensors.numpy.load_file(str(dst / "model.safetensors"))
    edit(state)
    safetensors.numpy.save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_extra_tensors_name_the_file(torch_clip, tmp_path):
    d, _, _ = torch_clip
    for name in ("text_projection.weight", "vision_model.embeddings.class_embedding", "logit_scale"):
        bad = _corrupt(d, tmp_path / f"missing_{name}", lambda s, n=name: s.pop(n))
        with pytest.raises(WeightsError, match="missing") as e:
            clip.load(bad)
        assert str(bad / "model.safetensors") in str(e.value) and name in str(e.value)
    bad = _corrupt(d, tmp_path / "extra", lambda s: s.update(extra_head=np.zeros((2, 2), np.float32)))
    with pytest.raises(WeightsError, match="unexpected tensor 'extra_head'") as e:
        clip.load(bad)
    assert str(bad / "model.safetensors") in str(e.value)
    bad = _corrupt(d, tmp_path / "shape", lambda s: s.update(logit_scale=np.zeros((2,), np.float32)))
    with pytest.raises(WeightsError, match="logit_scale' has shape"):
        clip.load(bad)
    cfg = tmp_path / "textonly"
    shutil.copytree(d, cfg)
    (cfg / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()),
                                                 "model_type": "clip_text_model"}))
    with pytest.raises(WeightsError, match="config.json: model_type"):
        clip.load(cfg)
    with pytest.raises(WeightsError, match="not found"):
        clip.load(tmp_path / "nope")


def test_tiny_scorer():
    s = clip.tiny(0)
    x = np.random.default_rng(2).random((2, 40, 48, 3)).astype(np.float32)
    e = np.asarray(s.image_embeds(x))
    t = np.asarray(s.text_embeds(["a red car", "a blue car"]))
    assert e.shape == (2, 16) and t.shape == (2, 16)
    np.testing.assert_allclose(np.linalg.norm(e, axis=-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(clip.tiny(0).image_embeds(x)), e, atol=1e-6)  # seeded
    # per image: a batch of 2 gives what 2 batches of 1 give
    np.testing.assert_allclose(np.concatenate([np.asarray(s.image_embeds(x[i:i + 1])) for i in range(2)]), e,
                               atol=1e-5)


def test_metrics():
    rng = np.random.default_rng(3)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    i0, i1, t0, t1 = (unit(rng.standard_normal((4, 16))).astype(np.float32) for _ in range(4))
    np.testing.assert_allclose(np.asarray(clip_sim.clip_image_similarity(i0, i0)), 1.0, atol=1e-6)
    np.testing.assert_allclose(np.asarray(clip_sim.clip_image_similarity(i0, i1)), np.sum(i0 * i1, -1), atol=1e-6)
    ds = np.asarray(clip_sim.clip_direction_similarity(i0, i1, t0, t1))
    di, dt = i1 - i0, t1 - t0
    ref = np.sum(di * dt, -1) / (np.linalg.norm(di, axis=-1) * np.linalg.norm(dt, axis=-1))
    np.testing.assert_allclose(ds, ref, atol=1e-6)
    np.testing.assert_allclose(np.asarray(clip_sim.clip_direction_similarity(i1, i0, t0, t1)), -ds, atol=1e-6)
    np.testing.assert_allclose(np.asarray(clip_sim.clip_direction_similarity(i0, i1, t1, t0)), -ds, atol=1e-6)
    # a [D] text pair broadcasts; per-image values do not depend on the rest of the batch
    one = np.asarray(clip_sim.clip_direction_similarity(i0, i1, t0[0], t1[0]))
    single = np.asarray(clip_sim.clip_direction_similarity(i0[2:3], i1[2:3], t0[0], t1[0]))
    np.testing.assert_allclose(one[2], single[0], atol=1e-6)
    # moving exactly along the caption change: 1; identical images: 0, not NaN
    np.testing.assert_allclose(np.asarray(clip_sim.clip_direction_similarity(i0, i0 + 0.5 * (t1 - t0), t0, t1)), 1.0,
                               atol=1e-5)
    np.testing.assert_array_equal(np.asarray(clip_sim.clip_direction_similarity(i0, i0, t0, t1)), 0.0)
