"""The command end to end on the tiny surrogate: bad inputs, exit codes, originals untouched, resume.

Every bad input sits in one folder next to good images, so one run checks the message per file, the
exit code (1), that the good images were still protected, and that no original changed.
"""
import csv
import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import tdae as cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--surrogate=ip2p", "--objective=pge", "--steps=3", "--size=32", "--eps=0.03137254901960784",
        "--step_size=0.01", "--batch_size=2", "--report=true", "--log_every=1"]


def _rgb(seed, h=40, w=48):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _digest(folder: Path):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _rows(workdir: Path):
    with open(workdir / "metrics.csv") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def run(argv):
    return cli.run_cli(["tdae"] + argv)


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    Image.fromarray(_rgb(0)).save(d / "good1.png")
    Image.fromarray(_rgb(1)).save(d / "good2.jpg", quality=95)
    (d / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    (d / "notes.png").write_text("this is a text file, not an image\n")
    Image.fromarray(_rgb(2)[..., 0]).save(d / "gray.png")
    Image.fromarray(_rgb(3)).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray(_rgb(4)).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    Image.fromarray((_rgb(5)[..., 0].astype(np.uint16) * 257)).save(d / "deep16.png")
    rgba = np.concatenate([_rgb(6), np.full((40, 48, 1), 200, np.uint8)], -1)
    Image.fromarray(rgba, "RGBA").save(d / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    Image.fromarray(_rgb(7, 40, 64)).save(d / "rotated.jpg", exif=exif.tobytes(), quality=95)
    Image.fromarray(_rgb(8, 4, 4)).save(d / "tiny4x4.png")
    # a truncated PNG
    buf = io.BytesIO()
    Image.fromarray(_rgb(9)).save(buf, format="PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return d


def test_bad_inputs_one_run(bad_folder, tmp_path, capsys):
    before = _digest(bad_folder)
    work = tmp_path / "work"
    code = run(FAST + [f"--images={bad_folder}", f"--workdir={work}"])
    err = capsys.readouterr().err
    assert code == 1
    rows = _rows(work)
    ok = {"good1", "good2", "gray", "cmyk", "palette", "deep16", "alpha", "rotated"}
    bad = {"corrupt": "", "notes": "", "tiny4x4": "too small", "truncated": ""}
    for i in ok:
        assert rows[i]["status"] == "done", (i, rows[i]["error"])
        assert (work / "protected" / f"{i}.png").exists()
        assert int(rows[i]["linf_255"]) <= 8
    for i, word in bad.items():
        assert rows[i]["status"] == "failed"
        assert f"{i}." in rows[i]["error"] and word in rows[i]["error"]  # names the file and the problem
        assert f"{i}." in err  # and says so on stderr
        assert not (work / "protected" / f"{i}.png").exists()
    # EXIF orientation applied: the 64x40 stored image is 40x64 (portrait) when displayed
    assert Image.open(work / "protected" / "rotated.png").size == (40, 64)
    # outputs keep the original resolution
    assert Image.open(work / "protected" / "good1.png").size == (48, 40)
    assert _digest(bad_folder) == before  # originals byte-identical
    assert not list(bad_folder.glob("*.tmp*"))
    for name in ("metrics.jsonl", "report.html", "flags.flags", "git_revision.txt", "manifest.json"):
        assert (work / name).exists(), name
    html = (work / "report.html").read_text()
    assert "good1" in html and "corrupt" in html

    # resume: the same command does nothing more, still reports the failures, exit 1
    stamp = (work / "protected" / "good1.png").stat().st_mtime_ns
    assert run(FAST + [f"--images={bad_folder}", f"--workdir={work}"]) == 1
    assert (work / "protected" / "good1.png").stat().st_mtime_ns == stamp
    assert "skipped" in capsys.readouterr().out


def test_empty_folder_is_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(FAST + [f"--images={empty}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert str(empty) in capsys.readouterr().err
    assert not (tmp_path / "w").exists()


def test_workdir_inside_input_folder_refused(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(0)).save(d / "a.png")
    before = _digest(d)
    assert run(FAST + [f"--images={d}", f"--workdir={d}"]) == 2
    assert "input folder" in capsys.readouterr().err
    assert _digest(d) == before
    assert run(FAST + [f"--images={d}", f"--workdir={d / 'out'}"]) == 2
    assert _digest(d) == before


def test_prompts_row_with_missing_image(tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(0)).save(d / "a.png")
    Image.fromarray(_rgb(1)).save(d / "b.png")
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("id,image,instruction\na,a.png,make it snowy\nghost,ghost.png,add a hat\n")
    work = tmp_path / "w"
    code = run(FAST + ["--objective=advdm", "--timesteps=1", f"--images={d}", f"--prompts={prompts}",
                       f"--workdir={work}"])
    assert code == 1
    rows = _rows(work)
    assert rows["a"]["status"] == "done" and rows["b"]["status"] == "done"  # b: default prompt
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and "ghost.png" in failed[0]["error"] and "prompts.csv" in failed[0]["error"]


def test_weights_dir_with_missing_tensor(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    from tdae_jax import models

    wdir = tmp_path / "model"
    models.save(models.tiny("ip2p"), wdir)
    f = wdir / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(f)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, f)
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(0)).save(d / "a.png")
    assert run(FAST + [f"--images={d}", f"--workdir={tmp_path / 'w'}", f"--weights_dir={wdir}"]) == 2
    err = capsys.readouterr().err
    assert "diffusion_pytorch_model.safetensors" in err and dropped in err


def test_weights_dir_roundtrip_runs(tmp_path, monkeypatch):
    """A model saved in diffusers layout loads through --weights_dir and protects an image; every path is given
    relative to the current directory, as the README's quickstart does (--workdir=runs/quickstart)."""
    from tdae_jax import models

    models.save(models.tiny("ip2p"), tmp_path / "model")
    (tmp_path / "in").mkdir()
    Image.fromarray(_rgb(0)).save(tmp_path / "in" / "a.png")
    monkeypatch.chdir(tmp_path)
    assert run(FAST + ["--images=in", "--workdir=runs/w", "--weights_dir=model"]) == 0
    assert (tmp_path / "runs" / "w" / "protected" / "a.png").is_file()
    assert _rows(tmp_path / "runs" / "w")["a"]["status"] == "done"


def test_subprocess_exit_code_and_flagfile(tmp_path):
    """The real `python -m experiments.tdae --flagfile=...` path, and flags.flags re-runs the same config."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(0)).save(d / "a.png")
    ff = tmp_path / "x.flags"
    ff.write_text("\n".join(["# a comment", *FAST, f"--images={d}", f"--workdir={tmp_path / 'w'}"]) + "\n")
    r = subprocess.run([sys.executable, "-m", "experiments.tdae", f"--flagfile={ff}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "iter 3/3" in r.stderr and "ETA" in r.stderr
    saved = (tmp_path / "w" / "flags.flags").read_text()
    assert "--steps=3" in saved and "--objective=pge" in saved
    r = subprocess.run([sys.executable, "-m", "experiments.tdae", "--nosuch_flag=1"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "nosuch_flag" in r.stderr  # a bad flag is a usage error


def test_memory_efficient_attention_and_dtype_flags(tmp_path):
    """``--memory_efficient_attention`` and ``--dtype=bfloat16`` reach the surrogate: chunked attention is the
    same function (the protected image matches the ordinary run's to within sign flips of near-zero gradient
    entries); bf16 compute keeps the budget on disk and mostly the same update signs."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(11)).save(d / "a.png")
    outs = []
    variants = (("full", []), ("chunked", ["--memory_efficient_attention"]), ("bf16", ["--dtype=bfloat16"]))
    for name, extra in variants:
        assert run(FAST + [f"--images={d}", f"--workdir={tmp_path / name}", "--batch_size=1"] + extra) == 0
        outs.append(np.asarray(Image.open(tmp_path / name / "protected" / "a.png"), np.int16))
    assert "--memory_efficient_attention" in (tmp_path / "chunked" / "flags.flags").read_text()
    assert "--dtype=bfloat16" in (tmp_path / "bf16" / "flags.flags").read_text()
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    from experiments import common
    from tdae_jax import pipeline

    assert common.DTYPES == list(pipeline.DTYPES)  # the flag's choices are what load_surrogate accepts
    assert outs[0].shape == outs[1].shape == outs[2].shape == (40, 48, 3)
    assert np.mean(outs[0] == outs[1]) >= 0.99 and np.abs(outs[0] - outs[1]).max() <= 3
    orig = _rgb(11).astype(np.int16)
    assert np.abs(outs[2] - orig).max() <= 8  # eps = 8/255 exactly on disk
    assert np.mean(np.sign(outs[2] - orig) == np.sign(outs[0] - orig)) >= 0.9  # measured 0.976


@pytest.mark.parametrize("args, words", [
    (["--objective=pge", "--defense=tdae"], ["no text to act on", "--defense=fdm", "PGE + TDAE is not runnable"]),
    (["--objective=pge_untargeted", "--defense=dpd"], ["no text to act on", "--defense=fdm"]),
    (["--objective=mist", "--target=gray"], ["--target=gray", "'mist' has no image target", "pge, pgd"]),
    (["--objective=ace", "--target=black"], ["'ace' has no image target"]),
    (["--objective=sa", "--target=gray"], ["'sa' has no image target"]),
    (["--defense=fdm", "--dtype=bfloat16"], ["--dtype=bfloat16", "finite difference", "--fdm_mode=exact"]),
    (["--defense=tdae", "--objective=advdm", "--dtype=bfloat16"], ["finite difference", "--dtype=float32"]),
    (["--target=pattern"], ["--target", "zero|gray|black"]),  # not a target of the registry: absl's enum
    (["--objective=pge_targeted"], ["--objective"]),
])
def test_configuration_usage_errors(tmp_path, capsys, args, words):
    """Flag combinations that would not run what they say: exit 2, one line naming the problem, no traceback,
    nothing written (the check runs before the inputs are even listed)."""
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(0)).save(d / "a.png")
    work = tmp_path / "w"
    assert run(FAST + [f"--images={d}", f"--workdir={work}"] + args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert all(w in err[0] for w in words), (err[0], words)
    assert not work.exists()


def test_validate_accepts_what_runs():
    """The refusals are exactly the dishonest combinations: their neighbours pass (pure check, no run)."""
    from tdae_jax import configs, objectives, pipeline

    def cfg(name="pge", defense="none", target="zero", dtype="float32", fdm_mode="finite_difference"):
        return pipeline.RunConfig(images="x", workdir="w", defense=defense, dtype=dtype,
                                  objective=configs.Objective(name=name, target=target),
                                  fdm=configs.FDM(mode=fdm_mode))

    for ok in (cfg(defense="fdm"), cfg("pgd", "tdae", "black"), cfg("pge", "none", "gray"),
               cfg("advdm", "dpd"), cfg(defense="fdm", dtype="bfloat16", fdm_mode="exact"),
               cfg("mist", "tdae", dtype="bfloat16", fdm_mode="exact_gog"), cfg(dtype="bfloat16")):
        pipeline.validate(ok)
    for name in objectives.NAMES:  # the default target is accepted by every host, DPD by every text host
        pipeline.validate(cfg(name, "tdae" if objectives.uses_text(name) else "fdm"))
    # library callers bypass the flags' enums: an unknown host or target is refused by validate itself
    with pytest.raises(pipeline.UsageError, match="--target must be one of zero, gray, black, got 'grey'"):
        pipeline.validate(cfg("pge", target="grey"))
    with pytest.raises(pipeline.UsageError, match="--objective must be one of pge, "):
        pipeline.validate(cfg("pge_targeted"))


def test_config_json_and_report_say_what_ran(tmp_path):
    """config.json is the configuration that ran (``pipeline.effective``), not the flags: FDM off without a flatness
    defense, DPD on only where it acts, TPA as selected, no target for hosts that read none, the random start of
    hosts that need one; the report's summary lists the same."""
    from tdae_jax import configs, pipeline

    def ran(name, defense):
        return pipeline.effective(pipeline.RunConfig(images="x", workdir="w", defense=defense,
                                                     objective=configs.Objective(name=name)))

    r = ran("pge", "none")  # the flags' fdm_mode (default finite_difference) does not run without --defense=fdm
    assert (r.fdm.mode, r.dpd.enabled, r.tpa.enabled, r.objective.target) == ("off", False, False, "zero")
    r = ran("advdm", "tdae")
    assert (r.fdm.mode, r.dpd.enabled, r.tpa.enabled, r.objective.target) == ("finite_difference", True, False, None)
    r = ran("pge_untargeted", "tpa")
    assert (r.fdm.mode, r.dpd.enabled, r.tpa.enabled, r.pgd.random_start) == ("off", False, True, 0.25)
    summary = pipeline.describe(ran("mist", "tdae"))
    assert summary["objective"] == "mist" and summary["dpd"].startswith("on (S=10")
    assert summary["fdm"].startswith("finite_difference") and summary["tpa"] == "off"

    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(_rgb(0)).save(d / "a.png")
    work = tmp_path / "w"
    assert run(FAST + [f"--images={d}", f"--workdir={work}", "--batch_size=1"]) == 0  # pge, --defense=none
    written = json.loads((work / "config.json").read_text())
    assert written["defense"] == "none" and written["fdm"]["mode"] == "off"
    assert written["dpd"]["enabled"] is False and written["tpa"]["enabled"] is False
    assert written["objective"]["name"] == "pge" and written["objective"]["target"] == "zero"
    html = (work / "report.html").read_text()
    assert "<b>fdm</b>: off" in html and "<b>dpd</b>: off" in html and "<b>tpa</b>: off" in html
    assert "pge (target zero)" in html
