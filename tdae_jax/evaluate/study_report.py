"""The reproduction study's page: tables shaped like TDAE's (Tables II-VI, Fig. 5), with intervals and paired tests.

Every rate is ``k/n`` pairs with a 95 % bootstrap interval; every comparison is paired on the same pairs
(``stats.paired_diff_ci``: difference in percentage points, its 95 % paired bootstrap interval, exact McNemar p).
The sentences under a table are generated from ``stats.verdict``: a difference is named only where the
interval excludes 0 and p < 0.05; everything else is reported as "no measurable effect".
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from tdae_jax.evaluate import stats
from tdae_jax.evaluate.study import Cell, StudyConfig, Store, cells, score_key
from tdae_jax.miniature import protection as mp
from tdae_jax.miniature import shipped


def outcomes(scores: dict, victim: str, purifier: str, c: StudyConfig) -> np.ndarray | None:
    v = scores.get(score_key(victim, purifier, c))
    return None if v is None else np.asarray(v, bool)


def worst(scores: dict, victim: str, c: StudyConfig) -> np.ndarray | None:
    """Per pair: the edit succeeds under some purification (or none): the attacker's best."""
    got = [outcomes(scores, victim, p, c) for p in ("none", *c.purifiers)]
    return None if any(g is None for g in got) else np.any(np.stack(got), axis=0)


def victims(c: StudyConfig) -> list[tuple[str, str]]:
    """(name, column label) of every victim: intra, cross, SDEdit."""
    out = []
    for v in (*c.victims, *c.sdedit_victims):
        kind = "intra" if v == c.surrogate else ("SDEdit" if shipped.family(v) == "sd" else "cross")
        out.append((v, f"{v} ({kind})"))
    return out


def _rows_for(store: Store, threat: str, eps: float, grid: list[Cell]) -> list[Cell]:
    """The cells shown in the (threat, eps) table: clean, then each computed row in its own or the "any" threat."""
    out = [Cell("none")]
    for cell in grid:
        if (cell.row != "none" and cell.beta is None and cell.eps == eps and cell.threat in (threat, "any")
                and store.score_path(cell).is_file()):
            out.append(cell)
    return out


def pending(store: Store, grid: list[Cell]) -> str:
    """The cells not computed yet, grouped by row: ``pgd_tpa (16/255 blind, 8/255 known)``."""
    groups: dict[str, list[str]] = {}
    for cell in grid:
        if not store.score_path(cell).is_file():
            beta = "" if cell.beta is None else f" beta {cell.beta:g}"
            groups.setdefault(cell.row, []).append(f"{cell.eps:g}/255 {cell.threat}{beta}".replace(" any", ""))
    return "; ".join(f"{row} ({', '.join(v)})" for row, v in groups.items())


def _label(cell: Cell) -> str:
    return "none (clean edit)" if cell.row == "none" else cell.row + ("" if cell.threat != "any" else " *")


def rate_table(store: Store, c: StudyConfig, shown: list[Cell], pick) -> str:
    """Markdown: one line per cell, one column per victim, ``rate [lo, hi]`` in %."""
    vs = victims(c)
    lines = ["| protection | " + " | ".join(lbl for _, lbl in vs) + " |", "|---|" + "---|" * len(vs)]
    for cell in shown:
        sc = store.load_scores(cell)
        vals = [pick(sc, v) for v, _ in vs]
        lines.append(f"| {_label(cell)} | " + " | ".join("-" if x is None else stats.fmt_rate(stats.rate_ci(x))
                                                          for x in vals) + " |")
    return "\n".join(lines) + "\n"


def comparisons(c: StudyConfig, shown: list[Cell]) -> list[tuple[str, Cell, Cell]]:
    """(name, a, b) pairs to compare (b - a): every protection vs the noise control, host+X vs host."""
    by_row = {cell.row: cell for cell in shown}
    out = []
    noise = by_row.get("noise")
    for cell in shown:
        if cell.row in ("none", "noise"):
            continue
        if noise is not None:
            out.append((f"{cell.row} vs noise", noise, cell))
        host, variant = mp.parse_spec(cell.row)
        if variant and host in by_row:
            out.append((f"{cell.row} vs {host}", by_row[host], cell))
    if noise is not None:
        out.insert(0, ("noise vs none", by_row["none"], noise))
    return out


def comparison_table(store: Store, c: StudyConfig, comps, pick) -> tuple[str, list[str]]:
    """Markdown table of paired differences and the sentences the intervals support."""
    vs = victims(c)
    lines = ["| comparison (b - a) | " + " | ".join(lbl for _, lbl in vs) + " |", "|---|" + "---|" * len(vs)]
    supported = []
    for name, a, b in comps:
        sa, sb = store.load_scores(a), store.load_scores(b)
        row = []
        for v, lbl in vs:
            xa, xb = pick(sa, v), pick(sb, v)
            if xa is None or xb is None:
                row.append("-")
                continue
            d = stats.paired_diff_ci(xa, xb)
            row.append(stats.fmt_paired(d))
            word = stats.verdict(d)
            if word != "no measurable effect":
                supported.append(f"{name} on {lbl}: edit success {word}, {stats.fmt_paired(d)}")
        lines.append(f"| {name} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n", supported


def _reading(supported: list[str]) -> str:
    if not supported:
        return ("Reading: no comparison in this table has a paired interval that excludes 0 with McNemar p < 0.05: "
                "**no measurable effect** of any row against its reference here.\n")
    body = "\n".join(f"- {s}." for s in supported)
    return ("Reading (only the differences whose paired 95 % interval excludes 0 and McNemar p < 0.05; every other "
            "comparison above: no measurable effect):\n" + body + "\n")


def section(store: Store, c: StudyConfig, threat: str, eps: float, grid: list[Cell]) -> str:
    shown = _rows_for(store, threat, eps, grid)
    comps = comparisons(c, shown)
    none_pick = lambda sc, v: outcomes(sc, v, "none", c)  # noqa: E731
    worst_pick = lambda sc, v: worst(sc, v, c)  # noqa: E731
    if len(shown) == 1:
        return f"### {threat.capitalize()}, eps {eps:g}/255\n\nNo protection cell computed yet.\n"
    parts = [f"### {threat.capitalize()}, eps {eps:g}/255\n",
             "Edit success (%), 95 % bootstrap interval; no purification:\n", rate_table(store, c, shown, none_pick)]
    t, sup = comparison_table(store, c, comps, none_pick)
    parts += ["\nPaired differences in edit success (percentage points, 95 % paired bootstrap interval, exact "
              "McNemar p); no purification:\n", t, "\n" + _reading(sup)]
    if c.purifiers:
        parts += [f"\nWorst case over purifications (the edit succeeds under any of none, {', '.join(c.purifiers)}):\n",
                  rate_table(store, c, shown, worst_pick)]
        t, sup = comparison_table(store, c, comps, worst_pick)
        parts += ["\nPaired differences, worst case:\n", t, "\n" + _reading(sup)]
    return "\n".join(parts)


def quality_table(store: Store, grid: list[Cell]) -> str:
    """Image quality of the protected images vs the clean ones (TDAE Table V): mean and sd over pairs."""
    lines = ["| protection | eps (/255) | threat | PSNR (dB) | SSIM | seconds (protect, all pairs) |",
             "|---|---|---|---|---|---|"]
    for cell in grid:
        d = store.load_cell(cell)
        if cell.row == "none" or d is None:
            continue
        lines.append(f"| {cell.row}{'' if cell.beta is None else f' beta={cell.beta:g}'} | {cell.eps:g} | "
                     f"{cell.threat} | {d['psnr'].mean():.2f} ± {d['psnr'].std():.2f} | "
                     f"{d['ssim'].mean():.4f} ± {d['ssim'].std():.4f} | {float(d['seconds']):.0f} |")
    return "\n".join(lines) + "\n"


def csv_text(store: Store, c: StudyConfig, grid: list[Cell]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["row", "eps_255", "threat", "beta", "victim", "purifier", "k", "n", "rate", "lo95", "hi95"])
    for cell in grid:
        sc = store.load_scores(cell)
        for v, _ in victims(c):
            for pur in ("none", *c.purifiers, "worst"):
                x = worst(sc, v, c) if pur == "worst" else outcomes(sc, v, pur, c)
                if x is None:
                    continue
                r = stats.rate_ci(x)
                w.writerow([cell.row, f"{cell.eps:g}", cell.threat, "" if cell.beta is None else f"{cell.beta:g}",
                            v, pur, r.k, r.n, f"{r.rate:.4f}", f"{r.lo:.4f}", f"{r.hi:.4f}"])
    return buf.getvalue()


def plot(store: Store, c: StudyConfig, threat: str, grid: list[Cell], path: Path) -> None:
    """Edit success with 95 % intervals per protection and victim, one panel per budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vs = victims(c)
    fig, axes = plt.subplots(1, len(c.eps), figsize=(5 + 2.5 * len(c.eps), 4), squeeze=False, sharey=True)
    for ax, e in zip(axes[0], sorted(c.eps, key=float)):
        shown = _rows_for(store, threat, float(e), grid)
        width = 0.8 / len(vs)
        for j, (v, lbl) in enumerate(vs):
            rs = [stats.rate_ci(x) if (x := outcomes(store.load_scores(s), v, "none", c)) is not None else None
                  for s in shown]
            xs = [i + j * width for i, r in enumerate(rs) if r is not None]
            ys = [100 * r.rate for r in rs if r is not None]
            err = np.array([[100 * (r.rate - r.lo), 100 * (r.hi - r.rate)] for r in rs if r is not None]).T
            ax.bar(xs, ys, width, yerr=err if len(ys) else None, label=lbl, capsize=2)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(shown))])
        ax.set_xticklabels([s.row for s in shown], rotation=45, ha="right")
        ax.set_title(f"{threat}, eps {float(e):g}/255")
        ax.set_ylabel("edit success (%), 95 % CI")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="lower center", ncol=len(vs), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=90)
    plt.close(fig)


def threat_section(store: Store, c: StudyConfig, grid: list[Cell]) -> str:
    """Known minus blind instruction, per text-reading row and budget, on the same pairs."""
    pick = lambda sc, v: outcomes(sc, v, "none", c)  # noqa: E731
    comps = []
    for cell in grid:
        if cell.threat == "blind" and cell.beta is None:
            known = Cell(cell.row, cell.eps, "known")
            if known in grid and store.score_path(cell).is_file() and store.score_path(known).is_file():
                comps.append((f"{cell.row} @ {cell.eps:g}/255: known vs blind", cell, known))
    if not comps:
        return ""
    t, sup = comparison_table(store, c, comps, pick)
    return ("## Does knowing the instruction matter? (known - blind, same pairs, no purification)\n\n" + t + "\n"
            + _reading(sup))


def beta_section(store: Store, c: StudyConfig, grid: list[Cell]) -> str:
    """FDM's beta sweep (TDAE Fig. 5): edit success per beta, the default beta's cell included."""
    sweep = [cell for cell in grid if cell.beta is not None]
    if not sweep:
        return ""
    base = Cell(sweep[0].row, sweep[0].eps, sweep[0].threat)
    vs = victims(c)
    lines = [f"## FDM beta sweep (TDAE Fig. 5): `{base.row}`, {base.eps:g}/255, {base.threat}\n",
             "| beta | " + " | ".join(lbl for _, lbl in vs) + " |", "|---|" + "---|" * len(vs)]
    for cell in sorted([*sweep, base], key=lambda x: 0.3 if x.beta is None else x.beta):
        sc = store.load_scores(cell)
        vals = [outcomes(sc, v, "none", c) for v, _ in vs]
        beta = "0.3 (default)" if cell.beta is None else f"{cell.beta:g}"
        lines.append(f"| {beta} | " + " | ".join("-" if x is None else stats.fmt_rate(stats.rate_ci(x))
                                                  for x in vals) + " |")
    comps = [(f"beta {cell.beta:g} vs 0.3", base, cell) for cell in sweep if store.score_path(cell).is_file()]
    if not comps or not store.score_path(base).is_file():
        return "\n".join(lines) + "\n"
    t, sup = comparison_table(store, c, comps, lambda sc, v: outcomes(sc, v, "none", c))
    return ("\n".join(lines) + "\n\nPaired differences against the default beta (same pairs, no purification):\n\n"
            + t + "\n" + _reading(sup))


def page(store: Store, c: StudyConfig, header: str, extra: str = "") -> str:
    """The whole Markdown page for one world (``header``: the command and wall time)."""
    grid = cells(c)
    parts = [header]
    for threat in c.threats:
        parts.append(f"## {threat.capitalize()} threat model\n")
        for e in sorted(c.eps, key=float):
            parts.append(section(store, c, threat, float(e), grid))
    parts += [threat_section(store, c, grid), beta_section(store, c, grid),
              "## Image quality of the protected images (TDAE Table V)\n",
              "Protected vs clean image, mean ± sd over the cell's pairs. LPIPS needs the LPIPS network weights, which "
              "do not ship with the package and cannot be fetched here, so it is not reported on this page "
              "(`experiments.evaluate --lpips_weights=...` computes it where the weights exist). The seconds are each "
              "cell's protection wall time (compilation included) on the machine that made it, possibly with other "
              "jobs running: a record, not a speed comparison (the cost table is).\n",
              quality_table(store, grid)]
    if extra:
        parts.append(extra)
    return "\n".join(parts)


def header(store: Store, c: StudyConfig, command: str, wall: float, assets: str) -> str:
    """Title, command, compute time, settings and how to read the tables."""
    grid = cells(c)
    done = [cell for cell in grid if store.score_path(cell).is_file()]
    compute = sum(float(d["seconds"]) for cell in done if (d := store.load_cell(cell)) is not None)
    todo = "" if len(done) == len(grid) else (
        f"\n\n**Cells done: {len(done)} of {len(grid)}.** Not computed yet (the same command continues the study; the "
        f"tables below show only computed cells): {pending(store, grid)}.")
    vs = ", ".join(lbl for _, lbl in victims(c))
    return (
        f"# Reproduction study: {c.world} world\n\n"
        f"Command: `{command}`  \n"
        + ("This page was rewritten from the stored cells (--report_only). " if wall is None else
           f"Wall time of the run that wrote this page: {wall:.0f} s. ")
        + f"Protection compute over all cells (summed over "
        f"the runs that made them): {compute:.0f} s. Per-cell data: `cells.csv` and the plots in `{assets}/`.{todo}\n\n"
        f"**Setting.** {c.n} held-out edit pairs per cell (world seed {c.seed}; the shipped models were trained on seeds 0-2 and 10-12; "
        f"kinds {', '.join(c.kinds)}; 1-{c.max_objects} objects; {c.size} px). Protections optimize against "
        f"`{c.surrogate}` with {c.steps} sign-PGD iterations (step max(eps/8, 1/255)); victims: {vs}, each editing "
        f"with {c.edit_steps} DDIM steps and the same noise for clean and protected images"
        f"{f'; SDEdit at strength {c.sdedit_strength:g} with the edited caption' if c.sdedit_victims else ''}. "
        f"Edit success is the world's oracle (the instructed edit happened, against the exact ground truth).\n\n"
        "**Threat models.** *blind*: the protector does not know the edit that will be asked; it optimizes with "
        "another instruction of the same scene drawn from the world's vocabulary (DPD refines that text), and the "
        "victim edits with the pair's own instruction. *known*: the protector is given the victim's instruction "
        "(the papers' setting, a best case for the protector). Rows marked * read no text (the noise control, the "
        "encoder attack): the same images serve both threat models.\n\n"
        "**Statistics.** Rates: k/n with a 95 % percentile bootstrap interval (10,000 resamples of pairs). "
        "Comparisons: on the same pairs, the difference b - a in percentage points with a 95 % paired bootstrap "
        "interval and the exact McNemar p. A difference is named only where the interval excludes 0 and p < 0.05; "
        "no correction for multiple comparisons is applied, so read isolated p values near 0.05 with care. "
        "Lower edit success = stronger protection; `noise` is uniform random noise at the same L_inf budget, the "
        "control every protection is compared with. The FDM-only / DPD-only ablation (TDAE Table VI) is the "
        "`host_fdm` and `host_dpd` rows and their 'vs host' lines.\n"
    )
