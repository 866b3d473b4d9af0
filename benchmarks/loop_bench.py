#!/usr/bin/env python
"""XLA:CPU cost of a gradient inside ``lax.fori_loop`` vs the same gradients unrolled (not a test).

TPA (``defenses/tpa.py``) runs its 2N neighbour gradients in a ``lax.fori_loop`` to keep the memory of one
gradient; on CPU, XLA executes a loop body several times slower than the same ops in the entry computation.
This measures that factor on the PhotoGuard encoder host (``pge``) of the ``small`` VAE of step_bench.py.

    python benchmarks/loop_bench.py --size 128 --n 4
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="small")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--n", type=int, default=4, help="gradients per call")
    ap.add_argument("--iters", type=int, default=3)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import step_bench as sb

    from tdae_jax import configs, objectives
    from tdae_jax.defenses.fdm import value_and_grad
    from tdae_jax.models.surrogate import Surrogate

    sb.machine_report()
    static, params = sb.arch_surrogate(a.arch, 0)
    batch = sb.host_batch(a.size, 0)

    def make(mode):
        def f(params, delta, keys):
            loss = objectives.make_objective("pge", Surrogate(params=params, static=static),
                                             configs.Objective(name="pge"))
            vg = value_and_grad(loss, batch, batch["emb"], keys)
            if mode == "fori_loop":
                return jax.lax.fori_loop(0, a.n, lambda i, acc: acc + vg(delta + 1e-3 * i)[1], jnp.zeros_like(delta))
            acc = jnp.zeros_like(delta)
            for i in range(a.n):
                acc = acc + vg(delta + 1e-3 * i)[1]
            return acc
        return jax.jit(f)

    keys = jax.random.split(jax.random.key(0), 1)
    delta = jnp.zeros_like(batch["x0"])
    res = {}
    for mode in ("fori_loop", "unrolled"):
        c = make(mode).lower(params, delta, keys).compile()
        jax.block_until_ready(c(params, delta, keys))
        t0, p0 = time.perf_counter(), time.process_time()
        for _ in range(a.iters):
            jax.block_until_ready(c(params, delta, keys))
        res[mode] = ((time.perf_counter() - t0) / a.iters, (time.process_time() - p0) / a.iters)
        print(f"# {mode}: {res[mode][0]:.3f} s/call wall, {res[mode][1]:.3f} cpu-s/call ({a.n} gradients)", flush=True)
    print(f"| arch | size | n | fori_loop s | unrolled s | ratio |\n|---|---|---|---|---|---|\n| {a.arch} | {a.size} | "
          f"{a.n} | {res['fori_loop'][0]:.3f} | {res['unrolled'][0]:.3f} | "
          f"{res['fori_loop'][0] / res['unrolled'][0]:.2f} |")


if __name__ == "__main__":
    main()
