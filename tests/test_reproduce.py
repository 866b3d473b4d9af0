"""The reproduction study command: --quick end to end, resume, usage errors (pairs of its own world seed)."""
import csv

from experiments import reproduce
from tdae_jax.evaluate import study

# A world seed of its own: disjoint from the study's tables (31337), the editors' evaluation (1000), training.
SEED = 9090


def test_usage_errors_exit_2_before_writing(tmp_path, capsys):
    for bad in (["--rows=noise,foo"], ["--budgets=300"], ["--threats=psychic"], ["--ip2p_victims=nope"],
                ["--rows=pge_tdae"], ["--pairs=1"],
                ["--world=mini64"]):  # the 32 px models in the 64 px world
        wd = tmp_path / "wd"
        rc = reproduce.run_cli(["reproduce", f"--study_dir={wd}", f"--page={tmp_path}/r.md", *bad])
        assert rc == 2, bad
        assert not wd.exists(), bad
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), (bad, err)


def test_quick_study_writes_page_and_resumes(tmp_path):
    wd, out = tmp_path / "wd", tmp_path / "docs" / "reproduction.md"
    argv = ["reproduce", "--quick", f"--world_seed={SEED}", f"--study_dir={wd}", f"--page={out}"]
    assert reproduce.run_cli(argv) == 0
    page = out.read_text()
    assert "### Blind, eps 16/255" in page and "McNemar" in page
    assert "| noise * |" in page and "| pgd vs noise |" in page
    assert "no measurable effect" in page or "lower" in page or "higher" in page
    rows = list(csv.DictReader(open(out.parent / "reproduction" / "cells.csv")))
    assert {r["row"] for r in rows} == {"none", "noise", "pgd"}
    assert all(int(r["n"]) == 8 and float(r["lo95"]) <= float(r["rate"]) <= float(r["hi95"]) for r in rows)
    assert {r["purifier"] for r in rows} == {"none", "jpeg75", "worst"}
    cell_files = sorted((wd / "cells").iterdir())
    mtimes = [f.stat().st_mtime_ns for f in cell_files]
    assert reproduce.run_cli(argv) == 0  # resumes: nothing recomputed
    assert [f.stat().st_mtime_ns for f in sorted((wd / "cells").iterdir())] == mtimes
    # the page alone, from the stored cells
    again = tmp_path / "again.md"
    assert reproduce.run_cli([*argv[:-1], f"--page={again}", "--report_only"]) == 0
    assert "rewritten from the stored cells" in again.read_text() and "| pgd vs noise |" in again.read_text()
    # the same workdir with another setting is refused
    assert reproduce.run_cli([*argv, "--scene_objects=1"]) == 2


def test_blind_prompts_differ_from_the_victims():
    c = study.StudyConfig(n=16, seed=SEED, rows=("noise",), victims=("ip2p_a",), sdedit_victims=())
    p = study.pairs(c)
    blind = study.protector_prompts(p, c, "blind")
    assert study.protector_prompts(p, c, "known") == p["instruction"]
    assert sum(b != i for b, i in zip(blind, p["instruction"])) >= 15
    assert blind == study.protector_prompts(study.pairs(c), c, "blind")  # deterministic


def test_noise_control_is_inside_the_budget_and_seeded(tmp_path):
    from tdae_jax.data import io as dio
    from tdae_jax.miniature import protection as mp

    c = study.StudyConfig(n=4, seed=SEED, rows=("noise",), victims=("ip2p_a",), sdedit_victims=())
    p = study.pairs(c)
    x = mp.noise_control(p["source"], 8 / 255, p["ids"])
    assert dio.linf_uint8(x, p["source"]) == 8
    assert (x == mp.noise_control(p["source"], 8 / 255, p["ids"])).all()
    assert (x != p["source"]).mean() > 0.5


def test_study_flagfile_parses_to_the_documented_grid():
    from pathlib import Path

    from experiments.common import FLAGS

    flagfile = Path(reproduce.__file__).parent / "flags" / "reproduce_miniature.flags"
    FLAGS.unparse_flags()
    FLAGS(["reproduce", f"--flagfile={flagfile}"])
    c = reproduce.config_from_flags(FLAGS)
    assert c.n >= 128 and set(c.eps) == {8.0, 16.0} and set(c.threats) == {"blind", "known"}
    assert {"noise", "pgd", "pgd_tdae", "pgd_fdm", "pgd_dpd", "pgd_tpa", "pge", "advdm", "mist", "sds", "ace",
            "sa"} <= set(c.rows)
    assert c.seed not in (SEED, 1000, 2000, 4242)  # tables and tests use different pairs
    FLAGS.unparse_flags()


def test_a_live_study_in_the_folder_is_refused_before_writing(tmp_path, capsys):
    from tdae_jax.runs import lock

    wd = tmp_path / "wd"
    wd.mkdir()
    lock._create(wd / study.LOCK)  # held by this (live) process
    rc = reproduce.run_cli(["reproduce", "--quick", f"--study_dir={wd}", f"--page={tmp_path}/r.md"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "in use by pid" in err[0], err
    assert sorted(p.name for p in wd.iterdir()) == [study.LOCK]  # nothing written
    # --report_only reads the stored cells only: a live study does not stop it (here: none stored yet)
    assert reproduce.run_cli(["reproduce", "--quick", f"--study_dir={wd}", f"--page={tmp_path}/r.md",
                              "--report_only"]) == 0


def test_beta_sweep_section_compares_each_beta_with_the_default_on_the_same_pairs(tmp_path):
    from tdae_jax.evaluate import study_report

    c = study.StudyConfig(seed=SEED, n=8, rows=("pgd_fdm",), eps=(16,), threats=("blind",), victims=("ip2p_a",),
                          sdedit_victims=(), purifiers=(), beta_sweep=(0.1, 1.0))
    store = study.Store(tmp_path, c)
    key = study.score_key("ip2p_a", "none", c)
    base = study.Cell("pgd_fdm", 16.0, "blind")
    outcomes = {None: [True] * 8, 0.1: [True] * 8, 1.0: [False] * 7 + [True]}  # beta 1: 7 pairs flip
    for beta, o in outcomes.items():
        store.save_scores(base if beta is None else study.Cell("pgd_fdm", 16.0, "blind", beta), {key: o})
    text = study_report.beta_section(store, c, study.cells(c))
    assert "| 0.3 (default) | 100.0" in text and "| 1 | 12.5" in text
    assert "| beta 0.1 vs 0.3 | +0.0" in text and "| beta 1 vs 0.3 | -87.5" in text
    assert "beta 1 vs 0.3 on ip2p_a (intra): edit success lower" in text
