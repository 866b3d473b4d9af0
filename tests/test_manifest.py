"""tdae_jax.data.manifest: unique ids, resumable status, prompts files."""
import json
import os

import pytest

from tdae_jax.data import io as dio
from tdae_jax.data.io import DataError
from tdae_jax.data.manifest import Manifest, find_prompt, load_prompts, unique_ids


def _files(root, names):
    out = []
    for n in names:
        p = root / n
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(n.encode())
        out.append(p)
    return out


def test_unique_ids_are_deterministic_and_case_insensitive(tmp_path):
    paths = _files(tmp_path, ["b/img.png", "a/img.jpg", "a/IMG.png", "c/img_2.png", "d/cat.png"])
    ids = unique_ids(paths)
    assert ids == unique_ids(list(reversed(paths)))  # order of the input list does not matter
    assert ids[tmp_path / "a/IMG.png"] == "IMG"  # sorted path order: a/IMG.png < a/img.jpg < b/img.png
    assert ids[tmp_path / "a/img.jpg"] == "img_2"
    assert ids[tmp_path / "b/img.png"] == "img_3"
    assert ids[tmp_path / "c/img_2.png"] == "img_2_2"
    assert ids[tmp_path / "d/cat.png"] == "cat"
    assert len({v.casefold() for v in ids.values()}) == len(paths)
    assert unique_ids([tmp_path / "d/cat.png"], taken=["CAT"])[tmp_path / "d/cat.png"] == "cat_2"


def test_manifest_resume(tmp_path):
    srcs = _files(tmp_path / "in", ["x/a.png", "y/a.png", "b.png", "c.png"])
    mpath = tmp_path / "run" / "manifest.json"
    mpath.parent.mkdir()
    m = Manifest(mpath, meta={"eps": 0.03, "resize": "center_crop"})
    ids = m.add(srcs)
    assert ids == ["a", "a_2", "b", "c"] and m.pending() == ids
    m.mark("a", "running")
    m.mark("a", "done", outputs={"protected": "protected/a.png"}, metrics={"budget/linf": 7})
    m.mark("b", "running")  # interrupted: never finished
    m.mark("c", "running")
    m.mark("c", "failed", error="ImageError: too small")
    assert sorted(os.listdir(mpath.parent)) == ["manifest.json"]  # atomic writes leave no temp files

    r = Manifest(mpath, meta={"eps": 0.03, "resize": "center_crop"})
    assert r.done() == ["a"] and r.failed() == ["c"]
    assert r.pending() == ["a_2", "b"] and r.pending(retry_failed=True) == ["a_2", "b", "c"]
    assert r.entry("a")["metrics"] == {"budget/linf": 7} and r.entry("a")["outputs"]["protected"] == "protected/a.png"
    assert r.entry("b")["attempts"] == 1 and r.entry("c")["error"] == "ImageError: too small"
    assert r.add(list(reversed(srcs))) == ["c", "b", "a_2", "a"]  # same ids, statuses kept
    assert r.done() == ["a"] and r.id_for(srcs[1]) == "a_2"
    new = _files(tmp_path / "in", ["z/a.PNG"])
    assert r.add(new) == ["a_3"]  # new files never take a recorded id

    srcs[0].write_bytes(b"edited")  # a changed source is redone
    r2 = Manifest(mpath)
    r2.add(srcs)
    e = r2.entry("a")
    assert e["status"] == "pending" and e["outputs"] == {} and "changed" in e["note"]
    assert r2.counts() == {"pending": 3, "running": 1, "done": 0, "failed": 1}  # a, a_2, a_3; b interrupted


def test_manifest_errors(tmp_path):
    src = _files(tmp_path, ["a.png"])
    m = Manifest(tmp_path / "m.json", meta={"eps": 0.03})
    m.add(src)
    with pytest.raises(ValueError, match="status must be one of"):
        m.mark("a", "finished")
    with pytest.raises(KeyError, match="no entry with id 'zz'"):
        m.mark("zz", "done")
    with pytest.raises(DataError, match=r"different settings \(eps: 0.03 -> 0.05\)"):
        Manifest(tmp_path / "m.json", meta={"eps": 0.05})
    m.add_failure("ghost", "prompts.csv:3: image 'ghost.png' not found", source=tmp_path / "ghost.png")
    assert Manifest(tmp_path / "m.json").entry("ghost")["status"] == "failed"
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(DataError, match="bad.json: not a readable manifest"):
        Manifest(tmp_path / "bad.json")
    assert json.loads((tmp_path / "m.json").read_text())["version"] == 1


def test_prompts_csv(tmp_path):
    _files(tmp_path / "imgs", ["cat.png", "dog.jpg", "owl.png"])
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text(
        "id,image,instruction,caption\n"
        "cat,imgs/cat.png,make it a tiger,a cat\n"
        ",imgs/dog.jpg,\"add a hat, red\",\n"
        "fox,imgs/fox.png,make it snow,a fox\n"
        "owl,imgs/owl.png,too,many,fields\n"
        "cat,imgs/cat.png,make it a lion,a cat\n"
        "bee,,paint it,a bee\n"
        "emu,,,an emu\n", encoding="utf-8")
    prompts, problems = load_prompts(csv_path)
    assert sorted(prompts) == ["bee", "dog.jpg"]
    assert prompts["dog.jpg"]["instruction"] == "add a hat, red" and prompts["dog.jpg"]["id"] is None
    assert prompts["dog.jpg"]["image"] == str(tmp_path / "imgs" / "dog.jpg") and prompts["bee"]["image"] is None
    by_line = {p.line: p for p in problems}
    assert set(by_line) == {4, 5, 6, 8}
    assert by_line[4].key == "fox" and "fox.png' not found" in str(by_line[4])
    assert str(by_line[5]).startswith(f"{csv_path}:5: expected 4 fields, got 5") and by_line[5].key is None
    assert by_line[6].key == "cat" and "duplicate" in by_line[6].message  # ambiguous: both cat rows dropped
    assert by_line[6].path == str((tmp_path / "imgs" / "cat.png").resolve()) and by_line[4].path is None
    assert by_line[8].key == "emu" and "empty instruction" in by_line[8].message
    assert find_prompt(prompts, "dog", tmp_path / "imgs" / "dog.jpg")["caption"] == ""
    assert find_prompt(prompts, "bee")["instruction"] == "paint it" and find_prompt(prompts, "yak") is None


def test_prompts_matched_to_listed_images(tmp_path):
    x, y, z = _files(tmp_path, ["x/a.png", "y/a.png", "z/owl.png"])
    csv_path = tmp_path / "p" / "prompts.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("id,image,instruction\n"
                        "a,../x/a.png,for x\n"   # relative to the prompts file
                        "a_2,../y/a.png,for y\n"
                        "owl,,for the owl\n"    # id only: the listed image with that stem
                        "b,b.png,for b\n", encoding="utf-8")
    prompts, problems = load_prompts(csv_path, image_paths=[x, y, z])
    assert prompts["owl"]["image"] == str(z.resolve())
    assert [p.key for p in problems] == ["b"]
    m = Manifest(tmp_path / "m.json")
    for e in m.sync([x, y, z]):
        got = find_prompt(prompts, e["id"], e["source"])
        assert got["instruction"] == {"a": "for x", "a_2": "for y", "owl": "for the owl"}[e["id"]]
    assert [e["id"] for e in m.entries()] == ["a", "a_2", "owl"]
    # A row naming x/a.png never matches y/a.png through the stem fallback.
    only_x = {"a": dict(prompts["a"])}
    assert find_prompt(only_x, "a_2", y) is None and find_prompt(only_x, "zzz", x)["instruction"] == "for x"


def test_prompts_jsonl_and_header_errors(tmp_path):
    _files(tmp_path, ["a.png"])
    j = tmp_path / "p.jsonl"
    j.write_text('{"image": "a.png", "edit_prompt": "turn it blue", "edited_prompt": "a blue a"}\n'
                 "\n"
                 '{"id": "b", "instruction": "x"\n'
                 '["not", "an", "object"]\n'
                 '{"id": "c", "instruction": "y", "seed": 3}\n', encoding="utf-8")
    prompts, problems = load_prompts(j)
    assert prompts["a.png"]["instruction"] == "turn it blue" and prompts["a.png"]["edited_prompt"] == "a blue a"
    assert prompts["c"]["seed"] == 3 and prompts["c"]["line"] == 5
    assert [(p.line, p.key) for p in problems] == [(3, None), (4, None)]
    assert dio.load_prompts(j)[0] == prompts  # the same function, reachable from io
    assert str(problems[0]).startswith(f"{j}:3: invalid JSON") and "expected a JSON object" in problems[1].message
    bad = tmp_path / "h.csv"
    bad.write_text("id,image,caption\na,a.png,x\n")
    with pytest.raises(DataError, match=r"h.csv:1: the header .* needs an 'instruction' column"):
        load_prompts(bad)
    with pytest.raises(DataError, match="prompts file not found"):
        load_prompts(tmp_path / "nope.csv")
    (tmp_path / "p.txt").write_text("x")
    with pytest.raises(DataError, match="unknown prompts format .txt"):
        load_prompts(tmp_path / "p.txt")


def test_each_family_edits_with_its_own_field_of_a_prompts_row():
    """InstructPix2Pix takes the instruction; img2img, inpainting and SD3 a description of the edited image; a
    missing or empty field falls through to the next, then to the run's default (one rule: the protector and the
    evaluation's victims read rows alike)."""
    from tdae_jax import models

    row = {"instruction": "make the car red", "caption": "a car", "edited_prompt": "a red car"}
    assert models.edit_text(row, "ip2p", "d") == "make the car red"
    for fam in ("sd", "inpaint", "sd3"):
        assert models.edit_text(row, fam, "d") == "a red car"
        assert models.edit_text({**row, "edited_prompt": ""}, fam, "d") == "a car"
    assert models.edit_text({"caption": "a car"}, "ip2p", "d") == "a car"
    assert models.edit_text({"edited_prompt": "a red car"}, "ip2p", "d") == "d"
    assert models.edit_text(None, "sd", "d") == "d"
    with pytest.raises(ValueError, match="unknown model family"):
        models.edit_text(row, "dalle", "d")
