"""The customization study's page: per-cell rates with intervals and paired comparisons over subjects.

Rates are per-subject shares of samples reproducing the subject, averaged over subjects (95 % bootstrap interval
over subjects, :func:`stats.mean_ci`); each comparison pairs the same subjects (and attacker seeds) and is called
a difference only when :func:`stats.verdict` supports it (interval excludes 0 and sign-flip p < 0.05).
"""
from __future__ import annotations

from tdae_jax.evaluate import stats
from tdae_jax.miniature import customization_study as cs


def _rate_cell(store, cid: str) -> str:
    a, _, sids = cs.units(store, cid, cid)
    return f"{stats.fmt_rate(stats.mean_ci(a))} (n={len(sids)})" if sids else "-"


def _paired_cell(store, a: str, b: str) -> str:
    ra, rb, sids = cs.units(store, a, b)
    if len(sids) < 2:
        return "-"
    c = stats.paired_units_ci(ra, rb)
    v = stats.verdict(c)
    return f"{stats.fmt_paired(c)} ({v})" if v != "no measurable effect" else f"{stats.fmt_paired(c)} (n.m.e.)"


def rates_table(store, c: cs.StudyConfig, attacker: str) -> str:
    """One row per (attacked model, defense, budget): rate, and the paired difference to clean and to noise."""
    lines = [f"| attacked model ({attacker}) | defense | eps (/255) | subject reproduced, % [95 % CI] | "
             "vs clean, pp [95 % CI] | vs noise at the same eps |", "|---|---|---|---|---|---|"]
    for v in c.victims:
        kind = "intra" if v == c.surrogate else "cross"
        clean = cs.cell_id("none", 0.0, v, attacker)
        for m, e in c.variants():
            cid = cs.cell_id(m, e, v, attacker)
            vs_clean = "-" if m == "none" else _paired_cell(store, clean, cid)
            noise = cs.cell_id("noise", e, v, attacker)
            vs_noise = "-" if m in ("none", "noise") or "noise" not in c.methods else _paired_cell(store, noise, cid)
            lines.append(f"| {v} ({kind}) | {m} | {'-' if m == 'none' else f'{e:g}'} | {_rate_cell(store, cid)} | "
                         f"{vs_clean} | {vs_noise} |")
    return "\n".join(lines) + "\n"


def defenses_table(store, c: cs.StudyConfig) -> str:
    """DLADiff minus each baseline on the same subjects (negative: DLADiff leaves the attacker less)."""
    others = [m for m in c.methods if m not in ("dladiff", "noise")]
    if "dladiff" not in c.methods or not others:
        return ""
    lines = ["| attacker | attacked model | eps (/255) | " + " | ".join(f"DLADiff - {m}" for m in others) + " |",
             "|---|---|---|" + "---|" * len(others)]
    for a in c.attackers:
        for v in c.victims:
            for e in c.eps:
                cells = [_paired_cell(store, cs.cell_id(m, e, v, a), cs.cell_id("dladiff", e, v, a)) for m in others]
                lines.append(f"| {a} | {v} | {e:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def page(store, c: cs.StudyConfig, command: str, wall: float | None) -> str:
    """The Markdown results block (between the page's results markers)."""
    att = c.attack
    names = {"dreambooth": f"DreamBooth (UNet, lr {att.lr:g})", "lora": f"LoRA (rank 4, lr {c.lora_lr:g})"}
    head = (f"Command: `{command}`" + (f" ({wall:.0f} s wall this run)" if wall is not None else "") + ". "
            f"Up to {c.subjects} subjects x {c.views} views (world seed {c.subject_seed}), attacker seeds "
            f"{', '.join(map(str, c.seeds))} (each cell's n: the subjects it has so far); surrogate {c.surrogate}; "
            f"defenses: {c.defense.epochs} epochs, surrogate "
            f"lr {c.defense.lr:g}, DSUR {c.defense.static_steps} steps, FSMG {c.defense.fsmg_steps} PGD steps on "
            f"the DSUR surrogate; attackers: {' and '.join(names[a] for a in c.attackers)}, "
            f"{att.steps} steps, batch {att.batch_size}; {att.samples} samples per subject ({att.sample_steps} "
            f"DDIM steps, guidance {att.guidance:g}); success: both subject colours >= {att.min_px} px and no "
            "other colour. n = subjects; intervals are 95 % bootstrap over subjects; p: exact sign-flip test on "
            "the paired per-subject differences; n.m.e. = no measurable effect.\n\n")
    body = "".join(f"### {a}\n\n" + rates_table(store, c, a) + "\n" for a in c.attackers)
    comp = defenses_table(store, c)
    return head + body + ("### DLADiff against the baselines (paired, pp)\n\n" + comp if comp else "")
