"""The §11 metrics of an edit pair (:func:`compare`), the victims' noise keys (:func:`edit_keys`) and the
per-image worst case over purifiers (:func:`worst_rows`)."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import numpy as np

from tdae_jax import prng
from tdae_jax import purify as purify_lib
from tdae_jax.evaluate.specs import EDIT_STEP, METRICS, MIN_SIDE
from tdae_jax.metrics import image as image_metrics


def compare(a, b, lpips_fn: Callable | None = None, psnr_cap: float | None = 100.0,
            metrics: Sequence[str] = METRICS, chunk: int | None = None) -> dict[str, np.ndarray]:
    """§11 metrics of ``a`` (test) vs ``b`` (reference), ``[N,H,W,3]`` in [0,1] -> ``{metric: [N] float64}``.

    LPIPS only with ``lpips_fn``; a metric the image is too small for is NaN (``MIN_SIDE``). ``chunk``: pad
    every call to this batch size (one compilation per shape, whatever N)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    n, side = a.shape[0], min(a.shape[1:3])
    chunk = chunk or n
    fns = {"psnr": functools.partial(image_metrics.psnr, max_db=psnr_cap), "ssim": image_metrics.ssim,
           "vifp": image_metrics.vifp, "fsim": image_metrics.fsim, "lpips": lpips_fn}
    out = {}
    for m in metrics:
        if fns.get(m) is None:
            continue
        if side < MIN_SIDE[m]:
            out[m] = np.full(n, np.nan)
            continue
        vals = []
        for i in range(0, n, chunk):
            aa, bb = a[i:i + chunk], b[i:i + chunk]
            k = aa.shape[0]
            if k < chunk:
                pad = np.repeat(aa[-1:], chunk - k, 0), np.repeat(bb[-1:], chunk - k, 0)
                aa, bb = np.concatenate([aa, pad[0]]), np.concatenate([bb, pad[1]])
            vals.append(np.asarray(fns[m](aa, bb), np.float64)[:k])
        out[m] = np.concatenate(vals)
    return out


@jax.jit
def _keys(seeds, uids, step):
    f = lambda s, u: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), u), step)  # noqa: E731
    return jax.random.key_data(jax.vmap(f)(seeds, uids))


def edit_keys(seeds: int | Sequence[int], ids: Sequence[str], step: int = EDIT_STEP) -> jax.Array:
    """``[B, 2]`` raw key data: the victim's noise for (seed, image id), i.e.
    ``prng.image_keys(prng.base_key(seed), prng.uids(ids), step)`` with one seed per id (or one for all)."""
    seeds = np.broadcast_to(np.asarray(seeds, np.int64), (len(ids),)).astype(np.uint32)
    return _keys(jax.numpy.asarray(seeds), jax.numpy.asarray(prng.uids(ids)).astype(jax.numpy.uint32),
                 jax.numpy.uint32(step))


def worst_rows(rows: list[dict], metrics: Sequence[str] = METRICS) -> list[dict]:
    """``kind="worst"`` rows: per (run, id, victim, seed), :func:`purify.worst_case` over the protection rows."""
    groups: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["kind"] == "protection":
            groups.setdefault((r["run"], r["id"], r["victim"], r["seed"]), {})[r["purify"]] = r
    out = []
    for per in groups.values():
        ms = [m for m in metrics if any(m in r for r in per.values())]
        value, which = purify_lib.worst_case({p: {m: r.get(m) for m in ms} for p, r in per.items()}, ms)
        first = next(iter(per.values()))
        out.append({**first, "kind": "worst", "purify": "worst", **{m: value[m] for m in metrics if m in value},
                    "worst_by": ";".join(f"{m}:{which[m]}" for m in metrics if which.get(m))})
    return out

