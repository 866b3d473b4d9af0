#!/usr/bin/env python
"""The SD-1.5 VAE encoder's kernels one at a time, forward + input gradient (not a test).

Where ``step_bench.py encoder`` times the whole PhotoGuard step, this times its two kernel families alone at the
256 px encoder's shapes: the 3x3 stride-1 convolutions (``lax.conv_general_dilated``, NHWC/HWIO as Flax runs
them) and GroupNorm(32) + SiLU (``flax.linen.GroupNorm`` as diffusers' Flax VAE runs it; ``fastnorm``: the
library's ``tdae_jax.models.fastnorm.group_norm`` that the surrogates run instead), each with its
input gradient only (an attack's weights are frozen), plus the same ops in PyTorch eager. ``weighted`` sums
each shape's median times the number of such layers in the encoder, i.e. that kernel family's share of one
step. Apart from ``fastnorm`` it imports neither tdae_jax nor diffusers, so it also runs in a bare virtual
environment with another jaxlib (how docs/benchmarks.md compares jaxlib releases):

    python benchmarks/kernel_bench.py --framework jax --ops conv groupnorm fastnorm
    python benchmarks/kernel_bench.py --framework torch
    XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python benchmarks/kernel_bench.py --framework jax   # Eigen
    python -m venv /tmp/venv_0.9.2 && /tmp/venv_0.9.2/bin/pip install jax==0.9.2 jaxlib==0.9.2 flax \\
        && /tmp/venv_0.9.2/bin/python benchmarks/kernel_bench.py --framework jax --ops conv

Run the variants alternately, several rounds, and compare them within a round: timings on a shared 2-core
machine drift by 10-20 % between minutes.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

# (spatial px, in channels, out channels): layers of that shape in the encoder at 256 px
CONVS = {(256, 128, 128): 4, (128, 256, 256): 3, (64, 512, 512): 3, (32, 512, 512): 8}
# (spatial px, channels): GroupNorm + SiLU layers of that shape in the encoder at 256 px
NORMS = {(256, 128): 4, (128, 128): 1, (128, 256): 3, (64, 256): 1, (64, 512): 3, (32, 512): 10}
GROUPS, EPS = 32, 1e-6


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def jax_kernels(ops, iters, rng):
    import jax
    import jax.numpy as jnp
    from jax import lax

    out = {"framework": f"jax {jax.__version__}"}

    def fwd_bwd(f):  # output and input gradient, both returned (else XLA drops the unused forward)
        def step(x, g, *args):
            y, vjp = jax.vjp(lambda x: f(x, *args), x)
            return y, vjp(g)[0]
        return jax.jit(step)
    if "conv" in ops:
        def conv(x, w):
            return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        step = fwd_bwd(conv)
        for (px, cin, cout), n in CONVS.items():
            x = jnp.asarray(rng.standard_normal((1, px, px, cin), np.float32))
            w = jnp.asarray(rng.standard_normal((3, 3, cin, cout), np.float32) * 0.02)
            g = jnp.asarray(rng.standard_normal((1, px, px, cout), np.float32))
            out[f"conv {px}px {cin}->{cout} x{n}"] = median_ms(lambda: jax.block_until_ready(step(x, g, w)), iters)
    for op in [o for o in ops if o in ("groupnorm", "fastnorm")]:
        if op == "groupnorm":
            import flax.linen as nn

            def norm(x, s, b):
                return jax.nn.silu(nn.GroupNorm(GROUPS, epsilon=EPS).apply({"params": {"scale": s, "bias": b}}, x))
        else:  # the library's GroupNorm (tdae_jax/models/fastnorm.py; needs the project on the path)
            import os
            import sys
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
            from tdae_jax.models import fastnorm

            def norm(x, s, b):
                return jax.nn.silu(fastnorm.group_norm(x, s, b, GROUPS, EPS))
        step = fwd_bwd(norm)
        for (px, c), n in NORMS.items():
            x = jnp.asarray(rng.standard_normal((1, px, px, c), np.float32))
            s, b = jnp.asarray(rng.standard_normal(c, np.float32)), jnp.asarray(rng.standard_normal(c, np.float32))
            g = jnp.asarray(rng.standard_normal((1, px, px, c), np.float32))
            out[f"{op}+silu {px}px {c} x{n}"] = median_ms(lambda: jax.block_until_ready(step(x, g, s, b)), iters)
    return out


def torch_kernels(ops, iters, rng, threads):
    import torch

    torch.set_num_threads(threads)
    out = {"framework": f"torch {torch.__version__} ({torch.get_num_threads()} threads)"}

    def timed(module, x, g):
        module.requires_grad_(False)
        x = torch.tensor(x, requires_grad=True)
        g = torch.tensor(g)

        def step():
            y = module(x)
            return y, torch.autograd.grad(y, x, g)[0]
        return median_ms(step, iters)
    if "conv" in ops:
        for (px, cin, cout), n in CONVS.items():
            conv = torch.nn.Conv2d(cin, cout, 3, padding=1, bias=False)
            out[f"conv {px}px {cin}->{cout} x{n}"] = timed(
                conv, rng.standard_normal((1, cin, px, px), np.float32),
                rng.standard_normal((1, cout, px, px), np.float32))
    if "groupnorm" in ops:
        for (px, c), n in NORMS.items():
            norm = torch.nn.Sequential(torch.nn.GroupNorm(GROUPS, c, eps=EPS), torch.nn.SiLU())
            out[f"groupnorm+silu {px}px {c} x{n}"] = timed(
                norm, rng.standard_normal((1, c, px, px), np.float32),
                rng.standard_normal((1, c, px, px), np.float32))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--framework", choices=["jax", "torch"], default="jax")
    ap.add_argument("--ops", nargs="+", choices=["conv", "groupnorm", "fastnorm"], default=["conv", "groupnorm"],
                    help="fastnorm: the library's GroupNorm (JAX only)")
    ap.add_argument("--iters", type=int, default=7, help="timed calls per shape (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    rng = np.random.default_rng(a.seed)
    if a.framework == "jax":
        res = jax_kernels(a.ops, a.iters, rng)
    else:
        res = torch_kernels(a.ops, a.iters, rng, a.threads)
    for op in [o for o in a.ops if a.framework == "jax" or o != "fastnorm"]:
        key = op if op == "conv" else f"{op}+silu"
        res[f"{key} weighted"] = sum(v * int(k.rsplit(" x", 1)[1]) for k, v in res.items()
                                     if k.startswith(key + " "))
    print(json.dumps({k: (round(v, 1) if isinstance(v, float) else v) for k, v in res.items()}), flush=True)


if __name__ == "__main__":
    main()
