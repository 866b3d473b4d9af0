"""Oracle for the miniature world: did an editor carry out the instruction? (docs/miniature.md)

The world is procedural, so every edit's exact result is known (``world.Edit``). Success is measured on
pixels, per instruction type, with a colour classifier that names each pixel by its nearest palette hue, or
"neutral" when it is nearly grey (every background is). Colours are read where the ground truth itself
names them (so the ground truth scores 1.0 at any resolution):

- recolour: share of the object's core pixels (binary mask eroded by 1 px) named the instructed colour > 0.7;
- reshape / resize: near the object, the output's soft colour mask (``colour_weight``) is nearer (L2) to the
  ground truth's than to that of any other form at that place (the other shapes, or the other size; the
  source's form among them), and its soft IoU with the ground truth's is >= 0.5;
- remove: share of the removed object's core still named its colour < 0.3, and the region's PSNR against
  the ground truth (the background) >= 18 dB;
- add: share of the new object's core named the instructed colour > 0.7, and its shape matches (as reshape);
- move: the new place is in the colour (> 0.7) and the old place is not (< 0.3);
- every kind: the pixels away from the edited object (outside its masks dilated by 2 px) keep PSNR > 20 dB
  against the ground truth, and every other object keeps its colour (share > 0.7 of its core): no bleeding.

Plus PSNR and SSIM (Gaussian window 11, sigma 1.5, as Wang et al. 2004) of the whole image against the
ground truth. Images are ``uint8 [H,W,3]`` or float ``[H,W,3] in [0, 1]``.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from tdae_jax.miniature import vocab, world

NEUTRAL = len(vocab.COLOURS)   # label of grey/white/black pixels
PSNR_CAP = 100.0


@dataclass(frozen=True)
class Thresholds:
    share: float = 0.7           # instructed colour on the object's core
    removed_share: float = 0.3   # colour left where an object was removed / moved from
    rest_psnr: float = 20.0      # dB, pixels away from the edited object
    region_psnr: float = 18.0    # dB, removed object's region against the ground-truth background
    iou: float = 0.5             # reshape / resize / (reported for add)
    keep_share: float = 0.7      # every other object keeps its colour on its core


def to_float(img) -> np.ndarray:
    """``[H,W,3]`` float64 in [0, 1] from uint8 or float in [0, 1]."""
    a = np.asarray(img)
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    return np.clip(a.astype(np.float64), 0.0, 1.0)


CHROMA_MIN = 30.0   # below this chroma (0..255 scale) a pixel is neutral: backgrounds stay under 22


_P = np.asarray([world.PALETTE[c] for c in vocab.COLOURS], np.float64)
_PA, _PB = _P[:, 0] - 0.5 * (_P[:, 1] + _P[:, 2]), (np.sqrt(3) / 2) * (_P[:, 1] - _P[:, 2])
_HUES, _CHROMAS = np.arctan2(_PB, _PA), np.hypot(_PA, _PB)     # [K] palette hues (radians) and chromas


def _chroma_ab(img):
    """Chroma plane coordinates (a, b) of each pixel, 0..255 scale: the pixel minus its grey level."""
    x = to_float(img) * 255.0
    return x[..., 0] - 0.5 * (x[..., 1] + x[..., 2]), (np.sqrt(3) / 2) * (x[..., 1] - x[..., 2])


def classify(img) -> np.ndarray:
    """``int [H,W]``: index into ``vocab.COLOURS`` of each pixel's nearest palette hue, or ``NEUTRAL``.

    Hue is the angle of the pixel's chroma (its RGB minus its grey level), so a colour's texture shade, and
    its anti-aliased blends with the grey background, keep the colour's name; pixels with chroma below
    ``CHROMA_MIN`` (the greys of every background, white, black) are neutral.
    """
    a, b = _chroma_ab(img)
    proj = a[..., None] * np.cos(_HUES) + b[..., None] * np.sin(_HUES)   # nearest hue = largest projection
    return np.where(np.hypot(a, b) < CHROMA_MIN, NEUTRAL, np.argmax(proj, axis=-1))


def colour_weight(img, colour: str) -> np.ndarray:
    """``float [H,W] in [0, 1]``: how much of each pixel is ``colour`` (its chroma along the colour's hue, over
    the colour's own chroma): 1 on the colour, SHADE on its texture shade, the coverage on anti-aliased edges
    over a grey background, 0 on greys and on opposite hues."""
    a, b = _chroma_ab(img)
    k = vocab.COLOURS.index(colour)
    return np.clip((a * np.cos(_HUES[k]) + b * np.sin(_HUES[k])) / _CHROMAS[k], 0.0, 1.0)


def psnr(a, b, mask=None) -> float:
    """PSNR in dB of two images in [0, 1] (uint8 or float) over ``mask`` (all pixels if None), capped at 100."""
    se = (to_float(a) - to_float(b)) ** 2
    if mask is not None:
        mask = np.asarray(mask, bool)
        if not mask.any():
            return PSNR_CAP
        se = se[mask]
    mse = float(se.mean())
    return PSNR_CAP if mse <= 10 ** (-PSNR_CAP / 10) else float(-10.0 * np.log10(mse))


def _gauss_filter(x, sigma: float = 1.5, truncate: float = 3.5):
    """Separable Gaussian over axes 0 and 1 with mirrored borders (scipy.ndimage's mode="reflect").

    Shift-and-add, no BLAS: a multi-threaded BLAS on a busy machine is slower than this at these sizes."""
    r = int(truncate * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k = (k / k.sum()).astype(x.dtype)
    for axis in (0, 1):
        n = x.shape[axis]
        xp = np.pad(x, [(r, r) if ax == axis else (0, 0) for ax in range(x.ndim)], mode="symmetric")
        sl = [slice(None)] * x.ndim
        acc = np.zeros_like(x)
        for i, w in enumerate(k):
            sl[axis] = slice(i, i + n)
            acc += w * xp[tuple(sl)]
        x = acc
    return x


def ssim(a, b) -> float:
    """Mean SSIM over channels (data range 1, Gaussian 11x11 sigma 1.5, K1 0.01, K2 0.03, borders cropped 5 px),
    computed in float32 (agrees with float64 to ~1e-6).

    Matches ``skimage.metrics.structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False, data_range=1)``.
    """
    x, y = to_float(a).astype(np.float32), to_float(b).astype(np.float32)
    f = _gauss_filter(np.concatenate([x, y, x * x, y * y, x * y], axis=-1))   # [H,W,5C]
    mx, my, xx, yy, xy = np.split(f, 5, axis=-1)
    vx, vy, cxy = xx - mx * mx, yy - my * my, xy - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s[5:-5, 5:-5].astype(np.float64).mean())


def _dilate(m, r):
    m = np.asarray(m, bool)
    for _ in range(r):
        p = np.pad(m, 1)
        m = p[1:-1, 1:-1] | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:] \
            | p[:-2, :-2] | p[:-2, 2:] | p[2:, :-2] | p[2:, 2:]
    return m


def _core(cov, ref_labels, colour):
    """Where to read an object's colour: its binary mask (coverage >= 0.5) eroded by 1 px, kept to the pixels
    the reference image (ground truth or source) itself names ``colour`` (so the reference scores 1.0 at any
    resolution); falls back to the eroded, then the plain binary mask when that leaves nothing."""
    b = cov >= 0.5
    core = ~_dilate(~b, 1)
    core = core if core.any() else b
    named = core & (ref_labels == vocab.COLOURS.index(colour))
    return named if named.any() else core


def _share(labels, mask, colour) -> float:
    return float((labels[mask] == vocab.COLOURS.index(colour)).mean()) if mask.any() else 0.0


def _soft_iou(a, b) -> float:
    u = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / u) if u else 1.0


def _alternatives(edit: world.Edit, size: int, ss: int, src_img):
    """Images of the wrong forms the edited object could take: other shapes (reshape, add), other size (resize).
    Drawn alone on the background: the form check only looks near the object, away from the others."""
    if edit.kind == "resize":
        return [src_img]
    after = edit.after
    return [world.render(world.Scene(edit.target.background, (dataclasses.replace(after, shape=shape),)), size, ss)
            for shape in vocab.SHAPES if shape != after.shape]


@functools.lru_cache(maxsize=1024)
def reference(edit: world.Edit, size: int, ss: int = 4) -> dict:
    """Everything the oracle needs that does not depend on the output (cached: scoring many outputs of the
    same edits, e.g. several checkpoints on one held-out set, renders each reference once)."""
    gt, t_cov = world.render_with_masks(edit.target, size, ss)
    src, s_cov = world.render_with_masks(edit.source, size, ss)
    gt_labels, src_labels = classify(gt), classify(src)
    before, after = edit.before, edit.after
    zero = np.zeros((size, size), np.float32)
    b_cov = s_cov[edit.index] if before is not None else zero
    a_cov = t_cov[edit.index] if after is not None else zero
    others = [k for k in range(len(edit.target.objects)) if k != edit.index or edit.kind == "remove"]
    ref = {"gt": gt, "rest": ~_dilate((b_cov > 0) | (a_cov > 0), 2),
           "keep": [(_core(t_cov[k], gt_labels, edit.target.objects[k].colour), edit.target.objects[k].colour)
                    for k in others]}
    if edit.kind in ("recolour", "add", "move"):
        ref["new_core"] = _core(a_cov, gt_labels, after.colour)
    if edit.kind in ("remove", "move"):
        ref["old_core"] = _core(b_cov, src_labels, before.colour) & ~(a_cov > 0)
    if edit.kind == "remove":
        ref["region"] = b_cov >= 0.5
    if edit.kind in ("reshape", "resize", "add"):
        # Form check by template matching near the object (its box grown 3 px, away from the other objects):
        # soft colour masks are linear in the image, so a blurred ground truth stays nearest its own template.
        rows, cols = np.nonzero((b_cov > 0) | (a_cov > 0))
        window = np.zeros((size, size), bool)
        window[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        window = _dilate(window, 3)
        if others:
            window &= ~_dilate((t_cov[others] > 0).any(0), 1)
        rows, cols = np.nonzero(window)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        ref["box"], ref["window"] = box, window[box]
        ref["f_gt"] = (colour_weight(gt[box], after.colour) * window[box]).astype(np.float32)
        ref["f_alts"] = [(colour_weight(alt[box], after.colour) * window[box]).astype(np.float32)
                         for alt in _alternatives(edit, size, ss, src)]
    for a in [v for v in ref.values() if isinstance(v, np.ndarray)] + ref.get("f_alts", []):
        a.setflags(write=False)          # shared by every caller of the cache
    return ref


def edit_success(output, edit: world.Edit, ss: int = 4, thresholds: Thresholds = Thresholds()) -> dict:
    """Score one edited image against the edit's exact result (rendered at the output's size).

    Args:
      output: the editor's result, uint8 [H,W,3] or float [H,W,3] in [0, 1].
      edit: the ``world.Edit`` that was asked for; ``ss`` the supersampling its pairs were rendered with.
    Returns:
      dict with ``success`` (bool), ``psnr``, ``ssim`` (whole image vs ground truth), ``rest_psnr``,
      ``keep_share`` and the kind's measurements (``share``, ``removed_share``, ``region_psnr``, ``iou``,
      ``iou_other``: soft IoU with the ground truth's form and with the nearest wrong form).
    """
    th = thresholds
    out = to_float(output)
    ref = reference(edit, out.shape[0], ss)
    gt, after, before = ref["gt"], edit.after, edit.before
    labels = classify(out)
    row = {"kind": edit.kind, "psnr": psnr(out, gt), "ssim": ssim(out, gt), "rest_psnr": psnr(out, gt, ref["rest"]),
           "keep_share": min([_share(labels, m, c) for m, c in ref["keep"]], default=1.0)}
    ok = row["rest_psnr"] > th.rest_psnr and row["keep_share"] >= th.keep_share
    if "new_core" in ref:
        row["share"] = _share(labels, ref["new_core"], after.colour)
        ok &= row["share"] > th.share
    if "old_core" in ref:
        row["removed_share"] = _share(labels, ref["old_core"], before.colour)
        ok &= row["removed_share"] < th.removed_share
    if "region" in ref:
        row["region_psnr"] = psnr(out, gt, ref["region"])
        ok &= row["region_psnr"] >= th.region_psnr
    if "window" in ref:
        f_out = colour_weight(out[ref["box"]], after.colour) * ref["window"]
        d_new = float(((f_out - ref["f_gt"]) ** 2).sum())
        d_alts = [float(((f_out - f) ** 2).sum()) for f in ref["f_alts"]]
        row["iou"] = _soft_iou(f_out, ref["f_gt"])
        row["iou_other"] = _soft_iou(f_out, ref["f_alts"][int(np.argmin(d_alts))])
        ok &= row["iou"] >= th.iou and d_new < min(d_alts)
    row["success"] = bool(ok)
    return row


def evaluate(outputs, pairs: dict, thresholds: Thresholds = Thresholds()) -> dict:
    """Score a batch of edited images ``outputs [n,H,W,3]`` against ``pairs`` (from ``world.make_pairs``).

    Returns ``{"rows": [per-item dict with index, kind, instruction, success, psnr, ssim, ...],
    "success": {kind: rate, "all": rate}, "psnr": {kind: mean}, "ssim": {kind: mean}, "count": {kind: n}}``.
    """
    outputs = np.asarray(outputs)
    if outputs.shape[0] != len(pairs["edits"]):
        raise ValueError(f"{outputs.shape[0]} outputs for {len(pairs['edits'])} pairs")
    rows = []
    for k, (out, e) in enumerate(zip(outputs, pairs["edits"])):
        r = edit_success(out, e, ss=pairs.get("ss", 4), thresholds=thresholds)
        rows.append({"index": int(pairs["index"][k]), "instruction": e.instruction, **r})
    summary = {"rows": rows, "success": {}, "psnr": {}, "ssim": {}, "count": {}}
    kinds = [k for k in world.EDIT_KINDS if any(r["kind"] == k for r in rows)] + ["all"]
    for kind in kinds:
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        summary["count"][kind] = len(sel)
        for key, field in (("success", "success"), ("psnr", "psnr"), ("ssim", "ssim")):
            summary[key][kind] = float(np.mean([r[field] for r in sel])) if sel else float("nan")
    return summary


# ------------------------------------------------------------------------------------- text-to-image
def scene_scores(outputs, scenes, size: int, ss: int = 4, sources=None, thresholds: Thresholds = Thresholds()) -> dict:
    """Score text-to-image samples, or SDEdit img2img outputs, against the scenes they were made from.

    - text-to-image (``sources=None``): ``colours`` = every colour the caption names covers at least half the
      area of its objects (pixels ``classify`` names so), and the colours it does not name cover at most half
      the smallest object (colourful noise fails). Positions are not in the caption, so they are not scored.
    - img2img (``sources`` = the input scenes' images): ``layout`` = every object keeps its colour at its place
      (share > ``thresholds.share`` of its core, as the edit oracle reads objects), and ``psnr`` to the source.
    Returns ``{"rows": [...], "success": rate, "psnr": mean}``; success is ``colours`` or ``layout``.
    """
    outputs = np.asarray(outputs)
    if outputs.shape[0] != len(scenes):
        raise ValueError(f"{outputs.shape[0]} outputs for {len(scenes)} scenes")
    rows = []
    for k, (out, scene) in enumerate(zip(outputs, scenes)):
        cov = world.render_masks(scene, size, ss)
        ref = classify(world.render(scene, size, ss))
        labels = classify(out)
        row = {"index": k, "caption": world.caption(scene), "objects": len(scene.objects)}
        if sources is None:
            named = {o.colour for o in scene.objects}
            area = {c: sum(float((cov[j] >= 0.5).sum()) for j, o in enumerate(scene.objects) if o.colour == c)
                    for c in named}
            found = {c: int((labels == vocab.COLOURS.index(c)).sum()) >= 0.5 * area[c] for c in named}
            smallest = min(float((m >= 0.5).sum()) for m in cov) if len(cov) else 0.0
            other = [vocab.COLOURS.index(c) for c in vocab.COLOURS if c not in named]
            spurious = int(np.isin(labels, other).sum())
            row["found"], row["spurious_px"] = found, spurious
            row["success"] = bool(all(found.values()) and spurious <= 0.5 * smallest)
        else:
            shares = [_share(labels, _core(cov[j], ref, o.colour), o.colour) for j, o in enumerate(scene.objects)]
            row["shares"] = shares
            row["success"] = bool(all(s > thresholds.share for s in shares))
            row["psnr"] = psnr(out, np.asarray(sources)[k])
        rows.append(row)
    out = {"rows": rows, "success": float(np.mean([r["success"] for r in rows]))}
    if sources is not None:
        out["psnr"] = float(np.mean([r["psnr"] for r in rows]))
    return out
