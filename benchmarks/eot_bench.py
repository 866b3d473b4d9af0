#!/usr/bin/env python
"""Cost of EOT (tdae_jax/eot.py) per protection iteration: seconds per iteration of one defense step
(``defenses.tdae.make_step``, jitted once per variant) with and without the objective averaged over
differentiable purifications, side by side (not a test: nothing here asserts a time).

    python benchmarks/eot_bench.py                                   # tiny ip2p surrogate, 64 px, pge + advdm
    python benchmarks/eot_bench.py --arch small_ip2p --size 256      # random-weight SD-shaped models (step_bench)

Variants: ``none`` (the plain objective) and each of ``--eot`` (comma lists = one variant averaging all
of them; ``xN`` = N samples per transform). Every step is compiled first; timed iterations then go
round-robin over all variants, so all see the same machine load. Prints the machine, versions and a table
(median wall s/it, ratio to ``none``, median process CPU s/it, compile seconds).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import step_bench as sb  # noqa: E402  (machine report, table, random-weight architectures)

DEFAULT_VARIANTS = ["jpeg75", "resize0.5", "blur1", "noise4", "jpeg75,resize0.5,blur1,noise4",
                    "jpeg75,resize0.5,blur1,noise4x2"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny", choices=["tiny"] + sorted(sb.ARCHS),
                   help="tiny = models.tiny(family); others: step_bench's random-weight architectures")
    p.add_argument("--family", default="ip2p", choices=["sd", "ip2p"], help="family of the tiny surrogate")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--hosts", nargs="+", default=["pge", "advdm"])
    p.add_argument("--eot", nargs="+", default=DEFAULT_VARIANTS, help="variants; 'a,b' averages a and b; suffix xN")
    p.add_argument("--defense", default="none", choices=["none", "fdm"], help="fdm: finite-difference FDM (2 grads)")
    p.add_argument("--timesteps", type=int, default=1, help="K (t, eps) draws per gradient of advdm")
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    sb.add_jax_args(p)
    return p.parse_args(argv)


def surrogate_and_batch(args):
    import jax.numpy as jnp
    import numpy as np

    from tdae_jax import models, prng

    if args.arch == "tiny":
        sur = models.tiny(args.family)
        static, params = sur.static, sur.params
        rng = np.random.default_rng(args.seed)
        ids = sur.tokenize(["make it a watercolor painting"] * args.batch)
        emb = np.asarray(sur.embed_ids(ids))
        unc = np.asarray(sur.embed_ids(sur.tokenize([""] * args.batch)))
        batch = {"x0": jnp.asarray(rng.uniform(0, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)),
                 "uid": jnp.asarray(prng.uids([f"img{i}" for i in range(args.batch)])),
                 "emb": jnp.asarray(emb), "uncond": jnp.asarray(unc)}
        print(f"# surrogate: models.tiny({args.family!r}), "
              f"{sum(int(x.size) for x in __import__('jax').tree.leaves(params)) / 1e6:.2f} M params")
    else:
        static, params = sb.arch_surrogate(args.arch, args.seed)
        one = sb.host_batch(args.size, args.seed)
        batch = {k: jnp.repeat(v, args.batch, axis=0) for k, v in one.items()}
        batch["uid"] = jnp.arange(args.batch, dtype=jnp.int32)
    return static, params, batch


def make_variant(static, host, spec, args):
    from tdae_jax import configs, eot, objectives
    from tdae_jax.defenses import tdae
    from tdae_jax.models.surrogate import Surrogate

    samples = 1
    if spec != "none" and "x" in spec.rsplit(",", 1)[-1]:
        spec, n = spec.rsplit("x", 1)
        samples = int(n)
    transforms = () if spec == "none" else eot.parse_transforms(spec)
    cfg = configs.Objective(name=host, timesteps=args.timesteps, remat=True)
    fdm = configs.FDM(mode="finite_difference") if args.defense == "fdm" else configs.FDM()

    def build(params):
        loss = objectives.make_objective(host, Surrogate(params=params, static=static), cfg)
        loss = eot.wrap_objective(loss, transforms, samples)
        return tdae.make_step(loss, budget=configs.Budget(eps=0.03), pgd=configs.PGD(step_size=0.005), fdm=fdm)

    def step(params, state, batch, key):
        return build(params)[1](state, batch, key)

    return (lambda batch: build(None)[0](batch)), step, len(transforms) * samples or 1


def main(argv=None):
    args = parse_args(argv)
    sb.setup_jax(args)
    import jax

    t_start = time.perf_counter()
    sb.machine_report()
    static, params, batch = surrogate_and_batch(args)
    key = jax.random.key(args.seed)
    variants = ["none"] + [v for v in args.eot if v != "none"]
    print(f"# {args.size}px, batch {args.batch}, defense {args.defense}, hosts {args.hosts}, timesteps K="
          f"{args.timesteps}; warm-up {args.warmup}, timed {args.iters} (round-robin over variants)", flush=True)
    rows = []
    for host in args.hosts:
        steps = {}
        for v in variants:
            init, step, evals = make_variant(static, host, v, args)
            state = init(batch)
            compiled, compile_s = sb.compile_step(step, params, state, batch, key)
            steps[v] = [compiled, state, compile_s, evals, [], []]
            print(f"#   {host} / {v}: compiled in {compile_s:.1f} s", flush=True)
        for i in range(args.warmup + args.iters):
            order = variants if i % 2 == 0 else variants[::-1]
            for v in order:
                s = steps[v]
                t0, c0 = time.perf_counter(), time.process_time()
                s[1], _ = sb.block(s[0](params, s[1], batch, key))
                if i >= args.warmup:
                    s[4].append(time.perf_counter() - t0)
                    s[5].append(time.process_time() - c0)
        base = sb.med(steps["none"][4])
        for v in variants:
            s = steps[v]
            rows.append((host, v, s[3], f"{sb.med(s[4]):.4f}", f"{sb.med(s[4]) / base:.2f}", f"{sb.med(s[5]):.4f}",
                         f"{s[2]:.1f}"))
    sb.table(("host", "EOT", "objective evals", "s/it", "x none", "cpu-s/it", "compile s"), rows)
    print("# s/it: median wall seconds per iteration; x none: ratio to the plain objective of the same host; "
          "objective evals: transforms x samples per gradient (x2 with FDM)")
    sb.end_report(t_start)


if __name__ == "__main__":
    main()
