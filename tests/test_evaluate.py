"""tdae_jax.evaluate + python -m experiments.evaluate: victim specs, ideal scores for identical images, the
worst case, and the command end to end on two tiny protect runs with two tiny victims (matrix.md,
metrics.csv, report.html, plots), plus its exit codes.

Compile time dominates on CPU, so the victims run with ``--fast_compile`` (XLA optimization level 0),
2-4 denoising steps, one seed and 32x32 images (VIFp needs 41 px: it is n/a there and checked at 48 px).
"""
import csv
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments import evaluate as ev_cli
from experiments import tdae as protect_cli
from tdae_jax import evaluate as ev
from tdae_jax.metrics import report

VICTIMS = "tsd:sd:tiny|steps=4|strength=0.5,tip:ip2p:tiny@1|steps=2"
PROTECT = ["--surrogate=ip2p", "--objective=pge", "--steps=2", "--size=32", "--step_size=0.01", "--batch_size=2",
           "--report=false", "--log_every=1"]


def _images(folder: Path, n=2, h=40, w=48):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rgb = np.random.default_rng(i).integers(0, 256, (h, w, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(folder / f"im{i}.png")
    return folder


@pytest.fixture(scope="module")
def protect_runs(tmp_path_factory):
    """Two tiny protect runs of the same two images: eps 4/255 plain, eps 8/255 with EOT (jpeg + noise)."""
    root = tmp_path_factory.mktemp("eval")
    imgs = _images(root / "imgs")
    runs = []
    for name, extra in (("run_a", ["--eps=0.01568627450980392"]),
                        ("run_b", ["--eps=0.03137254901960784", "--eot=jpeg75,noise4"])):
        code = protect_cli.run_cli(["tdae"] + PROTECT + [f"--images={imgs}", f"--workdir={root / name}"] + extra)
        assert code == 0
        runs.append(root / name)
    return root, runs


def _rows(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _f(v):
    return float(v) if v not in ("", None) else math.nan


# ------------------------------------------------------------------------------------------------ unit
def test_parse_victims():
    vs = ev.parse_victims("a:sd:tiny,b:ip2p:tiny@3|steps=5|guidance=3,c:inpaint:/models/x|strength=0.5|kind=inpaint")
    assert [(v.name, v.family, v.source) for v in vs] == [("a", "sd", "tiny"), ("b", "ip2p", "tiny@3"),
                                                          ("c", "inpaint", "/models/x")]
    kw = vs[1].editor_kwargs(ev.EditSettings(steps=10, strength=0.3))
    assert kw["num_inference_steps"] == 5 and kw["guidance_scale"] == 3.0 and "strength" not in kw  # ip2p: none
    assert vs[0].editor_kwargs(ev.EditSettings(steps=10, strength=0.3))["strength"] == 0.3
    assert vs[2].editor_kwargs(ev.EditSettings())["strength"] == 0.5
    (m,) = ev.parse_victims("m::miniature:ip2p_b")  # family from the shipped model's training.json
    assert (m.family, m.source) == ("ip2p", "miniature:ip2p_b")
    for bad in ("", "a:sd", "a:xx:tiny", "a:sd:tiny,a:sd:tiny", "a:sd:tiny|bogus=1", "a:sd:tiny|steps=x",
                "a::miniature:does_not_exist"):
        with pytest.raises(ev.UsageError):
            ev.parse_victims(bad)


def test_identical_images_give_ideal_scores(tmp_path):
    from tdae_jax.metrics.lpips import load_lpips_params, make_lpips_fn

    a = np.random.default_rng(0).random((2, 48, 48, 3)).astype(np.float32)
    lpips_fn = make_lpips_fn(load_lpips_params(str(_random_lpips_npz(tmp_path / "lpips.npz"))))
    s = ev.compare(a, a, lpips_fn, psnr_cap=100.0)
    assert set(s) == set(ev.METRICS)
    np.testing.assert_array_equal(s["psnr"], [100.0, 100.0])
    np.testing.assert_array_equal(s["lpips"], [0.0, 0.0])
    for m in ("ssim", "fsim", "vifp"):
        np.testing.assert_allclose(s[m], 1.0, atol=1e-6)
    small = ev.compare(a[:, :32, :32], a[:, :32, :32], None)  # too small for VIFp: NaN, not an error
    assert np.isnan(small["vifp"]).all() and "lpips" not in small and (small["ssim"] == 1).all()


def test_worst_rows_take_max_or_min_over_the_purifiers():
    base = {"run": "r", "id": "i", "victim": "v", "seed": 0, "kind": "protection"}
    rows = [{**base, "purify": "none", "psnr": 20.0, "ssim": 0.2, "lpips": 0.5},
            {**base, "purify": "jpeg75", "psnr": 24.0, "ssim": 0.1, "lpips": 0.6},
            {**base, "purify": "blur1", "psnr": 22.0, "ssim": 0.3, "lpips": 0.4}]
    (w,) = ev.worst_rows(rows, metrics=("psnr", "ssim", "lpips"))
    assert (w["kind"], w["psnr"], w["ssim"], w["lpips"]) == ("worst", 24.0, 0.3, 0.4)
    assert w["worst_by"] == "psnr:jpeg75;ssim:blur1;lpips:blur1"


# ------------------------------------------------------------------------------------------------ end to end
def test_cli_end_to_end(protect_runs, tmp_path):
    root, runs = protect_runs
    out = tmp_path / "eval"
    code = ev_cli.run_cli(["evaluate", f"--runs={runs[0]},{runs[1]}", f"--outdir={out}", f"--victims={VICTIMS}",
                           "--purify=none,blur0,jpeg75", "--seeds=0", "--fast_compile", "--eval_batch_size=4"])
    assert code == 0
    for f in ("matrix.md", "metrics.csv", "metrics.jsonl", "report.html", "eval_config.json", "flags.flags",
              "plots/loss_vs_iteration.png"):
        assert (out / f).is_file(), f
    # each (surrogate, objective, defense, EOT) group has one budget here: an eps curve would be one point
    assert not (out / "plots/psnr_vs_eps.png").exists()
    rows = _rows(out / "metrics.csv")
    # 2 runs x 2 images x 2 victims x 1 seed x (3 protection + 2 purifier_cost + 1 seed_floor + 1 worst)
    assert len(rows) == 2 * 2 * 2 * 7
    kinds = {}
    for r in rows:
        kinds[r["kind"]] = kinds.get(r["kind"], 0) + 1
    assert kinds == {"protection": 24, "purifier_cost": 16, "seed_floor": 8, "worst": 8}
    prot = [r for r in rows if r["kind"] == "protection"]
    assert {r["surrogate"] for r in rows} == {"ip2p:tiny"} and {r["eot"] for r in rows} == {"none", "jpeg75,noise4"}
    for r in prot:
        assert 0 < _f(r["psnr"]) <= 100 and -1 <= _f(r["ssim"]) <= 1 and math.isnan(_f(r["vifp"]))
        assert int(r["imp_linf_255"]) <= (4 if r["run"] == "run_a" else 8) and _f(r["imp_psnr"]) > 30
    key = lambda r: (r["run"], r["id"], r["victim"], r["seed"])  # noqa: E731
    by = {(key(r), r["purify"]): r for r in prot}
    for r in prot:
        if r["purify"] == "blur0":  # an identity purification leaves every metric unchanged
            for m in ("psnr", "ssim", "fsim"):
                assert r[m] == by[(key(r), "none")][m]
    for w in (r for r in rows if r["kind"] == "worst"):
        group = [by[(key(w), p)] for p in ("none", "blur0", "jpeg75")]
        assert _f(w["psnr"]) == max(_f(g["psnr"]) for g in group)
        assert _f(w["ssim"]) == max(_f(g["ssim"]) for g in group)
        assert "psnr:" in w["worst_by"]
    # the seed floor differs from the ideal score: the edits really depend on the seed
    assert all(_f(r["psnr"]) < 100 for r in rows if r["kind"] == "seed_floor")
    # matrix.md: every surrogate x victim cell of the no-purification PSNR table holds mean ± std
    md = (out / "matrix.md").read_text()
    table = md.split("### PSNR (dB)")[1].split("###")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("| ")]
    assert lines[0].split("|")[2:4] == [" tsd ", " tip "]
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:4]] for ln in lines[1:]}
    assert set(cells) == {"ip2p:tiny [run_a]", "ip2p:tiny [run_b]", "*seed floor*"}
    assert all("±" in c for cs in cells.values() for c in cs)
    assert "## Worst case over purifiers" in md and "## Imperceptibility" in md and "jpeg75,noise4" in md
    # VIFp needs 41 px: no finite value on these 40x48 images, said once instead of tables of n/a
    assert "### VIFp" not in md and md.count("not computed: vifp") == 1 and "vifp 41 px" in md
    html = (out / "report.html").read_text()
    for cap in ("original", "protected", "edit(original)", "edit(protected)", "edit(jpeg75(protected))"):
        assert f"<figcaption>{cap}</figcaption>" in html
    assert "<pre>" not in html and html.count("<table>") >= 4 and "<th>surrogate [run]</th>" in html
    assert len(list((out / "report_assets").glob("*.png"))) == 2 * 2 * 2 * 6


def _identical_run(run: Path, dest: Path):
    """A copy of protect workdir ``run`` whose 'protected' PNGs are the originals; returns (dest, manifest)."""
    shutil.copytree(run, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    for e in manifest["entries"].values():
        shutil.copy(e["source"], dest / e["outputs"]["protected"])
    return dest, manifest


def test_cli_resumes_from_stored_units(protect_runs, tmp_path, monkeypatch):
    """Each finished (batch of sources, victim) unit is stored: a stopped evaluation re-run with the same command
    computes only the missing units and writes the same metrics; other settings discard the stored units."""
    _, runs = protect_runs
    out = tmp_path / "eval"
    args = ["evaluate", f"--runs={runs[0]}", f"--outdir={out}", "--victims=tsd:sd:tiny|steps=2",
            "--purify=none,jpeg75", "--seeds=0", "--fast_compile", "--eval_batch_size=1"]
    assert ev_cli.run_cli(args) == 0
    first = (out / "metrics.csv").read_text()
    units = sorted((out / "partial").glob("*.npz"))
    assert len(units) == 2  # 2 images in batches of 1, one victim
    units[0].unlink()  # as if the run had stopped before its last unit
    calls, victim = [], ev.Runner._victim
    monkeypatch.setattr(ev.Runner, "_victim", lambda self, v, *a: calls.append(v.name) or victim(self, v, *a))
    assert ev_cli.run_cli(args) == 0
    assert calls == ["tsd"] and (out / "metrics.csv").read_text() == first
    assert (out / "report.html").read_text().count("<img") >= 2 * 4  # loaded units keep their thumbnails
    calls.clear()
    assert ev_cli.run_cli([*args[:-2], "--seeds=1", args[-1]]) == 0  # other settings: everything recomputed
    assert calls == ["tsd", "tsd"] and (out / "metrics.csv").read_text() != first


def test_identical_protected_rows_are_ideal_and_missing_files_exit_1(protect_runs, tmp_path):
    """A hand-made run whose 'protected' image is the original: every protection row is ideal; a done entry
    whose PNG is missing is reported (exit code 1) without losing the other rows. LPIPS via --lpips_weights."""
    root, runs = protect_runs
    fake, manifest = _identical_run(runs[0], tmp_path / "identical")
    missing = fake / manifest["entries"]["im1"]["outputs"]["protected"]
    missing.unlink()
    lp = _random_lpips_npz(tmp_path / "lpips.npz")
    out = tmp_path / "eval"
    code = ev_cli.run_cli(["evaluate", f"--runs={fake}", f"--outdir={out}", "--victims=tsd:sd:tiny|steps=2",
                           "--purify=none", "--seeds=0", "--fast_compile", "--eval_size=48", "--eval_batch_size=2",
                           f"--lpips_weights={lp}", "--purifier_cost=false", "--plots=false"])
    assert code == 1
    assert "im1" in (out / "failures.txt").read_text()
    rows = _rows(out / "metrics.csv")
    prot = [r for r in rows if r["kind"] == "protection"]
    assert [r["id"] for r in prot] == ["im0"]
    (r,) = prot
    assert _f(r["psnr"]) == 100.0 and _f(r["lpips"]) == 0.0 and _f(r["ssim"]) == 1.0
    assert _f(r["vifp"]) == pytest.approx(1.0, abs=1e-6) and _f(r["fsim"]) == pytest.approx(1.0, abs=1e-6)
    assert _f(r["imp_psnr"]) == 100.0 and _f(r["imp_ssim"]) == 1.0 and _f(r["imp_lpips"]) == 0.0
    assert int(r["imp_linf_255"]) == 0
    (floor,) = [r for r in rows if r["kind"] == "seed_floor"]
    assert _f(floor["psnr"]) < 100 and _f(floor["lpips"]) > 0


def test_sd3_victim_column(protect_runs, tmp_path):
    """SD3 (flow-matching img2img, editors/sd3_img2img.py) is a victim of the matrix like the UNet editors, at
    its own pipeline defaults (guidance 7.0, strength 0.6) unless the victim's options say otherwise."""
    from tdae_jax import editors

    # 3 steps at strength 0.6: t_start = int(3 - 1.8) = 1, two Euler steps from sigma < 1 (with 2 steps diffusers
    # starts at sigma = 1, pure noise, and the edit ignores the image)
    (v,) = ev.parse_victims("t3:sd3:tiny|steps=3")
    kw = v.editor_kwargs(ev.EditSettings())
    assert kw["kind"] == "sd3_img2img" and "guidance_scale" not in kw  # SD3's own 7.0, not SD's 7.5
    fn = editors.make_editor(surrogate=ev.load_model("sd3", "tiny"), **kw)
    assert (fn.config.guidance_scale, fn.config.strength, fn.config.num_inference_steps) == (7.0, 0.6, 3)
    assert fn.plan[1][0] < 1.0
    root, runs = protect_runs
    out = tmp_path / "eval"
    code = ev_cli.run_cli(["evaluate", f"--runs={runs[0]}", f"--outdir={out}", "--victims=t3:sd3:tiny|steps=3",
                           "--purify=none", "--seeds=0", "--fast_compile", "--eval_batch_size=2",
                           "--purifier_cost=false", "--plots=false"])
    assert code == 0
    rows = _rows(out / "metrics.csv")
    prot = [r for r in rows if r["kind"] == "protection"]
    assert len(prot) == 2 and {r["victim_family"] for r in prot} == {"sd3"}
    assert all(0 < _f(r["psnr"]) < 100 for r in rows)  # the edits differ (protection and seed floor alike)
    table = (out / "matrix.md").read_text().split("### PSNR (dB)")[1].split("###")[0]
    assert [ln for ln in table.splitlines() if ln.startswith("| ")][0].split("|")[2].strip() == "t3"


def test_clip_columns(protect_runs, tmp_path):
    """--clip_weights adds clip_img (the two edits' CLIP image similarity: 1 when protected == original) and
    clip_dir (the edit's direction vs the prompts row's caption -> edited_prompt; NaN without them)."""
    root, runs = protect_runs
    fake, manifest = _identical_run(runs[0], tmp_path / "identical")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "im0", "instruction": "add snow", "caption": "a photo of a house",
                                   "edited_prompt": "a photo of a house in snow"}) + "\n")
    config = json.loads((fake / "config.json").read_text())
    (fake / "config.json").write_text(json.dumps({**config, "prompts": str(prompts)}))
    out = tmp_path / "eval"
    code = ev_cli.run_cli(["evaluate", f"--runs={fake}", f"--outdir={out}", "--victims=tsd:sd:tiny|steps=2",
                           "--purify=none", "--seeds=0", "--fast_compile", "--eval_batch_size=2", "--clip_weights=tiny",
                           "--purifier_cost=false", "--plots=false"])
    assert code == 0
    rows = _rows(out / "metrics.csv")
    assert {"clip_img", "clip_dir"} <= set(rows[0]) and {"psnr", "imp_psnr", "worst_by"} <= set(rows[0])
    prot = {r["id"]: r for r in rows if r["kind"] == "protection"}
    assert set(prot) == {"im0", "im1"}
    for r in prot.values():
        assert _f(r["clip_img"]) == pytest.approx(1.0, abs=1e-6) and _f(r["psnr"]) == 100.0
    assert -1 <= _f(prot["im0"]["clip_dir"]) <= 1 and math.isnan(_f(prot["im1"]["clip_dir"]))
    assert all(-1 <= _f(r["clip_img"]) <= 1 for r in rows if r["kind"] == "seed_floor")


def _random_lpips_npz(path: Path) -> Path:
    """LPIPS-AlexNet weights with torch names (random: the plumbing, not the metric's values)."""
    from tdae_jax.metrics.lpips import TRUNKS, _channels

    rng = np.random.default_rng(0)
    t = {}
    for layer in TRUNKS["alex"]:
        if layer[0] == "conv":
            _, idx, cin, cout, k, _, _ = layer
            t[f"features.{idx}.weight"] = rng.normal(0, 0.05, (cout, cin, k, k)).astype(np.float32)
            t[f"features.{idx}.bias"] = np.zeros(cout, np.float32)
    for i, c in enumerate(_channels("alex")):
        t[f"lin{i}.model.1.weight"] = np.abs(rng.normal(0, 0.1, (1, c, 1, 1))).astype(np.float32)
    np.savez(path, **t)
    return path


def test_usage_errors_exit_2(protect_runs, tmp_path, capsys):
    root, runs = protect_runs
    base = ["evaluate", f"--outdir={tmp_path / 'o'}", "--seeds=0", "--fast_compile"]
    assert ev_cli.run_cli(base + [f"--runs={tmp_path / 'nope'}", "--victims=a:sd:tiny"]) == 2
    assert "not a protect workdir" in capsys.readouterr().err
    assert ev_cli.run_cli(base + [f"--runs={runs[0]}", "--victims=a:sdx:tiny"]) == 2
    assert ev_cli.run_cli(base + [f"--runs={runs[0]}", "--victims=a:sd:tiny", "--purify=gif"]) == 2
    assert ev_cli.run_cli(base + [f"--runs={runs[0]}", "--victims=a:ip2p:tiny", "--purify=diffpure"]) == 2
    assert "sd" in capsys.readouterr().err
    assert ev_cli.run_cli(["evaluate", f"--runs={runs[0]},{runs[1]}", "--victims=a:sd:tiny"]) == 2  # no --outdir
    assert not (tmp_path / "o").exists()
    # an evaluation writing into the same --outdir (a live lock): refused, one line, nothing else written there
    from tdae_jax.runs import lock

    (tmp_path / "o").mkdir()
    lock._create(tmp_path / "o" / ev_cli.LOCK)
    capsys.readouterr()
    assert ev_cli.run_cli(base + [f"--runs={runs[0]}", "--victims=a:sd:tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "in use by pid" in err[0], err
    assert [p.name for p in (tmp_path / "o").iterdir()] == [ev_cli.LOCK]


def test_report_select_counts_shared_sources_once():
    rows = [{"kind": "seed_floor", "run": r, "source": "s", "id": "i", "victim": "v", "purify": "none", "seed": 0,
             "seed_b": 1, "psnr": 10.0} for r in ("a", "b")]
    assert len(report.select(rows, kind="seed_floor", victim="v")) == 1
    assert len(report.select(rows, kind="seed_floor", victim="v", run="a")) == 1


@pytest.mark.parametrize("name", ["evaluate_quickstart.flags", "evaluate_miniature.flags", "evaluate_sd14.flags",
                                  "evaluate_miniature_matrix.flags"])
def test_evaluate_flagfiles_parse(name, monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # nested --flagfile paths are relative to the repository root
    ev_cli.FLAGS.unparse_flags()
    ev_cli.FLAGS(["evaluate", f"--flagfile=experiments/flags/{name}"])
    cfg = ev_cli.config_from_flags(ev_cli.FLAGS)
    assert cfg.runs and cfg.victims and cfg.outdir and cfg.seeds
    assert "none" in cfg.purify
    ev_cli.FLAGS.unparse_flags()
