"""tdae_jax.data.io: validation, conversions, geometry, the on-disk budget and safe output."""
import hashlib
import os
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from tdae_jax.data import io as dio
from tdae_jax.data.io import (DataError, ImageError, OutputDirError, budget_steps, check_output_dir, linf_uint8,
                              list_images, load_image, map_back, protect_at_original, protect_loaded,
                              quantize_protected, sample_dir, save_png_atomic)

def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png_raw(arr, bitdepth, colortype):
    """Minimal PNG writer (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    rows = [b"\x00" + arr[i].astype(">u2" if bitdepth == 16 else "u1").tobytes() for i in range(h)]

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, bitdepth, colortype, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows)))
            + chunk(b"IEND", b""))


def _sha(p):
    return hashlib.sha256(p.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------ loading


def test_samples_load_on_the_k_over_255_grid():
    paths = list_images(sample_dir())
    assert [p.name for p in paths] == ["astronaut.png", "chelsea.png", "coffee.png"]
    for p in paths:
        li = load_image(p, size=64, resize="center_crop")
        assert li.array.shape == (64, 64, 3) and li.array.dtype == np.float32
        assert li.warnings == [] and li.original_size == (256, 256)
        assert np.array_equal(li.array, np.round(li.array * 255).astype(np.float32) / np.float32(255))
        assert p.stat().st_size < 150_000


def test_exif_orientation_is_applied(tmp_path):
    a = _rgb(48, 40)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    Image.fromarray(a).save(tmp_path / "r.png", exif=exif)
    li = load_image(tmp_path / "r.png", size=None, resize="none", image_id="r_2")
    assert li.original_size == (40, 48) and li.id == "r_2"
    assert np.array_equal(li.original_uint8, np.rot90(a, -1))
    assert li.transform.exif_orientation == 6


@pytest.mark.parametrize("mode,fmt,needle", [
    ("L", "png", "grayscale"), ("1", "png", "grayscale"), ("P", "png", "palette"), ("CMYK", "jpeg", "CMYK"),
    ("I;16", "png", "16-bit grayscale"), ("F", "tiff", "float grayscale"), ("RGBA", "png", "opaque"),
    ("LA", "png", "grayscale+alpha")])
def test_modes_are_converted_with_a_warning(tmp_path, mode, fmt, needle):
    p = tmp_path / f"x.{fmt}"
    Image.fromarray(_rgb(32, 32)).convert(mode).save(p)
    li = load_image(p, size=None, resize="none")
    assert li.original_uint8.shape == (32, 32, 3) and li.original_uint8.dtype == np.uint8
    assert any(needle in w for w in li.warnings), li.warnings


def test_grayscale_16bit_is_rounded_to_8_bits(tmp_path):
    g = np.random.default_rng(1).integers(0, 65536, (24, 24)).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(_png_raw(g, 16, 0))
    li = load_image(tmp_path / "g16.png", size=None, resize="none")
    want = np.rint(g / 257.0).astype(np.uint8)
    assert np.array_equal(li.original_uint8[..., 0], want[:24, :24])
    assert np.array_equal(li.original_uint8[..., 0], li.original_uint8[..., 2])


def test_rgb_16bit_is_reduced_with_a_warning(tmp_path):
    a = np.random.default_rng(2).integers(0, 65536, (24, 24, 3)).astype(np.uint16)
    (tmp_path / "c16.png").write_bytes(_png_raw(a, 16, 2))
    li = load_image(tmp_path / "c16.png", size=None, resize="none")
    assert any("16-bit RGB" in w for w in li.warnings), li.warnings
    assert np.abs(li.original_uint8.astype(int) - a / 257.0).max() <= 1.0


def test_palette_with_transparency_and_alpha_composite_on_white(tmp_path):
    a = np.zeros((20, 20, 4), np.uint8)
    a[..., :3] = _rgb(20, 20, seed=3)
    a[..., 3] = 255
    a[:10, :, 3] = 0  # top half transparent -> white
    a[10:, :5, 3] = 128
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    li = load_image(tmp_path / "t.png", size=None, resize="none")
    assert any("composited on white" in w for w in li.warnings)
    out = li.original_uint8
    assert (out[:8] == 255).all()  # 'none' crops 20 -> 16 rows from row 2; rows 2..9 were transparent
    full = dio._composite_alpha(tmp_path / "t.png", a, [])
    assert np.array_equal(full[10:, 5:], a[10:, 5:, :3])
    want = np.rint(a[10:, :5, :3] * (128 / 255) + 255 * (1 - 128 / 255)).astype(np.uint8)
    assert np.array_equal(full[10:, :5], want)
    p = Image.fromarray(_rgb(20, 20, seed=4)).convert("P")
    p.info["transparency"] = 0
    p.save(tmp_path / "pt.png", transparency=0)
    li = load_image(tmp_path / "pt.png", size=None, resize="none")
    assert any("palette" in w for w in li.warnings)


def test_alpha_only_and_fully_transparent_are_rejected(tmp_path):
    a = np.zeros((32, 32, 4), np.uint8)
    a[..., 3] = np.arange(32, dtype=np.uint8)[None, :] * 8  # a glyph/mask: black everywhere, content in alpha
    Image.fromarray(a, "RGBA").save(tmp_path / "mask.png")
    with pytest.raises(ImageError, match="mask.png: alpha-only"):
        load_image(tmp_path / "mask.png", size=None, resize="none")
    b = np.zeros((32, 32, 4), np.uint8)
    b[..., :3] = _rgb(32, 32)
    Image.fromarray(b, "RGBA").save(tmp_path / "clear.png")
    with pytest.raises(ImageError, match="clear.png: fully transparent"):
        load_image(tmp_path / "clear.png", size=None, resize="none")


def _bad_files(tmp_path):
    a = _rgb(40, 40)
    Image.fromarray(a).save(tmp_path / "ok.png")
    Image.fromarray(a).save(tmp_path / "ok.jpg", quality=90)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    jpg = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    bad = bytearray(data)
    bad[60:90] = b"\x00" * 30
    (tmp_path / "corrupt.png").write_bytes(bytes(bad))
    (tmp_path / "text.png").write_text("this is not an image\n")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.fromarray(a[:4, :4]).save(tmp_path / "tiny.png")
    Image.fromarray(a).save(tmp_path / "anim.gif")
    return {"trunc.png": "truncated", "trunc.jpg": "truncated", "corrupt.png": "corrupt",
            "text.png": "not an image", "empty.png": "empty file", "tiny.png": "too small: 4x4, need at least 16x16",
            "anim.gif": "unsupported format GIF", "missing.png": "cannot read"}


def test_bad_files_raise_image_error_naming_the_file(tmp_path):
    for name, needle in _bad_files(tmp_path).items():
        with pytest.raises(ImageError) as info:
            load_image(tmp_path / name, size=32, resize="center_crop")
        assert str(info.value).startswith(str(tmp_path / name)) and needle in str(info.value), str(info.value)
        assert info.value.path == tmp_path / name
    assert load_image(tmp_path / "ok.png", size=32, resize="center_crop").array.shape == (32, 32, 3)


def test_decompression_bomb_limits(tmp_path, monkeypatch):
    Image.fromarray(_rgb(40, 40)).save(tmp_path / "b.png")
    with pytest.raises(ImageError, match=r"b.png: decompression bomb refused: 40x40 = 1600 pixels"):
        load_image(tmp_path / "b.png", size=None, resize="none", max_pixels=1000)
    before = Image.MAX_IMAGE_PIXELS
    assert load_image(tmp_path / "b.png", size=None, resize="none", max_pixels=1600).original_size == (40, 40)
    assert Image.MAX_IMAGE_PIXELS == before  # globals restored
    for limit in (1000, 700):  # PIL's own warning (1x..2x) and error (>2x) paths
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
        with pytest.raises(ImageError, match="decompression bomb"):
            load_image(tmp_path / "b.png", size=None, resize="none", max_pixels=None)


def test_truncated_images_fail_even_if_pil_is_relaxed(tmp_path, monkeypatch):
    _bad_files(tmp_path)
    from PIL import ImageFile
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ImageError, match="truncated"):
        load_image(tmp_path / "trunc.jpg", size=None, resize="none")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_bad_arguments():
    p = sample_dir() / "coffee.png"
    with pytest.raises(ValueError, match="multiple of 8"):
        load_image(p, size=100, resize="resize")
    with pytest.raises(ValueError, match="size=None"):
        load_image(p, size=64, resize="none")
    with pytest.raises(ValueError, match="resize must be one of"):
        load_image(p, size=64, resize="stretch")


# ----------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("mode,size,hw,work,box", [
    ("none", None, (37, 50), (40, 56), (0, 0, 37, 50)),
    ("center_crop", 32, (40, 60), (32, 32), (0, 10, 40, 40)),
    ("resize", 32, (40, 60), (32, 32), (0, 0, 40, 60)),
    ("pad", 32, (30, 60), (32, 32), (0, 0, 30, 60)),
])
def test_transform_and_map_back(tmp_path, mode, size, hw, work, box):
    a = _rgb(*hw, seed=5)
    Image.fromarray(a).save(tmp_path / "g.png")
    li = load_image(tmp_path / "g.png", size=size, resize=mode)
    t = li.transform
    assert li.array.shape == work + (3,) and t.work_hw == work and t.crop_box == box
    assert work[0] % 8 == 0 and work[1] % 8 == 0
    if mode == "none":  # the whole photo, edge-padded at the bottom/right to multiples of 8
        work_u8 = np.rint(li.array * 255).astype(np.uint8)
        assert np.array_equal(work_u8[:37, :50], a) and (work_u8[37:, :50] == a[36:37]).all()
        assert (work_u8[:37, 50:] == a[:, 49:50]).all()
    if mode == "pad":
        assert t.resized_hw == (16, 32) and t.offset == (8, 0)
    eps = 8 / 255
    # A constant delta on the canvas maps back to exactly that constant inside the crop window, 0 outside.
    const = map_back(np.full(work + (3,), 0.02, np.float32), li)
    top, left, h, w = box
    inside = np.zeros(hw, bool)
    inside[top:top + h, left:left + w] = True
    assert const.shape == hw + (3,)
    assert np.allclose(const[inside], 0.02, atol=1e-7) and (const[~inside] == 0).all()
    # A random in-budget delta stays in budget at the original resolution and on disk.
    d = np.random.default_rng(6).uniform(-eps, eps, work + (3,)).astype(np.float32)
    back = map_back(d, li)
    assert np.abs(back).max() <= np.abs(d).max()
    if mode == "none":  # every pixel of the photo gets its own canvas value; the padding is dropped
        assert np.array_equal(back, d[:37, :50])
    if mode == "pad":  # the padding rows of the canvas are discarded
        d2 = d.copy()
        d2[:8] = 1.0
        d2[24:] = -1.0
        assert np.array_equal(map_back(d2, li), back)
    prot = protect_loaded(li, d, eps)
    assert prot.shape == hw + (3,) and linf_uint8(prot, a) <= 8
    (tmp_path / "out").mkdir()
    save_png_atomic(tmp_path / "out" / "g.png", prot)
    assert linf_uint8(dio.read_back_uint8(tmp_path / "out" / "g.png"), a) <= 8
    with pytest.raises(ValueError, match="working size"):
        map_back(np.zeros((8, 8, 3)), li)


# ------------------------------------------------------------------------------------- budget


@pytest.mark.parametrize("eps", [8 / 255, 0.03, 16 / 255, 4 / 255, float(np.float32(8 / 255)), 1e-3, 0.05, 0.5])
def test_budget_is_exact_on_disk(tmp_path, eps):
    rng = np.random.default_rng(int(eps * 1e6))
    x0 = rng.integers(0, 256, (2, 33, 47, 3), dtype=np.uint8)
    x0[0, :3] = 0
    x0[0, 3:6] = 255  # saturated pixels exercise the [0,255] clip
    delta = rng.uniform(-3 * eps, 3 * eps, x0.shape)  # deliberately over budget, off the grid
    k = budget_steps(eps)
    assert k / 255 <= eps + 1e-9 and (k + 1) / 255 > eps
    out = quantize_protected(x0, delta, eps)
    for i in range(2):
        save_png_atomic(tmp_path / f"{i}.png", out[i])
        back = np.asarray(Image.open(tmp_path / f"{i}.png"))
        diff = np.abs(back.astype(int) - x0[i].astype(int))
        assert diff.max() <= k and diff.max() <= eps * 255 + 1e-6
        assert np.array_equal(back, out[i])
    # The budget is used, not wasted: far-over-budget entries sit at +-k unless clipped at 0/255.
    free = (x0.astype(int) + np.sign(delta) * k >= 0) & (x0.astype(int) + np.sign(delta) * k <= 255)
    big = (np.abs(delta) * 255 >= k + 0.5) & free
    assert (np.abs(out.astype(int) - x0)[big] == k).all()
    assert np.array_equal(protect_at_original(x0[0], delta[0], eps), out[0])


def test_quantize_rejects_bad_input():
    x = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(TypeError, match="uint8"):
        quantize_protected(x.astype(np.float32), np.zeros((8, 8, 3)), 0.03)
    with pytest.raises(ValueError, match="shape"):
        quantize_protected(x, np.zeros((8, 9, 3)), 0.03)
    with pytest.raises(ValueError, match="NaN"):
        quantize_protected(x, np.full((8, 8, 3), np.nan), 0.03)


# ------------------------------------------------------------------------------------- output


def test_atomic_save_leaves_no_temp_and_never_touches_the_original(tmp_path, monkeypatch):
    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    out.mkdir()
    src = inp / "photo.jpg"
    Image.fromarray(_rgb(64, 64)).save(src, quality=92)
    before = _sha(src)
    li = load_image(src, size=32, resize="resize")
    prot = protect_loaded(li, np.full((32, 32, 3), 0.03, np.float32), 0.03)
    save_png_atomic(out / "photo.png", prot, forbidden_dirs=[inp])
    save_png_atomic(out / "photo.png", prot, forbidden_dirs=[inp])  # overwrite is fine
    assert sorted(os.listdir(out)) == ["photo.png"] and _sha(src) == before
    with pytest.raises(OutputDirError, match="inside the input folder"):
        save_png_atomic(inp / "photo.png", prot, forbidden_dirs=[inp])
    (tmp_path / "link").symlink_to(inp, target_is_directory=True)
    with pytest.raises(OutputDirError):
        save_png_atomic(tmp_path / "link" / "p.png", prot, forbidden_dirs=[src])
    assert sorted(os.listdir(inp)) == ["photo.jpg"] and _sha(src) == before

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(dio.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_png_atomic(out / "new.png", prot)
    assert sorted(os.listdir(out)) == ["photo.png"]


def test_check_output_dir(tmp_path):
    inp = tmp_path / "images"
    (inp / "sub").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(inp, target_is_directory=True)
    for bad in (inp, inp / "sub", inp / "new" / "run", tmp_path / "alias" / "run"):
        with pytest.raises(OutputDirError, match="input folder"):
            check_output_dir(bad, [inp])
    with pytest.raises(OutputDirError):
        check_output_dir(inp / "run", [tmp_path / "alias"])
    assert check_output_dir(tmp_path / "run", [inp]) == (tmp_path / "run").resolve()
    assert check_output_dir(tmp_path, [inp]) == tmp_path.resolve()  # input inside the workdir: allowed


def test_list_images(tmp_path):
    for n in ("b.PNG", "a.jpg", "c.webp", ".hidden.png", "notes.txt", "d.tiff"):
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "e.png").write_bytes(b"x")
    assert [p.name for p in list_images(tmp_path)] == ["a.jpg", "b.PNG", "c.webp", "d.tiff"]
    assert [p.name for p in list_images(str(tmp_path / "*.jpg"))] == ["a.jpg"]
    assert [p.name for p in list_images(str(tmp_path / "**" / "e.png"))] == ["e.png"]
    assert list_images(tmp_path / "a.jpg") == [tmp_path / "a.jpg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        list_images(tmp_path / "empty")
    with pytest.raises(DataError, match=r"no images match the pattern .*\*\.gif"):
        list_images(str(tmp_path / "*.gif"))
    with pytest.raises(DataError, match="no such file or folder"):
        list_images(tmp_path / "nope")


@pytest.mark.parametrize("name,kw", [("x.bmp", {}), ("x.tiff", {}), ("x.webp", {"lossless": True}), ("x.png", {})])
def test_accepted_formats_are_lossless_where_the_format_is(tmp_path, name, kw):
    a = _rgb(24, 32, seed=7)
    Image.fromarray(a).save(tmp_path / name, **kw)
    li = load_image(tmp_path / name, size=None, resize="none")
    assert li.warnings == [] and np.array_equal(li.original_uint8, a)


def test_multipage_tiff_uses_the_first_page_and_says_so(tmp_path):
    pages = [Image.fromarray(_rgb(24, 24, seed=s)) for s in (8, 9)]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    li = load_image(tmp_path / "m.tif", size=None, resize="none")
    assert np.array_equal(li.original_uint8, np.asarray(pages[0]))
    assert any("2 frames/pages" in w for w in li.warnings)
    Image.fromarray(_rgb(24, 24)).save(tmp_path / "misnamed.png", format="JPEG")
    assert any("content is JPEG" in w for w in load_image(tmp_path / "misnamed.png", size=None,
                                                           resize="none").warnings)
