"""The customization study on the miniature world: a resumable grid with the TDAE study's statistics.

Grid: subjects x attacker seeds x defenses (the clean views, the noise control and each layer-1 defense at each
budget) x attacked models x attackers (DreamBooth, LoRA). The unit of the statistics is the **subject**: each
cell gives, per subject, the share of the attacker's samples that reproduce it, averaged over the attacker seeds
both sides of a comparison have. Every defense of a subject meets the same attacker draws (key per subject and
seed), so cells are compared pairwise over subjects (:func:`stats.paired_units_ci`: bootstrap interval over
subjects and the exact sign-flip test); a difference is written only when :func:`stats.verdict` supports it.

Workdir (``study_dir``): ``study.json`` (the settings; another value refuses the folder), ``protected/`` (one
subject's protected views per defense and budget, ``.npy``), ``rates/`` (one JSON per cell: ``{seed: {subject:
rate}}``, rewritten atomically after every attack) and ``grids/`` (the first subject's samples per cell). A
stopped study continues where it stopped with the same command.
"""
from __future__ import annotations

import dataclasses
import io
import json
import time
from pathlib import Path

import jax
import numpy as np

from tdae_jax import models
from tdae_jax.data import io as dio
from tdae_jax.miniature import customization as cz
from tdae_jax.miniature import shipped
from tdae_jax.runs import lock
from tdae_jax.runs.errors import UsageError

LOCK = "study.lock"


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    surrogate: str = "sd_a"
    victims: tuple = ("sd_a", "sd_b", "sd_c")
    methods: tuple = ("noise", "dladiff", "aspl", "fsmg")
    eps: tuple = (8.0, 16.0)  # 1/255 units
    attackers: tuple = ("dreambooth", "lora")
    seeds: tuple = (0, 1)  # attacker seeds
    subjects: int = 12
    views: int = 4
    subject_seed: int = 3000
    defense: cz.DefenseConfig = cz.DefenseConfig()
    attack: cz.AttackConfig = cz.AttackConfig()
    lora_lr: float = 1e-3

    def __post_init__(self):
        bad = [m for m in self.methods if m not in cz.METHODS[1:]]
        bad += [a for a in self.attackers if a not in cz.ATTACKERS]
        bad += [v for v in (self.surrogate, *self.victims) if v not in shipped.names() or shipped.family(v) != "sd"]
        if bad:
            raise UsageError(f"unknown defenses / attackers / text-to-image models: {bad} (defenses "
                             f"{cz.METHODS[1:]}, attackers {cz.ATTACKERS}, models "
                             f"{[n for n in shipped.names() if shipped.family(n) == 'sd']})")
        if self.subjects < 2 or not self.seeds or not self.eps:
            raise UsageError("need at least 2 subjects, one attacker seed and one budget")

    def attack_cfg(self, attacker: str) -> cz.AttackConfig:
        lr = self.lora_lr if attacker == "lora" else self.attack.lr
        return dataclasses.replace(self.attack, method=attacker, lr=lr)

    def variants(self) -> list[tuple[str, float]]:
        return [("none", 0.0)] + [(m, e) for m in self.methods for e in self.eps]

    def fingerprint(self) -> dict:
        """What determines a cell's rates (the grid's extent may grow between runs)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if k not in ("victims", "methods", "eps", "attackers", "seeds", "subjects")}


def cell_id(method: str, eps: float, victim: str, attacker: str) -> str:
    return f"{method}__{eps:g}__{victim}__{attacker}"


class Store:
    """The study's folder: settings check and atomic per-cell files."""

    def __init__(self, root, c: StudyConfig):
        self.root = Path(root)
        meta = self.root / "study.json"
        if meta.is_file():
            old = json.loads(meta.read_text())
            diff = sorted(k for k, v in json.loads(json.dumps(c.fingerprint())).items() if old.get(k) != v)
            if diff:
                raise UsageError(f"--study_dir={root} holds a study with other settings ({', '.join(diff)}); "
                                 "use a new --study_dir")
        for sub in ("protected", "rates", "grids"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        dio.atomic_write_bytes(meta, json.dumps(c.fingerprint(), indent=1).encode())

    def protected(self, method: str, eps: float, sid: int, make) -> np.ndarray:
        path = self.root / "protected" / f"{method}__{eps:g}__s{sid}.npy"
        if path.is_file():
            return np.load(path)
        views = make()
        buf = io.BytesIO()
        np.save(buf, views)
        dio.atomic_write_bytes(path, buf.getvalue())
        return views

    def rates(self, cid: str) -> dict:
        path = self.root / "rates" / f"{cid}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def add_rate(self, cid: str, seed: int, sid: int, rate: float) -> None:
        r = self.rates(cid)
        r.setdefault(str(seed), {})[str(sid)] = rate
        dio.atomic_write_bytes(self.root / "rates" / f"{cid}.json", json.dumps(r, indent=0).encode())

    def save_grid(self, cid: str, images) -> None:
        tiles = np.concatenate(list(images[:8]), axis=1)
        dio.save_png_atomic(self.root / "grids" / f"{cid}.png", tiles)


def run(c: StudyConfig, store: Store, log=print, on_subject=None) -> None:
    """Every missing attack of the grid, seed by seed and subject by subject (so a stopped study has whole
    subjects; ``on_subject()`` after each), holding the folder's lock; protections are computed once per subject
    and kept."""
    with lock.held(store.root / LOCK, store.root):
        _run(c, store, log, on_subject or (lambda: None))


def _run(c: StudyConfig, store: Store, log, on_subject) -> None:
    subj = cz.eligible_subjects(c.subject_seed, c.subjects, c.views, c.attack.min_px)
    sur = models.load("sd", shipped.path(c.surrogate))
    victims = {v: (sur if v == c.surrogate else models.load("sd", shipped.path(v))) for v in c.victims}
    key = jax.random.key(0)
    for seed in c.seeds:
        for i, sid in enumerate(subj["index"]):
            todo = [(m, e, v, a) for m, e in c.variants() for v in c.victims for a in c.attackers
                    if str(sid) not in store.rates(cell_id(m, e, v, a)).get(str(seed), {})]
            if not todo:
                continue
            views = _views(c, store, sur, subj, i, sid, jax.random.fold_in(key, sid), log)
            for m, e, v, a in todo:
                t0 = time.perf_counter()
                k = jax.random.fold_in(jax.random.fold_in(key, 100 + sid), seed)
                rate, imgs = cz.attack(victims[v], views[(m, e)], subj["instance_prompts"][i], subj["subjects"][i],
                                       k, c.attack_cfg(a))
                cid = cell_id(m, e, v, a)
                store.add_rate(cid, seed, sid, rate)
                if i == 0 and seed == c.seeds[0]:
                    store.save_grid(cid, imgs)
                log(f"seed {seed} subject {sid} {m}@{e:g} {a} on {v}: {rate:.0%} ({time.perf_counter() - t0:.0f} s)")
            on_subject()


def _views(c: StudyConfig, store: Store, sur, subj: dict, i: int, sid: int, key, log) -> dict:
    """``{(method, eps): protected uint8 views}`` of subject ``i``, from the store or computed (and stored)."""
    clean, prompt = subj["images"][i], subj["instance_prompts"][i]
    ids = [f"subject{sid}_view{v}" for v in range(len(clean))]
    static = []

    def make(m, e):
        t0 = time.perf_counter()
        if m in ("dladiff", "fsmg") and not static:
            static.append(cz.static_surrogate(sur, clean, prompt, c.defense, key))
        out = cz.protect(m, sur, clean, prompt, e / 255.0, key, c.defense, static=static[0] if static else None,
                         view_ids=ids)
        if dio.linf_uint8(out, clean) > int(e):
            raise AssertionError(f"subject {sid} {m}@{e:g}: budget exceeded on the 8-bit grid")
        log(f"subject {sid}: {m}@{e:g} protected in {time.perf_counter() - t0:.0f} s")
        return out

    return {(m, e): clean if m == "none" else store.protected(m, e, sid, lambda m=m, e=e: make(m, e))
            for m, e in c.variants()}


def units(store: Store, a: str, b: str) -> tuple[np.ndarray, np.ndarray, list]:
    """Per-subject rates of cells ``a`` and ``b``, each averaged over the seeds both have for that subject."""
    ra, rb = store.rates(a), store.rates(b)
    out_a, out_b, sids = [], [], []
    for sid in sorted({s for r in ra.values() for s in r}, key=int):
        seeds = [s for s in ra if sid in ra[s] and sid in rb.get(s, {})]
        if seeds:
            out_a.append(np.mean([ra[s][sid] for s in seeds]))
            out_b.append(np.mean([rb[s][sid] for s in seeds]))
            sids.append(sid)
    return np.asarray(out_a), np.asarray(out_b), sids
