#!/usr/bin/env python
"""Where the time of one PhotoGuard encoder step goes, JAX (XLA:CPU) next to PyTorch eager (issue 2 item 8's
gap). Not a test. Same step and weights as ``step_bench.py encoder``:

    python benchmarks/xla_profile.py --size 256

JAX: one compiled step run under ``jax.profiler.trace``; the XLA:CPU thunks' durations (from
``jax.profiler.ProfileData``) summed by kind (``ynn_fusion`` = YNNPACK convolutions with their fused epilogues,
``transpose_copy_fusion`` = the flipped kernels of the backward-input convolutions, ``*_fusion`` = elementwise
and GroupNorm loops), next to the step's FLOPs from ``cost_analysis()``. PyTorch: one step under
``torch.profiler`` (self CPU time by aten op). Each framework is timed alone (``--iters`` steps, median), in
this one process, JAX first.
"""
from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_bench as sb  # noqa: E402


def jax_profile(size: int, iters: int, seed: int, vae_dir: Path, batch: int = 1):
    import jax

    from tdae_jax.models import sd

    vae, vae_params = sd.load_vae(vae_dir)
    params = {"vae": vae_params}
    init, step = sb.make_bench_step(sb.make_static("sd", vae, None, "sd15-vae-torch-init"), "pge", "host")
    batch = {k: v for k, v in sb.host_batch(size, seed, batch).items() if k in ("x0", "uid")}
    key, state = jax.random.key(seed), init(batch)
    compiled, _ = sb.compile_step(step, params, state, batch, key)
    cost = compiled.cost_analysis()
    flops = (cost[0] if isinstance(cost, list) else cost).get("flops", float("nan"))
    times = []
    for _ in range(1 + iters):
        t0 = time.perf_counter()
        state, _ = sb.block(compiled(params, state, batch, key))
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            state, _ = sb.block(compiled(params, state, batch, key))
        data = jax.profiler.ProfileData.from_file(str(next(Path(d).rglob("*.xplane.pb"))))
    kinds: dict = collections.defaultdict(lambda: [0.0, 0])
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "$", "SlinkyThreadPool", "end:", "Pjit", "Common",
                                       "ParseArguments")):
                    continue
                k = kinds[re.sub(r"\.\d+$", "", ev.name)]
                k[0] += ev.duration_ns / 1e9
                k[1] += 1
    return sb.med(times[1:]), flops, kinds


def torch_profile(size: int, iters: int, seed: int, tvae, batch: int = 1):
    import numpy as np
    import torch

    import _torch_ref

    ref = _torch_ref.EncoderPGD(tvae, np.asarray(sb.host_batch(size, seed, batch)["x0"]), 0.03, 0.005)
    times = []
    for _ in range(1 + iters):
        t0 = time.perf_counter()
        ref.step()
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ref.step()
    kinds = {e.key: [e.self_cpu_time_total / 1e6, e.count] for e in prof.key_averages()}
    return sb.med(times[1:]), kinds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="images per step")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = sb.add_jax_args(p).parse_args(argv)
    sb.setup_jax(args)
    import _torch_ref

    sb.machine_report(_torch_ref.info())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tvae = _torch_ref.build_vae(sb.SD15_VAE, args.seed, Path(d) / "vae")
        j_s, flops, j_kinds = jax_profile(args.size, args.iters, args.seed, Path(d) / "vae", args.batch)
    t_s, t_kinds = torch_profile(args.size, args.iters, args.seed, tvae, args.batch)
    print(f"# SD-1.5 VAE encoder PGE step, {args.size} px, batch {args.batch}: XLA cost_analysis {flops / 1e9:.1f} GFLOP")
    print(f"# jax {j_s:.3f} s/step ({flops / 1e9 / j_s:.0f} GFLOP/s); torch {t_s:.3f} s/step "
          f"({flops / 1e9 / t_s:.0f} GFLOP/s at the same FLOPs); torch/jax {t_s / j_s:.2f}")
    for name, kinds in (("jax (XLA:CPU thunks)", j_kinds), ("torch (self CPU time, all threads)", t_kinds)):
        total = sum(v[0] for v in kinds.values())
        rows = sorted(kinds.items(), key=lambda kv: -kv[1][0])[:args.top]
        print(f"# {name}: profiled ops total {total:.3f} s")
        sb.table(("op", "calls", "s", "share"), [(k[:48], v[1], f"{v[0]:.3f}", f"{v[0] / total:.1%}")
                                                 for k, v in rows])
    sb.end_report(t0)


if __name__ == "__main__":
    main()
