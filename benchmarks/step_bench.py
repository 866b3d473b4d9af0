#!/usr/bin/env python
"""Step-time and memory benchmarks of the defenses (not a test: nothing here asserts a time).

Three commands, each prints the machine, the versions and one table (copy it to docs/benchmarks.md):

``encoder``  PhotoGuard encoder attack (host ``pge``: one sign-PGD step on ||mu_E(x+delta)||_2 through
             ``defenses.tdae.make_step``, jitted once) on the SD-1.5 VAE architecture with random weights,
             JAX vs a PyTorch eager loop with identical weights (torch's default init, saved in diffusers
             layout, loaded by ``models.sd.load_vae``). JAX and torch steps are interleaved (alternating
             which goes first), so both see the same machine load; medians over ``--iters`` timed
             iterations after ``--warmup``. Checks that both compute the same loss at step 0.

             python benchmarks/step_bench.py encoder --sizes 256 512

``tdae``     Seconds per iteration of each host alone, +FDM finite difference (2 gradients), +FDM exact
             (gradient + HVP) and +TPA(N) (2N+1 gradients) on the SD-1.5 / InstructPix2Pix UNet
             architectures with random weights. Every (host, variant) step is compiled first, then the
             timed iterations go round-robin over all of them.

             python benchmarks/step_bench.py tdae --arch sd15 ip2p --size 256

``memory``   Compiled memory of the PhotoGuard diffusion host (``pgd``) with K denoising steps, from
             ``jax.jit(step).lower(...).compile().memory_analysis()`` (arguments + temporaries), on abstract
             params (nothing is run, no weights are allocated).

             python benchmarks/step_bench.py memory --arch sd15 --denoise-steps 4 20

The surrogate params are an argument of the jitted step (not closed over), so every compiled step shares
one copy of the weights and the memory analysis counts them as arguments.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# diffusers AutoencoderKL config of SD-1.5 (runwayml/stable-diffusion-v1-5 vae/config.json, random weights here).
SD15_VAE = dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
                layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
                scaling_factor=0.18215)
# diffusers UNet2DConditionModel config of SD-1.5 (attention_head_dim 8 = 8 heads, as in SD-1.5's config).
SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                 up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                 block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8,
                 cross_attention_dim=768)
# Same topology, 1/5 of the UNet width and 1/4 of the VAE width: for quick looks and memory scaling only.
SMALL_VAE = {**SD15_VAE, "block_out_channels": [32, 64, 128, 128]}
SMALL_UNET = {**SD15_UNET, "block_out_channels": [64, 128, 256, 256]}
ARCHS = {  # name -> (surrogate family, VAE config, UNet config)
    "sd15": ("sd", SD15_VAE, SD15_UNET),
    "ip2p": ("ip2p", SD15_VAE, {**SD15_UNET, "in_channels": 8}),
    "small": ("sd", SMALL_VAE, SMALL_UNET),
    "small_ip2p": ("ip2p", SMALL_VAE, {**SMALL_UNET, "in_channels": 8}),
}
HOSTS = ("pge", "pgd", "sa", "mist", "ace")
VARIANTS = ("host", "fd", "exact", "tpa")
VARIANT_LABEL = {"host": "host", "fd": "+FDM(fd)", "exact": "+FDM(exact)", "tpa": "+TPA"}
TEXT_LEN, TEXT_DIM = 77, 768


# ---------------------------------------------------------------------------------------------- setup
def add_jax_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options :func:`setup_jax` reads (every benchmark takes them)."""
    p.add_argument("--platform", default=None,
                   help="JAX_PLATFORMS for this run (default: $JAX_PLATFORMS, else cpu); e.g. cuda, tpu")
    p.add_argument("--xla-flags", default="", help="appended to XLA_FLAGS before jax is imported")
    p.add_argument("--matmul-precision", default=None,
                   help="jax_default_matmul_precision (default: JAX's default; tests use 'highest')")
    p.add_argument("--malloc", default="default", choices=("default", "reuse"),
                   help="reuse: keep freed host memory (tdae_jax.runtime.reuse_host_memory, what the "
                        "experiments do); applies to both frameworks in the process")
    p.add_argument("--cache-dir", default=None,
                   help="JAX persistent compilation cache (then 'compile s' is mostly a cache load)")
    return p


def parse_args(argv=None):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--iters", type=int, default=None, help="timed iterations per step (after warm-up)")
    common.add_argument("--warmup", type=int, default=1, help="untimed iterations after compilation")
    common.add_argument("--seed", type=int, default=0)
    add_jax_args(common)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    enc = sub.add_parser("encoder", parents=[common], help="PGE step, JAX vs PyTorch eager, SD-1.5 VAE")
    enc.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    enc.add_argument("--eps", type=float, default=0.03)
    enc.add_argument("--alpha", type=float, default=0.005)
    enc.add_argument("--batch", type=int, default=1, help="images per step (one jitted step / one autograd pass)")
    enc.add_argument("--torch-threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    enc.add_argument("--torch-device", default="cpu", help="torch device of the reference loop (cpu, cuda)")
    td = sub.add_parser("tdae", parents=[common], help="host / +FDM / +TPA seconds per iteration")
    td.add_argument("--arch", nargs="+", default=["sd15", "ip2p"], choices=sorted(ARCHS))
    td.add_argument("--size", type=int, default=256)
    td.add_argument("--hosts", nargs="+", default=list(HOSTS), choices=HOSTS)
    td.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    td.add_argument("--timesteps", type=int, default=1, help="K (t, eps) draws per gradient of the per-timestep hosts")
    td.add_argument("--denoise-steps", type=int, default=4, help="PhotoGuard diffusion host (pgd) K")
    td.add_argument("--tpa-n", type=int, default=10)
    mem = sub.add_parser("memory", parents=[common], help="compiled memory of pgd vs denoising steps K")
    mem.add_argument("--arch", nargs="+", default=["sd15"], choices=sorted(ARCHS))
    mem.add_argument("--size", type=int, default=256)
    mem.add_argument("--denoise-steps", type=int, nargs="+", default=[4, 20])
    mem.add_argument("--variant", default="host", choices=VARIANTS)
    mem.add_argument("--tpa-n", type=int, default=10)
    mem.add_argument("--timesteps", type=int, default=1)
    ho = sub.add_parser("weights", parents=[common], help="weights closed over (embedded) vs passed as arguments")
    ho.add_argument("--arch", default="sd15", choices=sorted(ARCHS))
    ho.add_argument("--host", default="pge", choices=HOSTS)
    ho.add_argument("--size", type=int, default=256)
    args = p.parse_args(argv)
    if args.iters is None:
        args.iters = {"encoder": 5, "tdae": 2, "memory": 0, "weights": 3}[args.cmd]
    return args


def setup_jax(args):
    if args.xla_flags:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + args.xla_flags).strip()
    if args.platform:
        os.environ["JAX_PLATFORMS"] = args.platform
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.malloc == "reuse":
        from tdae_jax import runtime

        print(f"# malloc: reuse_host_memory applied: {runtime.reuse_host_memory()}", flush=True)
    import jax
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()  # diffusers 0.39 logs a Flax deprecation notice for every module

    if args.matmul_precision:
        jax.config.update("jax_default_matmul_precision", args.matmul_precision)
    if args.cache_dir:
        jax.config.update("jax_compilation_cache_dir", args.cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return jax


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_report(extra: dict | None = None) -> None:
    import diffusers
    import flax
    import jax
    import jaxlib

    la = os.getloadavg()
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# machine: nproc={os.cpu_count()} (affinity {len(os.sched_getaffinity(0))}), cpu={cpu_model()!r}, "
          f"loadavg(1/5/15 min)={la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}")
    print(f"# versions: python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
          f"flax {flax.__version__}, diffusers {diffusers.__version__}"
          + "".join(f", {k} {v}" for k, v in (extra or {}).items()))
    print(f"# jax: backend={jax.default_backend()}, devices={len(jax.devices())} x {jax.devices()[0].device_kind!r}, "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
          f"matmul_precision={jax.config.values['jax_default_matmul_precision']}")
    sys.stdout.flush()


def end_report(t0: float) -> None:
    la = os.getloadavg()
    print(f"# done in {time.perf_counter() - t0:.0f} s wall; loadavg at end {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}")


def block(tree):
    import jax

    return jax.block_until_ready(tree)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt_times(xs) -> str:
    return "[" + ", ".join(f"{x:.3g}" for x in xs) + "]"


def table(header, rows) -> None:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(header)]
    line = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(header))
    print("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
    for r in rows:
        print(line(r))
    sys.stdout.flush()


# ---------------------------------------------------------------------------------------------- surrogate
def make_static(family: str, vae, unet, source: str):
    from tdae_jax.models import sd
    from tdae_jax.models.surrogate import Static

    return Static(family=family, vae=vae, unet=unet, text_encoder=None, tokenizer=None,
                  alphas_cumprod=sd.alphas_cumprod(sd.SD_SCHEDULER), prediction_type="epsilon",
                  scaling_factor=float(vae.scaling_factor), scheduler_config=dict(sd.SD_SCHEDULER),
                  name=source, source=source)


def arch_surrogate(arch: str, seed: int, abstract: bool = False):
    """(Static, params) of a random-weight surrogate of ``arch`` (no text encoder: the benchmark feeds
    random text embeddings). ``abstract``: params as ``ShapeDtypeStruct`` (for lowering only)."""
    import jax

    from tdae_jax.models import sd, weights

    family, vae_cfg, unet_cfg = ARCHS[arch]
    vae = sd.vae_module(vae_cfg, Path(f"<{arch} vae config>"))
    unet = sd.unet_module(unet_cfg, Path(f"<{arch} unet config>"))
    if abstract:
        import flax

        params = {name: flax.traverse_util.unflatten_dict(weights.expected_params(m))
                  for name, m in (("vae", vae), ("unet", unet))}
    else:
        params = {"vae": weights.random_params(vae, seed), "unet": weights.random_params(unet, seed + 1)}
    n = sum(int(x.size) for x in jax.tree.leaves(params))
    print(f"# surrogate {arch}: family={family}, VAE {vae_cfg['block_out_channels']}, UNet "
          f"{unet_cfg['block_out_channels']} in_channels={unet_cfg['in_channels']}, {n / 1e6:.1f} M params (f32)")
    return make_static(family, vae, unet, f"random-{arch}"), params


def host_batch(size: int, seed: int, batch: int = 1):
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(seed)
    tok = np.zeros((batch, TEXT_LEN), np.float32)
    tok[:, 1:6] = 1.0  # five content tokens (SA's target tokens)
    return {
        "x0": jnp.asarray(rng.uniform(0.0, 1.0, (batch, size, size, 3)).astype(np.float32)),
        "uid": jnp.arange(batch, dtype=jnp.int32),
        "emb": jnp.asarray(rng.standard_normal((batch, TEXT_LEN, TEXT_DIM)).astype(np.float32)),
        "uncond": jnp.asarray(rng.standard_normal((batch, TEXT_LEN, TEXT_DIM)).astype(np.float32)),
        "token_mask": jnp.asarray(tok),
    }


def make_bench_step(static, host: str, variant: str, *, timesteps=1, denoise_steps=4, tpa_n=10,
                    eps=0.03, alpha=0.005):
    """``(init_fn, step(params, state, batch, key))`` for host x variant through ``defenses.tdae.make_step``."""
    from tdae_jax import configs, objectives
    from tdae_jax.defenses import tdae
    from tdae_jax.models.surrogate import Surrogate

    # one pgd pass per gradient at eta 0 (the figures in docs/benchmarks.md; PhotoGuard's default 10 passes cost 10x)
    cfg = configs.Objective(name=host, timesteps=timesteps, denoise_steps=denoise_steps, remat=True,
                            pgd_grad_reps=1, pgd_eta=0.0)
    fdm = {"fd": configs.FDM(mode="finite_difference"), "exact": configs.FDM(mode="exact")}.get(variant, configs.FDM())
    tpa = configs.TPA(enabled=True, n=tpa_n) if variant == "tpa" else None
    budget, pgd = configs.Budget(eps=eps), configs.PGD(step_size=alpha)

    def build(params):
        loss_fn = objectives.make_objective(host, Surrogate(params=params, static=static), cfg)
        return tdae.make_step(loss_fn, budget=budget, pgd=pgd, fdm=fdm, tpa=tpa)

    def step(params, state, batch, key):
        return build(params)[1](state, batch, key)

    def init(batch):
        return build(None)[0](batch)

    return init, step


def compile_step(step, params, state, batch, key):
    import jax

    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=1).lower(params, state, batch, key).compile()
    return compiled, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------- encoder
def cmd_encoder(args):
    import jax
    import numpy as np

    import _torch_ref
    import torch

    from tdae_jax.models import sd

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    if args.matmul_precision in ("highest", "float32"):
        _torch_ref.set_tf32(False)
    machine_report(_torch_ref.info(args.torch_device))
    with tempfile.TemporaryDirectory() as d:
        tvae = _torch_ref.build_vae(SD15_VAE, args.seed, Path(d) / "vae").to(args.torch_device)
        vae, vae_params = sd.load_vae(Path(d) / "vae")
    static = make_static("sd", vae, None, "sd15-vae-torch-init")
    params = {"vae": vae_params}
    print(f"# SD-1.5 VAE, torch default init (seed {args.seed}), {sum(p.numel() for p in tvae.parameters()) / 1e6:.1f} M "
          f"params; eps={args.eps} alpha={args.alpha}; batch {args.batch}; warmup {args.warmup}, timed {args.iters}")
    key = jax.random.key(args.seed)
    rows = []
    for size in args.sizes:
        batch = {k: v for k, v in host_batch(size, args.seed, args.batch).items() if k in ("x0", "uid")}
        init, step = make_bench_step(static, "pge", "host", eps=args.eps, alpha=args.alpha)
        state = init(batch)
        compiled, compile_s = compile_step(step, params, state, batch, key)
        ref = _torch_ref.EncoderPGD(tvae, np.asarray(batch["x0"]), args.eps, args.alpha)
        jt, tt, jc, tc = [], [], [], []
        for i in range(args.warmup + args.iters):
            order = ("jax", "torch") if i % 2 == 0 else ("torch", "jax")
            dts, cpu = {}, {}
            for who in order:
                t0, c0 = time.perf_counter(), time.process_time()
                if who == "jax":
                    state, metrics = block(compiled(params, state, batch, key))
                    dts[who], cpu[who] = time.perf_counter() - t0, time.process_time() - c0
                    if i == 0:
                        jax_loss0, jax_delta1 = float(metrics["loss"].sum()), np.asarray(state.delta)
                else:
                    loss = ref.step()
                    dts[who], cpu[who] = time.perf_counter() - t0, time.process_time() - c0
                    if i == 0:
                        torch_loss0, torch_delta1 = loss, ref.delta_nhwc()
            if i >= args.warmup:
                jt.append(dts["jax"])
                tt.append(dts["torch"])
                jc.append(cpu["jax"])
                tc.append(cpu["torch"])
            print(f"#   {size}px iter {i}{' (warm-up)' if i < args.warmup else ''}: jax {dts['jax']:.3f} s "
                  f"(cpu {cpu['jax']:.3f}), torch {dts['torch']:.3f} s (cpu {cpu['torch']:.3f}), first: {order[0]}, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
        agree = float(np.mean(np.abs(jax_delta1 - torch_delta1) < 1e-6))
        rel = abs(jax_loss0 - torch_loss0) / abs(torch_loss0)
        print(f"# {size}px: jax s/it {fmt_times(jt)}, torch s/it {fmt_times(tt)}, compile {compile_s:.1f} s; "
              f"loss0 jax {jax_loss0:.6g} torch {torch_loss0:.6g}", flush=True)
        rows.append((size, f"{med(jt):.3f}", f"{med(tt):.3f}", f"{med(tt) / med(jt):.2f}", f"{med(jc):.3f}",
                     f"{med(tc):.3f}", f"{rel:.1e}", f"{agree:.4f}", f"{compile_s:.1f}"))
    table(("size px", "jax s/it", "torch s/it", "torch/jax", "jax cpu-s/it", "torch cpu-s/it", "loss0 rel err",
           "step-1 delta agree", "jax compile s"), rows)
    print("# s/it: median wall seconds per iteration (the comparison); cpu-s/it: median process CPU seconds "
          "(all threads; torch's OpenMP spin-waits count too); step-1 delta agree: fraction of pixels where both "
          "first updates are equal (1e-6)")


# ---------------------------------------------------------------------------------------------- tdae
def cmd_tdae(args):
    import jax
    import numpy as np

    machine_report()
    key = jax.random.key(args.seed)
    print(f"# size {args.size}px, batch 1, timesteps K={args.timesteps} (per-timestep hosts), pgd denoise steps "
          f"{args.denoise_steps}, TPA N={args.tpa_n}; warmup {args.warmup}, timed {args.iters}, round-robin", flush=True)
    for arch in args.arch:
        static, params = arch_surrogate(arch, args.seed)
        batch = host_batch(args.size, args.seed)
        combos = {}
        for host in args.hosts:
            for variant in args.variants:
                init, step = make_bench_step(static, host, variant, timesteps=args.timesteps,
                                             denoise_steps=args.denoise_steps, tpa_n=args.tpa_n)
                state = init(batch)
                compiled, compile_s = compile_step(step, params, state, batch, key)
                combos[(host, variant)] = {"fn": compiled, "state": state, "compile": compile_s, "times": [],
                                         "cpu": []}
                print(f"#   {arch} {host} {variant}: compiled in {compile_s:.1f} s", flush=True)
        for i in range(args.warmup + args.iters):
            for (host, variant), c in combos.items():
                t0, c0 = time.perf_counter(), time.process_time()
                c["state"], metrics = block(c["fn"](params, c["state"], batch, key))
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
                if i >= args.warmup:
                    c["times"].append(dt)
                    c["cpu"].append(dc)
                if i == 0:
                    c["loss0"] = float(metrics["loss"][0])
                    c["gnorm0"] = float(metrics["grad_norm"][0])
                print(f"#   {arch} round {i}{' (warm-up)' if i < args.warmup else ''} {host} {variant}: {dt:.2f} s "
                      f"(cpu {dc:.2f} s, load {os.getloadavg()[0]:.1f})", flush=True)
        for (host, variant), c in combos.items():
            bad = "" if np.isfinite(c["loss0"]) and np.isfinite(c["gnorm0"]) and c["gnorm0"] > 0 else "  <-- NOT FINITE/ZERO"
            print(f"# {arch} {host} {variant}: s/it {fmt_times(c['times'])}, cpu-s/it {fmt_times(c['cpu'])}, compile {c['compile']:.1f} s, "
                  f"loss0 {c['loss0']:.5g}, |grad|0 {c['gnorm0']:.3g}{bad}")
        header = ["arch", "host"] + [f"{VARIANT_LABEL[v]} s/it" for v in args.variants]
        ratios = [("fd", "host", "FDM(fd)/host"), ("exact", "host", "FDM(exact)/host"), ("tpa", "fd", "TPA/FDM(fd)")]
        ratios = [r for r in ratios if r[0] in args.variants and r[1] in args.variants]
        header += [r[2] for r in ratios]
        rows = []
        for host in args.hosts:
            m = {v: med(combos[(host, v)]["times"]) for v in args.variants}
            rows.append([arch, host] + [f"{m[v]:.2f}" for v in args.variants]
                        + [f"{m[a] / m[b]:.2f}" for a, b, _ in ratios])
        table(header, rows)
        print(f"# {arch}: the same ratios from median process CPU seconds per iteration:")
        table(["arch", "host"] + [r[2] for r in ratios],
              [[arch, host] + [f"{med(combos[(host, a)]['cpu']) / med(combos[(host, b)]['cpu']):.2f}"
                               for a, b, _ in ratios] for host in args.hosts])
        del combos, params


# ---------------------------------------------------------------------------------------------- weights
def cmd_weights(args):
    """How the weights reach the compiled step. Plain ``jax.jit`` of a step that closes over the surrogate
    embeds the weights in the program; ``Protector`` builds the step from the surrogate inside the trace, so the
    weights are an argument with explicit shardings (tdae_jax/protect.py). Compile time, program size, compiled
    memory and step time of both, side by side."""
    import jax

    machine_report()
    key = jax.random.key(args.seed)
    static, params = arch_surrogate(args.arch, args.seed)
    batch = host_batch(args.size, args.seed)
    init, step = make_bench_step(static, args.host, "host")
    state0 = init(batch)
    closed = lambda st, b, k: step(params, st, b, k)  # noqa: E731  (a step that closes over the weights)
    as_argument = lambda st, b, k, p: step(p, st, b, k)  # noqa: E731  (Protector: the model is an argument)
    print(f"# {args.arch} {args.host} {args.size}px: {len(jax.tree.leaves(params))} weights, "
          f"{sum(a.nbytes for a in jax.tree.leaves(params)) / 2**20:.1f} MiB", flush=True)
    variants = {"embedded (jit of the closure)": (jax.jit(closed), ()),
                "argument (Protector)": (jax.jit(as_argument), (params,))}
    rows = []
    for name, (fn, extra) in variants.items():
        t0 = time.perf_counter()
        lowered = fn.lower(state0, batch, key, *extra)
        text_mb = len(lowered.as_text()) / 2**20
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        times, state = [], init(batch)
        for i in range(args.warmup + args.iters):
            t1 = time.perf_counter()
            state, _ = block(compiled(state, batch, key, *extra))
            if i >= args.warmup:
                times.append(time.perf_counter() - t1)
        print(f"#   {name}: lower+compile {compile_s:.1f} s, program {text_mb:.1f} MiB, {ma}", flush=True)
        rows.append((name, f"{compile_s:.1f}", f"{text_mb:.1f}", f"{ma.argument_size_in_bytes / 2**20:.1f}",
                     f"{ma.temp_size_in_bytes / 2**20:.1f}", fmt_times(times)))
        del compiled, lowered
    table(("weights", "lower+compile s", "StableHLO MiB", "argument MiB", "temp MiB", "s/it"), rows)


# ---------------------------------------------------------------------------------------------- memory
def cmd_memory(args):
    import jax

    machine_report()
    key = jax.random.key(args.seed)
    print(f"# pgd host, variant {args.variant}, size {args.size}px, batch 1; memory_analysis() of the compiled step",
          flush=True)
    rows = []
    for arch in args.arch:
        static, params = arch_surrogate(arch, args.seed, abstract=True)
        batch = host_batch(args.size, args.seed)
        base = None
        for k in args.denoise_steps:
            init, step = make_bench_step(static, "pgd", args.variant, timesteps=args.timesteps, denoise_steps=k,
                                         tpa_n=args.tpa_n)
            state = jax.eval_shape(init, batch)
            t0 = time.perf_counter()
            ma = jax.jit(step, donate_argnums=1).lower(params, state, batch, key).compile().memory_analysis()
            compile_s = time.perf_counter() - t0
            total = ma.temp_size_in_bytes + ma.argument_size_in_bytes
            base = base or total
            gib = lambda b: f"{b / 2**30:.3f}"  # noqa: E731
            rows.append((arch, k, gib(ma.argument_size_in_bytes), gib(ma.temp_size_in_bytes),
                         gib(ma.output_size_in_bytes), gib(ma.alias_size_in_bytes), gib(total), f"{total / base:.3f}",
                         f"{compile_s:.0f}"))
            print(f"#   {arch} K={k}: {ma}", flush=True)
    table(("arch", "K", "argument GiB", "temp GiB", "output GiB", "alias GiB", "temp+argument GiB", "vs first K",
           "compile s"), rows)


def main(argv=None):
    args = parse_args(argv)
    setup_jax(args)
    t0 = time.perf_counter()
    {"encoder": cmd_encoder, "tdae": cmd_tdae, "memory": cmd_memory, "weights": cmd_weights}[args.cmd](args)
    end_report(t0)


if __name__ == "__main__":
    main()
