"""The evaluation loop (:class:`Runner`): load runs and victims, purify, edit (deduplicated jobs, padded
batches), compare, CLIP scores, report thumbnails."""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path
from typing import Callable

import numpy as np

from tdae_jax import purify as purify_lib
from tdae_jax.data import io as dio
from tdae_jax.evaluate.runs import Item, RunInfo, _find_prompt, load_item, prompt_for, read_run
from tdae_jax.evaluate.scores import compare, edit_keys, worst_rows
from tdae_jax.evaluate.specs import (CLIP_METRICS, METRICS, EvalConfig, UsageError, VictimSpec, load_clip,
                                     load_model, parse_model)
from tdae_jax.evaluate.unit_cache import UnitCache

log = logging.getLogger("tdae_jax")


@dataclasses.dataclass
class EvalResult:
    rows: list[dict]
    failures: list[str]
    outdir: Path
    runs: list[RunInfo]
    thumbs: dict  # (victim, run, id) -> {caption: uint8 [H,W,3]}



def _u8(x) -> np.ndarray:
    return np.round(np.clip(np.asarray(x, np.float64), 0, 1) * 255).astype(np.uint8)


def centre_mask(h: int, w: int) -> np.ndarray:
    """``[H,W,1]``: the centre half of the image (the objectives' default inpainting mask)."""
    m = np.zeros((h, w, 1), np.float32)
    m[h // 4:3 * h // 4, w // 4:3 * w // 4] = 1.0
    return m


class _Jobs:
    """Edit jobs of one victim, deduplicated by content: two logical jobs with the same pixels, mask, prompt,
    seed and image id are edited once (so an identity purifier reproduces edit(protected) bit for bit)."""

    def __init__(self):
        self.jobs: dict = {}  # content key -> (image, prompt, seed, image id, mask)
        self.alias: dict = {}  # logical key -> content key

    def add(self, key, image, prompt, seed, image_id, mask=None):
        digest = hashlib.sha1(np.ascontiguousarray(image, np.float32).tobytes()).hexdigest()
        mdig = None if mask is None else hashlib.sha1(np.ascontiguousarray(mask, np.float32).tobytes()).hexdigest()
        ck = (digest, image.shape, mdig, prompt, int(seed), image_id)
        self.jobs.setdefault(ck, (image, prompt, seed, image_id, mask))
        self.alias[key] = ck
        return key

    def run(self, editor, surrogate, batch_size: int, progress: Callable[[str], None] | None = None,
            label: str = "edit batch") -> dict:
        """Edits every job in batches of ``batch_size`` (padded: one compilation per image shape); returns
        logical key -> ``[H,W,3]`` float32. ``progress``: a ``runtime.Ticker`` line after each batch."""
        from tdae_jax import editors, runtime

        by_shape: dict[tuple, list] = {}
        for k, j in self.jobs.items():
            by_shape.setdefault(j[0].shape, []).append(k)
        done = {}
        inpaint = editor.config.kind == "inpaint"
        tick = runtime.Ticker(sum(-(-len(k) // batch_size) for k in by_shape.values()), progress or (lambda _: None),
                              label)
        for shape, keys in by_shape.items():
            for i in range(0, len(keys), batch_size):
                ks = keys[i:i + batch_size]
                js = [self.jobs[k] for k in ks] + [self.jobs[ks[-1]]] * (batch_size - len(ks))
                imgs = np.stack([j[0] for j in js])
                emb, uncond = editors.embed_prompts(surrogate, [j[1] for j in js])
                keyd = edit_keys([j[2] for j in js], [j[3] for j in js])
                mask = (np.stack([j[4] if j[4] is not None else centre_mask(*shape[:2]) for j in js])
                        if inpaint else None)
                res = np.asarray(editor(imgs, emb, uncond, keyd, mask=mask), np.float32)
                done.update(zip(ks, res[:len(ks)]))
                tick.step()
        return {k: done[ck] for k, ck in self.alias.items()}


class Runner:
    """The evaluation loop: load runs and victims, purify, edit, compare (module docstring)."""

    METRIC_CHUNK = 8

    def __init__(self, cfg: EvalConfig, progress: Callable[[str], None] = log.info):
        self.cfg, self.progress = cfg, progress
        if not cfg.runs:
            raise UsageError("no runs: give --runs=WORKDIR[,WORKDIR...] (protect workdirs)")
        if not cfg.victims:
            raise UsageError("no victims: give --victims=NAME:FAMILY:SOURCE[,...]")
        if not cfg.seeds or len(set(cfg.seeds)) != len(cfg.seeds):
            raise UsageError(f"--seeds must be a non-empty list of distinct integers, got {list(cfg.seeds)}")
        if cfg.batch_size < 1:
            raise UsageError(f"--batch_size must be >= 1, got {cfg.batch_size}")
        try:
            self.purifier_specs = purify_lib.parse(cfg.purify) or (purify_lib.PurifierSpec("none"),)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.copts = {"xla_backend_optimization_level": 0} if cfg.fast_compile else None
        self.lpips_fn = None
        if cfg.lpips_weights:
            from tdae_jax.metrics.lpips import load_lpips_params, make_lpips_fn

            try:
                self.lpips_fn = make_lpips_fn(load_lpips_params(list(cfg.lpips_weights), cfg.lpips_net), cfg.lpips_net)
            except (OSError, ValueError, KeyError) as e:
                raise UsageError(f"--lpips_weights: {e}") from e
        self.clip = load_clip(cfg.clip_dir) if cfg.clip_dir else None
        if self.clip is not None and self.clip.static.tokenizer is None:
            log.warning("--clip_weights %s: no tokenizer files (vocab.json, merges.txt): clip_dir stays NaN",
                        cfg.clip_dir)
        self._clip_text: dict[str, np.ndarray] = {}
        self.failures: list[str] = []
        self.runs = []
        for r in cfg.runs:
            info, problems = read_run(r, cfg.size, cfg.max_images)
            self.runs.append(info)
            self.failures.extend(problems)
        names = [r.name for r in self.runs]
        if len(set(names)) != len(names):
            raise UsageError(f"run folder names must be unique (they label the rows), got {names}")
        self.models = {}
        for v in cfg.victims:
            progress(f"loading victim {v.name} ({v.family} from {v.source})")
            self.models[v.name] = load_model(v.family, v.source)
        self.editors = {}
        from tdae_jax import editors

        for v in cfg.victims:
            try:
                self.editors[v.name] = editors.make_editor(surrogate=self.models[v.name], compiler_options=self.copts,
                                                           **v.editor_kwargs(cfg.edit))
            except ValueError as e:
                raise UsageError(f"victim {v.name}: {e}") from e
        pmodel = None
        if any(p.needs_model for p in self.purifier_specs):
            if cfg.purifier_model:
                m = parse_model(cfg.purifier_model)
                pmodel = load_model(m.family, m.source)
            else:
                sd = [v for v in cfg.victims if v.family == "sd"]
                if not sd:
                    raise UsageError("diffpure / noisyup need an 'sd' model: give --purifier_model=sd:SOURCE or an "
                                     "sd victim")
                pmodel = self.models[sd[0].name]
        try:
            self.purifiers = [purify_lib.Purifier(p, pmodel, cfg.purify_steps, cfg.noisyup_sigma,
                                                  compiler_options=self.copts) for p in self.purifier_specs]
        except ValueError as e:
            raise UsageError(str(e)) from e

    # -------------------------------------------------------------------------------------------------
    def run(self) -> EvalResult:
        cfg = self.cfg
        items = []
        for r in self.runs:
            for it in r.items:
                try:
                    load_item(it, self.lpips_fn, cfg.psnr_cap_db)
                    items.append(it)
                except (dio.DataError, OSError, ValueError) as e:
                    self.failures.append(f"{r.name}/{it.id}: {e}")
                    log.error("%s/%s: %s", r.name, it.id, e)
        self.report_set = {(r.name, it.id) for r in self.runs for it in
                           [i for i in r.items if i.clean is not None][:cfg.report_images]}
        groups: dict[tuple, list[Item]] = {}
        for it in items:
            groups.setdefault(it.source_key, []).append(it)
        order = list(groups)
        rows, thumbs = [], {}
        cache = UnitCache(cfg.outdir, cfg)
        for c in range(0, len(order), cfg.batch_size):
            chunk = [groups[k] for k in order[c:c + cfg.batch_size]]
            self._chunk(chunk, f"sources {c + 1}-{c + len(chunk)} of {len(order)}", cache, rows, thumbs)
        if len(self.purifiers) > 1:
            rows.extend(worst_rows(rows, METRICS + CLIP_METRICS))
        return EvalResult(rows, self.failures, Path(cfg.outdir), self.runs, thumbs)

    def _chunk(self, chunk, label: str, cache: UnitCache, rows: list, thumbs: dict) -> None:
        """Every victim on one batch of sources: stored units are loaded, the others computed and stored."""
        todo = []
        for v in self.cfg.victims:
            got = cache.load(v.name, chunk)
            if got is None:
                todo.append(v)
            else:
                rows.extend(got[0])
                thumbs.update(got[1])
        if len(todo) < len(self.cfg.victims):
            self.progress(f"{label}: {len(self.cfg.victims) - len(todo)} victim(s) loaded from an earlier run")
        if not todo:
            return
        self.progress(f"{label}: purifying ({', '.join(p.name for p in self.purifiers)})")
        pur = self._purify(chunk)
        for v in todo:
            self.progress(f"{label}: victim {v.name}")
            unit_thumbs: dict = {}
            try:
                unit_rows = self._victim(v, chunk, pur, unit_thumbs)
            except Exception as e:  # noqa: BLE001 - one victim failing must not lose the others
                self.failures.append(f"victim {v.name} on {[g[0].id for g in chunk]}: {type(e).__name__}: {e}")
                log.exception("victim %s failed", v.name)
                continue
            cache.save(v.name, chunk, unit_rows, unit_thumbs)
            rows.extend(unit_rows)
            thumbs.update(unit_thumbs)

    def _random(self, p) -> bool:
        return p.spec.kind in ("noise", "diffpure", "noisyup")

    def _purify(self, chunk) -> dict:
        """{(image key, purifier, seed or None): purified [H,W,3]} for the protected (and clean) images."""
        inputs = []  # (image key, image, id)
        for group in chunk:
            for it in group:
                inputs.append((("prot", it.run.name, it.id), it.protected, it.id))
            if self.cfg.purifier_cost:
                it = group[0]
                inputs.append((("clean", it.source_key), it.clean, it.id))
        out = {}
        for p in self.purifiers:
            if p.name == "none":
                continue
            seeds = self.cfg.seeds if self._random(p) else (None,)
            for s in seeds:
                by_shape: dict = {}
                for key, img, iid in inputs:
                    by_shape.setdefault(img.shape, []).append((key, img, iid))
                for lst in by_shape.values():
                    b = self.cfg.batch_size
                    for i in range(0, len(lst), b):
                        part = lst[i:i + b]
                        full = part + [part[-1]] * (b - len(part))
                        keys = edit_keys(0 if s is None else s, [x[2] for x in full], purify_lib.stream(p.name))
                        res = p(np.stack([x[1] for x in full]), keys)
                        out.update({(x[0], p.name, s): res[j] for j, x in enumerate(part)})
        return out

    def _get(self, pur, key, image, p, seed):
        if p.name == "none":
            return image
        return pur[(key, p.name, seed if self._random(p) else None)]

    def _victim(self, v: VictimSpec, chunk, pur, thumbs) -> list[dict]:
        cfg, seeds = self.cfg, list(self.cfg.seeds)
        jobs, pairs = _Jobs(), []
        for group in chunk:
            for it in group:
                prompt, sk = prompt_for(it, v.family, cfg.prompt), it.source_key
                pk = ("prot", it.run.name, it.id)
                for si, s in enumerate(seeds):
                    add = lambda key, img, seed=s: jobs.add(  # noqa: E731
                        key + (seed, prompt), img, prompt, seed, it.id, it.mask)
                    ref = add(("clean", sk, "none"), it.clean)
                    for p in self.purifiers:
                        t = add(("prot", pk, p.name), self._get(pur, pk, it.protected, p, s))
                        pairs.append((it, {"kind": "protection", "purify": p.name, "seed": s, **it.imp}, t, ref))
                        if cfg.purifier_cost and p.name != "none":
                            t = add(("clean", sk, p.name), self._get(pur, ("clean", sk), it.clean, p, s))
                            pairs.append((it, {"kind": "purifier_cost", "purify": p.name, "seed": s}, t, ref))
                    if cfg.seed_floor:
                        sb = seeds[(si + 1) % len(seeds)] if len(seeds) > 1 else s + 1
                        t = add(("clean", sk, "none"), it.clean, seed=sb)
                        pairs.append((it, {"kind": "seed_floor", "purify": "none", "seed": s, "seed_b": sb}, t, ref))
        edits = jobs.run(self.editors[v.name], self.models[v.name], cfg.batch_size, self.progress,
                         f"victim {v.name}: edit batch")
        rows = []
        by_shape: dict = {}
        for pr in pairs:
            by_shape.setdefault(edits[pr[2]].shape, []).append(pr)
        for lst in by_shape.values():
            scores = compare(np.stack([edits[p[2]] for p in lst]), np.stack([edits[p[3]] for p in lst]), self.lpips_fn,
                             cfg.psnr_cap_db, chunk=self.METRIC_CHUNK)
            if self.clip is not None:
                scores.update(self._clip_scores(lst, edits))
            for j, (it, extra, _, _) in enumerate(lst):
                rows.append({**it.run.meta(), "id": it.id, "source": it.source, "victim": v.name,
                             "victim_family": v.family,
                             "editor": self.editors[v.name].config.kind, "seed_b": "", "worst_by": "", **extra,
                             **{m: float(s[j]) for m, s in scores.items()}})
        s0 = seeds[0]
        for group in chunk:
            for it in group:
                if (it.run.name, it.id) not in self.report_set:
                    continue
                prompt, sk, pk = prompt_for(it, v.family, cfg.prompt), it.source_key, ("prot", it.run.name, it.id)
                cells = {"original": _u8(it.clean), "protected": _u8(it.protected),
                         "edit(original)": _u8(edits[("clean", sk, "none", s0, prompt)])}
                for p in self.purifiers:
                    lab = "edit(protected)" if p.name == "none" else f"edit({p.name}(protected))"
                    cells[lab] = _u8(edits[("prot", pk, p.name, s0, prompt)])
                thumbs[(v.name, it.run.name, it.id)] = {"cells": cells, "prompt": prompt}
        return rows

    # ------------------------------------------------------------------------------------------------- CLIP
    def _clip_images(self, images: list) -> np.ndarray:
        """``[N, D]`` unit CLIP image embeddings, in padded chunks (one compilation per image shape)."""
        k, out = self.METRIC_CHUNK, np.zeros((len(images), self.clip.config.projection_dim), np.float32)
        by_shape: dict = {}
        for i, im in enumerate(images):
            by_shape.setdefault(np.shape(im), []).append(i)
        for idx in by_shape.values():
            for c in range(0, len(idx), k):
                part = idx[c:c + k]
                batch = np.stack([images[i] for i in part] + [images[part[-1]]] * (k - len(part)))
                out[part] = np.asarray(self.clip.image_embeds(batch))[:len(part)]
        return out

    def _clip_texts(self, texts: list[str]) -> np.ndarray:
        new = sorted({t for t in texts if t not in self._clip_text})
        k = self.METRIC_CHUNK
        for c in range(0, len(new), k):
            part = new[c:c + k]
            emb = np.asarray(self.clip.text_embeds(part + [part[-1]] * (k - len(part))))
            self._clip_text.update(zip(part, emb))
        return np.stack([self._clip_text[t] for t in texts])

    def _clip_scores(self, lst, edits) -> dict[str, np.ndarray]:
        """``clip_img`` (test edit vs reference edit) and ``clip_dir`` (module docstring) of ``lst``'s pairs."""
        from tdae_jax.metrics import clip_sim

        test = self._clip_images([edits[p[2]] for p in lst])
        ref = self._clip_images([edits[p[3]] for p in lst])
        out = {"clip_img": np.asarray(clip_sim.clip_image_similarity(test, ref), np.float64),
               "clip_dir": np.full(len(lst), np.nan)}
        text = not self.cfg.prompt and self.clip.static.tokenizer is not None
        recs = [_find_prompt(p[0]) if text else None for p in lst]
        has = [i for i, r in enumerate(recs) if r and r.get("caption") and r.get("edited_prompt")]
        if has:
            orig = self._clip_images([lst[i][0].clean for i in has])
            t0 = self._clip_texts([recs[i]["caption"] for i in has])
            t1 = self._clip_texts([recs[i]["edited_prompt"] for i in has])
            out["clip_dir"][has] = np.asarray(clip_sim.clip_direction_similarity(orig, test[has], t0, t1))
        return out


def run(cfg: EvalConfig, progress: Callable[[str], None] = log.info) -> EvalResult:
    """Evaluates every run against every victim (rows in memory; :func:`write_outputs` writes them)."""
    return Runner(cfg, progress).run()

