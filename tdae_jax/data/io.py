"""Image input/output: load and validate, the working-resolution transform, budget-exact PNG output.

docs/design.md convention 7 ("the budget is exact on disk"): inputs are 8-bit; the final perturbation is
snapped to the 1/255 grid *inside* the L_inf budget, so the PNG read back satisfies
``max|x' - x| <= eps``; originals are never written; outputs are written atomically.
TDAE §III-B (perturbation: pixel space, L_inf, images in [0,1]); resolution not stated: project default 512x512.

Policy decisions (documented here, tested in tests/test_data_io.py):
  * Every input becomes 8-bit RGB. Grayscale, palette, CMYK, 16-bit, float and alpha inputs are
    converted, each with a warning in ``LoadedImage.warnings``.
  * Alpha: transparent pixels are composited on white (warning; the output PNG is opaque RGB).
    Rejected: *alpha-only* images, where every visible pixel has the same colour and the content is
    in the alpha channel alone (masks, glyphs, icons), and fully transparent images: the opaque
    picture we would write is not what the user has.
  * Rejected with ``ImageError(path, reason)``: empty files, non-images, unsupported formats,
    truncated/corrupt data (full decode is forced), decompression bombs (``max_pixels``) and images
    with a side below ``min_side``.
  * The working image is ``[H, W, 3] float32`` holding exact k/255 values; ``H, W`` are multiples of 8
    (the VAE downsamples by 8). Geometry is recorded in ``Transform`` so that ``map_back`` returns the
    perturbation at the original resolution (zero outside the region the model saw: ``unprotected_fraction``;
    0 for ``resize``, ``pad`` and ``none``, the borders for ``center_crop``).
  * Outputs are lossless PNG or WebP (``OUTPUT_FORMATS``). The ICC profile is copied; EXIF is read with its
    orientation tag set to 1 (the pixels are stored upright) and copied only on request (privacy default).

This module does not import jax; arrays are numpy (jax arrays are accepted through ``np.asarray``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import glob
import io as _stdio
import math
import os
import stat
import warnings as _warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tdae_jax.data import manifest as _manifest
from tdae_jax.data.files import DataError, atomic_write_bytes

load_prompts = _manifest.load_prompts  # prompts file -> (prompts, problems); defined in data/manifest.py

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
_FORMATS = {"PNG", "JPEG", "MPO", "WEBP", "BMP", "TIFF"}  # MPO: multi-picture JPEG from cameras
_FORMAT_EXTS = {"PNG": {".png"}, "JPEG": {".jpg", ".jpeg"}, "MPO": {".jpg", ".jpeg"},
                "WEBP": {".webp"}, "BMP": {".bmp"}, "TIFF": {".tif", ".tiff"}}
RESIZE_MODES = ("none", "center_crop", "resize", "pad")
OUTPUT_FORMATS = ("png", "webp")  # both lossless: the budget holds on disk (convention 7)
DEFAULT_MIN_SIDE = 16
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485  # PIL's own default (~ 89.5 MP)
MULTIPLE = 8  # VAE downsampling factor: working H, W must be divisible by it


class ImageError(DataError):
    """An input image that cannot be used. ``path`` and ``reason`` are attributes."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class OutputDirError(DataError):
    """An output location that would write into an input folder."""


@dataclasses.dataclass(frozen=True)
class Transform:
    """Original (oriented) image -> working canvas. Sizes are (height, width) in pixels.

    The crop window ``crop_box = (top, left, height, width)`` of the original is resized to
    ``resized_hw`` and placed at ``offset = (top, left)`` of a ``work_hw`` canvas (the rest of the
    canvas, non-empty only for ``mode='pad'``, is edge-replicated padding).
    """

    mode: str
    original_hw: tuple[int, int]
    crop_box: tuple[int, int, int, int]
    resized_hw: tuple[int, int]
    offset: tuple[int, int]
    work_hw: tuple[int, int]
    exif_orientation: int = 1


@dataclasses.dataclass
class LoadedImage:
    """One validated input.

    Attributes:
      id: file stem (``Manifest`` makes ids unique across a run and may overwrite this).
      path: source file (never written).
      array: ``[H, W, 3] float32`` in [0, 1], exact k/255 values, the working image.
      original_uint8: ``[H0, W0, 3] uint8``, the full-resolution RGB image after EXIF orientation and
        mode conversion: the base the protected output is written against.
      original_size: ``(H0, W0)`` after EXIF orientation.
      transform: the geometry from ``original_uint8`` to ``array``.
      warnings: human-readable notes on conversions (empty for a plain 8-bit RGB image).
      icc_profile: the source's ICC profile when it describes RGB data (copied to the output), else None.
      exif: the source's EXIF block with the orientation tag set to 1 (the pixels are stored upright), or None
        when it has none; copied to the output only on request (``save_image_atomic(..., exif=...)``).
    """

    id: str
    path: Path
    array: np.ndarray
    original_uint8: np.ndarray
    original_size: tuple[int, int]
    transform: Transform
    warnings: list[str]
    icc_profile: bytes | None = None
    exif: bytes | None = None


def sample_dir() -> Path:
    """Folder of the bundled sample images (CC0 / public domain, see LICENSES.md there)."""
    return Path(__file__).resolve().parent.parent / "assets" / "samples"


# ----------------------------------------------------------------------------------------- loading


@contextlib.contextmanager
def _strict_decoding(max_pixels: int | None):
    """Full, non-truncated decoding (even if another library relaxed PIL's global flag); PIL's warnings
    are recorded instead of printed. With ``max_pixels`` set, our own check (right after the header is
    read, before any decoding) replaces PIL's bomb limit; else PIL's limit applies. Restores PIL's globals."""
    old = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if max_pixels is not None:
        Image.MAX_IMAGE_PIXELS = None
    try:
        with _warnings.catch_warnings(record=True) as caught:
            _warnings.simplefilter("always")
            _warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield caught
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = old


def _open_validated(path: Path, min_side: int, max_pixels: int | None, notes: list[str]) -> tuple[Image.Image, int]:
    """Open, check and fully decode (call inside ``_strict_decoding``).

    Returns the EXIF-oriented PIL image (any mode) and the EXIF orientation that was applied.
    """
    try:
        nbytes = path.stat().st_size
    except OSError as e:
        raise ImageError(path, f"cannot read file ({e.strerror or e})") from None
    if nbytes == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        img = Image.open(path)
    except UnidentifiedImageError:
        raise ImageError(path, "not an image file (or an unsupported format)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(path, f"decompression bomb refused ({e})") from None
    except Exception as e:  # noqa: BLE001 - any decoder failure is the file's problem
        raise ImageError(path, f"cannot open ({type(e).__name__}: {e})") from None
    with img:  # closes the file (multi-frame formats keep it open otherwise)
        w, h = img.size
        if img.format not in _FORMATS:
            raise ImageError(path, f"unsupported format {img.format} (accepted: png, jpg, webp, bmp, tiff)")
        if path.suffix.lower() not in _FORMAT_EXTS[img.format]:
            notes.append(f"file extension {path.suffix or '(none)'} but the content is {img.format}")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageError(path, f"decompression bomb refused: {w}x{h} = {w * h} pixels exceeds "
                                   f"the limit of {max_pixels} (max_pixels)")
        if w == 0 or h == 0:
            raise ImageError(path, f"image has no pixels ({w}x{h})")
        if getattr(img, "n_frames", 1) > 1:
            notes.append(f"{img.n_frames} frames/pages; only the first is used")
        if img.mode in ("RGB", "RGBA") and any(";16" in str(getattr(t, "args", "")) for t in (img.tile or ())):
            notes.append(f"16-bit {img.mode} image reduced to 8 bits per channel")
        try:
            img.load()  # force the full decode: truncated or corrupt data fails here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(path, f"decompression bomb refused ({e})") from None
        except Exception as e:  # noqa: BLE001
            raise ImageError(path, f"truncated or corrupt image data ({type(e).__name__}: {e})") from None
        try:
            orientation = int(img.getexif().get(0x0112, 1) or 1)
            out = ImageOps.exif_transpose(img)  # always a new image (a copy when nothing to do)
        except Exception as e:  # noqa: BLE001 - a broken EXIF block is not fatal
            notes.append(f"could not apply EXIF orientation ({e}); used as stored")
            orientation, out = 1, img.copy()
    w, h = out.size
    if min(w, h) < min_side:
        raise ImageError(path, f"too small: {w}x{h}, need at least {min_side}x{min_side}")
    return out, orientation


def _to_rgb_uint8(path: Path, img: Image.Image, notes: list[str]) -> np.ndarray:
    """Any PIL mode -> ``[H, W, 3] uint8``, noting every lossy or non-trivial conversion."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        v = np.asarray(img).astype(np.float64)
        if mode == "F":
            scale = 1.0 if np.nanmax(v) <= 1.0 else 1.0 / 255.0
            notes.append(f"float grayscale image (mode F, range assumed [0, {1 if scale == 1 else 255}]) "
                         "converted to 8-bit RGB")
        elif mode == "I" and np.max(v) <= 255:
            scale = 1.0 / 255.0
            notes.append("32-bit integer grayscale image (values <= 255) converted to 8-bit RGB")
        else:
            scale = 1.0 / 65535.0
            notes.append(f"16-bit grayscale image (mode {mode}) converted to 8-bit RGB")
        g = np.clip(np.rint(np.nan_to_num(v * scale) * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=-1)
    if mode == "P" or mode == "PA":
        has_alpha = mode == "PA" or "transparency" in img.info
        notes.append("palette image converted to RGB" + (" (palette has transparency)" if has_alpha else ""))
        img = img.convert("RGBA" if has_alpha else "RGB")
    elif mode in ("L", "1"):
        notes.append("grayscale image converted to RGB (3 identical channels)")
        img = img.convert("RGB")
    elif mode in ("LA", "La"):
        notes.append("grayscale+alpha image converted to RGB")
        img = img.convert("RGBA")
    elif mode in ("RGBa",):
        img = img.convert("RGBA")
    elif mode in ("RGBX",):
        img = img.convert("RGB")
    elif mode != "RGBA":
        notes.append(f"{mode} image converted to RGB (PIL's conversion, no colour management)")
        img = img.convert("RGB")
    a = np.asarray(img, dtype=np.uint8)
    if img.mode == "RGB":
        return a.copy()
    return _composite_alpha(path, a, notes)


def _composite_alpha(path: Path, rgba: np.ndarray, notes: list[str]) -> np.ndarray:
    """RGBA -> RGB on white; rejects alpha-only and fully transparent images (see module docstring)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3]
    if alpha.min() == 255:
        notes.append("alpha channel is fully opaque; dropped")
        return rgb.copy()
    visible = alpha > 0
    if not visible.any():
        raise ImageError(path, "fully transparent image (alpha is 0 everywhere): nothing to protect")
    colours = rgb[visible]
    if (colours == colours[0]).all():
        raise ImageError(path, "alpha-only image: every visible pixel has the colour "
                               f"{tuple(int(c) for c in colours[0])} and the content is in the alpha channel; "
                               "flatten it to an opaque RGB image first if that is what should be protected")
    notes.append(f"transparency composited on white ({int((alpha < 255).sum())} non-opaque pixels); "
                 "the protected output is an opaque RGB PNG")
    a = alpha[..., None].astype(np.float64) / 255.0
    out = rgb.astype(np.float64) * a + 255.0 * (1.0 - a)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _plan(mode: str, size: int | None, h: int, w: int) -> tuple:
    """Returns (crop_box, resized_hw, offset, work_hw) for an (h, w) original."""
    if mode == "none":  # the whole photo, edge-padded at the bottom/right to multiples of MULTIPLE
        return (0, 0, h, w), (h, w), (0, 0), (-(-h // MULTIPLE) * MULTIPLE, -(-w // MULTIPLE) * MULTIPLE)
    if mode == "center_crop":
        s = min(h, w)
        return ((h - s) // 2, (w - s) // 2, s, s), (size, size), (0, 0), (size, size)
    if mode == "resize":
        return (0, 0, h, w), (size, size), (0, 0), (size, size)
    # pad: longer side -> size, aspect kept, centred on the canvas
    rh, rw = (size, max(1, round(w * size / h))) if h >= w else (max(1, round(h * size / w)), size)
    return (0, 0, h, w), (rh, rw), ((size - rh) // 2, (size - rw) // 2), (size, size)


def load_image(path, *, size: int | None, resize: str, min_side: int = DEFAULT_MIN_SIDE,
               max_pixels: int | None = DEFAULT_MAX_PIXELS, image_id: str | None = None) -> LoadedImage:
    """Loads, validates and converts one image; builds the working-resolution array.

    Args:
      path: image file (png, jpg/jpeg, webp, bmp, tif/tiff; the content decides, not the name).
      size: working side in pixels, a multiple of 8; must be None for ``resize='none'``.
      resize: ``'none'``: native resolution, edge-padded at the bottom/right to multiples of 8 (every pixel
        is optimized; ``map_back`` drops the padding);
        ``'center_crop'``: the centred square of side min(H, W), resized to size x size;
        ``'resize'``: the whole image resized to size x size (aspect ratio not kept);
        ``'pad'``: the longer side resized to ``size`` (aspect kept), edge-padded to size x size.
        Resizing uses Lanczos on the 8-bit image, so the working array stays on the k/255 grid.
      min_side: smallest accepted side (after EXIF orientation; never below 8).
      max_pixels: decompression-bomb limit on W*H (None: PIL's own limit only).
      image_id: the run's id for this image (``Manifest`` ids are unique); default: the file stem.

    Returns:
      ``LoadedImage``; ``array`` is ``[H, W, 3] float32`` in [0, 1] with H, W multiples of 8.
    Raises:
      ImageError: the file cannot be used (the message names it and says why).
      ValueError: bad ``size``/``resize`` arguments.
    """
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if resize == "none":
        if size is not None:
            raise ValueError("resize='none' keeps the native resolution; pass size=None")
    elif size is None or int(size) != size or size <= 0 or size % MULTIPLE:
        raise ValueError(f"size must be a positive multiple of {MULTIPLE} for resize={resize!r}, got {size!r}")
    else:
        size = int(size)
    path = Path(path)
    notes: list[str] = []
    with _strict_decoding(max_pixels) as caught:
        img, orientation = _open_validated(path, max(int(min_side), MULTIPLE), max_pixels, notes)
        icc = img.info.get("icc_profile") if img.mode in ("RGB", "RGBA", "RGBX", "RGBa", "P") else None
        exif = _upright_exif(img, notes)
        original = _to_rgb_uint8(path, img, notes)
    notes.extend(f"PIL: {w.message}" for w in caught)
    h, w = original.shape[:2]
    box, rhw, off, whw = _plan(resize, size, h, w)
    top, left, ch, cw = box
    crop = original[top:top + ch, left:left + cw]
    if rhw != (ch, cw):
        if rhw[0] > ch or rhw[1] > cw:
            notes.append(f"upsampled {cw}x{ch} to {rhw[1]}x{rhw[0]} (the original is smaller than the working size)")
        crop = np.asarray(Image.fromarray(crop).resize((rhw[1], rhw[0]), Image.Resampling.LANCZOS))
    if whw != rhw:
        pads = ((off[0], whw[0] - rhw[0] - off[0]), (off[1], whw[1] - rhw[1] - off[1]), (0, 0))
        crop = np.pad(crop, pads, mode="edge")
    transform = Transform(resize, (h, w), box, rhw, off, whw, int(orientation))
    array = crop.astype(np.float32) / np.float32(255.0)
    return LoadedImage(image_id or path.stem, path, array, original, (h, w), transform, notes, icc, exif)


def _upright_exif(img: Image.Image, notes: list[str]) -> bytes | None:
    """The EXIF block of an (already EXIF-transposed) image with Orientation (0x0112) = 1, or None without EXIF.

    The pixels are stored upright, so a copied orientation other than 1 would rotate them a second time in
    viewers (PIL ``ImageOps.exif_transpose`` does the same to the image it returns).
    """
    try:
        exif = img.getexif()
        if not len(exif):
            return None
        exif[0x0112] = 1  # PIL's exif_transpose removes the tag; an explicit 1 keeps viewers from guessing
        return exif.tobytes()
    except Exception as e:  # noqa: BLE001 - a broken EXIF block is not fatal: it is simply not copied
        notes.append(f"unreadable EXIF block ({e}); it cannot be copied to the output")
        return None


def unprotected_fraction(t: Transform) -> float:
    """The fraction of the original's pixels outside the window the model sees (``crop_box``): 0 for ``resize``,
    ``pad`` and ``none``, 1 - s^2 / (H W) for ``center_crop`` (a third of a 3:2 photo). Those pixels are written
    unchanged (``map_back`` is 0 there)."""
    h, w = t.original_hw
    return 1.0 - (t.crop_box[2] * t.crop_box[3]) / float(h * w)


# ------------------------------------------------------------------------------- budget & mapping


def budget_steps(eps: float) -> int:
    """Largest integer k with k/255 <= eps (1e-6 tolerance on eps*255 for float round-off)."""
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    return int(math.floor(eps * 255.0 + 1e-6))


def quantize_protected(x0_uint8: np.ndarray, delta, eps: float) -> np.ndarray:
    """Snaps a perturbation onto the 1/255 grid inside the budget and applies it.

    Args:
      x0_uint8: ``[..., H, W, 3] uint8`` clean image(s).
      delta: same shape, float perturbation in [0,1] units (need not be inside the budget).
      eps: L_inf budget in [0,1] units.
    Returns:
      ``uint8`` array, ``clip(x0 + clip(rint(255 delta), -k, k), 0, 255)`` with k = ``budget_steps(eps)``,
      so ``max|x' - x0| <= k <= 255 eps`` holds exactly, as integers.
    """
    x0 = np.asarray(x0_uint8)
    if x0.dtype != np.uint8:
        raise TypeError(f"x0_uint8 must be uint8, got {x0.dtype} (use to_uint8 on a [0,1] float image)")
    d = np.asarray(delta, dtype=np.float64)
    if d.shape != x0.shape:
        raise ValueError(f"delta shape {d.shape} != image shape {x0.shape}")
    if not np.isfinite(d).all():
        raise ValueError("delta contains NaN or Inf")
    k = budget_steps(eps)
    off = np.clip(np.rint(d * 255.0), -k, k).astype(np.int16)
    return np.clip(x0.astype(np.int16) + off, 0, 255).astype(np.uint8)


def to_uint8(x) -> np.ndarray:
    """``[0,1]`` float image -> uint8 by rounding (exact for k/255 inputs)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)


def linf_uint8(a: np.ndarray, b: np.ndarray) -> int:
    """``max|a - b|`` of two uint8 images, as an integer number of 1/255 steps."""
    return int(np.max(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)), initial=0))


def map_back(delta_work, loaded: LoadedImage | Transform) -> np.ndarray:
    """Perturbation on the working canvas -> perturbation at the original resolution.

    The canvas region that holds the image is resized (bilinear, a convex combination, so
    ``|delta|`` never grows) to the crop window and placed there; outside the window it is 0.

    Args:
      delta_work: ``[H, W, C]`` float, H, W = ``transform.work_hw``.
      loaded: the ``LoadedImage`` (or its ``Transform``).
    Returns:
      ``[H0, W0, C] float32``.
    """
    t = loaded.transform if isinstance(loaded, LoadedImage) else loaded
    d = np.asarray(delta_work, dtype=np.float32)
    if d.ndim != 3 or tuple(d.shape[:2]) != tuple(t.work_hw):
        raise ValueError(f"delta_work shape {d.shape} does not match the working size {t.work_hw}")
    (oy, ox), (rh, rw) = t.offset, t.resized_hw
    top, left, ch, cw = t.crop_box
    region = d[oy:oy + rh, ox:ox + rw]
    if (rh, rw) != (ch, cw):
        chans = [np.asarray(Image.fromarray(np.ascontiguousarray(region[..., c]), mode="F")
                            .resize((cw, ch), Image.Resampling.BILINEAR)) for c in range(d.shape[-1])]
        lo, hi = (float(region.min()), float(region.max())) if region.size else (0.0, 0.0)
        region = np.clip(np.stack(chans, axis=-1), lo, hi)  # guard against float round-off only
    out = np.zeros(tuple(t.original_hw) + (d.shape[-1],), np.float32)
    out[top:top + ch, left:left + cw] = region
    return out


def protect_at_original(original_uint8: np.ndarray, delta_orig, eps: float) -> np.ndarray:
    """Full-resolution protected ``uint8`` image, exactly inside the budget (see ``quantize_protected``)."""
    return quantize_protected(original_uint8, delta_orig, eps)


def protect_loaded(loaded: LoadedImage, delta_work, eps: float) -> np.ndarray:
    """``protect_at_original(loaded.original_uint8, map_back(delta_work, loaded), eps)``."""
    return protect_at_original(loaded.original_uint8, map_back(delta_work, loaded), eps)


# --------------------------------------------------------------------------------- output & listing


def _is_within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_output_dir(workdir, input_dirs) -> Path:
    """Refuses a workdir equal to or inside an input folder (symlinks resolved); returns it resolved.

    An input folder *inside* the workdir is allowed (e.g. ``run/inputs``): listing is not recursive,
    and ``save_png_atomic(..., forbidden_dirs=input_dirs)`` still refuses to write into it.
    ``input_dirs`` may contain image files; their parent folders are used.
    """
    wd = Path(workdir).expanduser().resolve()
    for d in input_dirs:
        d = Path(d).expanduser().resolve()
        if d.is_file():
            d = d.parent
        if _is_within(wd, d):
            raise OutputDirError(f"workdir {wd} is {'the' if wd == d else 'inside the'} input folder {d}; "
                                 "choose a workdir outside it (originals are never written next to themselves)")
    return wd


def check_workdir(workdir) -> Path:
    """Refuses a workdir that cannot be a folder: an existing file (or FIFO, device, broken or looping link), a
    path under such a file, or under a folder this process cannot write. Only stats (creates nothing); returns
    the absolute path. DataError names the flag value and the offending path."""
    wd = Path(os.path.abspath(Path(workdir).expanduser()))
    for p in (wd, *wd.parents):
        try:
            st = os.stat(p)
        except (FileNotFoundError, NotADirectoryError):
            if os.path.lexists(p):
                raise DataError(f"--workdir={workdir}: {p} is a broken symbolic link") from None
            continue  # does not exist yet (created by the run), or a parent is a file: found further up
        except OSError as e:
            raise DataError(f"--workdir={workdir}: cannot use {p} ({e.strerror or e})") from None
        if not stat.S_ISDIR(st.st_mode):
            what = "is an existing file, not a folder" if p == wd else "is a file, so no folder can be created under it"
            raise DataError(f"--workdir={workdir}: {p} {what}")
        if not os.access(p, os.W_OK | os.X_OK):
            raise DataError(f"--workdir={workdir}: {p} is not writable")
        return wd
    return wd


def save_png_atomic(path, image_uint8: np.ndarray, *, forbidden_dirs=(), icc_profile: bytes | None = None) -> Path:
    """``save_image_atomic(..., fmt="png")``."""
    return save_image_atomic(path, image_uint8, forbidden_dirs=forbidden_dirs, icc_profile=icc_profile)


def save_image_atomic(path, image_uint8: np.ndarray, *, fmt: str = "png", forbidden_dirs=(),
                      icc_profile: bytes | None = None, exif: bytes | None = None) -> Path:
    """Writes ``[H, W, 3]`` (or ``[H, W]``) uint8 as a lossless PNG or WebP atomically; refuses paths inside
    ``forbidden_dirs``. ``icc_profile`` / ``exif``: metadata blocks copied into the file (PNG iCCP / eXIf, WebP
    ICCP / EXIF chunks). WebP is written lossless with ``exact`` RGB (libwebp), so the pixels read back are the
    pixels given and the budget holds on disk.

    Returns the written path. The parent folder must exist.
    """
    if fmt not in OUTPUT_FORMATS:
        raise ValueError(f"output format must be one of {OUTPUT_FORMATS}, got {fmt!r}")
    path = Path(path)
    a = np.asarray(image_uint8)
    if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))):
        raise ValueError(f"expected an [H, W, 3] uint8 image, got {a.shape} {a.dtype}")
    target = path.expanduser().resolve()
    for d in forbidden_dirs:
        d = Path(d).expanduser().resolve()
        if d.is_file():
            d = d.parent
        if _is_within(target.parent, d):
            raise OutputDirError(f"refusing to write {target}: it is inside the input folder {d}")
    buf = _stdio.BytesIO()
    kwargs = {k: v for k, v in (("icc_profile", icc_profile), ("exif", exif)) if v}
    if fmt == "webp":
        kwargs.update(lossless=True, quality=100, method=4, exact=True)
    Image.fromarray(a).save(buf, format=fmt.upper(), **kwargs)
    atomic_write_bytes(target, buf.getvalue())
    return target


def image_size(path) -> tuple[int, int] | None:
    """``(H, W)`` of an image file as displayed (EXIF orientation applied), from its header only; None when it
    cannot be read."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            return (w, h) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (h, w)
    except Exception:  # noqa: BLE001 - any unreadable file: no size
        return None


def read_back_uint8(path) -> np.ndarray:
    """Re-reads a written PNG or WebP as ``[H, W, 3] uint8`` (for checking the on-disk budget)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB") if im.mode != "RGB" else im, dtype=np.uint8).copy()


def _has_magic(s: str) -> bool:
    return any(c in s for c in "*?[")


# Why an entry of the input folder/pattern is not an input; ``Listing.warning`` counts them in this order.
SKIP_REASONS = ("inside the workdir", "symlink loop", "broken symlink", "unreadable", "directory",
                "not a regular file", "unsupported extension", "hidden")
_PLURAL = {"symlink loop": "symlink loops", "broken symlink": "broken symlinks", "directory": "directories",
           "not a regular file": "not regular files", "unsupported extension": "unsupported extensions"}


@dataclasses.dataclass(frozen=True)
class Listing:
    """What :func:`list_inputs` found for one ``--images`` value.

    Attributes:
      spec: the folder, pattern or file as given.
      paths: the usable image files, sorted (what ``list_images`` returns).
      skipped: reason (one of ``SKIP_REASONS``) -> entries left out because they are not inputs (a folder, a
        ``.gif``, a symlink loop, a file under the run's own workdir, ...). Reported as one warning line.
      rejected: ``(entry, why)`` for entries that look like inputs but must not be used (a link into the run's
        workdir: one of its own outputs). Each is reported by name.
    """

    spec: str
    paths: list[Path]
    skipped: dict[str, list[Path]]
    rejected: list[tuple[Path, str]]

    def warning(self) -> str | None:
        """One line counting the skipped entries by reason, e.g. ``skipped 3 entries in photos/: 1 symlink loop,
        1 unsupported extension (.gif), 1 directory``; None when nothing was skipped."""
        n = sum(len(v) for v in self.skipped.values())
        if not n:
            return None
        parts = []
        for reason in SKIP_REASONS:
            entries = self.skipped.get(reason, [])
            if not entries:
                continue
            label = reason if len(entries) == 1 else _PLURAL.get(reason, reason)
            if reason == "unsupported extension":
                exts = sorted({q.suffix.lower() or "(none)" for q in entries})
                label += f" ({', '.join(exts[:6])}{', ...' if len(exts) > 6 else ''})"
            parts.append(f"{len(entries)} {label}")
        return f"skipped {n} {'entry' if n == 1 else 'entries'} in {self.spec}: {', '.join(parts)}"


def _within(p: Path, root: Path | None) -> bool:
    return root is not None and _is_within(p, root)


def _classify(q: Path, wd: Path | None, keep: Path | None) -> tuple[str, str | None]:
    """``("ok", None)``, ``("skip", reason)`` or ``("reject", why)`` for one folder entry or pattern match.

    Only ``os.stat``/``lstat``/``realpath``: nothing is opened (a FIFO would block), nothing written. ``wd`` is the
    resolved workdir; entries under it are not inputs, except under ``keep`` (an input folder the user named
    inside the workdir). An entry outside it whose link target lies inside it is rejected.
    """
    if wd is not None:
        here = Path(os.path.realpath(q.parent)) / q.name  # where the entry itself is (its links not followed)
        target = Path(os.path.realpath(q))
        if _within(here, wd) and not _within(here, keep):
            return "skip", "inside the workdir"
        if _within(target, wd) and not _within(target, keep):
            return "reject", (f"resolves to {target}, inside the workdir {wd}: it is one of this run's outputs, "
                              "never an input")
    try:
        st = os.stat(q)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "skip", "symlink loop"
        return "skip", "broken symlink" if os.path.islink(q) else "unreadable"
    if q.name.startswith("."):
        return "skip", "hidden"
    if stat.S_ISDIR(st.st_mode):
        return "skip", "directory"
    if not stat.S_ISREG(st.st_mode):
        return "skip", "not a regular file"
    if q.suffix.lower() not in IMAGE_EXTENSIONS:
        return "skip", "unsupported extension"
    return "ok", None


def _spec_root(s: str) -> Path:
    """The folder a spec lists: the folder itself, a file's folder, or a pattern's leading literal folders."""
    p = Path(os.path.expanduser(s))
    if not _has_magic(s):
        return p if p.is_dir() else p.parent
    parts = p.parts
    lead = next(i for i, part in enumerate(parts) if _has_magic(part))
    return Path(*parts[:lead]) if lead else Path(".")


def _candidates(s: str) -> list[Path]:
    """Entries named by ``s`` before classification; DataError when the folder/file/pattern does not exist."""
    p = Path(os.path.expanduser(s))
    if p.is_dir():
        try:
            return sorted(p.iterdir())
        except OSError as e:
            raise DataError(f"cannot list the folder {p} ({e.strerror or e})") from None
    if p.is_file():
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"{p} is not an image file name (accepted: {', '.join(IMAGE_EXTENSIONS)})")
        return [p]
    if not _has_magic(s):
        if os.path.lexists(p):  # a symlink loop, a broken link, a FIFO or device named as the input
            raise DataError(f"{s} is not an image file or folder ({_classify(p, None, None)[1]})")
        raise DataError(f"no such file or folder: {s}")
    return sorted({Path(q) for q in glob.glob(os.path.expanduser(s), recursive=True)})


def list_inputs(spec, *, exclude=None) -> Listing:
    """The input images named by ``spec``, with what was left out and why.

    Args:
      spec: a folder (non-recursive), a glob pattern (``**`` recurses) or one image file.
      exclude: the run's workdir. Nothing under it is ever an input (the run's own outputs must not become
        inputs when a pattern covers the workdir): such entries are skipped ("inside the workdir"), and an
        entry elsewhere that links into it is rejected. Exception: entries under ``spec``'s own folder when that
        folder lies strictly inside the workdir (``--images=run/inputs --workdir=run``, which
        ``check_output_dir`` allows).
    Returns:
      :class:`Listing`; ``paths`` sorted; only ``IMAGE_EXTENSIONS`` (any case); hidden files, folders, symlink
      loops, broken links and special files are skipped, each counted by reason.
    Raises:
      DataError: the folder/pattern does not exist or yields no usable image (the message names it and says what
        was skipped or rejected there).
    """
    s = str(spec)
    wd = Path(exclude).expanduser().resolve() if exclude is not None else None
    root = Path(os.path.realpath(_spec_root(s)))
    keep = root if wd is not None and root != wd and _is_within(root, wd) else None
    paths, skipped, rejected = [], {}, []
    for q in _candidates(s):
        verdict, why = _classify(q, wd, keep)
        if verdict == "ok":
            paths.append(q)
        elif verdict == "skip":
            skipped.setdefault(why, []).append(q)
        else:
            rejected.append((q, why))
    listing = Listing(s, sorted(paths), skipped, rejected)
    if not paths:
        what = f"folder {s}" if Path(os.path.expanduser(s)).is_dir() else (
            f"the pattern {s}" if _has_magic(s) else s)
        detail = "; ".join([f"{q}: {w}" for q, w in rejected[:3]] + [listing.warning() or ""]).strip("; ")
        head = (f"no images match {what}" if _has_magic(s) else
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {what}")
        raise DataError(head + (f" ({detail})" if detail else ""))
    return listing


def list_images(spec, *, exclude=None) -> list[Path]:
    """Image files named by ``spec``: a folder (non-recursive), a glob pattern (``**`` recurses) or one file.

    ``list_inputs(spec, exclude=exclude).paths``: sorted by path; only ``IMAGE_EXTENSIONS`` (any case); hidden
    files skipped. Raises DataError naming the folder/pattern when nothing matches or it does not exist.
    """
    return list_inputs(spec, exclude=exclude).paths


def unlisted_prompt_images(prompts: dict, paths) -> dict[str, str]:
    """Prompt rows that name an image which is not one of the run's listed inputs: ``{key: problem}``.

    ``prompts`` is ``load_prompts``'s dict (a record's ``image`` is the resolved path it names, or None when the
    row names no file); ``paths`` the listed inputs. A row naming ``../../etc/passwd`` (or any file outside the
    input folder, or a file in it that the listing skipped) would otherwise be accepted silently: such a row
    prompts nothing and is a problem of the prompts file. Rows without an ``image`` (matched by id) are not
    returned. Pure (resolves paths, reads nothing).
    """
    listed = {str(Path(p).expanduser().resolve()) for p in paths}
    folders = sorted({str(Path(p).expanduser().resolve().parent) for p in paths})
    out = {}
    for key, rec in prompts.items():
        image = rec.get("image")
        if image and str(Path(image).resolve()) not in listed:
            where = ("in an input folder but not listed as an input"
                     if str(Path(image).resolve().parent) in folders else
                     f"outside the input folder{'s' if len(folders) > 1 else ''} {', '.join(folders[:3])}")
            out[key] = f"{key}: image {image} is not one of the run's inputs ({where}); row ignored"
    return out
