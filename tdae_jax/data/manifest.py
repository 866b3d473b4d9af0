"""Run bookkeeping: unique image ids, the prompts file, and a resumable per-image manifest.

docs/design.md convention 8 (every run leaves a workdir) and the resumption guarantee of convention 4
(results never depend on resumption: ids are stable file stems, so keys derived from them are too).

* ``unique_ids``: ids are file stems; collisions (compared case-insensitively, since output files are
  named ``<id>.png`` and some file systems ignore case) get ``_2``, ``_3``, ... in sorted-path order.
* ``Manifest``: one JSON file, rewritten atomically after every change, with an entry per input
  ``{id, source, sha256, status, error, outputs, metrics, attempts, updated}``; status is one of
  pending | running | done | failed. Re-opening the file resumes: ``running`` entries (a run that
  was interrupted) count as pending; a source whose bytes changed since it was recorded goes back to
  pending.
* ``load_prompts``: CSV or JSONL prompts; per-row problems are returned, not raised, so the caller
  can mark those inputs failed and carry on.
* Settings: a manifest records the settings its outputs were made with (``meta``); ``settings_diff`` names every
  difference (nested keys dotted, ``budget.eps``), ``read_meta`` reads them without touching the file, so a run
  can refuse other settings before it creates anything.
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
import hashlib
import json
from pathlib import Path

import numpy as np

from tdae_jax.data.files import DataError, atomic_write_bytes

STATUSES = ("pending", "running", "done", "failed")
MANIFEST_VERSION = 1


def unique_ids(paths, taken=()) -> dict[Path, str]:
    """``{path: id}``: the file stem, made unique with ``_2``, ``_3``, ... (sorted-path order, case-insensitive).

    ``taken`` are ids already in use (e.g. by a resumed manifest); they are never reassigned.
    """
    used = {t.casefold() for t in taken}
    out: dict[Path, str] = {}
    for p in sorted({Path(p) for p in paths}, key=str):
        cand, n = p.stem, 2
        while cand.casefold() in used:
            cand, n = f"{p.stem}_{n}", n + 1
        used.add(cand.casefold())
        out[p] = cand
    return out


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha_or_none(path) -> str | None:
    """sha256, or None for an unreadable file (loading it will then fail with a clear ImageError)."""
    try:
        return sha256_file(path)
    except OSError:
        return None


def _jsonable(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def settings_diff(old: dict, new: dict) -> list[str]:
    """Every difference between two settings dicts as ``'key: old -> new'`` (nested keys dotted, sorted)."""
    a = _flatten(json.loads(json.dumps(old, default=_jsonable)))
    b = _flatten(json.loads(json.dumps(new, default=_jsonable)))
    missing = "<unset>"
    return [f"{k}: {a.get(k, missing)!r} -> {b.get(k, missing)!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


def read_meta(path) -> dict | None:
    """The settings recorded in a manifest file (``{}`` when it records none), None when there is no file.

    Read-only. Raises DataError for a file that is not a manifest.
    """
    path = Path(path)
    return (_read(path).get("meta") or {}) if path.exists() else None


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != MANIFEST_VERSION or not isinstance(data.get("entries"), dict):
            raise ValueError(f"expected version {MANIFEST_VERSION} with an 'entries' object")
    except (ValueError, AttributeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not a readable manifest ({e}); move it away to start afresh") from None
    return data


class Manifest:
    """Resumable per-image status, stored as one JSON file (written atomically).

    Args:
      path: the manifest file (its folder must exist). Loaded if it exists, else created on first save.
      meta: JSON-serializable run settings. A new manifest stores them; re-opening an existing one with
        different ``meta`` raises DataError naming every difference (resuming with other settings would mix
        results); an existing manifest that records none (written by an older version) adopts them.
    """

    def __init__(self, path, *, meta: dict | None = None):
        self.path = Path(path)
        self.meta: dict = {}
        self._entries: dict[str, dict] = {}
        if self.path.exists():
            data = _read(self.path)
            self.meta, self._entries = data.get("meta", {}), data["entries"]
            if meta is not None:
                new = json.loads(json.dumps(meta, default=_jsonable))
                diff = settings_diff(self.meta, new) if self.meta else []  # none recorded (older file): adopt
                if diff:
                    raise DataError(f"{self.path}: resuming with different settings ({'; '.join(diff)}); "
                                    "use a new workdir or the original settings")
                self.meta = new
        elif meta is not None:
            self.meta = json.loads(json.dumps(meta, default=_jsonable))

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, image_id) -> bool:
        return image_id in self._entries

    def __iter__(self):
        return iter(list(self._entries))

    def entry(self, image_id: str) -> dict:
        """A copy of one entry."""
        return json.loads(json.dumps(self._get(image_id)))

    def id_for(self, source) -> str | None:
        """The id recorded for a source file (resolved path), or None."""
        s = str(Path(source).expanduser().resolve())
        return next((i for i, e in self._entries.items() if e.get("source") == s), None)

    def ids(self, *statuses: str) -> list[str]:
        """Ids with one of ``statuses`` (all ids if none given), in insertion order."""
        return [i for i, e in self._entries.items() if not statuses or e["status"] in statuses]

    def pending(self, *, retry_failed: bool = False) -> list[str]:
        """Ids still to do: pending, plus running (interrupted) ones, plus failed ones if ``retry_failed``."""
        return self.ids("pending", "running", *(("failed",) if retry_failed else ()))

    def done(self) -> list[str]:
        return self.ids("done")

    def failed(self) -> list[str]:
        return self.ids("failed")

    def entries(self) -> list[dict]:
        """Copies of all entries, in insertion order."""
        return [self.entry(i) for i in self._entries]

    def sync(self, paths) -> list[dict]:
        """``add(paths)``, then copies of their entries in the order given."""
        return [self.entry(i) for i in self.add(paths)]

    def counts(self) -> dict[str, int]:
        return {s: len(self.ids(s)) for s in STATUSES}

    # ------------------------------------------------------------------ updates
    def add(self, paths) -> list[str]:
        """Registers source images (idempotent); returns their ids in the order given.

        A path already recorded keeps its id; if its bytes changed since, its entry goes back to
        pending (outputs and metrics cleared). New paths get ``unique_ids`` avoiding every recorded id.
        """
        paths = [Path(p).expanduser().resolve() for p in paths]
        by_source = {e.get("source"): i for i, e in self._entries.items() if e.get("source")}
        new = {p: None for p in paths if str(p) not in by_source}
        assigned = unique_ids(new, taken=self._entries)  # ids by sorted path; entries in the order given
        for p in new:
            by_source[str(p)] = assigned[p]
            self._entries[assigned[p]] = self._blank(assigned[p], str(p), _sha_or_none(p))
        for p in dict.fromkeys(paths):
            e = self._entries[by_source[str(p)]]
            if p not in new:
                digest = _sha_or_none(p)
                if digest != e.get("sha256"):
                    e.update(self._blank(e["id"], str(p), digest), error=None,
                             note="source changed since it was recorded; redone")
        self.save()
        return [by_source[str(p)] for p in paths]

    def add_failure(self, image_id: str, error: str, *, source=None) -> None:
        """Records an input that failed before it could be loaded (e.g. a prompt row naming a missing image)."""
        if image_id not in self._entries:
            self._entries[image_id] = self._blank(image_id, str(source) if source else None, None)
        self.mark(image_id, "failed", error=error)

    def mark(self, image_id: str, status: str, *, error: str | None = None,
             outputs: dict | None = None, metrics: dict | None = None, save: bool = True) -> None:
        """Sets an entry's status; ``outputs``/``metrics`` are merged into the entry's dicts.

        ``running`` increments ``attempts``; ``done`` and ``pending`` clear ``error``.
        """
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        e = self._get(image_id)
        e["status"] = status
        e["error"] = str(error) if error is not None else (None if status in ("done", "pending") else e.get("error"))
        if status == "running":
            e["attempts"] = int(e.get("attempts", 0)) + 1
        if outputs:
            e["outputs"].update(json.loads(json.dumps(outputs, default=_jsonable)))
        if metrics:
            e["metrics"].update(json.loads(json.dumps(metrics, default=_jsonable)))
        e["updated"] = _now()
        if save:
            self.save()

    def save(self) -> None:
        """Atomic rewrite of the manifest file."""
        data = {"version": MANIFEST_VERSION, "meta": self.meta, "entries": self._entries}
        atomic_write_bytes(self.path, (json.dumps(data, indent=1, default=_jsonable) + "\n").encode("utf-8"))

    def _get(self, image_id: str) -> dict:
        try:
            return self._entries[image_id]
        except KeyError:
            raise KeyError(f"{self.path}: no entry with id {image_id!r}") from None

    @staticmethod
    def _blank(image_id: str, source: str | None, digest: str | None) -> dict:
        return {"id": image_id, "source": source, "sha256": digest, "status": "pending", "error": None,
                "outputs": {}, "metrics": {}, "attempts": 0, "updated": _now()}


# ---------------------------------------------------------------------------------------- prompts

_ALIASES = {"edit_prompt": "instruction", "original_prompt": "caption"}  # instructpix2pix dataset names


@dataclasses.dataclass(frozen=True)
class PromptProblem:
    """A prompt row that could not be used.

    ``file``/``line``: where; ``key``: the id/image name the row gives, when known; ``path``: the
    resolved image the row names when that file exists (so the caller can mark that input failed).
    """

    file: Path
    line: int
    key: str | None
    message: str
    path: str | None = None

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


def find_prompt(prompts: dict, image_id: str, image_path=None) -> dict | None:
    """The prompt record for an image: the row naming this file, else by id, file name or stem.

    A row that names a different image file never matches (two ``a.png`` in different folders).
    """
    src = str(Path(image_path).expanduser().resolve()) if image_path is not None else None
    if src is not None:
        hit = next((r for r in prompts.values() if r.get("image") == src), None)
        if hit is not None:
            return hit
    keys = [image_id] + ([Path(image_path).name, Path(image_path).stem] if image_path is not None else [])
    return next((prompts[k] for k in keys if k in prompts and prompts[k].get("image") in (None, src)), None)


def _rows(path: Path):
    """Yields (line number, dict or error string) from a CSV, JSONL or JSON-list file."""
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8-sig")
    if suffix == ".csv":
        reader = csv.reader(text.splitlines(keepends=True))
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: empty prompts file (expected a header such as id,image,instruction)")
        header = [_ALIASES.get(h.strip(), h.strip()) for h in header]
        if "instruction" not in header or not ({"id", "image"} & set(header)):
            raise DataError(f"{path}:1: the header {','.join(header)} needs an 'instruction' column and "
                            "an 'id' and/or 'image' column")
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                yield reader.line_num, f"expected {len(header)} fields, got {len(row)}"
            else:
                yield reader.line_num, {h: c.strip() for h, c in zip(header, row)}
    elif suffix in (".jsonl", ".ndjson", ".json"):
        if suffix == ".json":
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(items, list):
                raise DataError(f"{path}: a .json prompts file must hold a list of objects")
            lines = [(i + 1, it) for i, it in enumerate(items)]
        else:
            lines = []
            for n, raw in enumerate(text.splitlines(), start=1):
                if raw.strip():
                    try:
                        lines.append((n, json.loads(raw)))
                    except json.JSONDecodeError as e:
                        lines.append((n, f"invalid JSON ({e.msg} at column {e.colno})"))
        for n, obj in lines:
            if isinstance(obj, str):
                yield n, obj
            elif not isinstance(obj, dict):
                yield n, f"expected a JSON object, got {type(obj).__name__}"
            else:
                yield n, {_ALIASES.get(k, k): ("" if v is None else v) for k, v in obj.items()}
    else:
        raise DataError(f"{path}: unknown prompts format {suffix or '(no extension)'}; use .csv or .jsonl")


def load_prompts(path, *, image_dir=None, image_paths=None,
                 require_instruction: bool = True) -> tuple[dict[str, dict], list[PromptProblem]]:
    """Reads a prompts file.

    CSV: a header with ``instruction`` and ``id`` and/or ``image``; optional ``caption``, ``edited_prompt``
    and any other columns (kept as strings). JSONL: one object per line with the same keys. The
    instructpix2pix names ``edit_prompt``/``original_prompt`` are read as ``instruction``/``caption``.

    Args:
      path: ``.csv``, ``.jsonl`` (``.ndjson``) or ``.json`` (a list of objects).
      image_dir: folder that relative ``image`` values are resolved against (default: the prompts file's folder).
      image_paths: the run's listed images, if known. A relative ``image`` not found under ``image_dir``
        is looked up among them by file name, and a row with only an ``id`` gets the listed image
        whose stem is that id (``image`` stays None if there is none).
      require_instruction: an empty instruction is a problem for that row.
    Returns:
      ``(prompts, problems)``. ``prompts`` maps key -> record, key = ``id`` if given else the image
      file name; a record holds ``key, id, image`` (resolved absolute path string or None), ``instruction,
      caption, edited_prompt`` (strings, possibly empty), ``line`` and any extra fields. Rows that are
      malformed, name a missing image or repeat a key are left out (a repeated key drops every row
      with it) and described in ``problems``.
    Raises:
      DataError: missing/unreadable file, unknown format, or a CSV header without the needed columns.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompts file not found: {path}")
    base = Path(image_dir) if image_dir is not None else path.parent
    listed = [Path(p).expanduser().resolve() for p in (image_paths or ())]
    by_name: dict[str, list[Path]] = {}
    by_stem: dict[str, list[Path]] = {}
    for p in listed:
        by_name.setdefault(p.name, []).append(p)
        by_stem.setdefault(p.stem, []).append(p)
    prompts: dict[str, dict] = {}
    problems: list[PromptProblem] = []
    first_line: dict[str, int] = {}
    try:
        rows = list(_rows(path))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for line, row in rows:
        if isinstance(row, str):
            problems.append(PromptProblem(path, line, None, row))
            continue
        rid, image = str(row.get("id", "") or "").strip(), str(row.get("image", "") or "").strip()
        key = rid or (Path(image).name if image else "")
        if not key:
            problems.append(PromptProblem(path, line, None, "row has neither an id nor an image"))
            continue
        rec = {k: v for k, v in row.items()}
        rec.update(key=key, id=rid or None, line=line, image=None)
        for k in ("instruction", "caption", "edited_prompt"):
            rec[k] = str(row.get(k, "") or "").strip()
        if image:
            p = Path(image).expanduser()
            p = p if p.is_absolute() else base / p
            if not p.is_file() and not Path(image).is_absolute() and len(by_name.get(Path(image).name, ())) == 1:
                p = by_name[Path(image).name][0]
            if not p.is_file():
                problems.append(PromptProblem(path, line, key, f"{key}: image {image!r} not found (looked for {p})"))
                continue
            rec["image"] = str(p.resolve())
        elif len(by_stem.get(rid, ())) == 1:
            rec["image"] = str(by_stem[rid][0])
        if require_instruction and not rec["instruction"]:
            problems.append(PromptProblem(path, line, key, f"{key}: empty instruction", rec["image"]))
            continue
        if key in first_line:
            problems.append(PromptProblem(path, line, key, f"duplicate key {key!r} (first on line "
                                                           f"{first_line[key]}); all its rows are ignored",
                                          rec["image"]))
            dropped = prompts.pop(key, None)
            if dropped is not None and dropped["image"] and dropped["image"] != rec["image"]:
                problems.append(PromptProblem(path, first_line[key], key, f"duplicate key {key!r} "
                                              f"(again on line {line}); all its rows are ignored", dropped["image"]))
            continue
        first_line[key] = line
        prompts[key] = rec
    return prompts, problems
