"""The command-line layer of the experiments (experiments/common.py): ``--help`` lists each command's own flags by
group with their defaults and exits 0; a bad command line (unknown flag, bad enum or integer, missing flagfile, a
flagfile line that is not a flag, no ``--images``, a paper flagfile without real weights) is one ``error:`` line,
exit code 2, nothing written; a failure of the run itself is one line and exit code 1; durations read h:mm:ss.

In-process through ``run_cli`` where possible; four subprocesses check the real ``python -m`` exit codes."""
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import common
from experiments import dladiff as dladiff_cli
from experiments import evaluate as evaluate_cli
from experiments import tdae as tdae_cli
from tdae_jax import runtime

ROOT = Path(__file__).resolve().parents[1]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _read_names(fn) -> set[str]:
    """The flags a config builder reads (``F.name`` in its source)."""
    import inspect

    return set(re.findall(r"\bF\.(\w+)", inspect.getsource(fn)))


@pytest.fixture
def images(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / "a.png")
    return d


def _python_m(*argv):
    return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("module, expected", [
    ("experiments.tdae", ["--eps=0.03", "--steps=100", "--weights_dir=''", "budget and optimizer:", "defense:",
                          "model:", "output:"]),
    ("experiments.dladiff", ["--eps_ft=0.027450980392156862", "--epochs=50", "--size=512",
                             "layer 1: budget and optimizer (ADFT):", "layer 2: identity encoders and landmarks:"]),
    ("experiments.evaluate", ["--seeds=0,1,2", "--edit_steps=0", "victims:", "purification:", "metrics:"]),
])
def test_help_subprocess_exits_0_with_grouped_defaults(module, expected):
    """The real ``python -m ... --help``: the command's own flags (absl's --help lists none of them and exits 1)."""
    r = _python_m(module, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert all(e in r.stdout for e in expected), (module, [e for e in expected if e not in r.stdout])
    assert "Try --helpfull" not in r.stdout and r.stdout.startswith(sys.modules[module].__doc__.strip()[:40])


def test_bad_enum_subprocess_is_one_line_exit_2():
    r = _python_m("experiments.tdae", "--objective=foo")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "--objective=foo" in err[0] and "pge|" in err[0], err


@pytest.mark.parametrize("cli, fn", [(tdae_cli, common.run_config_from_flags),
                                     (dladiff_cli, dladiff_cli.config_from_flags),
                                     (evaluate_cli, evaluate_cli.config_from_flags)])
def test_help_documents_every_flag_the_command_reads(cli, fn, capsys):
    """In-process --help (exit 0): every flag the config builder reads is listed once, under a group, with its
    default; every group has at least one flag."""
    assert cli.run_cli(["prog", "--help"]) == 0
    out = capsys.readouterr().out
    listed = re.findall(r"^  --(\w+)=", out, flags=re.M)
    assert len(listed) == len(set(listed))
    assert _read_names(fn) <= set(listed), sorted(_read_names(fn) - set(listed))
    groups = out.split("Flags of", 1)[1].strip("\n").split("\n\n")[1:]  # blocks after the header paragraph
    assert len(groups) >= 5
    for block in groups:
        title, *rows = block.splitlines()
        assert title.endswith(":") and rows and rows[0].startswith("  --"), block[:200]


def test_reproduce_help_groups(capsys):
    from experiments import reproduce

    assert reproduce.run_cli(["reproduce", "--help"]) == 0
    out = capsys.readouterr().out
    assert "grid:" in out and "--budgets=8,16" in out and "--pgd_iterations=40" in out and "other:" not in out


@pytest.mark.parametrize("args, words", [
    (["--steps=x"], ["--steps=x", "int()"]),
    (["--nosuch_flag=1"], ["nosuch_flag", "--help"]),
    (["--steps"], ["Missing value", "--steps"]),
    (["stray"], ["'stray'", "--name=value"]),
])
def test_bad_command_line_is_one_line_exit_2(tmp_path, capsys, args, words):
    assert tdae_cli.run_cli(["tdae", f"--workdir={tmp_path / 'w'}", *args]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), (line, words)
    assert not (tmp_path / "w").exists()


def test_missing_or_bad_flagfile_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tdae_cli.run_cli(["tdae", "--flagfile=nope/x.flags"]) == 2
    line = _one_error_line(capsys)
    assert "cannot open --flagfile" in line and "nope/x.flags" in line and str(tmp_path) in line  # relative: cwd
    assert tdae_cli.run_cli(["tdae", f"--flagfile={tmp_path / 'absent.flags'}"]) == 2
    line = _one_error_line(capsys)
    assert "absent.flags" in line and "current directory" not in line
    bad = tmp_path / "bad.flags"
    bad.write_text("# a comment\n--steps=3\neps=0.1\n")  # the last line lost its leading --
    assert tdae_cli.run_cli(["tdae", f"--flagfile={bad}", f"--workdir={tmp_path / 'w'}"]) == 2
    assert "'eps=0.1'" in _one_error_line(capsys)
    bad.write_text("--steps=many\n")
    assert dladiff_cli.run_cli(["dladiff", f"--flagfile={bad}"]) == 2
    assert "--steps=many" in _one_error_line(capsys)
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("cli, name, words", [
    (tdae_cli, "tdae", ["no --images", "--images=DIR", "--flagfile=experiments/flags/quickstart.flags"]),
    (dladiff_cli, "dladiff", ["no --images", "--images=DIR", "dladiff_layer1.flags", "--images=pkg:samples"]),
])
def test_no_images_names_the_command_to_run(tmp_path, capsys, cli, name, words):
    """No hidden default input: a bare command refuses instead of starting a long demonstration."""
    # --surrogate=sd: in one process the IO flags shared by both commands keep experiments.tdae's defaults
    assert cli.run_cli([name, f"--workdir={tmp_path / 'w'}", "--size=32", "--surrogate=sd"]) == 2
    line = _one_error_line(capsys)
    assert all(w in line for w in words), line
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("flagfile, family", [("ip2p_pge.flags", "InstructPix2Pix"),
                                              ("sd14_pgd_tdae.flags", "Stable Diffusion"),
                                              ("sd3_pge.flags", "Stable Diffusion 3")])
def test_paper_flagfile_needs_weights_dir(images, tmp_path, capsys, monkeypatch, flagfile, family):
    monkeypatch.chdir(ROOT)  # flagfiles include base.flags by a repo-relative path
    work = tmp_path / "w"
    argv = ["tdae", f"--flagfile=experiments/flags/{flagfile}", f"--images={images}", f"--workdir={work}"]
    assert tdae_cli.run_cli(argv) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: --weights_dir is required by this flagfile") and flagfile in line, line
    assert f"real {family} weights" in line and "--weights_dir=tiny" in line
    assert not work.exists()


def test_dladiff_flagfile_needs_weights_dir_for_layer1_only(images, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    work = tmp_path / "w"
    paths = [f"--images={images}", f"--workdir={work}"]  # after the flagfile, which sets --images=
    assert dladiff_cli.run_cli(["dladiff", "--flagfile=experiments/flags/dladiff_layer1.flags", *paths]) == 2
    line = _one_error_line(capsys)
    assert "--weights_dir is required by this flagfile" in line and "Stable Diffusion weights" in line
    dladiff_cli.FLAGS.unparse_flags()  # layer 2 alone loads no SD model: no weights needed
    dladiff_cli.FLAGS(["dladiff", "--flagfile=experiments/flags/dladiff_layer2.flags", *paths])
    common.require_weights(dladiff_cli.FLAGS, needs_model=dladiff_cli.FLAGS.method != "none")
    assert not work.exists()


def test_weights_rule_and_tiny_and_overwrite(images, tmp_path):
    """Empty --weights_dir: accepted up to TINY_MAX_SIZE px only; tiny -> the library's "" at any size;
    --overwrite reaches RunConfig and is never saved in flags.flags (re-running it must resume, not clear)."""
    F = tdae_cli.FLAGS

    def parse(*args):
        F.unparse_flags()
        rest, error, _ = common.parse_args(["tdae", f"--images={images}", *args], "experiments.tdae")
        assert error is None, error
        return F

    common.require_weights(parse(f"--size={common.TINY_MAX_SIZE}"))
    for bad in ([f"--size={common.TINY_MAX_SIZE + 8}"], ["--resize=none", "--size=32"]):
        with pytest.raises(ValueError, match="--weights_dir is required at --(size|resize)"):
            common.require_weights(parse(*bad))
    common.require_weights(parse("--size=512", "--weights_dir=tiny"))
    cfg = common.run_config_from_flags(parse("--images=pkg:samples", "--weights_dir=tiny", "--overwrite"))
    assert cfg.weights_dir == "" and cfg.overwrite is True and cfg.images.endswith("assets/samples")
    assert common.run_config_from_flags(parse()).overwrite is False
    parse("--images=pkg:samples", "--weights_dir=tiny", "--overwrite")
    common.write_flagfile(F, tmp_path / "flags.flags")
    saved = (tmp_path / "flags.flags").read_text().splitlines()
    assert "--weights_dir=tiny" in saved and "--images=pkg:samples" in saved
    assert not [line for line in saved if "overwrite" in line]


def test_run_error_is_one_line_exit_1(images, tmp_path, capsys, monkeypatch):
    """A failure of the run itself (pipeline.RunError: the disk filled up mid-run) is one line and exit 1; the
    run's own message is passed on unchanged."""
    from tdae_jax import pipeline

    def full_disk(cfg, progress):
        raise pipeline.RunError(f"cannot write protected/a.png in workdir {cfg.workdir}: No space left on device "
                                "(ENOSPC); re-run the same command to resume")

    monkeypatch.setattr(pipeline, "run", full_disk)
    assert tdae_cli.run_cli(["tdae", f"--images={images}", f"--workdir={tmp_path / 'w'}", "--size=32"]) == 1
    line = _one_error_line(capsys)
    assert "No space left on device" in line and "resume" in line


def test_format_duration():
    f = runtime.format_duration
    assert [f(2437.4), f(0), f(59.4), f(61), f(3600), f(26 * 3600 + 5)] == [
        "0:40:37", "0:00:00", "0:00:59", "0:01:01", "1:00:00", "26:00:05"]
    assert f(math.nan) == f(math.inf) == "?" and f(-3) == "0:00:00"


def test_ticker_throttles_and_estimates():
    """First unit (compilation: no ETA yet), then at most one line per every_s, and always the last unit; the ETA
    is the rate after the first unit times the units left."""
    now, lines = [0.0], []
    tick = runtime.Ticker(6, lines.append, "edits", every_s=5.0, clock=lambda: now[0])
    for dt in (30, 2, 2, 2, 2, 2):  # unit 1 compiles (30 s), the others take 2 s
        now[0] += dt
        tick.step()
    assert lines == ["edits 1/6, elapsed 0:00:30, ETA ?", "edits 4/6, elapsed 0:00:36, ETA 0:00:04",
                     "edits 6/6, elapsed 0:00:40, ETA 0:00:00"]
