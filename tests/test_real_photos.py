"""A person with real photos: ``python -m experiments.tdae`` on a 3:2 photo and a camera JPEG (built-in tiny model,
2 steps, 32 px working size, in-process).

* Every pixel is protected by default (``--resize=resize``: the whole frame); ``--resize=center_crop`` stays
  available, says in one warning line how much of the photo it leaves unprotected, and the report says so too.
* A demonstration surrogate (built-in tiny, shipped miniature) on a photo larger than it works at: a warning line
  and a banner at the top of report.html saying it does not protect against real editors and how to use real weights.
* report.html shows the instruction per image, the settings (resize policy included), the verdict, loss curves
  with labelled axes and the preview editor's name.
* ``--output_format=webp`` is lossless (the budget holds on disk, read back); ``--keep_metadata`` copies EXIF with
  the orientation tag set to 1; without it EXIF is not copied and a warning says so.
"""
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import tdae as cli
from tdae_jax import pipeline
from tdae_jax.data import io as dio
from tdae_jax.miniature import shipped

EPS = 8 / 255
FAST = ["--weights_dir=tiny", "--surrogate=ip2p", "--objective=pge", "--steps=2", "--size=32", f"--eps={EPS}",
        "--step_size=0.01", "--batch_size=1", "--log_every=1"]
H, W = 48, 72  # a 3:2 landscape photo


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def run(argv) -> tuple[int, list[str]]:
    """Runs the command in-process; returns its exit code and the warning lines of the ``tdae_jax`` logger."""
    handler, logger = _Lines(), logging.getLogger("tdae_jax")
    logger.addHandler(handler)
    try:
        code = cli.run_cli(["tdae"] + FAST + argv)
    finally:
        logger.removeHandler(handler)
    return code, handler.lines


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """``wide.png`` (48x72, 3:2) with a prompts row, and ``cam.jpg``: stored 56x40 with EXIF (maker, orientation 6:
    displayed 40x56, portrait)."""
    root = tmp_path_factory.mktemp("photos")
    d = root / "in"
    d.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(d / "wide.png")
    exif = Image.Exif()
    exif[0x010F], exif[0x0112] = "Canon", 6
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(d / "cam.jpg", exif=exif.tobytes(),
                                                                            quality=95)
    (root / "prompts.csv").write_text("image,instruction\nin/wide.png,make it snowy\n")
    return root


@pytest.fixture(scope="module")
def default_run(photos):
    """The defaults (no --resize, PNG, no metadata) with the report's preview edits on."""
    work = photos / "default"
    code, lines = run([f"--images={photos / 'in'}", f"--prompts={photos / 'prompts.csv'}", f"--workdir={work}",
                       "--preview_edit=true", "--preview_steps=2", "--preview_guidance=1",
                       "--preview_image_guidance=1"])
    return {"code": code, "lines": lines, "work": work, "html": (work / "report.html").read_text()}


def _section(html: str, image_id: str) -> str:
    return re.search(rf"<section><h3>{image_id} .*?</section>", html, re.S).group(0)


def test_default_protects_every_pixel_of_a_3_2_photo(photos, default_run):
    assert default_run["code"] == 0
    orig = np.asarray(Image.open(photos / "in" / "wide.png"), np.int16)
    prot = np.asarray(Image.open(default_run["work"] / "protected" / "wide.png"), np.int16)
    assert prot.shape == orig.shape == (H, W, 3)
    diff = np.abs(prot - orig).max(-1)
    assert diff.max() <= dio.budget_steps(EPS)
    blocks = diff.reshape(H // 8, 8, W // 8, 8).max(axis=(1, 3))  # every 8x8 block: borders, corners, centre
    assert (blocks > 0).all(), blocks
    assert not [line for line in default_run["lines"] if "unprotected" in line]


def test_center_crop_is_announced_and_reported(photos):
    work = photos / "crop"
    code, lines = run([f"--images={photos / 'in' / 'wide.png'}", f"--workdir={work}", "--resize=center_crop"])
    assert code == 0
    [line] = [line for line in lines if "unprotected" in line]
    assert "--resize=center_crop" in line and "33%" in line and "wide.png" in line and "--resize=resize" in line
    orig = np.asarray(Image.open(photos / "in" / "wide.png"), np.int16)
    prot = np.asarray(Image.open(work / "protected" / "wide.png"), np.int16)
    side = (W - H) // 2  # the left and right borders outside the centred 48x48 square: written unchanged
    assert (prot[:, :side] == orig[:, :side]).all() and (prot[:, -side:] == orig[:, -side:]).all()
    assert (prot[:, side:-side] != orig[:, side:-side]).any()
    assert "<b>resize</b>: center_crop: only the centred square" in (work / "report.html").read_text()


def test_unprotected_fraction(photos):
    wide = photos / "in" / "wide.png"
    assert dio.unprotected_fraction(dio.load_image(wide, size=32, resize="center_crop").transform) == pytest.approx(1 / 3)
    for mode in ("resize", "pad"):
        assert dio.unprotected_fraction(dio.load_image(wide, size=32, resize=mode).transform) == 0
    odd = photos / "odd.png"  # 45x70: not multiples of 8; --resize=none pads, so no border is left out
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (45, 70, 3), dtype=np.uint8)).save(odd)
    li = dio.load_image(odd, size=None, resize="none")
    assert dio.unprotected_fraction(li.transform) == 0 and li.array.shape == (48, 72, 3)
    assert (dio.map_back(np.full((48, 72, 3), 0.01, np.float32), li) == np.float32(0.01)).all()


def test_demonstration_model_banner(default_run):
    html = default_run["html"]
    banner = re.search(r"<div class='banner'[^>]*>(.*?)</div>", html, re.S)
    assert banner and html.index("class='banner'") < html.index("<h1>")  # at the top, above everything
    text = banner.group(1)
    assert "built-in tiny random model" in text and "does NOT protect these photos against real editors" in text
    assert "--weights_dir=&lt;local diffusers folder&gt;" in text and "upsampled" in text
    assert [line for line in default_run["lines"] if "Demonstration only" in line]  # and one warning line


def test_demonstration_notice_rules(tmp_path):
    """Shipped miniature: a banner above its 32 px; the tiny model above the working size; real weights: never."""
    mini = str(shipped.path("ip2p_a"))
    cfg = pipeline.RunConfig(images="x", workdir="w", weights_dir=mini, size=32)
    assert "shipped miniature model ip2p_a" in pipeline.demo_notice(cfg, [(H, W)])
    assert pipeline.demo_notice(cfg, [(32, 32)]) is None
    assert pipeline.demo_notice(pipeline.RunConfig(images="x", workdir="w", weights_dir="", size=64), [(64, 48)]) is None
    none = pipeline.RunConfig(images="x", workdir="w", weights_dir=mini, size=None, resize="none")
    assert "at the photos' resolution" in pipeline.demo_notice(none, [(H, W)])
    assert pipeline.demo_notice(pipeline.RunConfig(images="x", workdir="w", weights_dir=str(tmp_path)), [(H, W)]) is None


def test_report_says_what_happened(default_run):
    html = default_run["html"]
    assert "make it snowy" in _section(html, "wide")  # the prompts row
    assert "make it a watercolor painting" in _section(html, "cam")  # the default instruction
    assert "<b>resize</b>: resize: the whole frame" in html and "<b>eps</b>:" in html
    assert re.search(r"<b>preview editor</b>: ip2p editor of the ip2p surrogate", html)
    assert "edit(protected)" in _section(html, "wide")
    verdict = re.search(r"<p class='verdict'>(.*?)</p>", html).group(1)
    assert verdict.startswith("2 of 2 images protected and written within the budget (on-disk L_inf &lt;= 8/255)")
    for image_id in ("wide", "cam"):
        svg = re.search(r"<svg class='loss'.*?</svg>", _section(html, image_id), re.S).group(0)
        assert "class='xlabel'>iteration</text>" in svg and "class='ylabel'" in svg and ">loss</text>" in svg
        assert svg.count("<line") == 2  # the two axes


def test_exif_is_not_copied_by_default(default_run):
    out = default_run["work"] / "protected" / "cam.png"
    with Image.open(out) as im:
        assert im.size == (40, 56) and not dict(im.getexif())  # stored upright, no EXIF
    assert [line for line in default_run["lines"] if "EXIF" in line and "--keep_metadata" in line]
    assert "EXIF not copied" in default_run["html"]


def test_webp_output_keeps_metadata_and_budget(photos):
    work = photos / "webp"
    code, _ = run([f"--images={photos / 'in'}", f"--workdir={work}", "--output_format=webp", "--keep_metadata",
                   "--report=false"])
    assert code == 0
    assert sorted(p.name for p in (work / "protected").iterdir()) == ["cam.webp", "wide.webp"]
    k = dio.budget_steps(EPS)
    for name in ("cam.jpg", "wide.png"):
        src = dio.load_image(photos / "in" / name, size=None, resize="none")
        out = work / "protected" / f"{Path(name).stem}.webp"
        with Image.open(out) as im:
            assert im.format == "WEBP"
        back = dio.read_back_uint8(out)
        assert back.shape == src.original_uint8.shape and 0 < dio.linf_uint8(back, src.original_uint8) <= k
    with Image.open(work / "protected" / "cam.webp") as im:
        exif = im.getexif()
        assert im.size == (40, 56) and exif.get(0x010F) == "Canon" and exif.get(0x0112) == 1
    assert (work / "manifest.json").read_text().count('"protected/cam.webp"') == 1


def test_bad_output_format_is_a_usage_error(photos, tmp_path, capsys):
    code, _ = run([f"--images={photos / 'in'}", f"--workdir={tmp_path / 'w'}", "--output_format=jpeg"])
    assert code == 2 and not (tmp_path / "w").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "output_format" in err[0]


def test_resumed_run_keeps_the_report(photos, default_run):
    """Re-running the same workdir (nothing left to do, previews off) rewrites a report that still has the banner,
    the instructions and the verdict: they come from the manifest, not from this run's optimisation."""
    work = default_run["work"]
    stamp = (work / "protected" / "wide.png").stat().st_mtime_ns
    code, _ = run([f"--images={photos / 'in'}", f"--prompts={photos / 'prompts.csv'}", f"--workdir={work}"])
    assert code == 0 and (work / "protected" / "wide.png").stat().st_mtime_ns == stamp
    html = (work / "report.html").read_text()
    assert "class='banner'" in html and "make it snowy" in _section(html, "wide")
    assert "2 of 2 images protected" in html


def test_step_too_large_for_the_memory_is_refused_before_anything_is_written(photos, capsys):
    """The step is compiled before the workdir exists; XLA's memory estimate above the limit is exit 2, one line
    naming what would fit, and no workdir. A run within the limit logs the estimate."""
    work = photos / "too_big"
    code, _ = run([f"--images={photos / 'in'}", f"--workdir={work}", "--memory_limit_gib=0.0001"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: the protection step needs about "), err
    assert all(w in err[0] for w in ("--size=32", "--batch_size=1", "--memory_limit_gib", "--memory_efficient"))
    assert not work.exists()


def test_memory_estimate_is_logged(photos, tmp_path):
    """A run within the limit compiles its step before the workdir exists and says how much memory it needs."""
    lines = []
    cfg = pipeline.RunConfig(images=str(photos / "in" / "wide.png"), workdir=str(tmp_path / "w"), size=32,
                             objective=pipeline.configs.Objective(name="pge"), report=False,
                             pgd=pipeline.configs.PGD(steps=1), memory_limit_gib=64.0)
    result = pipeline.run(cfg, progress=lines.append)
    assert result.done == ["wide"] and "memory_limit_gib" in pipeline.RUN_ONLY
    [line] = [ln for ln in lines if "the step needs about" in ln]
    assert re.search(r"needs about \d+\.\d\d GiB per device \(--memory_limit_gib: 64\.0 GiB\)", line), line
    assert lines.index(line) < next(i for i, ln in enumerate(lines) if "iter" in ln or "ETA" in ln)
