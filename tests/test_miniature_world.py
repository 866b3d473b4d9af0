"""The miniature world (scenes, captions, edits, subjects) and its oracle. numpy only, fast."""
import dataclasses

import numpy as np
import pytest

from tdae_jax.miniature import oracle, vocab, world

SEED = 11


@pytest.fixture(scope="module")
def core_pairs():
    """50 pairs of each core kind (recolour, reshape, remove, add)."""
    return world.make_pairs(SEED, 200, 64, kinds=world.CORE_KINDS)


@pytest.fixture(scope="module")
def extra_pairs():
    """50 pairs of each extra kind (move, resize)."""
    return world.make_pairs(SEED, 100, 64, kinds=("move", "resize"))


def _noise_like(a, seed=0):
    return np.random.default_rng(seed).integers(0, 256, a.shape).astype(np.uint8)


# ------------------------------------------------------------------------------------------ determinism
def test_pairs_are_deterministic_and_item_i_is_independent_of_n():
    a, b = world.make_pairs(3, 6, 48), world.make_pairs(3, 6, 48)
    for key in ("source", "target", "mask"):
        assert a[key].tobytes() == b[key].tobytes()
    for key in ("instruction", "caption", "edited_caption", "kind"):
        assert a[key] == b[key]
    short, tail = world.make_pairs(3, 2, 48), world.make_pairs(3, 3, 48, start=3)
    assert short["source"].tobytes() == a["source"][:2].tobytes()
    assert tail["target"].tobytes() == a["target"][3:].tobytes()
    assert tail["instruction"] == a["instruction"][3:]
    assert world.make_pairs(4, 6, 48)["source"].tobytes() != a["source"].tobytes()


def test_kinds_cycle_and_every_kind_has_a_visible_change(core_pairs, extra_pairs):
    assert core_pairs["kind"][:4] == list(world.CORE_KINDS)
    for p in (core_pairs, extra_pairs):
        for k in range(len(p["kind"])):
            diff = (p["source"][k] != p["target"][k]).any(-1)
            assert diff.any(), p["instruction"][k]
            # The edit touches nothing outside the edited object's footprint (before and after).
            assert not (diff & ~p["mask"][k]).any(), p["instruction"][k]


def test_render_equals_naive_supersampling():
    """The fast renderer (background downsampled once, objects corrected in their boxes) is exact."""
    def naive(scene, size, ss):
        t = (np.arange(size * ss) + 0.5) / (size * ss)
        X, Y = np.meshgrid(t, t)
        bg = scene.background
        w = world._bg_weight(bg, X, Y)
        c1, c2 = np.asarray(bg.c1), np.asarray(bg.c2)
        img = np.broadcast_to(c1, X.shape + (3,)).copy() if w is None else c1 + (c2 - c1) * w[..., None]
        for o in scene.objects:
            cx, cy = o.center
            u, v = (X - cx) / o.half, (Y - cy) / o.half
            m = world.inside_shape(o.shape, u, v)
            img[m] = world._object_colour(o)(u, v, X - cx, Y - cy)[m]
        return np.clip(np.round(img.reshape(size, ss, size, ss, 3).mean((1, 3))), 0, 255).astype(np.uint8)

    for i in range(12):
        scene = world.sample_scene(world.item_rng(5, 9, i))
        for size, ss in ((32, 2), (64, 4)):
            fast = world.render(scene, size, ss).astype(int)
            assert np.abs(fast - naive(scene, size, ss)).max() <= 1


# ------------------------------------------------------------------------------------------ geometry
def test_objects_never_overlap_and_stay_off_the_borders(core_pairs, extra_pairs):
    scenes = [s for p in (core_pairs, extra_pairs) for e in p["edits"] for s in (e.source, e.target)]
    for scene in scenes:
        cov = world.render_masks(scene, 64) > 0
        assert cov.shape[0] == len(scene.objects) and all(c.any() for c in cov)
        grown = np.stack([oracle._dilate(c, 1) for c in cov] + [np.zeros((64, 64), bool)])
        assert (grown.sum(0) <= 1).all(), "objects closer than 1 px"
        assert not cov[:, :2].any() and not cov[:, -2:].any() and not cov[:, :, :2].any() and not cov[:, :, -2:].any()
        looks = [(o.colour, o.shape) for o in scene.objects]
        assert len(set(looks)) == len(looks)


# ------------------------------------------------------------------------------------------ text
def test_captions_mention_every_object(core_pairs):
    for e in core_pairs["edits"]:
        for scene, cap in ((e.source, e.caption), (e.target, e.edited_caption)):
            assert cap == world.caption(scene)
            for o in scene.objects:
                assert world.object_phrase(o) in cap
            assert cap.endswith(f"{scene.background.kind} background")
            assert cap.count(" and ") == max(len(scene.objects) - 1, 0)
    scene = core_pairs["edits"][0].source
    with_pos = world.caption(scene, positions=True)
    assert all(vocab.POSITIONS[o.cell] in with_pos for o in scene.objects)


def test_instructions_match_their_ground_truth(core_pairs, extra_pairs):
    for p in (core_pairs, extra_pairs):
        for e in p["edits"]:
            src, tgt, text = e.source.objects, e.target.objects, e.instruction
            if e.kind == "add":
                assert len(tgt) == len(src) + 1 and tgt[:-1] == src
                new = tgt[e.index]
                assert world.object_phrase(new) in text and vocab.POSITIONS[new.cell] in text
                continue
            old = src[e.index]
            assert old.shape in text
            if e.kind == "remove":
                assert tgt == src[:e.index] + src[e.index + 1:]
                continue
            new = tgt[e.index]
            assert len(tgt) == len(src) and all(a == b for k, (a, b) in enumerate(zip(src, tgt)) if k != e.index)
            changed = {f.name for f in dataclasses.fields(world.Obj) if getattr(old, f.name) != getattr(new, f.name)}
            if e.kind == "recolour":
                assert changed == {"colour"} and text.endswith(new.colour)
            elif e.kind == "reshape":
                assert changed == {"shape"} and text.endswith(new.shape)
            elif e.kind == "move":
                assert "cell" in changed <= {"cell", "dx", "dy"} and text.endswith(vocab.POSITIONS[new.cell])
            elif e.kind == "resize":
                assert "size" in changed <= {"size", "dx", "dy"}


def test_vocabulary_is_closed(core_pairs, extra_pairs):
    words = vocab.words()
    assert words == sorted(set(words)) and "sks" in words and "photo" in words
    texts = [t for p in (core_pairs, extra_pairs) for key in ("instruction", "caption", "edited_caption")
             for t in p[key]]
    subs = world.subjects(SEED, 4, 2)
    texts += subs["instance_prompts"] + subs["class_prompts"] + [t for row in subs["prompts"] for t in row]
    texts += [world.caption(e.source, positions=True) for e in core_pairs["edits"][:20]]
    texts += [world.caption(world.Scene(core_pairs["edits"][0].source.background, ()))]
    used = {w for t in texts for w in t.split()}
    assert used <= set(words), used - set(words)


# ------------------------------------------------------------------------------------------ oracle
def test_classifier_names_palette_shades_and_backgrounds():
    for k, name in enumerate(vocab.COLOURS):
        base = np.asarray(world.PALETTE[name], float)
        px = np.stack([base, world.SHADE * base, 0.5 * base + 0.5 * 140]) / 255.0
        assert (oracle.classify(px[None]) == k).all(), name
    greys = np.linspace(0, 1, 11)[:, None].repeat(3, 1)
    assert (oracle.classify(greys[None]) == oracle.NEUTRAL).all()
    for i in range(100):
        bg = world.sample_background(world.item_rng(0, 7, i))
        img = world.render(world.Scene(bg, ()), 32)
        assert (oracle.classify(img) == oracle.NEUTRAL).all(), bg


def _rates(outputs, pairs):
    return oracle.evaluate(outputs, pairs)["success"]


def test_oracle_calibration(core_pairs, extra_pairs):
    for p in (core_pairs, extra_pairs):
        kinds = sorted(set(p["kind"]))
        gt, ident, noise = _rates(p["target"], p), _rates(p["source"], p), _rates(_noise_like(p["target"]), p)
        for kind in kinds:
            assert gt[kind] == 1.0, (kind, gt)
            assert ident[kind] == 0.0, (kind, ident)
            assert noise[kind] <= 0.02, (kind, noise)
    p = {**core_pairs, "edits": core_pairs["edits"][:40], "index": core_pairs["index"][:40]}
    tgt = core_pairs["target"][:40]
    assert _rates(tgt.astype(np.float32) / 255.0, p)["all"] == 1.0
    noisy = np.clip(tgt.astype(int) + np.random.default_rng(1).integers(-12, 13, tgt.shape), 0, 255)
    assert _rates(noisy.astype(np.uint8), p)["all"] >= 0.95


def test_oracle_rejects_wrong_edits(core_pairs):
    """The right kind of change applied wrongly (other colour / other shape / other object) fails."""
    rng = np.random.default_rng(0)
    outs, keep = [], []
    for k, e in enumerate(core_pairs["edits"]):
        objs = list(e.target.objects)
        if e.kind == "recolour":
            bad = [c for c in vocab.COLOURS if c not in (e.after.colour, e.before.colour)]
            objs[e.index] = dataclasses.replace(e.after, colour=bad[rng.integers(len(bad))])
        elif e.kind in ("reshape", "add"):
            bad = [s for s in vocab.SHAPES if s != e.after.shape and (e.kind == "add" or s != e.before.shape)]
            objs[e.index] = dataclasses.replace(e.after, shape=bad[rng.integers(len(bad))])
        elif len(e.source.objects) > 1:      # remove: remove another object instead
            objs = [o for j, o in enumerate(e.source.objects) if j != (e.index + 1) % len(e.source.objects)]
        else:
            continue
        outs.append(world.render(world.Scene(e.target.background, tuple(objs)), 64))
        keep.append(k)
    sub = {**core_pairs, "edits": [core_pairs["edits"][k] for k in keep], "index": core_pairs["index"][keep]}
    rates = _rates(np.stack(outs), sub)
    assert rates["all"] == 0.0, rates


def test_ssim_and_psnr():
    rng = np.random.default_rng(0)
    a, b = rng.random((40, 48, 3)), rng.random((40, 48, 3))
    assert oracle.ssim(a, a) == pytest.approx(1.0) and oracle.psnr(a, a) == oracle.PSNR_CAP
    assert oracle.psnr(np.zeros((4, 4, 3)), np.full((4, 4, 3), 0.1)) == pytest.approx(20.0)
    skm = pytest.importorskip("skimage.metrics")
    ref = skm.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                    use_sample_covariance=False, data_range=1.0)
    assert oracle.ssim(a, b) == pytest.approx(ref, abs=1e-5)


# ------------------------------------------------------------------------------------------ subjects
def test_subjects_views_differ_but_share_the_look():
    s = world.subjects(SEED, 4, 4, 64)
    assert s["images"].shape == (4, 4, 64, 64, 3) and s["masks"].shape == (4, 4, 64, 64)
    assert len(set(s["tokens"])) == 4
    assert s["instance_prompts"][0] == f"a photo of {s['tokens'][0]} {s['class_words'][0]}"
    looks = [dataclasses.astuple(sub)[1:] for sub in s["subjects"]]
    assert all(sum(x != y for x, y in zip(a, b)) >= 3 for i, a in enumerate(looks) for b in looks[i + 1:])
    for i, sub in enumerate(s["subjects"]):
        for v in range(4):
            img, m = s["images"][i, v], s["masks"][i, v]
            labels = oracle.classify(img)[m]
            for colour in (sub.colour, sub.colour2):       # both colours of the look in every view
                assert (labels == vocab.COLOURS.index(colour)).mean() > 0.08, (sub, v, colour)
            assert (labels == oracle.NEUTRAL).any()         # the white marking
            for w in range(v):
                assert np.abs(img.astype(int) - s["images"][i, w]).mean() > 5   # views differ
    again = world.subjects(SEED, 2, 4, 64)                  # subject i does not depend on how many are drawn
    assert again["images"].tobytes() == s["images"][:2].tobytes() and again["subjects"] == s["subjects"][:2]


def test_make_scenes_matches_pair_sources():
    sc, p = world.make_scenes(SEED, 3, 32), world.make_pairs(SEED, 3, 32)
    assert sc["image"].tobytes() == p["source"].tobytes() and sc["caption"] == p["caption"]


def test_scene_scores_calibration():
    """Text-to-image / img2img oracle: a scene's own render scores 1.0 on both; colourful noise, a blank grey
    image and another scene's render score (almost) 0 — so a model's success cannot come from chance."""
    sc = world.make_scenes(1000, 64, 32)
    imgs, scenes = sc["image"], sc["scenes"]
    assert oracle.scene_scores(imgs, scenes, 32)["success"] == 1.0
    same = oracle.scene_scores(imgs, scenes, 32, sources=imgs)
    assert same["success"] == 1.0 and same["psnr"] == oracle.PSNR_CAP
    noise = np.random.default_rng(0).integers(0, 256, imgs.shape, dtype=np.uint8)
    other = imgs[np.roll(np.arange(len(imgs)), 1)]
    for wrong in (noise, np.full_like(imgs, 128), other):
        assert oracle.scene_scores(wrong, scenes, 32)["success"] <= 0.05
        assert oracle.scene_scores(wrong, scenes, 32, sources=imgs)["success"] <= 0.05
    with pytest.raises(ValueError, match="outputs for"):
        oracle.scene_scores(imgs[:3], scenes, 32)
