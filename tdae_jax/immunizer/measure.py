"""Measurements of a trained immunizer on the miniature world: edit success of the victim on immunized images
against the reproduction study's rows on the same held-out pairs, and protect throughput against the per-image
defense (``python -m experiments.immunizer measure``; docs/immunizer.md reports its output).

Edit success: the study's protocol (``evaluate/study.py``: world seed 31337, its pairs, ``edit_outcomes`` = the
victim's 10-step edit with the study's fixed noise, scored by the world's oracle, ``miniature/oracle.py``). The
immunized images are ``quantize_protected(x, g(x), eps)`` (8-bit, within eps). The study's stored per-pair
outcomes (``<study_dir>/scores/<row>__<eps>__<threat>.json``) give the other rows on the same pairs; the clean
row is recomputed here and must equal the stored one (same editor, same noise), else the comparison is refused.
Paired comparisons: ``evaluate/stats.py`` (bootstrap interval of the difference, exact McNemar p).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import numpy as np

from tdae_jax.data import io as dio
from tdae_jax.evaluate import stats
from tdae_jax.evaluate import study as study_lib
from tdae_jax.immunizer import net as net_lib
from tdae_jax.immunizer import protect as protect_lib

STUDY_ROWS = ("none__0__any", "noise__{e}__any", "advdm__{e}__blind", "advdm_tdae__{e}__blind",
              "pgd_tdae__{e}__blind")


def immunize(net_cfg: net_lib.NetConfig, params, x_uint8: np.ndarray, batch: int = 32) -> np.ndarray:
    """``[n,H,W,3]`` uint8 immunized images (``max|x' - x| <= eps`` on the 8-bit grid)."""
    apply = protect_lib.make_apply(net_cfg)
    out = []
    for i in range(0, len(x_uint8), batch):
        x = x_uint8[i:i + batch]
        delta = np.asarray(jax.device_get(apply(params, np.asarray(x, np.float32) / 255.0)))
        out.append(dio.quantize_protected(x, delta, net_cfg.eps))
    return np.concatenate(out)


def stored_outcomes(study_dir, eps_255: int, key: str) -> dict[str, list[bool]]:
    """The study's per-pair outcomes of :data:`STUDY_ROWS` at ``eps_255`` under the score ``key`` (victim,
    purifier, sampler: ``study.score_key``); rows it has not computed are left out."""
    out = {}
    for row in STUDY_ROWS:
        path = Path(study_dir) / "scores" / f"{row.format(e=eps_255)}.json"
        if path.is_file():
            scores = json.loads(path.read_text())
            if key in scores:
                out[row.split("__")[0]] = [bool(v) for v in scores[key]]
    return out


def _compare(rows: dict[str, list[bool]]) -> dict:
    """Rates with intervals, and the immunizer paired against every other row (same pairs)."""
    return {"rates": {k: stats.rate_ci(v)._asdict() for k, v in rows.items()},
            "immunizer_vs": {k: stats.paired_diff_ci(v, rows["immunizer"])._asdict()
                             for k, v in rows.items() if k != "immunizer"}}


def victim_rows(study_dir, eps_255: int, sub: dict, immunized, victim: str, sur, purifiers, cfg) -> dict:
    """One victim: per purifier, the immunizer's outcomes and the study's rows on the same pairs, compared; and
    the worst case (a pair counts as edited when some purification, or none, lets the edit succeed: the study's
    worst-case column). The unpurified clean row is recomputed and must equal the study's stored one."""
    n, per = len(immunized), {}
    for pur in purifiers:
        rows = {k: v[:n] for k, v in stored_outcomes(study_dir, eps_255,
                                                     study_lib.score_key(victim, pur, cfg)).items()}
        if pur == "none":
            clean = study_lib.edit_outcomes(sub["source"], sub, victim, sur, cfg)
            if "none" in rows and rows["none"] != clean:
                raise ValueError(f"{victim}: the recomputed clean outcomes differ from the study's: not the same "
                                 "protocol")
            rows["none"] = clean
        rows["immunizer"] = study_lib.edit_outcomes(study_lib.purified(immunized, pur, sub), sub, victim, sur, cfg)
        per[pur] = rows
    out = {pur: _compare(rows) for pur, rows in per.items()}
    if len(per) > 1:
        shared = set.intersection(*(set(rows) for rows in per.values()))
        out["worst"] = _compare({k: np.any([per[p][k] for p in per], axis=0).tolist() for k in sorted(shared)})
    return out


def edit_success(train_dir, study_dir, n: int, victims=("ip2p_a",), purifiers=("none",), progress=print) -> dict:
    """Edit success of every victim (the study's intra, cross-model and SDEdit editors) on the first ``n`` study
    pairs, immunized, under each purifier, against the study's rows on the same pairs (:func:`victim_rows`)."""
    from tdae_jax.miniature import shipped

    if "none" not in purifiers:
        purifiers = ("none", *purifiers)
    net_cfg, params = protect_lib.load(train_dir)
    eps_255 = int(round(net_cfg.eps * 255))
    cfg = study_lib.StudyConfig()
    pairs = study_lib.pairs(cfg)
    sub = {k: (v[:n] if isinstance(v, (list, np.ndarray)) else v) for k, v in pairs.items()}
    t0 = time.perf_counter()
    immunized = immunize(net_cfg, params, sub["source"])
    progress(f"immunized {n} images in {time.perf_counter() - t0:.2f} s")
    out = {"n": n, "eps_255": eps_255, "world_seed": cfg.seed, "purifiers": list(purifiers),
           "linf_255": int(np.abs(immunized.astype(int) - sub["source"].astype(int)).max()), "victims": {}}
    for v in victims:
        progress(f"editing with {v} ({len(purifiers)} purifications)")
        out["victims"][v] = victim_rows(study_dir, eps_255, sub, immunized, v, shipped.load(v), purifiers, cfg)
    return out


def steady_seconds_per_image(workdir) -> float:
    """Seconds per image of a protect workdir's last batch (the first includes compilation): ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]
    secs = [r["seconds"] for r in rows if r.get("status") == "done" and r.get("seconds") is not None]
    if not secs:
        raise ValueError(f"{workdir}: no done image with a time")
    return float(secs[-1])


def tdae_args(eps: float, steps: int = 40) -> list[str]:
    """``experiments.tdae`` flags of the study's per-image AdvDM + TDAE row (miniature/protection.py
    ``make_protector``: K = 2 draws, no guidance, sign-PGD step max(eps/8, 1/255), DPD S = 10, M = 5)."""
    return ["--surrogate=ip2p", "--weights_dir=miniature:ip2p_a", "--objective=advdm", "--timesteps=2",
            "--guidance_scale=1.0", "--image_guidance_scale=1.0", "--defense=tdae", "--dpd_period=10",
            "--dpd_steps=5", f"--eps={eps!r}", f"--step_size={max(eps / 8, 1 / 255)!r}", "--step_decay=none",
            f"--steps={steps}", "--size=32", "--resize=none", "--ckpt_every=0", "--report=false",
            "--preview_edit=false", "--random_start=0"]


def throughput(train_dir, scratch, n: int, batch: int, progress=print) -> dict:
    """Images per second of ``experiments.immunizer protect`` and of the per-image ``experiments.tdae`` on the
    same ``n`` held-out world images (study pairs), one after the other on this machine; steady state (the last
    batch of each run, compilation excluded)."""
    import subprocess
    import sys

    from PIL import Image

    net_cfg, _ = protect_lib.load(train_dir)
    scratch = Path(scratch)
    images = scratch / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i, x in enumerate(study_lib.pairs(study_lib.StudyConfig())["source"][:n]):
        Image.fromarray(x).save(images / f"scene{i:03d}.png")
    common = [f"--images={images}", f"--batch_size={batch}", "--num_devices=1"]
    cmds = {"immunizer": [sys.executable, "-m", "experiments.immunizer", "protect", f"--immunizer={train_dir}",
                          f"--workdir={scratch / 'immunized'}", "--size=32", "--resize=none", "--report=false",
                          *common],
            "tdae": [sys.executable, "-m", "experiments.tdae", f"--workdir={scratch / 'tdae'}",
                     *tdae_args(net_cfg.eps), *common]}
    out = {"n": n, "batch": batch}
    for name, cmd in cmds.items():
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, capture_output=True, text=True)
        if rc.returncode != 0:
            raise RuntimeError(f"{name} exited {rc.returncode}: {rc.stderr.strip()[-2000:]}")
        spi = steady_seconds_per_image(scratch / ("immunized" if name == "immunizer" else "tdae"))
        out[name] = {"wall_seconds": round(time.perf_counter() - t0, 2), "steady_seconds_per_image": spi,
                     "images_per_second": 1.0 / spi if spi > 0 else float("inf")}
        progress(f"{name}: {out[name]}")
    out["ratio"] = out["immunizer"]["images_per_second"] / out["tdae"]["images_per_second"]
    return out
