#!/usr/bin/env python
"""SD3 surrogate step time (not a test: nothing here asserts a time).

One TDAE iteration (``defenses.tdae.make_step``, jitted once, params an argument) of a host on the **SD3-medium
architecture with random weights** (``stable-diffusion-3-medium-diffusers`` transformer and VAE configs,
MMDiT 24 layers x 1536, 2.03 B params; 16-channel VAE 128/256/512/512), fp32, batch 1, random text
embeddings ``prompt_embeds [1, 333, 4096]`` / pooled ``[1, 2048]`` (the text encoders are never differentiated).
Hosts: ``pge`` (VAE encoder only) and ``advdm`` (posterior sample -> K transformer calls at K timesteps of the shifted
training grid, ``objectives/diffusion.py``), variants ``host`` (plain gradient) and ``fd`` (+FDM finite difference:
2 gradients). Prints the machine, one row per (host, variant, layers, K): compile seconds and median seconds per
iteration; ``--extrapolate`` fits ``t = t_vae + K (c + b L)`` to two depths (t_vae from pge) and prints the
full-size estimate.

    python benchmarks/sd3_bench.py --size 256 --hosts pge --variants fd
    python benchmarks/sd3_bench.py --size 256 --hosts advdm --variants fd --layers 2 3 --timesteps 1 --extrapolate

``--layers`` overrides the transformer depth (the SD3-medium width, heads, text and VAE are kept): full depth (24)
needs ~8 GB for the fp32 weights and, on a small CPU, more time than a benchmark run should take.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for p in (HERE, HERE.parent):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json and vae/config.json.
SD3_MEDIUM = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
                  num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                  pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm=None,
                  dual_attention_layers=())
SD3_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
               act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
               shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
TEXT_LEN = 77 + 256


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--hosts", nargs="+", default=["pge", "advdm"], choices=["pge", "advdm"])
    p.add_argument("--variants", nargs="+", default=["fd"], choices=["host", "fd"])
    p.add_argument("--layers", type=int, nargs="+", default=[24], help="transformer depth(s) (SD3-medium: 24)")
    p.add_argument("--timesteps", type=int, default=10, help="advdm: K (t, eps) draws per gradient (TDAE §9: 10)")
    p.add_argument("--iters", type=int, default=1, help="timed iterations after compilation")
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extrapolate", action="store_true",
                   help="advdm: fit t = t_vae + K (c + b L) to two --layers (t_vae from pge, same variant) and "
                        "print the 24-layer, K = 10 estimate")
    p.add_argument("--fit-cpu", action="store_true", help="extrapolate from CPU seconds instead of wall seconds")
    from step_bench import add_jax_args

    return add_jax_args(p).parse_args(argv)


def random_params(shapes, key):
    """Random params built leaf by leaf on the device (no host copy of 8 GB): kernels ~ N(0, 1/fan_in),
    biases 0, norm scales 1 (as ``models.sd3.random_params``)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    @jax.jit
    def normal(k, std, proto):
        return jax.random.normal(k, proto.shape, jnp.float32) * std

    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name, shape = str(getattr(path[-1], "key", path[-1])), tuple(leaf.shape)
        if name == "kernel":
            out.append(normal(jax.random.fold_in(key, i), 1.0 / np.sqrt(np.prod(shape[:-1])),
                              jax.ShapeDtypeStruct(shape, jnp.float32)))
        elif name == "bias":
            out.append(jnp.zeros(shape, jnp.float32))
        else:
            out.append(jnp.ones(shape, jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


def build_model(layers: int | None, seed: int):
    """(SD3Static, params). ``layers`` None: VAE only (the transformer params are not materialised)."""
    import jax

    from tdae_jax.models import flow_match, sd3, sd3_transformer, sd3_vae

    cfg = sd3_transformer.SD3Config.from_dict({**SD3_MEDIUM, "num_layers": layers or 1})
    transformer = sd3_transformer.SD3Transformer2DModel(cfg, remat=False)
    vae, info = sd3_vae.build_vae(SD3_VAE)
    key = jax.random.key(seed)
    params = {"vae": random_params(sd3_vae.init_shapes(vae, info), jax.random.fold_in(key, 0))}
    if layers:
        params["transformer"] = random_params(sd3_transformer.init_shapes(transformer), jax.random.fold_in(key, 1))
    params = jax.block_until_ready(params)  # generated asynchronously: not inside the first timed step
    static = sd3.SD3Static(transformer, vae, info, None, flow_match.FlowMatchConfig(1000, 3.0),
                           name=f"sd3-medium-random-L{layers}", source="random")
    n = {k: sum(int(x.size) for x in jax.tree.leaves(v)) / 1e6 for k, v in params.items()}
    print(f"# model: VAE {n['vae']:.1f} M params" + (f", transformer {layers} layers {n['transformer']:.1f} M params"
                                                    if layers else ", no transformer (pge)"), flush=True)
    return static, params


def batch(size: int, seed: int):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {"x0": jnp.asarray(rng.uniform(0, 1, (1, size, size, 3)).astype(np.float32)),
            "uid": jnp.asarray([0], jnp.int32), "emb": f(1, TEXT_LEN, 4096), "pooled": f(1, 2048),
            "uncond": f(1, TEXT_LEN, 4096), "uncond_pooled": f(1, 2048)}


def bench_one(static, params, b, host, variant, k, args):
    import jax

    from tdae_jax import configs, objectives
    from tdae_jax.defenses import tdae
    from tdae_jax.models.sd3 import SD3

    cfg = configs.Objective(name=host, timesteps=k, remat=True)
    fdm = configs.FDM(mode="finite_difference") if variant == "fd" else configs.FDM()

    def build(p):
        return tdae.make_step(objectives.make_objective(host, SD3(params=p, static=static), cfg),
                              budget=configs.Budget(0.03), pgd=configs.PGD(step_size=0.005), fdm=fdm)

    step = lambda p, s, bb, key: build(p)[1](s, bb, key)  # noqa: E731
    state = build(None)[0](b)
    key = jax.random.key(args.seed)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=1).lower(params, state, b, key).compile()
    compile_s = time.perf_counter() - t0
    times, cpu = [], []
    for i in range(args.warmup + args.iters):
        t0, c0 = time.perf_counter(), time.process_time()
        state, m = jax.block_until_ready(compiled(params, state, b, key))
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        print(f"#   {host} {variant} iter {i}{' (warm-up)' if i < args.warmup else ''}: {dt:.2f} s "
              f"(cpu {dc:.2f} s), loss {float(m['loss'][0]):.5g}, load {os.getloadavg()[0]:.1f}", flush=True)
        if i >= args.warmup:
            times.append(dt)
            cpu.append(dc)
    return compile_s, times, cpu


def main(argv=None):
    args = parse_args(argv)
    from step_bench import end_report, machine_report, med, setup_jax, table

    setup_jax(args)
    t_start = time.perf_counter()
    machine_report()
    print(f"# SD3-medium architecture, random fp32 weights, {args.size} px (latents 16x{args.size // 8}^2, "
          f"{(args.size // 16) ** 2} image + {TEXT_LEN} text tokens), batch 1, warmup {args.warmup}, timed {args.iters}",
          flush=True)
    b = batch(args.size, args.seed)
    rows, results = [], {}
    configs_ = [(h, L) for h in args.hosts for L in ([None] if h == "pge" else args.layers)]
    for host, layers in configs_:
        static, params = build_model(layers, args.seed)
        for variant in args.variants:
            k = args.timesteps if host == "advdm" else 1
            compile_s, times, cpu = bench_one(static, params, b, host, variant, k, args)
            results[(host, variant, layers)] = med(cpu) if args.fit_cpu else med(times)
            rows.append((host, variant, layers or "-", k if host == "advdm" else "-", f"{compile_s:.1f}",
                         f"{med(times):.2f}", "[" + ", ".join(f"{t:.2f}" for t in times) + "]", f"{med(cpu):.2f}"))
        del params
    table(("host", "variant", "layers", "K", "compile s", "s/it (median)", "s/it (all)", "cpu-s/it"), rows)
    print("# s/it: wall seconds per iteration; cpu-s/it: process CPU seconds (all threads), steadier than wall "
          "on a shared machine", flush=True)
    if args.extrapolate and "advdm" in args.hosts and len(args.layers) >= 2:
        l1, l2 = sorted(args.layers)[:2]
        for variant in args.variants:
            t1, t2 = results[("advdm", variant, l1)], results[("advdm", variant, l2)]
            t_vae = results.get(("pge", variant, None), 0.0)
            per_block = (t2 - t1) / (l2 - l1) / args.timesteps  # transformer cost per block per K
            part24 = (t1 - t_vae) / args.timesteps + (24 - l1) * per_block  # per-K transformer part at 24 layers
            unit = "cpu-s" if args.fit_cpu else "s"
            if per_block <= 0 or part24 <= 0:
                print(f"# extrapolation advdm {variant}: timings too noisy (per block {per_block:.2f} {unit}); "
                      f"not extrapolated", flush=True)
                continue
            print(f"# extrapolation advdm {variant} ({unit}, linear in layers and K): {per_block:.2f} per block per K, "
                  f"VAE part (pge {variant}) {t_vae:.2f} -> 24 layers: K = 1 ~{t_vae + part24:.0f} {unit}/it, "
                  f"K = 10 ~{t_vae + 10 * part24:.0f} {unit}/it", flush=True)
    end_report(t_start)


if __name__ == "__main__":
    main()
