"""ADFT (DLADiff layer 1) vs an ASPL loop: seconds and compiled memory per epoch on the SD-2.1-base architecture
with random weights. Not a test.

    python benchmarks/adft_bench.py --size 256 --batch 1 --iters 1

What is measured, per compiled step (the same jitted functions the defenses run: ``adft.stage1_jit`` = PGD on
L_att through the static and the dynamic UNet, ``adft.stage2_jit`` = PGD on L_cond, also ASPL's and FSMG's
PGD step, ``finetune.train_step_jit`` = one AdamW step of the UNet, ADFT stage 3 and ASPL's two trainings):
compile time, ``memory_analysis()`` (arguments + temporaries = the step's peak on the device), and median
seconds per call. An epoch is then ``iter1 * stage1 + iter2 * stage2 + iter3 * train`` for ADFT (DLADiff
defaults 3/3/3) and ``clean_steps * train + pgd_steps * stage2 + adv_steps * train`` for ASPL (Anti-DreamBooth
defaults 3/6/3). On a GPU/TPU each step's line also gives the allocator's peak so far (``memory_stats``: it
grows over the steps of one process, weights, optimizer state and compile-time scratch included).
``--abstract`` compiles on ShapeDtypeStructs only (memory figures without allocating the weights; no timings),
which is how the 512 px figures are taken on a small machine. ``--residuals`` adds, per
step, the bytes of the residuals its differentiated function saves for the backward pass (by dtype): XLA:CPU
computes bf16 convolutions and matmuls in float32, so its buffer assignment hides what bf16 saves on an
accelerator, while the residuals are what the program asks every backend to keep.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_bench as sb  # noqa: E402  (architectures, machine report, table)

# diffusers UNet2DConditionModel config of SD-2.1-base (stabilityai/stable-diffusion-2-1-base unet/config.json):
# heads 5/10/20/20 of 64 channels, OpenCLIP-H text width 1024, linear projections in the transformers.
SD21_UNET = {**sb.SD15_UNET, "attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024,
             "use_linear_projection": True}
SMALL21_UNET = {**SD21_UNET, "block_out_channels": [64, 128, 256, 256], "attention_head_dim": [1, 2, 4, 4]}
ARCHS = {"sd21": (sb.SD15_VAE, SD21_UNET), "small": (sb.SMALL_VAE, SMALL21_UNET)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sd21", choices=sorted(ARCHS))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=1, help="images of the identity optimised together")
    p.add_argument("--iters", type=int, default=1, help="timed calls per step (after one warm-up call)")
    p.add_argument("--abstract", action="store_true", help="compile only (memory), no weights allocated")
    p.add_argument("--mem-efficient-attention", action="store_true",
                   help="diffusers' chunked attention in the UNet (use_memory_efficient_attention=True)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="surrogate compute dtype (bfloat16: Surrogate.mixed_precision, float32 UNet master weights)")
    p.add_argument("--residuals", action="store_true",
                   help="also sum the activations each step's gradient saves for its backward pass (jaxpr level: "
                        "platform-independent, before XLA's buffer assignment; what bf16 shrinks on a GPU/TPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=["stage1", "stage2", "train"], choices=("stage1", "stage2", "train"),
                   help="steps to measure (each in its own process fits a 24 GB machine at 256 px)")
    return sb.add_jax_args(p).parse_args(argv)


def build(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tdae_jax.defenses.dladiff import adft, dsur
    from tdae_jax.editors import finetune as ft
    from tdae_jax.models import sd, weights
    from tdae_jax.models.surrogate import Surrogate

    vae_cfg, unet_cfg = ARCHS[args.arch]
    vae = sd.vae_module(vae_cfg, Path("<vae config>"))
    unet = sd.unet_module(unet_cfg, Path("<unet config>"))
    static = sb.make_static("sd", vae, unet, f"random-{args.arch}")
    if args.abstract:
        import flax

        params = {n: flax.traverse_util.unflatten_dict(weights.expected_params(m)) for n, m in
                  (("vae", vae), ("unet", unet))}
    else:
        params = {"vae": weights.random_params(vae, args.seed), "unet": weights.random_params(unet, args.seed + 1)}
    sur = Surrogate(params=params, static=static)
    sur = sur.memory_efficient() if args.mem_efficient_attention else sur
    if args.dtype != "float32":  # eval_shape: works on the abstract params too
        mixed = lambda s: s.mixed_precision(args.dtype)  # noqa: E731
        sur = jax.eval_shape(mixed, sur) if args.abstract else mixed(sur)
    n_unet = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params["unet"]))
    print(f"# {args.arch}: UNet {unet_cfg['block_out_channels']} heads {unet_cfg['attention_head_dim']} "
          f"cross {unet_cfg['cross_attention_dim']}, {n_unet / 1e6:.1f} M params; VAE {vae_cfg['block_out_channels']}; "
          f"{args.size} px, batch {args.batch}, compute dtype {args.dtype}", flush=True)
    b = args.batch
    rng = np.random.default_rng(args.seed)
    batch = {"x0": jnp.asarray(rng.uniform(0, 1, (b, args.size, args.size, 3)), jnp.float32),
             "uid": jnp.arange(b, dtype=jnp.int32),
             "emb": jnp.asarray(rng.standard_normal((b, 77, unet_cfg["cross_attention_dim"])), jnp.float32)}
    layers = dsur.select_layers(sur, args.size, resolution=args.size // 16)
    cfg = adft.ADFTConfig(layers=layers)
    tcfg = cfg.stage3(b)
    return sur, batch, cfg, tcfg, adft, ft


def residual_bytes(fn, arg, const) -> dict:
    """Bytes of the residuals ``jax.grad(fn)(arg, const)`` (w.r.t. ``arg`` only) saves for the backward pass,
    by dtype, at the jaxpr level; residuals that are the inputs themselves (weights) are not counted."""
    import jax
    import numpy as np
    from jax._src import ad_checkpoint

    out: dict = {}
    for aval, why in ad_checkpoint.saved_residuals(lambda a, c: fn(a, jax.lax.stop_gradient(c)), arg, const):
        if hasattr(aval, "dtype") and hasattr(aval, "shape") and "argument" not in why:
            out[str(aval.dtype)] = out.get(str(aval.dtype), 0) + int(np.prod(aval.shape)) * aval.dtype.itemsize
    return out


def print_residuals(sur, s_unet, batch, cfg, key):
    import jax
    import jax.numpy as jnp

    from tdae_jax import prng
    from tdae_jax.defenses.dladiff import dsur
    from tdae_jax.editors import finetune as ft

    keys = prng.image_keys(key, batch["uid"], jnp.zeros((), jnp.int32))
    x0, emb = batch["x0"], batch["emb"]
    delta = jax.ShapeDtypeStruct(x0.shape, jnp.float32)

    def stage1(d, c):
        s, static = c
        return dsur.l_att(s.replace(params={**s.params, "unet": static}), s, x0, x0 + d, emb, keys, cfg.layers).sum()

    def train(u, s):
        return ft.diffusion_loss(s.replace(params={**s.params, "unet": u}), x0, emb, keys).mean()

    fns = {"stage1 (L_att PGD)": (stage1, delta, (sur, s_unet)),
           "stage2 (L_cond PGD)": (lambda d, s: ft.diffusion_loss(s, x0 + d, emb, keys).sum(), delta, sur),
           "train (AdamW step)": (train, sur.params["unet"], sur)}
    for name, (fn, arg, const) in fns.items():
        by = residual_bytes(fn, arg, const)
        parts = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in sorted(by.items()))
        print(f"#   residuals {name}: {sum(by.values()) / 2**30:.2f} GiB ({parts})", flush=True)


def main(argv=None):
    args = parse_args(argv)
    sb.setup_jax(args)
    import jax
    import jax.numpy as jnp
    import numpy as np

    sb.machine_report()
    t_all = time.perf_counter()
    sur, batch, cfg, tcfg, adft, ft = build(args)
    key = jax.random.key(args.seed)
    unet = sur.params["unet"]  # UNet_d: float32 master weights
    s_unet = jax.eval_shape(sur.frozen_unet, unet) if args.abstract else sur.frozen_unet(unet)  # UNet_s
    as_spec = (lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t))  # noqa: E731
    new_p = lambda: adft.init_perturb(jnp.zeros_like(batch["x0"]), cfg)  # noqa: E731  (each step donates its own)
    frozen = ft.frozen_part(sur, tcfg)
    if args.abstract or "train" not in args.only:
        train_state = jax.eval_shape(lambda s: ft.init_state(s, tcfg), sur)
    else:
        train_state = ft.init_state(sur, tcfg)
    draw = jnp.arange(args.batch, dtype=jnp.int32)
    tbatch = {**batch, "draw": draw}
    steps = {
        # static = dynamic = the same weights here: the compiled program and its cost are the same
        "stage1 (L_att PGD)": (adft.stage1_jit, (new_p(), sur, s_unet, unet, batch, key), {"cfg": cfg.trace_key()}),
        "stage2 (L_cond PGD)": (adft.stage2_jit, (new_p(), sur, unet, batch, key), {"cfg": adft.pgd_view(cfg)}),
        "train (AdamW step)": (ft.train_step_jit, (train_state, frozen, tbatch, key), {"cfg": tcfg.trace_key()}),
    }
    if args.residuals:
        print_residuals(sur, s_unet, batch, cfg, key)
    res = {}
    steps = {k: v for k, v in steps.items() if k.split()[0] in args.only}
    for name, (fn, a, kw) in steps.items():
        t0 = time.perf_counter()
        lowered = fn.lower(*([as_spec(x) for x in a] if args.abstract else a), **kw)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        ma = compiled.memory_analysis()
        peak = ma.argument_size_in_bytes + ma.temp_size_in_bytes
        times = []
        if not args.abstract:
            state = a[0]
            for i in range(1 + args.iters):
                t1 = time.perf_counter()
                out = fn(state, *a[1:], **kw)
                jax.block_until_ready(out)
                state = out[0]
                if i:
                    times.append(time.perf_counter() - t1)
            if name.startswith("train"):
                train_state = state
        res[name] = {"compile": compile_s, "arg": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
                     "peak": peak, "s": float(np.median(times)) if times else float("nan")}
        stats = jax.local_devices()[0].memory_stats() or {}  # GPU/TPU allocators; None on CPU
        held = (f", device peak so far {stats['peak_bytes_in_use'] / 2**30:.2f} GiB (in use "
                f"{stats.get('bytes_in_use', 0) / 2**30:.2f})" if "peak_bytes_in_use" in stats else "")
        print(f"#   {name}: compile {compile_s:.1f} s, argument {ma.argument_size_in_bytes / 2**30:.2f} GiB, "
              f"temp {ma.temp_size_in_bytes / 2**30:.2f} GiB, s/call {sb.fmt_times(times) if times else '-'}{held}",
              flush=True)
        del compiled, lowered
    gib = lambda b: f"{b / 2**30:.2f}"  # noqa: E731
    sb.table(("step", "compile s", "argument GiB", "temp GiB", "peak GiB", "s/call"),
             [(n, f"{r['compile']:.1f}", gib(r["arg"]), gib(r["temp"]), gib(r["peak"]), f"{r['s']:.2f}")
              for n, r in res.items()])
    if len(res) < 3:
        sb.end_report(t_all)
        return
    s1, s2, tr = (res[k] for k in steps)
    adft_epoch = cfg.iter1 * s1["s"] + cfg.iter2 * s2["s"] + cfg.iter3 * tr["s"]
    aspl_epoch = 3 * tr["s"] + 6 * s2["s"] + 3 * tr["s"]
    print(f"# per epoch: ADFT (3 stage1 + 3 stage2 + 3 train) {adft_epoch:.1f} s; ASPL (3 clean train + 6 PGD + "
          f"3 adv train) {aspl_epoch:.1f} s; ratio ADFT/ASPL {adft_epoch / aspl_epoch:.2f}")
    print(f"# peak of one step: ADFT {gib(max(s1['peak'], s2['peak'], tr['peak']))} GiB (stage1 {gib(s1['peak'])}), "
          f"ASPL {gib(max(s2['peak'], tr['peak']))} GiB")
    sb.end_report(t_all)


if __name__ == "__main__":
    main()
