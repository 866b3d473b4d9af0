"""Seconds per iteration of a host and its TDAE variants, as ratios to the host (TDAE Table IV).

Each variant's compiled step runs once (compilation, not timed), then ``iters`` iterations are timed on the
same ``batch_size`` pairs, one variant after the other in one process, so the ratios compare like with like
on this machine. Results are kept in ``<workdir>/timing.json`` (a re-run reuses them).
"""
from __future__ import annotations

import json
import platform
import time

import numpy as np

from tdae_jax import objectives, prng
from tdae_jax.data import io as dio
from tdae_jax.evaluate import study
from tdae_jax.miniature import protection as mp

VARIANTS = ("", "fdm", "tdae", "tpa")


def _seconds_per_iter(sur, p: dict, c: study.StudyConfig, spec: str, eps: float, iters: int) -> float:
    prot = mp.make_protector(sur, eps, spec, iters, c.denoise_steps, batch_size=c.batch_size)
    n = min(prot.batch_size, len(p["source"]))
    x0 = p["source"][:n].astype(np.float32) / 255.0
    batch = {"x0": x0, "uid": prng.uids(p["ids"][:n]), **mp.text_batch(sur, p["instruction"][:n])}
    prot.run(batch, n, 1, prng.base_key(0))  # compile + one iteration
    t0 = time.perf_counter()
    prot.run(batch, n, iters, prng.base_key(0))
    return (time.perf_counter() - t0) / iters


def run(c: study.StudyConfig, store: study.Store, host: str, iters: int, log=print) -> dict:
    """``{"host", "eps", "batch", "iters", "machine", "seconds": {spec: s/it}}`` (cached in the workdir)."""
    from tdae_jax import models
    from tdae_jax.miniature import shipped

    path = store.root / "timing.json"
    key = {"host": host, "eps": float(max(c.eps, key=float)), "batch": c.batch_size, "iters": iters}
    cached = json.loads(path.read_text()) if path.is_file() else {}
    if all(cached.get(k) == v for k, v in key.items()) and "seconds" in cached:
        return cached
    sur = models.load("ip2p", shipped.path(c.surrogate))
    p = study.pairs(c)
    out = {**key, "machine": f"{platform.processor() or platform.machine()}, {_cores()} cores", "seconds": {}}
    for v in VARIANTS:
        spec = host + ("_" + v if v else "")
        if v in ("tdae",) and not objectives.uses_text(host):
            continue
        out["seconds"][spec] = _seconds_per_iter(sur, p, c, spec, key["eps"] / 255.0, iters)
        log(f"timing {spec}: {out['seconds'][spec]:.3f} s/iteration")
    dio.atomic_write_bytes(path, json.dumps(out, indent=1).encode())
    return out


def load(store: study.Store) -> dict:
    """The timing table computed by an earlier run, or ``{}``."""
    path = store.root / "timing.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def table(t: dict) -> str:
    """Markdown: seconds per iteration and the ratio to the host."""
    base = t["seconds"].get(t["host"])
    lines = ["## Cost per iteration (TDAE Table IV)\n",
             f"Host `{t['host']}`, batch {t['batch']}, eps {t['eps']:g}/255, {t['iters']} timed iterations per variant "
             f"after a warm-up, one after the other in one process ({t['machine']}).\n",
             "| protection | seconds / iteration | ratio to host |", "|---|---|---|"]
    for spec, s in t["seconds"].items():
        lines.append(f"| {spec} | {s:.3f} | {s / base:.2f}x |" if base else f"| {spec} | {s:.3f} | - |")
    return "\n".join(lines) + "\n"
