"""python -m experiments.evaluate_customization on the built-in tiny SD model: the attacker's fine-tuning and
samples, the scores (FDR / ISM with dlib's own pipeline, BRISQUE), the outdir contract (files, rows, resume),
exit codes 0 / 1 / 2, and the three flagfiles.

The sets are copies of the shipped astronaut and cat (256 px): a folder of clean photos and a "protected" set
written as a workdir of experiments.dladiff (``protected/<id>.png`` + ``manifest.json``, the photos with +-7 grey
levels of noise). The ISM reference is the astronaut alone (the cat has no face for dlib). The attacker works at
32 px, the tiny model's native size, with the shapes of tests/test_finetune.py (2 images, batch 2): the
DreamBooth step (UNet only, no prior) is the one compiled there.
"""
import csv
import json
import math
import os
import shutil
import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import evaluate_customization as cli
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import MANIFEST_VERSION
from tdae_jax.evaluate import customization as cz
from tdae_jax.evaluate import customization_report as cz_report
from tdae_jax.evaluate import dlib_judge
from tdae_jax.metrics import brisque_iqa, dlib_face

FLAGS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "flags"
needs_dlib = pytest.mark.skipif(not dlib_face.available(), reason="dlib / face-recognition-models not installed "
                                "(the faces extra)")
HAS_BRISQUE = brisque_iqa.available()
SHORT = ["--weights_dir=tiny", "--resolution=32", "--attackers=dreambooth", "--attacker_seeds=0", "--db_steps=1",
         "--db_batch_size=2", "--db_train_text_encoder=false", "--db_prior_weight=0", "--samples_per_prompt=1",
         "--sample_steps=2", f"--brisque={str(HAS_BRISQUE).lower()}"]


def _photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(dio.sample_dir() / name).convert("RGB"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("identity")
    clean, ref, wd = root / "clean", root / "reference", root / "dladiff_run"
    for d in (clean, ref, wd / "protected"):
        d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ("astronaut.png", "chelsea.png"):
        shutil.copy(dio.sample_dir() / name, clean / name)
        noisy = np.clip(_photo(name).astype(np.int16) + rng.integers(-7, 8, (256, 256, 3)), 0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(wd / "protected" / name)
    shutil.copy(dio.sample_dir() / "astronaut.png", ref / "astronaut.png")
    (wd / "manifest.json").write_text(json.dumps({"version": MANIFEST_VERSION, "entries": {}}))
    return {"clean": clean, "ref": ref, "workdir": wd}


def run(data, out, *extra, sets=None):
    sets = sets or f"clean={data['clean']},dladiff={data['workdir']}"
    return cli.run_cli(["evaluate_customization", f"--sets={sets}", f"--clean={data['ref']}", f"--outdir={out}",
                        *SHORT, *extra])


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def stamps(out: Path) -> dict:
    return {p: p.stat().st_mtime_ns for d in ("units", "samples", "inputs") for p in (out / d).rglob("*")
            if p.is_file()}


@needs_dlib
def test_scores_on_a_real_face():
    """The clean astronaut against itself: dlib re-detects the face, ISM ~ 1, FDR 1 (FDFR 0), BRISQUE finite;
    the cat has no face (FDR 0, no ISM)."""
    astronaut, cat = _photo("astronaut.png"), _photo("chelsea.png")
    ref = dlib_judge.face(astronaut).descriptor
    s = cz.score_image(astronaut, ref, brisque=HAS_BRISQUE)
    assert s["face"] and s["ism"] > 0.999
    g = cz_report.group([{**s, "prompt_idx": 0}])
    assert (g["n_samples"], g["n_faces"], g["fdr"], g["fdfr"]) == (1, 1, 1.0, 0.0) and g["ism"] > 0.999
    c = cz.score_image(cat, ref, brisque=HAS_BRISQUE)
    assert not c["face"] and c["ism"] is None
    both = cz_report.group([s, c])
    assert (both["fdr"], both["fdfr"]) == (0.5, 0.5) and both["ism"] == s["ism"]  # ISM over the faces only
    if HAS_BRISQUE:
        assert math.isfinite(s["brisque"]) and math.isfinite(c["brisque"])


@pytest.mark.skipif(not HAS_BRISQUE, reason="the brisque package is not installed (the faces extra)")
def test_brisque_scores_quality():
    """BRISQUE from the brisque package's model: a natural photo scores low, the same photo with noise much
    higher (worse), a flat image has no score."""
    a = _photo("astronaut.png")
    clean = brisque_iqa.score(a)
    noisy = brisque_iqa.score(np.clip(a + np.random.default_rng(0).normal(0, 25, a.shape), 0, 255).astype(np.uint8))
    assert 0 < clean < 40 and noisy > clean + 20
    assert brisque_iqa.score(np.full((64, 64, 3), 128, np.uint8)) is None


@needs_dlib
def test_end_to_end_and_resume(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "attack"
    before = {p: p.read_bytes() for d in data.values() for p in Path(d).rglob("*") if p.is_file()}
    assert run(data, out) == 0
    assert "2 unit(s), 0 failed" in capsys.readouterr().out
    r = rows(out / "metrics.csv")  # one row per unit (set x attacker x seed) and prompt
    assert [(x["set"], x["attacker"], x["seed"], x["prompt_idx"]) for x in r] == [
        ("clean", "dreambooth", "0", "0"), ("clean", "dreambooth", "0", "1"),
        ("dladiff", "dreambooth", "0", "0"), ("dladiff", "dreambooth", "0", "1")]
    for x in r:
        assert x["status"] == "done" and x["n_samples"] == "1" and x["prompt"] in cz.EvalConfig.prompts
        assert float(x["fdr"]) + float(x["fdfr"]) == 1.0 and math.isfinite(float(x["final_loss"]))
        assert (x["brisque"] != "") == HAS_BRISQUE
    for s in ("clean", "dladiff"):
        for j in (0, 1):
            assert Image.open(out / "samples" / s / "dreambooth_seed0" / f"{j}_0.png").size == (32, 32)
    assert len(rows(out / "samples.csv")) == 4
    photos = {(x["set"], x["file"]): x for x in rows(out / "inputs.csv")}  # the sets' own photos, full size
    assert float(photos["clean", "astronaut.png"]["ism"]) > 0.999
    assert float(photos["dladiff", "astronaut.png"]["ism"]) > 0.9
    assert photos["clean", "chelsea.png"]["face"] == "False" and photos["clean", "chelsea.png"]["ism"] == ""
    html = (out / "report.html").read_text()
    assert "FDR [95% CI]" in html and "dreambooth" in html and "protected photos of the workdir" in html
    assert (out / "report_assets" / "dreambooth.1.dladiff.png").is_file()
    for f in ("summary.md", "metrics.jsonl", "settings.json", "flags.flags", "git_revision.txt"):
        assert (out / f).is_file(), f
    assert not (out / "run.lock").exists() and not (out / "class_images").exists()  # no prior: no class images
    assert {p: p.read_bytes() for d in data.values() for p in Path(d).rglob("*") if p.is_file()} == before
    # resume: every unit is done, so nothing is loaded, trained, sampled or scored again
    done = stamps(out)

    def boom(*a, **k):
        raise AssertionError("a finished evaluation computed something on resume")

    for name in ("load_model", "attack_unit", "score_inputs"):
        monkeypatch.setattr(cz, name, boom)
    assert run(data, out) == 0
    assert "2 skipped" in capsys.readouterr().out and stamps(out) == done
    assert rows(out / "metrics.csv") == r
    # the same outdir with the repeat command of its flags.flags: still nothing to do
    assert cli.run_cli(["evaluate_customization", f"--flagfile={out / 'flags.flags'}"]) == 0


@needs_dlib
def test_failed_unit_exit_1_others_continue(data, tmp_path, capsys, monkeypatch):
    """A unit whose fine-tuning fails is a failed record named on stderr (exit 1), the other units finish; it is
    retried only with --retry_failed."""
    out = tmp_path / "attack"
    real = cz._train

    def diverging(cfg, sur, s, *a, **k):
        if s.name == "dladiff":
            raise FloatingPointError("the fine-tuning loss became non-finite at step 1 (nan)")
        return real(cfg, sur, s, *a, **k)

    monkeypatch.setattr(cz, "_train", diverging)
    assert run(data, out) == 1
    err = capsys.readouterr().err
    assert "FAILED dladiff/dreambooth_seed0: FloatingPointError" in err and "clean/" not in err
    r = {x["set"]: x for x in rows(out / "metrics.csv")}
    assert r["clean"]["status"] == "done" and r["dladiff"]["status"] == "failed"
    assert "non-finite" in r["dladiff"]["error"]
    assert json.loads((out / "units" / "dladiff" / "dreambooth_seed0.json").read_text())["status"] == "failed"
    assert not (out / "samples" / "dladiff").exists()
    monkeypatch.setattr(cz, "_train", real)
    assert run(data, out) == 1  # not retried
    assert run(data, out, "--retry_failed") == 0
    assert {x["status"] for x in rows(out / "metrics.csv")} == {"done"}


@needs_dlib
def test_killed_run_continues(data, tmp_path, monkeypatch):
    """A run killed in its second unit keeps the first (its JSON is written once the unit is finished); the next
    run takes over the stale lock and computes the second unit only."""
    out = tmp_path / "attack"
    real, calls = cz.attack_unit, []

    def counting(cfg, sur, plan, s, *a, **k):
        calls.append(s.name)
        if s.name == "dladiff" and len(calls) == 2:
            raise KeyboardInterrupt  # the process dies inside the unit
        return real(cfg, sur, plan, s, *a, **k)

    monkeypatch.setattr(cz, "attack_unit", counting)
    with pytest.raises(KeyboardInterrupt):
        run(data, out)
    first = out / "units" / "clean" / "dreambooth_seed0.json"
    assert first.is_file() and not (out / "units" / "dladiff").exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (out / "run.lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))  # left by a kill
    stamp = first.stat().st_mtime_ns
    assert run(data, out) == 0
    assert calls == ["clean", "dladiff", "dladiff"] and first.stat().st_mtime_ns == stamp
    assert [x["status"] for x in rows(out / "metrics.csv")] == ["done"] * 4


def _one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_usage_errors_of_the_command_line(data, tmp_path, capsys, monkeypatch):
    """Exit 2 with one line, nothing written: flags, weights, and dlib missing (the faces extra named)."""
    out = tmp_path / "never"
    cases = [(["--sets="], "--sets is required"), (["--attackers=textual_inversion"], "--attackers: unknown"),
             (["--weights_dir="], "--weights_dir is required"), (["--attacker_seeds=a"], "--attacker_seeds"),
             (["--weights_dir=miniature:nope"], "no shipped miniature model"),
             (["--db_batch_size=0"], "--db_steps / --db_batch_size"), (["--sets=x"], "is not name=PATH"),
             (["--sets=_x=/tmp"], "set names must be unique")]
    for extra, words in cases:
        assert run(data, out, *extra) == 2, extra
        assert words in _one_error_line(capsys), extra
    monkeypatch.setattr(dlib_judge, "check_available",
                        lambda: (_ for _ in ()).throw(dlib_face.DlibUnavailable("dlib is not installed")))
    assert run(data, out) == 2
    assert 'pip install -e ".[faces]"' in _one_error_line(capsys)
    assert not out.exists()


@needs_dlib
def test_usage_errors_of_the_inputs(data, tmp_path, capsys, monkeypatch):
    """Exit 2 with one line before anything is written: a missing or empty set, an unloadable model, an outdir
    inside a set, a protection workdir still in use, BRISQUE missing, an outdir made with other settings."""
    out, empty, bad_weights = tmp_path / "never", tmp_path / "empty", tmp_path / "weights"
    empty.mkdir()
    bad_weights.mkdir()
    cases = [([f"--sets=a={tmp_path / 'nope'}"], "no such file or folder"), ([f"--sets=a={empty}"], "no images"),
             ([f"--weights_dir={bad_weights}"], "cannot load surrogate"),
             ([f"--clean={empty}"], "--clean"), ([f"--outdir={data['clean'] / 'attack'}"], "inside the input folder")]
    for extra, words in cases:
        assert run(data, out, *extra) == 2, extra  # a later --outdir overrides the first
        assert words in _one_error_line(capsys), extra
    lock = data["workdir"] / "run.lock"
    lock.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    try:
        assert run(data, out) == 2 and "is in use by" in _one_error_line(capsys)
    finally:
        lock.unlink()
    monkeypatch.setattr(brisque_iqa, "check_available",
                        lambda: (_ for _ in ()).throw(brisque_iqa.BrisqueUnavailable("no brisque")))
    assert run(data, out, "--brisque=true") == 2 and "--brisque=false" in _one_error_line(capsys)
    monkeypatch.undo()
    assert not out.exists() and not (data["clean"] / "attack").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "run.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert run(data, busy) == 2 and "is in use by" in _one_error_line(capsys)
    assert [p.name for p in busy.iterdir()] == ["run.lock"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "settings.json").write_text(json.dumps({"settings": {"resolution": 64}}))
    assert run(data, other) == 2 and "resolution: 64 -> 32" in _one_error_line(capsys)
    assert [p.name for p in other.iterdir()] == ["settings.json"]


def _config(flagfile: str, *extra):
    cli.FLAGS.unparse_flags()
    cli.FLAGS(["evaluate_customization", f"--flagfile={FLAGS_DIR / flagfile}", *extra])
    return cli.config_from_flags(cli.FLAGS)


def test_flagfiles(capsys):
    """The paper's attacker (DLADiff §5.1), Anti-DreamBooth's (attack_with_aspl.sh) and the tiny plumbing check;
    the paper flagfiles without weights are a usage error naming the flag."""
    need = ["--sets=a=/x", "--clean=/y", "--weights_dir=tiny"]
    d = _config("evaluate_customization_dladiff.flags", *need)
    assert (d.dreambooth.steps, d.dreambooth.batch_size, d.dreambooth.lr) == (400, 4, 5e-6)
    assert d.dreambooth.train_text_encoder and d.dreambooth.prior_weight == 1.0 and d.num_class_images == 200
    assert (d.lora.method, d.lora.lora_rank, d.lora.steps, d.lora.lr) == ("lora", 4, 1000, 1e-4)
    assert d.attackers == ("dreambooth", "lora") and d.prompts == ("a photo of sks person",
                                                                  "a dslr portrait of sks person")
    assert (d.samples_per_prompt, d.sample_steps, d.guidance, d.resolution) == (20, 100, 7.5, 512)
    a = _config("evaluate_customization_adb.flags", *need)
    assert (a.dreambooth.steps, a.dreambooth.batch_size, a.dreambooth.lr) == (1000, 2, 5e-7)
    assert a.dreambooth.train_text_encoder and a.dreambooth.prior_weight == 1.0 and a.num_class_images == 200
    assert a.attackers == ("dreambooth",) and (a.samples_per_prompt, a.sample_steps) == (16, 100)
    assert a.dtype == "bfloat16" and a.prompts == d.prompts
    t = _config("evaluate_customization_tiny.flags")
    assert t.weights_dir == "" and t.resolution == 32 and t.sets[0][0] == "samples" and Path(t.clean).is_dir()
    for name in ("evaluate_customization_dladiff.flags", "evaluate_customization_adb.flags"):
        assert cli.run_cli(["evaluate_customization", f"--flagfile={FLAGS_DIR / name}", "--sets=a=/x",
                            "--clean=/y"]) == 2
        assert "--weights_dir is required" in _one_error_line(capsys)


def test_help_lists_the_flags(capsys):
    """--help lists every flag the config builder reads (and the command's flags.flags saves them)."""
    import inspect
    import re

    assert cli.run_cli(["evaluate_customization", "--help"]) == 0
    listed = set(re.findall(r"^  --(\w+)=", capsys.readouterr().out, flags=re.M))
    read = set(re.findall(r"\bF\.(\w+)", inspect.getsource(cli.config_from_flags)))
    assert read and read <= listed and {"sets", "clean", "attackers", "attacker_seeds", "outdir"} <= listed
    assert read <= set(cli.NAMES)
