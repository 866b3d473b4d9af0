"""Inputs of a run: which manifest entries this process does, their loading, and the batches they form.

Per-process split: every process registers every input (same ids everywhere) and owns every P-th one in sorted
order (a disjoint, deterministic shard, parallel/multihost.py). An input that cannot be read, or whose prompt row
is unusable, is a failed row naming the file and the problem; the others go on. Batches group images of one
working shape, ``per`` at a time; in a multi-process run every process runs the same number of global batches
(SPMD), padding with empty ones. Nothing here knows the defense: batches are lists of ids.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Callable

from tdae_jax.data import io as dio
from tdae_jax.data.manifest import Manifest
from tdae_jax.parallel import multihost

log = logging.getLogger("tdae_jax")
PROMPT_ROW = "prompt:"  # ids of failed prompt rows that name no existing image or no listed input
INPUT_ROW = "input:"  # ids of listed entries rejected before loading (a link to one of the run's outputs)


@dataclasses.dataclass
class Selection:
    """``owned``: ids this process is responsible for; ``todo``: its entries to run now; ``skipped``: its ids
    already done (or failed, without ``retry_failed``); ``bad_prompt``: source path -> unusable prompt row."""

    owned: set
    todo: list
    skipped: list
    bad_prompt: dict
    total: int


def select(manifest: Manifest, paths, prompt_problems, proc: multihost.ProcessInfo, *,
           retry_failed: bool = False, failures=()) -> Selection:
    """Registers ``paths``, the prompt rows that name no image and ``failures`` (``(id, message, source)``:
    entries rejected by the listing) as failed rows, then picks this process's work."""
    entries = manifest.sync(paths)
    for image_id, message, source in failures:
        log.error("%s", message)
        manifest.add_failure(image_id, message, source=source)
    owned = {e["id"] for k, e in enumerate(entries) if k % proc.count == proc.index}
    bad_prompt = {}
    for problem in prompt_problems:
        log.error("prompts: %s", problem)
        if problem.path is not None and Path(problem.path).exists():
            bad_prompt[str(Path(problem.path).resolve())] = str(problem)
        else:  # the row names no existing image: it is a failed input of its own
            manifest.add_failure(f"{PROMPT_ROW}{problem.key or problem.line}", str(problem), source=problem.file)
    mine = [e for e in entries if e["id"] in owned]
    todo = [e for e in mine if e["status"] != "done" and (retry_failed or e["status"] != "failed")]
    skipped = [e["id"] for e in mine if e not in todo]
    return Selection(owned, todo, skipped, bad_prompt, len(entries))


def load(sel: Selection, manifest: Manifest, *, size: int | None, resize: str) -> dict[str, dio.LoadedImage]:
    """Loads the entries to do; a failure marks that entry failed (with a message naming the file) and goes on."""
    loaded = {}
    for e in sel.todo:
        try:
            li = dio.load_image(e["source"], size=size, resize=resize, image_id=e["id"])
            for w in li.warnings:
                log.warning("%s: %s", e["source"], w)
            if e["source"] in sel.bad_prompt:
                raise dio.DataError(f"{e['source']}: unusable prompt row: {sel.bad_prompt[e['source']]}")
            loaded[e["id"]] = li
        except (dio.DataError, OSError) as err:
            manifest.mark(e["id"], "failed", error=str(err))
            log.error("%s", err)
    return loaded


def batches(loaded: dict[str, dio.LoadedImage], per: int, proc: multihost.ProcessInfo,
            gather: Callable = multihost.allgather_json) -> list[list[str]]:
    """Lists of ids, at most ``per`` of one working shape each; every process gets as many (empty ones pad)."""
    groups: dict[tuple, list[str]] = {}
    for i, li in loaded.items():
        groups.setdefault(li.array.shape, []).append(i)
    work = [ids[j:j + per] for ids in groups.values() for j in range(0, len(ids), per)]
    if proc.count > 1:  # SPMD: every process runs the same number of global batches
        n_batches = max(gather(len(work), proc))
        work += [[] for _ in range(n_batches - len(work))]
    return work
