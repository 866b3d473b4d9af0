"""Protect workdirs as evaluation inputs: :func:`read_run` (manifest + config), :func:`load_item` (clean and
protected images at the run's working size, imperceptibility at full resolution) and the edit prompts."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

import numpy as np

from tdae_jax import models
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest
from tdae_jax.evaluate.scores import compare
from tdae_jax.evaluate.specs import IMP_METRICS, UsageError

log = logging.getLogger("tdae_jax")


@dataclasses.dataclass
class Item:
    run: "RunInfo"
    id: str
    source: str
    protected_path: Path
    clean: np.ndarray | None = None  # [H,W,3] float32 working
    protected: np.ndarray | None = None
    imp: dict = dataclasses.field(default_factory=dict)
    mask: np.ndarray | None = None  # [H,W,1] for inpaint victims (prompts' "mask" column), None = centre

    @property
    def source_key(self):
        return (self.source, self.id, self.run.size, self.run.resize)


@dataclasses.dataclass
class RunInfo:
    path: Path
    name: str
    config: dict
    items: list[Item]
    prompts: dict

    @property
    def surrogate(self) -> str:
        c = self.config
        return f"{c.get('surrogate', '?')}:{Path(c['weights_dir']).name if c.get('weights_dir') else 'tiny'}"

    @property
    def eps(self) -> float:
        return float((self.config.get("budget") or {}).get("eps", math.nan))

    @property
    def size(self):
        return self.config.get("size")

    @property
    def resize(self) -> str:
        return self.config.get("resize", "center_crop")

    @property
    def label(self) -> str:
        return f"{self.surrogate} [{self.name}]"

    def meta(self) -> dict:
        c = self.config
        return {"run": self.name, "surrogate": self.surrogate, "objective": (c.get("objective") or {}).get("name", ""),
                "defense": c.get("defense", ""), "eps": self.eps, "eot": c.get("eot") or "none"}


def read_run(path, size_override: int | None = None, max_images: int = 0) -> tuple[RunInfo, list[str]]:
    """Reads a protect workdir. Returns the run and a list of problems (done images that cannot be used)."""
    path = Path(path)
    if not (path / "config.json").is_file() or not (path / "manifest.json").is_file():
        raise UsageError(f"{path}: not a protect workdir (needs config.json and manifest.json; run "
                         f"python -m experiments.tdae first)")
    try:
        config = json.loads((path / "config.json").read_text())
        entries = Manifest(path / "manifest.json").entries()
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable config.json / manifest.json: {e}") from e
    if size_override:
        config = {**config, "size": int(size_override),
                  "resize": "center_crop" if config.get("resize") == "none" else config.get("resize", "center_crop")}
    run = RunInfo(path, path.resolve().name, config, [], {})
    problems = []
    done = [e for e in entries if isinstance(e, dict) and e.get("status") == "done"]
    if max_images:
        done = done[:max_images]
    if not done:
        problems.append(f"{path}: no protected images (no manifest entry with status 'done')")
    if config.get("prompts"):
        try:
            run.prompts, probs = dio.load_prompts(config["prompts"], image_paths=[e["source"] for e in done])
            problems.extend(f"{path}: prompts: {p}" for p in probs if p.path is not None)
        except (dio.DataError, OSError) as e:
            log.warning("%s: prompts file unusable (%s); using the default prompt", path, e)
    for e in done:
        prot = path / ((e.get("outputs") or {}).get("protected") or f"protected/{e['id']}.png")
        run.items.append(Item(run, e["id"], e["source"], prot))
    return run, problems


def load_item(item: Item, lpips_fn, psnr_cap: float) -> None:
    """Loads clean / protected at the run's working size and computes imperceptibility (full resolution)."""
    size = item.run.size if item.run.resize != "none" else None
    kw = dict(size=size, resize=item.run.resize, min_side=1)
    src = dio.load_image(item.source, image_id=item.id, **kw)
    prot = dio.load_image(item.protected_path, image_id=item.id, **kw)
    if prot.original_uint8.shape != src.original_uint8.shape:
        raise dio.DataError(f"{item.protected_path}: size {prot.original_uint8.shape[:2]} differs from the "
                            f"original {item.source} {src.original_uint8.shape[:2]}")
    item.clean, item.protected = src.array, prot.array
    a = np.asarray(prot.original_uint8, np.float32)[None] / 255.0
    b = np.asarray(src.original_uint8, np.float32)[None] / 255.0
    scores = compare(a, b, lpips_fn if "lpips" in IMP_METRICS else None, psnr_cap, metrics=IMP_METRICS)
    item.imp = {f"imp_{k}": float(v[0]) for k, v in scores.items()}
    item.imp["imp_linf_255"] = int(dio.linf_uint8(prot.original_uint8, src.original_uint8))
    rec = _find_prompt(item)
    if rec and rec.get("mask"):
        m = dio.load_image(Path(item.source).parent / rec["mask"] if not Path(rec["mask"]).is_absolute()
                           else rec["mask"], **kw).array
        item.mask = (m.mean(-1, keepdims=True) >= 0.5).astype(np.float32)


def _find_prompt(item: Item):
    from tdae_jax.data.manifest import find_prompt

    return find_prompt(item.run.prompts, item.id, item.source) if item.run.prompts else None


def prompt_for(item: Item, family: str, override: str = "") -> str:
    """The edit text: ``override``, else the run's prompts row (ip2p: instruction; sd/inpaint: edited_prompt,
    caption, instruction), else the run's default prompt."""
    if override:
        return override
    default = item.run.config.get("default_prompt") or "make it a watercolor painting"
    return models.edit_text(_find_prompt(item), family, default)

