"""The run engine (tdae_jax/runs/) as a hostile user meets it, through ``python -m experiments.tdae`` in-process.

* One run per workdir: a live lock is exit 2 naming its holder; a stale one (a dead pid of this host) is taken over.
* The manifest records the settings: the same workdir with another ``--eps`` is exit 2 naming the difference, before
  anything is written; ``--overwrite`` starts it afresh; the same settings resume.
* A non-finite loss (guidance 1e38 through PhotoGuard's unrolled sampler) is a failed row naming the file, with no
  PNG written (the check comes before the write), and the other inputs are done.
* A full disk while writing a PNG stops the run with one line and exit 1; the manifest stays consistent (no image
  marked done without its file) and the same command resumes once space is back.
"""
import hashlib
import json
import os
import socket

import numpy as np
import pytest
from PIL import Image

from experiments import tdae as cli
from tdae_jax.data import io as dio

FAST = ["--weights_dir=tiny", "--surrogate=ip2p", "--objective=pge", "--steps=2", "--size=32", "--eps=0.0314",
        "--step_size=0.01", "--batch_size=1", "--report=false", "--prompts="]


def run(argv):
    return cli.run_cli(["tdae"] + FAST + argv)


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{name}.png")
    return d


def _write_lock(work, pid, host):
    work.mkdir(parents=True, exist_ok=True)
    (work / "run.lock").write_text(json.dumps({"pid": pid, "host": host, "started": "earlier", "argv": []}))


def test_live_lock_is_refused_naming_its_holder(images, tmp_path, capsys):
    work = tmp_path / "w"
    _write_lock(work, os.getpid(), socket.gethostname())  # a live process of this host holds it
    assert run([f"--images={images}", f"--workdir={work}"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"pid {os.getpid()}" in line and "in use" in line
    assert sorted(p.name for p in work.iterdir()) == ["run.lock"]  # nothing else was written


def test_stale_lock_is_taken_over(images, tmp_path):
    work = tmp_path / "w"
    dead = 2 ** 22 + 12345  # above the default pid_max of small machines: no such process
    _write_lock(work, dead, socket.gethostname())
    assert run([f"--images={images}", f"--workdir={work}"]) == 0
    assert not (work / "run.lock").exists() and len(list((work / "protected").glob("*.png"))) == 2


def test_changed_settings_are_refused_then_overwrite_starts_afresh(images, tmp_path, capsys):
    work = tmp_path / "w"
    assert run([f"--images={images}", f"--workdir={work}"]) == 0
    before = _digest(work / "protected")
    manifest = (work / "manifest.json").read_bytes()
    capsys.readouterr()
    assert run([f"--images={images}", f"--workdir={work}", "--eps=0.0627"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "other settings" in line and "budget.eps" in line and "--overwrite" in line
    assert _digest(work / "protected") == before and (work / "manifest.json").read_bytes() == manifest
    assert run([f"--images={images}", f"--workdir={work}"]) == 0  # same settings: resumes (nothing to do)
    assert _digest(work / "protected") == before
    assert run([f"--images={images}", f"--workdir={work}", "--eps=0.0627", "--overwrite"]) == 0
    # the workdir now records the new settings (2 steps of 0.01 stay inside both budgets: same pixels)
    assert json.loads((work / "manifest.json").read_text())["meta"]["budget"]["eps"] == pytest.approx(0.0627)
    assert set(_digest(work / "protected")) == set(before)
    out = np.asarray(Image.open(work / "protected" / "a.png"), np.int16)
    orig = np.asarray(Image.open(images / "a.png"), np.int16)
    assert np.abs(out - orig).max() <= dio.budget_steps(0.0627)


def test_non_finite_loss_is_a_failed_row_without_png(images, tmp_path, capsys):
    work = tmp_path / "w"
    before = _digest(images)
    code = run([f"--images={images}", f"--workdir={work}", "--objective=pgd", "--guidance_scale=1e38",
                "--denoise_steps=1", "--pgd_grad_reps=1", "--steps=1"])
    assert code == 1
    rows = {r["id"]: r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())}
    assert {r["status"] for r in rows.values()} == {"failed"}
    assert all("non-finite" in r["error"] and r["source"] in r["error"] for r in rows.values())
    assert not list((work / "protected").glob("*.png"))  # the loss check comes before any PNG
    assert _digest(images) == before


def test_disk_full_stops_with_one_line_and_resumes(images, tmp_path, capsys, monkeypatch):
    work = tmp_path / "w"
    real = dio.save_image_atomic
    calls = []

    def full_after_first(path, *a, **k):
        calls.append(path)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(path, *a, **k)

    monkeypatch.setattr(dio, "save_image_atomic", full_after_first)
    assert run([f"--images={images}", f"--workdir={work}"]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "No space left on device" in line and "ENOSPC" in line and "re-run" in line
    manifest = json.loads((work / "manifest.json").read_text())
    done = {i for i, e in manifest["entries"].items() if e["status"] == "done"}
    assert done == {p.stem for p in (work / "protected").glob("*.png")} and len(done) == 1
    assert not list(work.rglob("*.tmp*")) and not (work / "run.lock").exists()
    monkeypatch.setattr(dio, "save_image_atomic", real)  # space is back: the same command finishes the rest
    assert run([f"--images={images}", f"--workdir={work}"]) == 0
    assert len(list((work / "protected").glob("*.png"))) == 2
