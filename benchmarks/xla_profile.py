#!/usr/bin/env python
"""Where the time of one PhotoGuard encoder step goes, JAX (XLA:CPU) next to PyTorch eager (the 256 px
gap). Not a test. Same step and weights as ``step_bench.py encoder``:

    python benchmarks/xla_profile.py --size 256

JAX: one compiled step run under ``jax.profiler.trace``; the XLA:CPU thunks' durations (from
``jax.profiler.ProfileData``) summed by kind (``ynn_fusion`` = YNNPACK convolutions with their fused epilogues,
``transpose_copy_fusion`` = the flipped kernels of the backward-input convolutions, ``*_fusion`` = elementwise
and GroupNorm loops), next to the step's FLOPs from ``cost_analysis()``. PyTorch: one step under
``torch.profiler`` (self CPU time by aten op). Each framework is timed alone (``--iters`` steps, median), in
this one process, JAX first.

``--by-layer`` adds a table per convolution layer shape (e.g. ``3x3/1 512->512 @32``): JAX's thunks attributed
to their Flax module through the HLO ``op_name`` metadata (forward vs ``transpose(jvp(...))``), torch's
convolution ops by their input shapes, so a gap can be traced to the layers where it arises.
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
    thunks: dict = collections.defaultdict(float)
    for plane in data.planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name.startswith(("ThunkExecutor", "$", "SlinkyThreadPool", "end:", "Pjit", "Common",
                                       "ParseArguments")):
                    continue
                k = kinds[re.sub(r"\.\d+$", "", ev.name)]
                k[0] += ev.duration_ns / 1e9
                k[1] += 1
                thunks[ev.name] += ev.duration_ns / 1e9
    return sb.med(times[1:]), flops, kinds, (thunks, compiled.as_text())


def thunk_owners(hlo: str) -> dict:
    """HLO instruction name -> (module path, 'fwd' | 'bwd'), from the ``op_name`` metadata of the instruction or,
    for a fusion without it, of its fused computation's root (or first instruction that has one: the kernel flips'
    root is a layout copy). ``transpose(jvp(...))`` marks the backward pass."""
    ops, calls, roots, comp = {}, {}, {}, None
    for line in hlo.splitlines():
        head = re.match(r"^%?([\w.\-]+) .*\{$", line)
        if head and not line.startswith(" "):
            comp = head.group(1)
            continue
        m = re.match(r"^\s*(ROOT )?%([\w.\-]+) = ", line)
        if not m:
            continue
        op = re.search(r'op_name="([^"]*)"', line)
        call = re.search(r"calls=%([\w.\-]+)", line)
        if op:
            ops[m.group(2)] = op.group(1)
            if comp and (m.group(1) or comp not in roots):
                roots[comp] = op.group(1)
        if call:
            calls[m.group(2)] = call.group(1)
    out = {}
    for name in set(ops) | set(calls):
        op = ops.get(name) or roots.get(calls.get(name, ""), "")
        path = re.match(r"^[^/]*/(transpose\()?[^/]*\)/(.*)$", op)
        if path:
            out[name] = (path.group(2), "bwd" if path.group(1) else "fwd")
    return out


def torch_conv_layers(tvae, run) -> dict:
    """Conv2d module path (Flax spelling) -> (signature, aten key): what each convolution of the torch encoder
    sees while ``run()`` does one step (forward hooks), so both frameworks' times can be grouped by layer shape."""
    import torch

    layers, hooks = {}, []
    for name, mod in tvae.named_modules():
        if isinstance(mod, torch.nn.Conv2d) and (name.startswith("encoder") or name == "quant_conv"):
            path = re.sub(r"\.(\d+)", r"_\1", name).replace(".", "/")

            def hook(m, inp, _out, path=path):
                n, c, h, w = inp[0].shape  # h odd: the downsampler's input, padded by one row (diffusers)
                kh, kw = m.kernel_size
                layers[path] = (f"{kh}x{kw}/{m.stride[0]} {c}->{m.out_channels} @{h - h % 2}",
                                (kh, kw, c, m.out_channels, h))
            hooks.append(mod.register_forward_hook(hook))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return layers


def by_layer(layers: dict, torch_events, jax_thunks) -> list:
    """Rows (signature, layers, jax fwd s, torch fwd s, jax bwd s, torch bwd s, torch/jax) per convolution
    shape: JAX thunks attributed to their Flax module by HLO metadata, torch's ``mkldnn_convolution`` /
    ``convolution_backward`` self times by input shapes."""
    thunks, hlo = jax_thunks
    owners = thunk_owners(hlo)
    key_sig = {key: sig for sig, key in layers.values()}
    groups = collections.defaultdict(lambda: {"n": 0, "jf": 0.0, "jb": 0.0, "tf": 0.0, "tb": 0.0})
    for sig, _ in layers.values():
        groups[sig]["n"] += 1
    paths = sorted(layers, key=len, reverse=True)
    for name, secs in thunks.items():
        path, direction = owners.get(name, ("", ""))
        layer = next((p for p in paths if path.startswith(p + "/")), None)
        if layer:
            groups[layers[layer][0]]["jf" if direction == "fwd" else "jb"] += secs
    for op, shapes, secs in torch_events:
        if op not in ("aten::mkldnn_convolution", "aten::convolution_backward") or len(shapes) < 2:
            continue
        x, w = (shapes[0], shapes[1]) if op == "aten::mkldnn_convolution" else (shapes[1], shapes[2])
        if len(x) != 4 or len(w) != 4:
            continue
        sig = key_sig.get((w[2], w[3], x[1], w[0], x[2]))
        if sig:
            groups[sig]["tf" if op == "aten::mkldnn_convolution" else "tb"] += secs
    rows = []
    for sig, g in sorted(groups.items(), key=lambda kv: -(kv[1]["jf"] + kv[1]["jb"])):
        j, t = g["jf"] + g["jb"], g["tf"] + g["tb"]
        rows.append((sig, g["n"], f"{g['jf']:.3f}", f"{g['tf']:.3f}", f"{g['jb']:.3f}", f"{g['tb']:.3f}",
                     f"{t / j:.2f}" if j else "-"))
    return rows


def torch_profile(size: int, iters: int, seed: int, tvae, batch: int = 1, shapes: bool = False):
    import numpy as np
    import torch

    import _torch_ref

    ref = _torch_ref.EncoderPGD(tvae, np.asarray(sb.host_batch(size, seed, batch)["x0"]), 0.03, 0.005)
    layers = torch_conv_layers(tvae, ref.step) if shapes else {}  # an extra warm-up step, under hooks
    times = []
    for _ in range(1 + iters):
        t0 = time.perf_counter()
        ref.step()
        times.append(time.perf_counter() - t0)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=shapes) as prof:
        ref.step()
    kinds = {e.key: [e.self_cpu_time_total / 1e6, e.count] for e in prof.key_averages()}
    events = [(e.key, e.input_shapes, e.self_cpu_time_total / 1e6)
              for e in prof.key_averages(group_by_input_shape=True)] if shapes else []
    return sb.med(times[1:]), kinds, (layers, events)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--batch", type=int, default=1, help="images per step")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--by-layer", action="store_true",
                   help="also compare the convolutions layer shape by layer shape (forward and input gradient)")
    args = sb.add_jax_args(p).parse_args(argv)
    sb.setup_jax(args)
    import _torch_ref

    sb.machine_report(_torch_ref.info())
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tvae = _torch_ref.build_vae(sb.SD15_VAE, args.seed, Path(d) / "vae")
        j_s, flops, j_kinds, j_thunks = jax_profile(args.size, args.iters, args.seed, Path(d) / "vae", args.batch)
    t_s, t_kinds, t_events = torch_profile(args.size, args.iters, args.seed, tvae, args.batch, args.by_layer)
    print(f"# SD-1.5 VAE encoder PGE step, {args.size} px, batch {args.batch}: XLA cost_analysis {flops / 1e9:.1f} GFLOP")
    print(f"# jax {j_s:.3f} s/step ({flops / 1e9 / j_s:.0f} GFLOP/s); torch {t_s:.3f} s/step "
          f"({flops / 1e9 / t_s:.0f} GFLOP/s at the same FLOPs); torch/jax {t_s / j_s:.2f}")
    for name, kinds in (("jax (XLA:CPU thunks)", j_kinds), ("torch (self CPU time, all threads)", t_kinds)):
        total = sum(v[0] for v in kinds.values())
        rows = sorted(kinds.items(), key=lambda kv: -kv[1][0])[:args.top]
        print(f"# {name}: profiled ops total {total:.3f} s")
        sb.table(("op", "calls", "s", "share"), [(k[:48], v[1], f"{v[0]:.3f}", f"{v[0] / total:.1%}")
                                                 for k, v in rows])
    if args.by_layer:
        print("# convolutions by layer shape (kh x kw / stride, channels, input px): seconds in one step, the "
              "backward pass being the input gradient (JAX: thunks owned by the layer, kernel flips included)")
        sb.table(("layer shape", "layers", "jax fwd", "torch fwd", "jax bwd", "torch bwd", "torch/jax"),
                 by_layer(*t_events, j_thunks))
    sb.end_report(t0)


if __name__ == "__main__":
    main()
