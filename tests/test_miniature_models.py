"""The shipped miniature models (issue 4; docs/miniature.md): each loads with ``tdae_jax.models.load`` (the
autoencoders with ``sd.load_vae``), and the shipped InstructPix2Pix editors carry out held-out recolour edits,
scored by the oracle. Thresholds sit below the measured rates in docs/miniature.md (16 pairs: +-12 points)."""
import numpy as np
import pytest

from tdae_jax.miniature import oracle, sample, shipped
from tdae_jax.miniature import train as T

NAMES = shipped.names()
IP2P = [n for n in NAMES if n.startswith("ip2p_")]
# minimum success on 16 held-out recolour pairs (world seed 2000, 1-2 objects, 10 DDIM steps, no guidance)
MIN_SUCCESS = {"ip2p_a": 0.6}   # measured 0.81 (13/16); ip2p_b, ip2p_c measured 0.69 (11/16)
DEFAULT_MIN_SUCCESS = 0.5

pytestmark = pytest.mark.skipif(not NAMES, reason="no shipped miniature models")


def test_shipped_set_is_complete_and_small():
    assert {"vae_a", "vae_b"} <= set(NAMES) and len(IP2P) >= 3
    total = sum(f.stat().st_size for f in shipped.ROOT.rglob("*") if f.is_file())
    assert total < 30 * 2 ** 20


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("vae_")])
def test_vae_loads_and_reconstructs(name):
    from tdae_jax.miniature import world

    vae, params = shipped.load(name)
    images = world.make_scenes(2000, 4, shipped.info(name)["Data"]["size"])["image"]
    mean, _ = T.encode_dataset(vae, params, images, batch=4)
    import jax.numpy as jnp

    rec = np.clip(np.asarray(T.vae_decode(vae, params, jnp.transpose(jnp.asarray(mean), (0, 2, 3, 1)))), 0, 1)
    assert np.mean([oracle.psnr(r, x) for r, x in zip(rec, images)]) > 20.0


@pytest.mark.parametrize("name", IP2P)
def test_ip2p_editor_recolours_held_out_scenes(name):
    from tdae_jax import models

    sur = models.load("ip2p", shipped.path(name))
    assert sur.static.prediction_type == "sample" and sur.family == "ip2p"
    data = shipped.info(name)["Data"]
    pairs = T.pairs(2000, 16, data["size"], ("recolour",), max_objects=2)
    summary = oracle.evaluate(sample.edit_pairs(sur, pairs, num_steps=10, batch=16), pairs)
    assert summary["success"]["recolour"] >= MIN_SUCCESS.get(name, DEFAULT_MIN_SUCCESS), summary["success"]


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("sd_")])
def test_sd_loads_and_samples(name):
    import jax

    from tdae_jax import models

    sur = models.load("sd", shipped.path(name))
    ids = sur.tokenize(["a large red circle on a plain background"])
    out = sample.text_to_image(sur, ids, jax.random.key(0), num_steps=5, size=shipped.info(name)["Data"]["size"])
    assert out.shape[0] == 1 and np.isfinite(np.asarray(out)).all()
