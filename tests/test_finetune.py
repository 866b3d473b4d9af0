"""editors.finetune: DreamBooth / LoRA train steps on the tiny SD surrogate, LoRA purity, DDIM sampling.

The tiny surrogate is ``pipeline._tiny("sd")`` (one cached object) and the batch is 2 images of 32 px on a
2-device mesh, the shapes the DLADiff tests use too, so the compiled train step is shared across files.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from tdae_jax.editors import finetune as ft
from tdae_jax.pipeline import _tiny

PROMPT = "a photo of sks person"


@pytest.fixture(scope="module")
def sur():
    return _tiny("sd")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(0, 1, (2, 32, 32, 3)).astype(np.float32)


def _snapshot(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), tree)


def test_dreambooth_loss_decreases(sur, images):
    base = _snapshot(sur.params["unet"])
    cfg = ft.FinetuneConfig(steps=5, batch_size=2, lr=2e-3, weight_decay=0.0)
    r = ft.finetune(sur, images, PROMPT, cfg, jax.random.key(0))
    loss = r.history["loss"]
    assert len(loss) == 5 and all(np.isfinite(loss))
    assert loss[-1] < loss[0]
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, np.asarray(b)), base, r.surrogate.params["unet"])
    assert any(jax.tree.leaves(changed))
    same = jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), base, sur.params["unet"])
    assert all(jax.tree.leaves(same)), "the input surrogate must not be modified (state copies the UNet)"
    assert int(r.state.step) == 5


def test_lora_leaves_base_untouched_and_learns(sur, images):
    base = _snapshot(sur.params)
    cfg = ft.FinetuneConfig(method="lora", steps=4, batch_size=2, lr=5e-2, weight_decay=0.0)
    r = ft.finetune(sur, images, PROMPT, cfg, jax.random.key(1))
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, np.asarray(b)), base, sur.params)))
    lora = r.state.trainable["lora"]
    names = sorted(lora)
    assert names and all(n.rsplit("/", 1)[-1] in ft.LORA_TARGETS for n in names)
    assert any(float(jnp.abs(v["b"]).max()) > 0 for v in lora.values()), "B must have been trained"
    assert r.history["loss"][-1] < r.history["loss"][0]
    # only the LoRA'd kernels differ in the merged surrogate, by exactly (alpha/r) A@B
    before = flatten_dict(base["unet"])
    after = flatten_dict(jax.device_get(r.surrogate.params["unet"]))
    scale = cfg.lora_alpha / cfg.lora_rank
    for path, w in after.items():
        name = "/".join(path[:-1])
        if path[-1] == "kernel" and name in lora:
            want = before[path] + scale * np.asarray(lora[name]["a"] @ lora[name]["b"])
            np.testing.assert_allclose(w, want, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(w, before[path])


def test_lora_zero_delta_is_identity(sur):
    cfg = ft.FinetuneConfig(method="lora")
    lora = ft.init_lora(sur.params["unet"], cfg, jax.random.key(0))
    merged = ft.apply_lora(sur.params["unet"], lora, 1.0)
    assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                                            merged, sur.params["unet"])))
    assert len(lora) == len(ft.lora_paths(sur.params["unet"])) > 0


def test_draw_indices_are_seeded_epochs():
    a, da = ft.draw_indices(3, 2, 5, 0)
    b, db = ft.draw_indices(3, 2, 5, 0)
    assert np.array_equal(a, b) and np.array_equal(da, db) and list(da) == [10, 11]
    seen = np.concatenate([ft.draw_indices(3, 3, s, 0)[0] for s in range(2)])
    assert sorted(seen[:3]) == [0, 1, 2] and sorted(seen[3:]) == [0, 1, 2]  # each epoch is a permutation


def test_sample_ddim(sur):
    x = ft.sample(sur, PROMPT, 2, jax.random.key(3), steps=2, batch_size=2)
    assert x.shape == (2, 32, 32, 3) and np.isfinite(x).all()
    assert x.min() >= 0 and x.max() <= 1
    assert not np.allclose(x[0], x[1])  # per-image noise
    y = ft.sample(sur, PROMPT, 2, jax.random.key(3), steps=2, batch_size=2)
    np.testing.assert_array_equal(x, y)


def test_config_validation():
    with pytest.raises(ValueError):
        ft.FinetuneConfig(method="textual_inversion")
    with pytest.raises(ValueError):
        ft.FinetuneConfig(method="lora", lora_rank=0)
    with pytest.raises(ValueError, match="prior"):
        ft.finetune(_tiny("sd"), np.zeros((1, 32, 32, 3), np.float32), PROMPT,
                    ft.FinetuneConfig(steps=1, batch_size=1, prior_weight=1.0), jax.random.key(0))
