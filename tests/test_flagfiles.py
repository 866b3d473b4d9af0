"""Every TDAE flagfile runs end to end on the built-in tiny surrogate, with a
short iteration count and small sizes passed after the flagfile (later flags override earlier ones)."""
import functools
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

from experiments import tdae as cli

FLAGS_DIR = Path(__file__).resolve().parents[1] / "experiments" / "flags"
TDAE_FLAGFILES = sorted(p.name for p in FLAGS_DIR.glob("*.flags")
                        if p.name.split("_")[0] in ("ip2p", "sd14", "sd3"))
FAST = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False}  # compile cheaply
SHORT = ["--steps=2", "--size=16", "--timesteps=1", "--denoise_steps=1", "--tpa_n=1", "--dpd_period=1",
         "--dpd_steps=1", "--batch_size=1", "--report=false", "--ckpt_every=0", "--num_devices=1"]


def _fast_jit(jit, fun=None, /, **kw):
    """``jax.jit`` with XLA's backend (LLVM) optimisation off, merged under any ``compiler_options`` passed."""
    kw["compiler_options"] = {**FAST, **(kw.get("compiler_options") or {})}
    return jit(fun, **kw) if fun is not None else functools.partial(_fast_jit, jit, **kw)


@pytest.fixture
def fast_compile(monkeypatch):
    """The command's programs (``jax.jit`` at call time: the protection step, its init, the text embedding) compile
    with XLA's backend optimisation off: the runs check that a flagfile parses and runs end to end, not how fast
    the step runs. Compilation of the step (minutes at full optimisation) halves; the optimisation level changes
    no semantics, and a 2-step run at 16 px stays short."""
    monkeypatch.setattr(jax, "jit", functools.partial(_fast_jit, jax.jit))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("img")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(d / "x.png")
    return d


def test_all_paper_rows_have_flagfiles():
    """Every runnable row of the paper's tables has a flagfile; PGE + TDAE has none (DPD needs a host that reads
    the text, and the PhotoGuard encoder attack reads none: base.flags, README)."""
    for s in ("ip2p", "sd14"):
        for h in ("pge", "pgd", "sa", "mist", "ace"):
            for v in ("", "_fdm", "_tdae", "_tpa"):
                assert (f"{s}_{h}{v}.flags" in TDAE_FLAGFILES) == (f"{h}{v}" != "pge_tdae"), (s, h, v)
    assert not [n for n in TDAE_FLAGFILES if n.endswith(("_pge_tdae.flags", "_pge_dpd.flags"))]


# CI runs a covering subset: every defense variant, both UNet surrogates and four of the five hosts (4 runs; the
# Semantic Attack falls under PGD in tests/test_objectives.py and has its own tests/test_semantic_attack.py: its
# TDAE step compiles for ~1 min, ACE's in half that); TDAE_ALL_FLAGFILES=1 runs all 40 (each compiles its own
# step: ~1 min apiece on 2 cores).
_SUBSET = ["ip2p_pge.flags", "sd14_pgd_fdm.flags", "ip2p_ace_tdae.flags", "sd14_mist_tpa.flags"]
RUN = TDAE_FLAGFILES if os.environ.get("TDAE_ALL_FLAGFILES") else [n for n in _SUBSET if n in TDAE_FLAGFILES]


def test_every_flagfile_parses_to_a_config(monkeypatch):
    """All flagfiles (incl. the ones not run below) resolve to a valid frozen config."""
    from experiments import common
    from tdae_jax import pipeline

    monkeypatch.chdir(FLAGS_DIR.parents[1])
    for name in TDAE_FLAGFILES + ["quickstart.flags"]:
        cli.FLAGS.unparse_flags()
        cli.FLAGS(["tdae", f"--flagfile=experiments/flags/{name}"])
        cfg = common.run_config_from_flags(cli.FLAGS)
        pipeline.validate(cfg)  # what the command checks before it writes anything: no flagfile is refused
        assert cfg.objective.name and cfg.budget.eps > 0, name


@pytest.mark.parametrize("name", RUN)
def test_flagfile_runs(name, images, tmp_path, monkeypatch, fast_compile):
    monkeypatch.chdir(FLAGS_DIR.parents[1])  # flagfiles include base.flags by a repo-relative path
    code = cli.run_cli(["tdae", f"--flagfile=experiments/flags/{name}", *SHORT, f"--images={images}",
                        f"--workdir={tmp_path / 'w'}"])
    assert code == 0, name
    out = np.asarray(Image.open(tmp_path / "w" / "protected" / "x.png"), np.int32)
    src = np.asarray(Image.open(images / "x.png"), np.int32)
    eps = float([l for l in (tmp_path / "w" / "flags.flags").read_text().split() if l.startswith("--eps=")][0][6:])
    assert np.abs(out - src).max() <= int(eps * 255 + 1e-6)


def test_quickstart_flagfile_is_complete():
    text = (FLAGS_DIR / "quickstart.flags").read_text()
    assert "--objective=pgd" in text and "--images=" in text and "--weights_dir=miniature:ip2p_a" in text


def _host_words(text: str, names: set[str], ignore: set[str]) -> set[str]:
    """Words of ``text`` that name a host: a registry name, or a variant of one (``pge_targeted``: a name + ``_``
    + more) that is not a flag or config field (``pgd_eta``, ``sa_mask``) or a host_defense row (``pgd_fdm``);
    words inside paths, file names, flag names or longer identifiers (``sd3_pge``, ``mist_v3.py``,
    ``--mist_weight``) are not names."""
    found = set()
    for m in re.finditer(r"(?<![\w./<>*-])([a-z][a-z0-9]*(?:_[a-z0-9]+)*)(?![\w.(/-])", text):
        w = m.group(1)
        if w in names or (w not in ignore and any(w.startswith(n + "_") for n in names)):
            found.add(w)
    return found


def test_names_in_help_and_flagfile_comments_exist():
    """Every host and target named by the --objective / --target / --defense help, the flagfiles (comments and
    values) and the Objective config's docstring exists in the registry (objectives.NAMES, objectives.TARGETS):
    the help strings are generated from it, and a stale name in a comment fails here."""
    import dataclasses
    import inspect

    from tdae_jax import configs, objectives, pipeline

    names, targets = set(objectives.NAMES), set(objectives.TARGETS)
    ignore = set(cli.FLAGS) | {f.name for c in (configs.Objective, configs.FDM, configs.TPA, configs.DPD)
                               for f in dataclasses.fields(c)}
    ignore |= {f"{n}_{d}" for n in names for d in pipeline.DEFENSES}  # rows / flagfile stems: host_defense
    helps = {k: cli.FLAGS[k].help for k in ("objective", "target", "defense")}
    assert set(re.search(r"<([^>]*)>", helps["objective"]).group(1).split("|")) == names
    assert set(re.search(r"<([^>]*)>", helps["target"]).group(1).split("|")) == targets
    mentioned = {src: _host_words(text, names, ignore) for src, text in helps.items()}
    mentioned["Objective"] = _host_words(inspect.getsource(configs.Objective), names, ignore)
    for path in sorted(FLAGS_DIR.glob("*.flags")):
        text = path.read_text()
        comments = "\n".join(line for line in text.splitlines() if line.startswith("#"))
        mentioned[path.name] = _host_words(comments, names, ignore) | set(re.findall(r"--objective=(\w+)", text))
        for t in re.findall(r"--target=(\w+)", text):
            assert t in targets, (path.name, t)
    unknown = {src: sorted(w - names) for src, w in mentioned.items() if w - names}
    assert not unknown, unknown
    # "a | b | c" lists (the old Objective comments): a list naming one host or target names only hosts or targets
    sources = [inspect.getsource(configs), *helps.values(), *(p.read_text() for p in FLAGS_DIR.glob("*.flags"))]
    for listed in (m.split(" | ") for src in sources for m in re.findall(r"\w+(?: \| \w+)+", src)):
        for vocabulary in (names, targets):
            assert not set(listed) & vocabulary or set(listed) <= vocabulary, listed
    assert {"pge", "pgd"} <= mentioned["target"] and mentioned["base.flags"] >= {"pge", "pge_untargeted"}
