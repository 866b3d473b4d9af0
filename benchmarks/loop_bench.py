#!/usr/bin/env python
"""XLA:CPU cost of a gradient inside ``lax.fori_loop`` vs the same gradients unrolled (not a test).

TPA (``defenses/tpa.py``) runs its 2N neighbour gradients in a ``lax.fori_loop`` to keep the memory of one
gradient; on CPU, XLA executes a loop body several times slower than the same ops in the entry computation.
This measures that factor on the PhotoGuard encoder host (``pge``) of the ``small`` VAE of step_bench.py.

    python benchmarks/loop_bench.py --size 128 --n 4

``--k-mean K`` measures instead the diffusion hosts' mean over K timesteps (``objectives.diffusion._mean_over_k``,
one rematerialized ``lax.scan``) against the same scan fully unrolled and against the earlier form that peeled
the first term out of the scan: compile time, XLA temp memory and s/call of one value-and-gradient, interleaved.

    python benchmarks/loop_bench.py --size 128 --k-mean 4 --host advdm --iters 5
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
    ap.add_argument("--k-mean", type=int, default=0, help="compare forms of the K-timestep mean instead")
    ap.add_argument("--host", default="advdm", help="diffusion host for --k-mean")
    a = ap.parse_args()
    if a.k_mean:
        return k_mean(a)
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


def k_mean(a):
    """The library's scan over K vs ``unroll=True`` vs the peeled first term, same weights, same loss."""
    import statistics

    import jax
    import jax.numpy as jnp
    import step_bench as sb

    from tdae_jax import configs, objectives
    from tdae_jax.defenses.fdm import value_and_grad
    from tdae_jax.models.surrogate import Surrogate
    from tdae_jax.objectives import diffusion

    def scan(unroll=False, peel=False):
        def mean(fn, ts, noises, remat):
            body = jax.checkpoint(fn) if remat else fn
            if peel:
                init, xs = body(ts[0], noises[0]), (ts[1:], noises[1:])
            else:
                init, xs = jax.tree.map(jnp.zeros_like, jax.eval_shape(body, ts[0], noises[0])), (ts, noises)
            acc, _ = jax.lax.scan(lambda c, tn: (c + body(*tn), None), init, xs, unroll=unroll)
            return acc / ts.shape[0]
        return mean

    sb.machine_report()
    static, params = sb.arch_surrogate(a.arch, 0)
    batch = sb.host_batch(a.size, 0)
    keys = jax.random.split(jax.random.key(0), 1)
    delta = jnp.zeros_like(batch["x0"])
    library = diffusion._mean_over_k
    forms = {"scan (library)": library, "scan unroll=True": scan(unroll=True), "peeled first term": scan(peel=True)}
    compiled, losses = {}, {}
    try:
        for name, impl in forms.items():
            diffusion._mean_over_k = impl  # looked up when the objective is traced

            def f(params, delta, keys):
                cfg = configs.Objective(name=a.host, timesteps=a.k_mean)
                loss = objectives.make_objective(a.host, Surrogate(params=params, static=static), cfg)
                return value_and_grad(loss, batch, batch["emb"], keys)(delta)
            t0 = time.perf_counter()
            c = jax.jit(f).lower(params, delta, keys).compile()
            losses[name] = float(jax.block_until_ready(c(params, delta, keys))[0].sum())
            compiled[name] = (c, time.perf_counter() - t0, c.memory_analysis().temp_size_in_bytes / 2**20)
    finally:
        diffusion._mean_over_k = library
    times = {n: [] for n in compiled}
    for _ in range(a.iters):
        for n, (c, _, _) in compiled.items():
            t0 = time.perf_counter()
            jax.block_until_ready(c(params, delta, keys))
            times[n].append(time.perf_counter() - t0)
    print(f"# {a.host}, K={a.k_mean}, {a.arch} {a.size}px, batch 1, remat; compile includes the first call")
    print("| form | compile+first s | temp MiB | s/call (median) | loss |\n|---|---|---|---|---|")
    for n, (_, ct, mib) in compiled.items():
        print(f"| {n} | {ct:.1f} | {mib:.0f} | {statistics.median(times[n]):.3f} | {losses[n]:.6f} |")


if __name__ == "__main__":
    main()
