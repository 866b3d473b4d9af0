"""Images per hour against device count (forced CPU devices), and the multi-process overhead.

    python benchmarks/scaling_bench.py --devices 1 2 4 8 --images 16 --steps 10
    python benchmarks/scaling_bench.py --processes 2 --images 16 --steps 10   # 2 processes x 4/2 devices

On a 2-core CPU host the forced devices share the same cores, so this measures the *overhead* of
sharding (and of the multi-process runtime), not a speedup; on a GPU/TPU host run it with real devices.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path, n: int, size: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"b{i:03d}.png")


def run(argv, env) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "experiments.tdae", *argv], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", type=int, nargs="*", default=[1, 2, 4, 8])
    ap.add_argument("--processes", type=int, default=0)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--objective", default="pge")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "in").mkdir()
        make_images(tmp / "in", a.images, a.size)
        common = [f"--images={tmp / 'in'}", f"--steps={a.steps}", f"--size={a.size}", f"--objective={a.objective}",
                  "--report=false", "--log_every=1000", "--weights_dir=tiny"]  # the built-in tiny surrogate
        print("| layout | batch | wall s | images/hour | (includes start-up and compilation) |")
        print("|---|---|---|---|---|")
        for d in a.devices:
            env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
            s = run(common + [f"--workdir={tmp / f'd{d}'}", f"--batch_size={d}"], env)
            print(f"| 1 process x {d} device(s) | {d} | {s:.1f} | {a.images / s * 3600:.0f} | |")
        if a.processes:
            p, total = a.processes, max(a.devices)
            per = max(total // p, 1)
            env = dict(os.environ, DEVICES_PER_PROCESS=str(per))
            t0 = time.perf_counter()
            r = subprocess.run(["bash", "launch/multiprocess_local.sh", str(p), *common,
                                f"--workdir={tmp / 'mp'}", f"--batch_size={per * p}"], cwd=ROOT, env=env,
                               capture_output=True, text=True)
            s = time.perf_counter() - t0
            if r.returncode != 0:
                raise SystemExit(r.stdout[-3000:])
            print(f"| {p} processes x {per} device(s) | {per * p} | {s:.1f} | {a.images / s * 3600:.0f} | |")


if __name__ == "__main__":
    main()
