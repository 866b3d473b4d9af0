"""SIGKILL at random points, then the same command again: exactly the outputs of an uninterrupted run,
no image lost or duplicated, no partial file left."""
import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--surrogate=ip2p", "--objective=pge", "--steps=8", "--size=32", "--batch_size=1", "--num_devices=1",
        "--ckpt_every=2", "--eps=0.03137254901960784", "--step_size=0.004", "--report=false", "--log_every=1"]


def _cmd(images, work):
    return [sys.executable, "-m", "experiments.tdae", *ARGS, f"--images={images}", f"--workdir={work}"]


def _env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    return env


def _outputs(work):
    return {p.name: p.read_bytes() for p in sorted((work / "protected").iterdir())}


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    ref = tmp_path / "ref"
    r = subprocess.run(_cmd(d, ref), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    want = _outputs(ref)
    assert len(want) == 4

    rnd = random.Random(0)
    for trial in range(1):  # one trial of up to 3 kills: each restart is a new process (~20 s on 2 cores)
        work = tmp_path / f"killed{trial}"
        kills = 0
        for attempt in range(3):  # kill up to 3 times at random iterations, then let it finish
            p = subprocess.Popen(_cmd(d, work), cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
            target = rnd.randint(2, 20)  # progress lines ("iter k/8") to wait for before the kill
            seen = 0
            for line in p.stderr:
                if " iter " in line:
                    seen += 1
                    if seen >= target:
                        os.kill(p.pid, signal.SIGKILL)
                        kills += 1
                        break
            p.wait(timeout=900)
            if p.returncode == 0:
                break
        r = subprocess.run(_cmd(d, work), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        assert kills >= 1
        got = _outputs(work)
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == want[k], (trial, k)
        leftovers = [p for p in work.rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
        assert not leftovers, leftovers
        with open(work / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["id"] for r in rows) == [f"p{i}" for i in range(4)]  # none lost, none duplicated
        assert all(r["status"] == "done" for r in rows)
