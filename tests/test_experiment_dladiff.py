"""python -m experiments.dladiff end to end on the tiny surrogate: the seven flagfiles with short step counts,
the workdir contract, budgets on disk, exit codes 0 / 1 / 2 and resume.

Inputs are the shipped astronaut and cat (256 px): layer 1 works at 32 px on the tiny surrogate (2 images,
the shapes of test_dladiff) with full attention (the flagfiles' chunked attention is the same function,
test_dladiff; its flag reaching the surrogate is checked here without a run), layer 2 at 256 px on the astronaut
with the landmarks of test_zeroshot and the random tiny IResNet, so every compiled step is shared with those files.
"""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import dladiff as cli
from tdae_jax.data import io as dio
from tdae_jax.data.manifest import read_meta

FLAGS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "flags"
ASTRONAUT_DLIB = [[127.0, 52.0], [119.0, 52.0], [97.0, 50.0], [106.0, 51.0], [112.0, 67.0]]
SHORT = ["--static_steps=1", "--static_batch=2", "--epochs=1", "--iter1=1", "--iter2=1", "--iter3=1",
         "--aspl_clean_steps=1", "--aspl_pgd_steps=1", "--aspl_adv_steps=1", "--fsmg_steps=1", "--fsmg_surrogate_steps=1", "--ckpt_every=0",
         "--encoders=iresnet_tiny", "--detector=none", "--zs_max_steps=12", "--step_zs=0.004", "--zs_threshold=0",
         "--zs_check_every=6", "--baseline_num_class_images=2", "--baseline_class_steps=2",
         "--disdiff_search_steps=1", "--antidiffusion_pto_steps=1", "--antidiffusion_tune_steps=1",
         "--weights_dir=tiny",  # the built-in tiny SD model (the flagfiles need real weights)
         "--memory_efficient_attention=false"]  # full attention: test_dladiff's compiled steps


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("identity")
    for name in ("astronaut.png", "chelsea.png"):
        shutil.copy(dio.sample_dir() / name, d / name)
    lm = d.parent / "landmarks.json"
    lm.write_text(json.dumps({"astronaut.png": {"dlib": ASTRONAUT_DLIB}}))
    return d, lm


def run(flagfile, inputs, work, *extra):
    d, lm = inputs
    return cli.run_cli(["dladiff", f"--flagfile={FLAGS_DIR / flagfile}", f"--images={d}", f"--workdir={work}",
                        f"--landmarks={lm}", *SHORT, *extra])


def rows(work):
    with open(work / "metrics.csv") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def jsonl(work):
    return {r["id"]: r for r in map(json.loads, (work / "metrics.jsonl").read_text().splitlines())}


def recorded_settings(work):
    """The settings the workdir's manifest records (what a resume must match)."""
    return read_meta(work / "manifest.json")


def _linf(work, d, name):
    a = np.asarray(Image.open(work / "protected" / f"{name}.png"), np.int16)
    b = np.asarray(Image.open(d / f"{name}.png").convert("RGB"), np.int16)
    assert a.shape == b.shape  # outputs keep the original resolution
    return np.abs(a - b).max()


def test_layer1_flagfile_and_resume(inputs, tmp_path, capsys):
    work = tmp_path / "l1"
    before = {p.name: p.read_bytes() for p in inputs[0].iterdir()}
    assert run("dladiff_layer1.flags", inputs, work) == 0
    r = rows(work)
    for name in ("astronaut", "chelsea"):
        assert r[name]["status"] == "done", r[name]["error"]
        assert 0 < int(r[name]["linf_255"]) <= 7 and 0 < _linf(work, inputs[0], name) <= 7
    assert 0 < float(jsonl(work)["astronaut"]["ism_pro/iresnet_tiny"]) <= 1.0  # scored, not attacked
    for f in ("metrics.jsonl", "report.html", "flags.flags", "git_revision.txt", "manifest.json", "config.json"):
        assert (work / f).exists(), f
    assert "--method=dladiff" in (work / "flags.flags").read_text()
    assert json.loads((work / "config.json").read_text())["size"] == 32  # the tiny surrogate's layer-1 size
    assert not (work / "ckpt").exists()
    assert {p.name: p.read_bytes() for p in inputs[0].iterdir()} == before  # originals untouched
    stamp = (work / "protected" / "astronaut.png").stat().st_mtime_ns
    assert run("dladiff_layer1.flags", inputs, work) == 0  # resume: nothing left to do
    assert (work / "protected" / "astronaut.png").stat().st_mtime_ns == stamp
    assert "2 skipped" in capsys.readouterr().out


def test_layer1_flagfile_loads_the_chunked_surrogate(inputs, tmp_path):
    """The flagfiles' --memory_efficient_attention=true (off in the runs above and below) reaches the surrogate
    layer 1 loads (flags -> run config -> surrogate; nothing compiled)."""
    from experiments import common
    from tdae_jax.pipeline import load_surrogate

    common.FLAGS.unparse_flags()
    _, error, _ = common.parse_args(["dladiff", f"--flagfile={FLAGS_DIR / 'dladiff_layer1.flags'}",
                                     f"--images={inputs[0]}", f"--workdir={tmp_path / 'w'}", "--weights_dir=tiny"],
                                    cli.__name__)
    assert error is None, error
    cfg = cli.config_from_flags(common.FLAGS)
    assert cfg.memory_efficient_attention and load_surrogate(cfg).static.unet.use_memory_efficient_attention


def test_layer2_flagfile(inputs, tmp_path, caplog):
    work = tmp_path / "l2"
    caplog.set_level("INFO", logger="tdae_jax")
    assert run("dladiff_layer2.flags", inputs, work, "--dtype=bfloat16") == 0
    # progress at every similarity check (--zs_check_every=6 of --zs_max_steps=12), not silence
    assert "astronaut.png: layer 2 step 6/12, identity cosine" in caplog.text
    assert "astronaut.png: layer 2 step 12/12" in caplog.text
    # --dtype reaches the run config (layer 2 alone loads no diffusion surrogate; bf16 runs: test_dladiff.py)
    assert json.loads((work / "config.json").read_text())["dtype"] == "bfloat16"
    j = jsonl(work)
    a, c = j["astronaut"], j["chelsea"]
    assert a["status"] == "done" and a["zs_steps"] == 12
    assert 0 < a["linf_255"] <= 11 and a["linf_outside_255"] == 0  # only inside the aligned face crop
    assert a["ism_pro"] < a["zs_cos_before"][0] - 0.005  # identity similarity lowered, measured on the PNG
    assert c["status"] == "done" and c["zs_steps"] == 0 and c["linf_255"] == 0  # no face: left as is


def test_both_layers_and_missing_face_fails(inputs, tmp_path, capsys):
    work = tmp_path / "both"
    assert run("dladiff_both.flags", inputs, work, "--missing_face=fail") == 1
    j = jsonl(work)
    a, c = j["astronaut"], j["chelsea"]
    assert a["status"] == "done" and a["zs_steps"] == 12
    assert 0 < a["linf_outside_255"] <= 7 and 7 < a["linf_255"] <= 18  # eta_ft outside, eta_ft + eta_zs inside
    assert c["status"] == "failed" and "chelsea.png" in c["error"] and "no face landmarks" in c["error"]
    assert "chelsea.png" in capsys.readouterr().err
    assert not (work / "protected" / "chelsea.png").exists()


@pytest.mark.parametrize("flagfile", ["dladiff_aspl.flags", "dladiff_fsmg.flags", "dladiff_disdiff.flags",
                                      "dladiff_antidiffusion.flags"])
def test_baseline_flagfiles(inputs, tmp_path, flagfile):
    work = tmp_path / flagfile.split(".")[0]
    # DisDiff's MSS scales a step by (1 + cos(pi t / 999)) / 2: one step of 2.5e-3 moves less than half a grey level;
    # Anti-Diffusion's step is 1e-3 (2 phases of 2 steps: at most 4e-3, one grey level)
    extra = {"disdiff": ["--aspl_pgd_steps=3"], "antidiffusion": ["--antidiffusion_pgd_steps=2"]}
    method = flagfile.split("_")[1].split(".")[0]
    assert run(flagfile, inputs, work, *extra.get(method, [])) == 0
    r = rows(work)
    for name in ("astronaut", "chelsea"):
        assert r[name]["status"] == "done" and 0 < int(r[name]["linf_255"]) <= 7
    cfg = json.loads((work / "config.json").read_text())
    assert cfg["method"] == method and cfg["baseline"]["eps"] == pytest.approx(7 / 255)
    if method == "antidiffusion":  # anti-diffusion_demo.sh: --pgd_alpha=2e-3, --pgd_eps=1e-2 on [-1,1] per phase
        ad = cfg["antidiffusion"]
        assert cfg["baseline"]["step_size"] == 0.001 and ad["phase_eps"] == 0.005 and ad["sdl_weight"] == 1.0
        assert (ad["pgd_steps"], ad["tune_steps"], ad["pto_steps"]) == (2, 1, 1) and ad["init_prompt"] == ""
        assert not cfg["baseline"]["train_text_encoder"] and cfg["baseline"]["prior_weight"] == 0.0  # UNet alone
        curve = json.loads((work / "curves" / "astronaut.json").read_text())  # L_cond - SDL and its terms
        assert {"loss", "antidiffusion/cond", "antidiffusion/sdl"} <= set(curve) and len(curve["loss"]) == 4
        assert "disdiff" not in recorded_settings(work)
        return
    assert "antidiffusion" not in recorded_settings(work)  # old workdirs resume
    # ADB's --pgd_alpha=5e-3 on [-1,1] pixels, under DLADiff's budget (the flagfiles' provenance)
    assert cfg["baseline"]["step_size"] == 0.0025
    # ADB's recipes: text encoder and prior preservation (FSMG: in the DreamBooth'd surrogate)
    assert cfg["baseline"]["train_text_encoder"] and cfg["baseline"]["prior_weight"] == 1.0
    if "fsmg" in flagfile:
        assert cfg["baseline"]["fsmg_surrogate"] == "adb" and cfg["baseline"]["fsmg_surrogate_batch"] == 2
    if "disdiff" in flagfile:  # DisDiff's scripts/disdiff.sh: CAE 0.1 on "sks", MSS, SimAC's search, one model
        dd = cfg["disdiff"]
        assert (dd["att_weight"], dd["token"], dd["mss"], dd["search"], dd["shared_surrogate"]) == (0.1, "sks", True,
                                                                                                   True, True)
        curve = json.loads((work / "curves" / "astronaut.json").read_text())  # L_cond + 0.1 L_CAE and its terms
        assert {"loss", "disdiff/cond", "disdiff/att"} <= set(curve) and len(curve["loss"]) == 3


def test_usage_errors(inputs, tmp_path, capsys):
    assert run("dladiff_layer1.flags", inputs, tmp_path / "x", f"--images={tmp_path / 'nope'}") == 2
    assert run("dladiff_layer1.flags", inputs, tmp_path / "y", "--method=none") == 2
    assert "nothing to do" in capsys.readouterr().err
    # Anti-Diffusion fine-tunes the UNet alone: asking it for the prior term is refused before anything is written
    assert run("dladiff_antidiffusion.flags", inputs, tmp_path / "z", "--baseline_prior_weight=1.0") == 2
    assert "UNet alone" in capsys.readouterr().err and not (tmp_path / "z").exists()
    assert run("dladiff_layer1.flags", inputs, inputs[0] / "out") == 2  # workdir inside the input folder
    assert not (inputs[0] / "out").exists()
