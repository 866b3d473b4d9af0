"""The customization study's command end to end on the shipped miniature models with short settings (resume,
settings check, page, budgets on the 8-bit grid); its statistics are test_stats's.

Subjects come from world seed 4242 (the study's tables use 3000). Four views per subject: the static surrogate
(DreamBooth on the views) then trains on a batch of the attacker's size (4), so both fine-tunings run one compiled
step."""
import json

import numpy as np

from experiments import miniature_customization as cli
from tdae_jax.data import io as dio
from tdae_jax.miniature import customization as cz


FAST = ["--cz_surrogate=sd_a", "--attacked_models=sd_a", "--defenses=noise,fsmg", "--cz_budgets=16",
        "--attackers=dreambooth", "--attacker_seeds=0", "--subjects=2", "--views=4", "--subject_seed=4242",
        "--defense_static_steps=1", "--defense_fsmg_steps=1", "--attack_steps=2", "--attack_samples=2",
        "--attack_sample_steps=2"]


def test_command_resumes_and_refuses_other_settings(tmp_path, capsys):
    study, page = tmp_path / "study", tmp_path / "page.md"
    page.write_text("# title\n<!-- results:start -->\nold\n<!-- results:end -->\ntail\n")
    args = ["cz", *FAST, f"--cz_study_dir={study}", f"--cz_page={page}"]
    assert cli.run_cli(args) == 0
    rates = {p.name: json.loads(p.read_text()) for p in (study / "rates").iterdir()}
    assert len(rates) == 3  # none, noise@16, fsmg@16 on sd_a with DreamBooth
    for r in rates.values():
        assert set(r) == {"0"} and len(r["0"]) == 2 and all(0 <= v <= 1 for v in r["0"].values())
    subj = cz.eligible_subjects(4242, 2, 4, 12)
    for sid, clean in zip(subj["index"], subj["images"]):
        for m in ("noise", "fsmg"):
            prot = np.load(study / "protected" / f"{m}__16__s{sid}.npy")
            assert 0 < dio.linf_uint8(prot, clean) <= 16  # the budget on the 8-bit grid
    text = page.read_text()
    assert text.startswith("# title") and text.rstrip().endswith("tail") and "old" not in text
    assert "| sd_a (intra) | fsmg | 16 |" in text and "(n=2)" in text
    stamps = {p.name: p.stat().st_mtime_ns for p in (study / "rates").iterdir()}
    assert cli.run_cli(args) == 0  # resume: nothing left to compute
    assert {p.name: p.stat().st_mtime_ns for p in (study / "rates").iterdir()} == stamps
    capsys.readouterr()
    assert cli.run_cli([*args, "--attack_steps=3"]) == 2  # other settings: refused before anything is written
    assert "other settings" in capsys.readouterr().err
    assert cli.run_cli([*args, "--defenses=mist"]) == 2


def test_units_pair_subjects_and_shared_seeds_and_the_page_says_only_what_the_test_supports(tmp_path):
    """``units``: per subject, the mean over the attacker seeds *both* cells have; the page calls a difference
    "lower" only when the sign-flip test supports it (6 subjects all lower: p = 2/64), else n.m.e."""
    from tdae_jax.miniature import customization_report as report
    from tdae_jax.miniature import customization_study as cs

    c = cs.StudyConfig(victims=("sd_a",), methods=("noise", "dladiff"), eps=(8.0,), attackers=("dreambooth",),
                       seeds=(0, 1), subjects=6)
    store = cs.Store(tmp_path / "s", c)
    clean, noise, prot = (cs.cell_id(m, e, "sd_a", "dreambooth") for m, e in (("none", 0.0), ("noise", 8.0),
                                                                             ("dladiff", 8.0)))
    for sid in range(6):
        for seed in (0, 1):
            store.add_rate(clean, seed, sid, 0.5 + 0.05 * sid + 0.1 * seed)
            store.add_rate(noise, seed, sid, 0.5 + 0.05 * sid + 0.1 * seed + (0.01 if sid % 2 else -0.01))
        store.add_rate(prot, 0, sid, 0.1)  # seed 0 only: the comparison uses seed 0 of the clean cell
    a, b, sids = cs.units(store, clean, prot)
    np.testing.assert_allclose(a, 0.5 + 0.05 * np.arange(6))
    np.testing.assert_allclose(b, 0.1)
    assert sids == [str(s) for s in range(6)]
    table = report.rates_table(store, c, "dreambooth")
    row = next(line for line in table.splitlines() if "| dladiff | 8 |" in line)
    assert "(lower)" in row and "p=0.031" in row and "(n=6)" in row
    noise_row = next(line for line in table.splitlines() if "| noise | 8 |" in line)
    assert "(n.m.e.)" in noise_row
