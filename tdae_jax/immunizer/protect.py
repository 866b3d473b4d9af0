"""Protect a folder of images with a trained immunizer: one forward pass per image, budget-exact PNGs.

The trained network is two files in the training workdir (``save`` / ``load``): ``immunizer.msgpack`` (Flax
msgpack parameters, never pickled) and ``immunizer.json`` (architecture and eps). ``protect_folder`` is the
workdir contract of ``experiments.tdae`` (docs/design.md convention 8) built from the same run engine pieces
(``tdae_jax/runs/``): ``Workdir.preflight`` (read-only: every usage error before anything is written) and
``Workdir.open`` (lock + resumable ``manifest.json`` recording the network's hash, eps and working size),
``inputs.select`` / ``inputs.load`` (a bad input is a failed row naming the file, the others go on),
``batches.run`` (batches of one working shape, a failing batch fails its rows only), ``finish.finish_image``
(perturbation snapped onto the 1/255 grid inside eps at the original resolution, atomic PNG, L_inf / PSNR /
SSIM of the PNG read back) and ``report.write_run_files`` / ``write_report`` (metrics.jsonl/csv, config.json,
report.html). The forward pass is one ``jax.jit`` with the batch split over the mesh's ``data`` axis and the
parameters replicated; batches are padded to a fixed size so each working shape traces once.

Not reused: the pipeline's optimisation loop and checkpoints (a forward pass has no iterations to resume) and
its preview edits (the immunizer's workdir names no surrogate).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from pathlib import Path

import jax
import numpy as np

from tdae_jax.data import io as dio
from tdae_jax.immunizer import net as net_lib
from tdae_jax.parallel import mesh as meshlib
from tdae_jax.parallel import multihost
from tdae_jax.runs import batches as run_batches
from tdae_jax.runs import finish as run_finish
from tdae_jax.runs import inputs as run_inputs
from tdae_jax.runs import report as run_report
from tdae_jax.runs.errors import UsageError
from tdae_jax.runs.workdir import Workdir

PARAMS_FILE, CONFIG_FILE = "immunizer.msgpack", "immunizer.json"
SHIPPED = Path(__file__).resolve().parents[1] / "miniature" / "immunizer"  # ``--immunizer=shipped``


def resolve(train_dir) -> Path:
    """``"shipped"`` -> the network shipped with the package (trained on the 32 px miniature world); else as given."""
    return SHIPPED if str(train_dir) == "shipped" else Path(train_dir)


@dataclasses.dataclass(frozen=True)
class ProtectConfig:
    """A protect run. ``immunizer``: the training workdir holding the network, or ``shipped`` (:func:`resolve`);
    ``size``: working resolution (None with ``resize="none"``); ``batch_size``: images per forward pass."""

    images: str
    workdir: str
    immunizer: str
    size: int | None = 32
    resize: str = "center_crop"
    batch_size: int = 8
    report: bool = True
    overwrite: bool = False
    num_devices: int | None = None
    eps: float | None = None  # if given, must equal the trained network's (the budget is part of the network)


def save(train_dir, cfg: net_lib.NetConfig, params) -> Path:
    """Write the trained network into ``train_dir`` (atomically); returns the parameters' path."""
    blob, meta = net_lib.to_bytes(cfg, params)
    d = Path(train_dir)
    d.mkdir(parents=True, exist_ok=True)
    dio.atomic_write_bytes(d / CONFIG_FILE, meta)
    dio.atomic_write_bytes(d / PARAMS_FILE, blob)
    return d / PARAMS_FILE


def load(train_dir):
    """``(NetConfig, params)`` of a trained immunizer; FileNotFoundError names the missing file."""
    d = resolve(train_dir)
    for name in (CONFIG_FILE, PARAMS_FILE):
        if not (d / name).is_file():
            raise FileNotFoundError(f"{d / name}: no trained immunizer there (run `experiments.immunizer train` "
                                    "with this --workdir first)")
    return net_lib.from_bytes((d / PARAMS_FILE).read_bytes(), (d / CONFIG_FILE).read_bytes())


def make_apply(cfg: net_lib.NetConfig, mesh=None):
    """Jitted ``(params, x [B,H,W,3]) -> delta``, batch over ``data`` and parameters replicated when ``mesh``
    is given; retraced once per input shape (the network is fully convolutional)."""
    module = net_lib.Immunizer(cfg)
    if mesh is None:
        return jax.jit(module.apply)
    data, repl = meshlib.batch_sharding(mesh), meshlib.replicated(mesh)
    return jax.jit(module.apply, in_shardings=(repl, data), out_shardings=data)


def settings(cfg: ProtectConfig, net_cfg: net_lib.NetConfig) -> dict:
    """What determines the protected images (recorded in the manifest; a resumed run must match)."""
    blob = (resolve(cfg.immunizer) / PARAMS_FILE).read_bytes()
    return {"immunizer_sha256": hashlib.sha256(blob).hexdigest(), "eps": net_cfg.eps,
            "features": list(net_cfg.features), "size": cfg.size, "resize": cfg.resize}


def _plan(cfg: ProtectConfig):
    """``(net_cfg, params, paths, failures, mesh)``; every problem a ``UsageError`` (nothing written)."""
    if cfg.batch_size < 1:
        raise UsageError(f"--batch_size must be >= 1, got {cfg.batch_size}")
    try:
        net_cfg, params = load(cfg.immunizer)
    except (OSError, ValueError, KeyError) as e:
        raise UsageError(f"--immunizer: {e}") from e
    if cfg.eps is not None and abs(cfg.eps - net_cfg.eps) > 1e-9:
        raise UsageError(f"--eps={cfg.eps:.6g}: the budget is part of the trained network ({net_cfg.eps:.6g}); "
                         "leave --eps out or train another network")
    workdir = Path(cfg.workdir).expanduser().resolve()
    try:
        listing = dio.list_inputs(cfg.images, exclude=workdir)
        dio.check_output_dir(workdir, sorted({p.parent for p in listing.paths}))
    except (dio.DataError, OSError) as e:
        raise UsageError(str(e)) from e
    try:
        mesh = meshlib.make_mesh(cfg.num_devices)
    except ValueError as e:
        raise UsageError(f"--num_devices: {e}") from e
    if multihost.info().count > 1:
        raise UsageError("protect runs in one process (a forward pass per image needs no more); start it once")
    failures = [(f"{run_inputs.INPUT_ROW}{q.name}", f"{q}: {why}", q) for q, why in listing.rejected]
    return net_cfg, params, listing.paths, failures, mesh


def _protect_fn(apply, params, loaded: dict, per: int):
    """``protect(batch_index, ids, on_iter) -> BatchResult``: one padded forward pass."""

    def protect(bi, ids, on_iter):
        x = np.stack([loaded[i].array for i in ids]).astype(np.float32)
        x = np.concatenate([x, np.repeat(x[-1:], per - len(ids), axis=0)]) if len(ids) < per else x
        delta = np.asarray(jax.device_get(apply(params, x)))[: len(ids)]  # no iterations: no progress line
        return run_batches.BatchResult(delta=delta, history={})

    return protect


def protect_folder(cfg: ProtectConfig, progress=print) -> dict:
    """Protect every image of ``cfg.images`` into ``cfg.workdir``; returns ``{"done", "failed", "skipped"}`` id
    lists and ``rows``. ``UsageError`` (nothing written) for a run that cannot start."""
    net_cfg, params, paths, failures, mesh = _plan(cfg)
    proc = multihost.info()
    wd = Workdir(cfg.workdir, proc)
    recorded = settings(cfg, net_cfg)
    wd.preflight(recorded, overwrite=cfg.overwrite)
    per = meshlib.padded_size(cfg.batch_size, mesh)
    apply, params = make_apply(net_cfg, mesh), meshlib.replicate(params, mesh)
    with wd.open(recorded, overwrite=cfg.overwrite) as manifest:
        with wd.writing("manifest.json"):
            sel = run_inputs.select(manifest, paths, [], proc, failures=failures)
            loaded = run_inputs.load(sel, manifest, size=cfg.size, resize=cfg.resize)
        if sel.skipped:
            progress(f"resuming: {len(sel.skipped)} of {sel.total} inputs already done or failed (not retried)")
        work = run_inputs.batches(loaded, per, proc)
        finish = functools.partial(_finish, wd, manifest, loaded, net_cfg.eps)
        t0 = time.perf_counter()
        run_batches.run(wd, manifest, work, _protect_fn(apply, params, loaded, per), finish,
                        run_batches.Clock(len(work), 1, progress))
        seconds = time.perf_counter() - t0
        progress(f"{len(loaded)} image(s) protected and written in {seconds:.2f} s ({len(work)} batch(es) of {per})")
        entries = run_report.merged_entries(manifest, sel.owned, proc)
        rows = [run_report.row(e) for e in entries]
        if proc.is_main:
            run_report.write_run_files(wd, rows, cfg)
            if cfg.report:
                run_report.write_report(wd, "tdae_jax immunizer protection report", entries, net_cfg.eps,
                                        _summary(cfg, net_cfg), {})
    return {"done": [e["id"] for e in entries if e["status"] == "done"],
            "failed": [e["id"] for e in entries if e["status"] == "failed"], "skipped": sel.skipped,
            "rows": rows, "seconds": seconds, "protected_now": len(loaded)}


def _finish(wd, manifest, loaded: dict, eps: float, image_id: str, delta, hist: dict, secs: float, outputs):
    return run_finish.finish_image(wd, manifest, loaded[image_id], delta, hist, secs, eps, outputs)


def _summary(cfg: ProtectConfig, net_cfg: net_lib.NetConfig) -> dict:
    return {"method": "amortized immunizer g(x) (one forward pass per image)", "immunizer": str(cfg.immunizer),
            "eps": f"{net_cfg.eps:.4f} ({net_cfg.eps * 255:.2f}/255)", "network": f"U-Net {list(net_cfg.features)}"}
