"""Hostile inputs of ``python -m experiments.tdae``: odd file names, links into the run's own outputs, patterns that
cover the workdir, silent skips, prompt rows pointing elsewhere, bad flag values and hostile weight files.

Every case runs the command in-process on the quickstart flagfile (tiny surrogate, PGE, 2 steps, 32 px): a problem
with one input fails or skips that input, by name, and the others are protected; a problem with the run is exit 2
with one ``error:`` line, before the workdir exists; the originals stay byte-identical.
"""
import hashlib
import logging
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import tdae as cli
from tdae_jax.data import io as dio
from tdae_jax.data.files import atomic_write_bytes, new_file_mode
from tdae_jax.data.manifest import load_prompts
from tdae_jax.miniature import shipped
from tdae_jax.models import weights

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--flagfile=" + str(ROOT / "experiments/flags/quickstart.flags"), "--prompts=", "--steps=2",
        "--preview_edit=false", "--batch_size=1", "--report=false", "--weights_dir=tiny", "--objective=pge"]
ODD = os.fsdecode(b"caf\xe9-latin1")  # a file name that is not UTF-8 (surrogate-escaped by Python)


def run(argv):
    return cli.run_cli(["tdae"] + BASE + argv)


def _png(path, seed, side=32):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)


def _digest(paths):
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in paths}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tree X with inputs in X/in and the workdir X/W, protected twice with ``--images='X/**/*'``; X/in holds
    two good images, one with a non-UTF-8 name, a symlink loop, a .gif, a folder named x.png and a link into
    X/W/protected; the prompts file has a row naming ../../etc/passwd."""
    x = tmp_path_factory.mktemp("hostile")
    d, work = x / "in", x / "W"
    d.mkdir()
    _png(d / "good.png", 0)
    _png(os.path.join(os.fsencode(d), os.fsencode(ODD) + b".png"), 1)
    (d / "loop.png").symlink_to("loop.png")
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(d / "anim.gif")
    (d / "x.png").mkdir()
    (d / "link.png").symlink_to(work / "protected" / "good.png")
    prompts = x / "prompts.csv"
    passwd = os.path.relpath("/etc/passwd", x)  # ../../../../etc/passwd: a real file outside the inputs
    prompts.write_text(f"image,instruction\nin/good.png,make it snowy\n{passwd},steal it\n")
    originals = [d / "good.png", d / f"{ODD}.png", d / "anim.gif", prompts]
    before = _digest(originals)
    argv = [f"--images={x}/**/*", f"--workdir={work}", f"--prompts={prompts}"]
    runs, warnings = [], _Warnings()
    logging.getLogger("tdae_jax").addHandler(warnings)
    try:
        for _ in range(2):
            code = run(argv)
            runs.append(code)
    finally:
        logging.getLogger("tdae_jax").removeHandler(warnings)
    return {"x": x, "d": d, "work": work, "codes": runs, "before": before, "originals": originals,
            "warnings": warnings.lines}


class _Warnings(logging.Handler):
    """The warning lines of the module's runs (caplog is function-scoped; the runs are shared)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def shared_logs(shared, capsys, caplog):
    return shared


def test_non_utf8_file_name_is_protected(shared):
    """Such a name used to stop the whole run (``prng.image_uid`` encoded the id as strict UTF-8)."""
    out = shared["work"] / "protected"
    assert (out / f"{ODD}.png").is_file() and (out / "good.png").is_file()
    assert shared["codes"][0] == 1  # exit 1: the link into the outputs failed, every image was protected
    assert _digest(shared["originals"]) == shared["before"]


def test_link_into_the_workdir_is_rejected_by_name(shared):
    """d/link.png -> W/protected/good.png: one of the run's own outputs, never an input (first run: dangling;
    second run: it exists), so no ``link.png`` is protected, and the manifest/metrics name it as failed."""
    out = shared["work"] / "protected"
    assert not (out / "link.png").exists() and not list(out.glob("good_*.png"))
    listing = dio.list_inputs(f"{shared['x']}/**/*", exclude=shared["work"])
    [(path, why)] = listing.rejected
    assert path.name == "link.png" and "one of this run's outputs" in why
    metrics = (shared["work"] / "metrics.csv").read_text()
    assert "link.png" in metrics and "one of this run's outputs" in metrics


def test_pattern_covering_the_workdir_never_lists_outputs(shared):
    """``--images='X/**/*'`` with the workdir under X, run twice: the second run neither protects its own
    outputs again nor fails on them; they are counted as "inside the workdir"."""
    names = sorted(p.name for p in (shared["work"] / "protected").iterdir())
    assert names == sorted(["good.png", f"{ODD}.png"])
    assert shared["codes"][1] == 1  # the same failures as the first run, nothing new
    listing = dio.list_inputs(f"{shared['x']}/**/*", exclude=shared["work"])
    assert sorted(p.name for p in listing.paths) == sorted(["good.png", f"{ODD}.png"])
    assert len(listing.skipped["inside the workdir"]) >= 3  # W, W/protected, its PNGs, the manifest, ...


def test_skipped_entries_are_counted_in_one_warning(shared):
    listing = dio.list_inputs(shared["d"], exclude=shared["work"])
    line = listing.warning()
    assert line == (f"skipped 3 entries in {shared['d']}: 1 symlink loop, 1 directory, "
                    "1 unsupported extension (.gif)")
    assert {k: sorted(p.name for p in v) for k, v in listing.skipped.items()} == {
        "symlink loop": ["loop.png"], "directory": ["x.png"], "unsupported extension": ["anim.gif"]}
    log = (shared["work"] / "run.log").read_text() if (shared["work"] / "run.log").exists() else None
    assert log is None or "skipped" in log


def test_prompt_row_outside_the_inputs_is_ignored_with_a_warning(shared):
    """A row naming an image that is not an input (../../etc/passwd here; in practice a prompts file covering
    more images than the run) prompts nothing, is never read, and is named in one warning line: it is not a
    failed input of the run."""
    prompts, problems = load_prompts(shared["x"] / "prompts.csv", image_paths=[shared["d"] / "good.png"])
    assert not problems and set(prompts) == {"good.png", "passwd"}  # load_prompts alone accepts the row
    bad = dio.unlisted_prompt_images(prompts, [shared["d"] / "good.png"])
    assert list(bad) == ["passwd"] and "/etc/passwd" in bad["passwd"] and "outside the input folder" in bad["passwd"]
    assert "passwd" not in (shared["work"] / "metrics.csv").read_text()
    assert any("1 prompt row(s) name an image that is not an input of this run, ignored" in w and "passwd" in w
               for w in shared["warnings"])


def test_outputs_follow_the_umask(shared, tmp_path):
    """mkstemp creates 0600 files; outputs get what ``open(path, "w")`` would give."""
    png = shared["work"] / "protected" / "good.png"
    assert stat.S_IMODE(png.stat().st_mode) == new_file_mode() == 0o666 & ~_current_umask()
    old = os.umask(0o027)
    try:
        atomic_write_bytes(tmp_path / "a.txt", b"x")
        dio.save_png_atomic(tmp_path / "b.png", np.zeros((8, 8, 3), np.uint8))
    finally:
        os.umask(old)
    assert {stat.S_IMODE((tmp_path / n).stat().st_mode) for n in ("a.txt", "b.png")} == {0o640}


def _current_umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


@pytest.fixture(scope="module")
def one_image(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    _png(d / "a.png", 3)
    return d


@pytest.mark.parametrize("flag, words", [
    ("--steps=0", ["--steps=0", ">= 1"]),
    ("--batch_size=0", ["--batch_size=0", ">= 1"]),
    ("--size=33", ["--size=33", "multiple of 8"]),
    ("--eps=1.5", ["eps", "(0, 1"]),
    ("--eps=0", ["eps", "(0, 1"]),
    ("--step_size=nan", ["--step_size=nan", "finite"]),
    ("--step_size=0", ["--step_size=0.0", "> 0"]),
    ("--guidance_scale=inf", ["--guidance_scale=inf", "finite"]),
    ("--preview_image_guidance=nan", ["--preview_image_guidance=nan", "finite"]),
])
def test_bad_values_are_usage_errors(one_image, tmp_path, capsys, flag, words):
    before = _digest([one_image / "a.png"])
    assert run([f"--images={one_image}", f"--workdir={tmp_path / 'w'}", flag]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert all(w in line for w in words), line
    assert not (tmp_path / "w").exists() and _digest([one_image / "a.png"]) == before


@pytest.mark.parametrize("where", ["file", "under_file"])
def test_workdir_that_is_or_lies_under_a_file(one_image, tmp_path, capsys, where):
    f = tmp_path / "taken"
    f.write_bytes(b"not a folder")
    work = f if where == "file" else f / "sub" / "run"
    assert run([f"--images={one_image}", f"--workdir={work}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(f) in line and ("existing file" if where == "file" else "is a file") in line
    assert f.read_bytes() == b"not a folder"


def _pickle_bytes(n):
    return pickle.dumps({"unet.weight": list(range(64))}, protocol=2)


def _header_length(value):
    def corrupt(raw):
        return value.to_bytes(8, "little") + raw[8:]
    return corrupt


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    dst = tmp_path_factory.mktemp("model") / "ip2p"
    shutil.copytree(shipped.path("ip2p_a"), dst)
    return dst


@pytest.mark.parametrize("case, corrupt, words", [
    ("pickle", lambda raw: _pickle_bytes(len(raw)), ["not a safetensors file", "pickle"]),
    ("2**40", _header_length(2 ** 40), ["header length field is 1099511627776"]),
    ("2**63-1", _header_length(2 ** 63 - 1), ["header length field is 9223372036854775807"]),
    ("truncated", lambda raw: raw[: len(raw) - 100], ["truncated"]),
])
def test_hostile_safetensors_are_usage_errors(one_image, model_copy, tmp_path, capsys, case, corrupt, words):
    """A pickle under a .safetensors name or a huge header length was a MemoryError / OverflowError, truncated
    data the library's SafetensorError: now exit 2 naming the file, before the workdir exists."""
    model = tmp_path / "model"
    shutil.copytree(model_copy, model)
    target = model / "unet" / "diffusion_pytorch_model.safetensors"
    target.write_bytes(corrupt(target.read_bytes()))
    with pytest.raises(weights.WeightsError, match="safetensors"):
        weights.safetensors_header(target)
    assert run([f"--images={one_image}", f"--workdir={tmp_path / 'w'}", f"--weights_dir={model}"]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(target) in line and all(w in line for w in words), line
    assert not (tmp_path / "w").exists()


def test_safetensors_check_accepts_the_shipped_models():
    for name in ("ip2p_a", "sd_a"):
        for f in sorted(shipped.path(name).rglob("*.safetensors")):
            n, header = weights.safetensors_header(f)
            assert n > 0 and any(k != "__metadata__" for k in header)
