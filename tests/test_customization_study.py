"""The customization study's command end to end on the shipped miniature models with short settings (resume,
settings check, page, budgets on the 8-bit grid); its statistics are test_stats's.

Subjects come from world seed 4242 (the study's tables use 3000)."""
import json

import numpy as np

from experiments import miniature_customization as cli
from tdae_jax.data import io as dio
from tdae_jax.miniature import customization as cz


FAST = ["--cz_surrogate=sd_a", "--attacked_models=sd_a", "--defenses=noise,fsmg", "--cz_budgets=16",
        "--attackers=dreambooth", "--attacker_seeds=0", "--subjects=2", "--views=2", "--subject_seed=4242",
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
    subj = cz.eligible_subjects(4242, 2, 2, 12)
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
