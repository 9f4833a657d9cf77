"""Ablation reports, all rendered from the one results dict of :func:`medkd.ablate.report.compute_results`:
the Rich table (stdout), ``results.json``, ``results.csv``, ``results.md``, ``results.png`` and, with several
labelled fractions, ``label_efficiency.png``.

Rows are the settings in grid order with the baseline(s) first and the reference rows (all labels, teacher) last;
a rule separates groups of the same (loss, PMD) so that scale subsets read down a column, as in the reference
study's Table 4.2.
"""

from __future__ import annotations

import csv
import io
import json
import textwrap
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from rich import box
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from medkd import rundir
from medkd.metrics import LOWER_IS_BETTER, STUDY_KEYS
from medkd.report.tables import NA, fmt_count, fmt_mean_std, fmt_num, fmt_pct

METRIC_LABELS = dict(zip(STUDY_KEYS, ("Dice", "IoU", "Recall", "Precision", "HD95 mm")))


def fmt_p(p: Any) -> str:
    if p is None:
        return NA
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def _digits(metric: str) -> int:
    return 2 if metric in LOWER_IS_BETTER else 4  # distances in mm


def _group(row: Dict[str, Any]) -> Tuple[Any, ...]:
    if row.get("reference"):
        return ("reference",)
    return (row.get("is_baseline"), row.get("loss") if row.get("scales") else None, bool(row.get("pmd")))


def fmt_gap(gap: Any, ci: Any = None) -> str:
    """Gap closed in percent with its interval: ``"35% [10, 60]"`` (``–`` when undefined)."""
    if gap is None:
        return NA
    text = f"{100 * gap:.0f}%"
    if ci:
        text += f" [{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"
    return text


def fmt_ci(ci: Any, digits: int = 4) -> str:
    return f"[{fmt_num(ci[0], digits)}, {fmt_num(ci[1], digits)}]" if ci else NA


def _students(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in rows if r.get("reference") != "teacher"]


def setting_cells(row: Dict[str, Any]) -> Tuple[str, str, str]:
    scales = "+".join({"enc": "E", "bottleneck": "B", "dec": "D"}[s] for s in row.get("scales") or []) or "–"
    return scales, (row.get("loss") or "–"), ("✓" if row.get("pmd") else "–")


def test_line(results: Dict[str, Any]) -> str:
    """The test, its unit, n and the correction in one sentence (caption of every format)."""
    t = results.get("test") or {}
    corr = t.get("correction", "none")
    adj = f"p adj. = {t.get('correction_description', corr)}" if corr != "none" else \
        "no multiple-comparison correction (p adj. = p)"
    lo, hi = t.get("n_seeds_range") or [t.get("n_seeds", "?")] * 2
    n = f"{lo}" if lo == hi else f"{lo}–{hi}"
    return (f"p = {t.get('method', '?')} (two-sided, over seeds: per-seed mean per-case Dice difference vs the "
            f"baseline run of the same seed), n = {n} seed(s) x {t.get('n_cases', '?')} case(s); {adj}; "
            f"* p adj. < {t.get('alpha', 0.05)}.")


def caption(results: Dict[str, Any]) -> str:
    t = results.get("test") or {}
    seeds = results.get("seeds") or []
    text = (f"{results.get('split', 'test')} split; mean ± std over {len(seeds)} seed(s) "
            f"({', '.join(map(str, seeds))}) of each run's mean over cases (HD95 in mm)")
    if any(not r.get("is_baseline") for r in results.get("rows") or []):
        text += ("; (±%) = relative change vs the row's baseline over the seeds both finished (HD95: lower is "
                 "better); " + test_line(results))
    else:
        text += "."
    subset = (results.get("subset") or {}).get("description")
    if subset:
        text += f" Training subset: {subset}."
    trained = (results.get("teacher_training") or {}).get("description")
    if trained:
        text += f" Setting: {trained}."
    if results.get("gap"):
        text += (" Gap closed = (row - baseline) / (teacher - baseline) in mean Dice, with the 95% t interval over "
                 "seeds divided by that gap (two-level bootstrap intervals, which also speak to new patients, are in "
                 "results.md/csv/json).")
    if any(not r.get("is_baseline") and not r.get("reference") for r in results.get("rows") or []):
        text += (" Equal budgets: each row's baseline had the same epochs and augmentation and at least as many "
                 "optimizer steps.")
    unfair = [r["name"] for r in results.get("rows") or [] if r.get("budget_matched") is False]
    if unfair:
        text += f" Warning: the baseline of {', '.join(unfair)} took fewer optimizer steps (or other augmentation)."
    if t.get("note"):
        text += f" Note: {t['note']}."
    failed = results.get("failed") or []
    if failed:
        which = ", ".join(f"{f['name']}" + ("" if f.get("seed") is None else f" seed {f['seed']}") for f in failed)
        text += (f" {len(failed)} run(s) failed and are left out (rows are compared over the seeds both "
                 f"finished): {which}.")
    return text


def title(results: Dict[str, Any]) -> str:
    o = results.get("options") or {}
    rows = _students(results.get("rows") or [])
    params = {r.get("params") for r in rows} - {None}
    student = f"student {o.get('student', '?')}" + (f" ({fmt_count(params.pop())} params)" if len(params) == 1 else "")
    fractions = results.get("fractions")
    fraction = f"fractions {', '.join(f'{f:g}' for f in fractions)}" if fractions else \
        f"fraction {o.get('fraction', '?')}"
    return (f"ablation ({results.get('grid', '?')}): {len(rows)} settings, {student}, {fraction}, "
            f"{o.get('epochs', '?')} epochs")


class AblateTable:
    """The ablation table as a Rich renderable that fits the console: ``mean ± std`` on one line when there is
    room, else ``mean`` / ``±std`` stacked (never truncated numbers). Build the Table itself with
    :func:`build_table`."""

    def __init__(self, results: Dict[str, Any]):
        self.results = results

    def __rich_measure__(self, console, options) -> Measurement:
        """The wide table's width, so :func:`medkd.report.tables.print_table` can size a captured output to it."""
        return Measurement.get(console, options, build_table(self.results, compact=False))

    def __rich_console__(self, console, options):
        wide = build_table(self.results, compact=False)
        if console.measure(wide, options=options.update_width(10_000)).maximum <= options.max_width:
            yield wide
        else:
            yield build_table(self.results, compact=True)


def ablate_table(results: Dict[str, Any]) -> AblateTable:
    """Rich renderable of the results: one row per setting, per metric mean ± std with the relative change below
    it, and the raw and adjusted p-values (see :func:`build_table`)."""
    return AblateTable(results)


def build_table(results: Dict[str, Any], compact: bool = False) -> Table:
    """Rich table: one row per setting; per metric ``mean ± std`` (``compact``: std on its own line) with the
    seed-matched relative change vs the row's baseline below it; ``p`` (raw) and ``p adj.`` (after the
    correction) with ``*`` when significant.

    A ``params`` column appears only when the rows differ (else the title gives them), a ``seeds`` column only
    when some row lacks a seed's result (failed runs). A blank line separates groups of the same (loss, PMD).
    """
    rows = results.get("rows") or []
    metrics = results.get("metrics") or list(METRIC_LABELS)
    n_seeds = len(results.get("seeds") or [])
    show_seeds = any(len(r.get("seeds") or []) != n_seeds for r in _students(rows))
    show_params = len({r.get("params") for r in _students(rows)}) > 1
    show_gap = bool(results.get("gap"))
    table = Table(title=Text(title(results)), title_justify="left", caption=Text(caption(results)),
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, padding=0 if compact else (0, 1))
    table.add_column("setting", no_wrap=True)
    if show_seeds:
        table.add_column("seeds", justify="right", no_wrap=True)
    if show_params:
        table.add_column("params", justify="right", no_wrap=True)
    for m in metrics:
        label = METRIC_LABELS.get(m, m)
        table.add_column(label.replace(" mm", "") if compact else label, justify="right", no_wrap=True)
    if show_gap:
        table.add_column("gap closed" if not compact else "gap", justify="right", no_wrap=True)
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("p adj.", justify="right", no_wrap=True)
    sep = "\n±" if compact else " ± "
    for i, r in enumerate(rows):
        teacher = r.get("reference") == "teacher"
        style = "bold" if r.get("is_baseline") else ("italic" if r.get("reference") else "")
        cells: List[Any] = [Text(r["name"], style=style)]
        if show_seeds:
            cells.append("1 run" if teacher else f"{len(r.get('seeds') or [])}/{n_seeds}")
        if show_params:
            cells.append(fmt_count(r.get("params")))
        for m in metrics:
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            top = fmt_num(mean, _digits(m)) + ("" if std is None or mean is None else sep + fmt_num(std, _digits(m)))
            if r.get("is_baseline") or teacher:
                cells.append(Text(top + "\n") + Text("(ref)" if not teacher else "(teacher)", style="dim"))
                continue
            g = r.get(f"{m}_rel_gain")
            better = None if g is None or round(g, 1) == 0 else ((g < 0) if m in LOWER_IS_BETTER else (g > 0))
            style = "" if better is None else ("green" if better else "red")
            cells.append(Text(top + "\n") + Text(f"({fmt_pct(g, 1)})", style=style))
        if show_gap:
            gap = fmt_gap(r.get("gap_closed"), r.get("gap_closed_ci")).replace(" [", "\n[" if compact else " [")
            cells.append(Text("ref" if r.get("is_baseline") else ("100%" if teacher else gap),
                              style="dim" if r.get("is_baseline") or teacher else ""))
        if r.get("is_baseline"):
            cells += [Text("ref", style="dim"), Text("ref", style="dim")]
        elif r.get("reference"):  # described, not tested
            cells += [fmt_p(r.get("p_value")), Text(NA, style="dim")]
        else:
            star = "*" if r.get("significant") else ""
            cells.append(fmt_p(r.get("p_value")))
            cells.append(Text(fmt_p(r.get("p_adjusted")) + star, style="bold green" if star else ""))
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        table.add_row(*cells, end_section=nxt is not None and _group(nxt) != _group(r))
    return table


def to_markdown(results: Dict[str, Any]) -> str:
    """``results.md``: the same table as GitHub markdown, then the caption and the test in words."""
    metrics = results.get("metrics") or list(METRIC_LABELS)
    gap = bool(results.get("gap"))
    head = ["setting", "scales", "loss", "PMD", "seeds", "params", "steps", *[METRIC_LABELS.get(m, m) for m in metrics],
            "ΔDice (95% CI)", "ΔDice (bootstrap CI)", *(["gap closed (95% CI)", "gap closed (bootstrap CI)"] if gap
                                                        else []), "p", "p adj."]
    n_diff = 4 + (2 if gap else 0)
    lines = [f"# {title(results)}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":---", ":---:", ":---:", ":---:", "---:", "---:", "---:"] + ["---:"] *
                            (len(metrics) + n_diff)) + "|"]
    for r in results.get("rows") or []:
        sc, loss, pmd = setting_cells(r)
        teacher = r.get("reference") == "teacher"
        name = f"**{r['name']}**" if r.get("is_baseline") else (f"*{r['name']}*" if r.get("reference") else r["name"])
        cells = [name, sc, loss, pmd, "1 run" if teacher else str(len(r.get("seeds") or [])),
                 fmt_count(r.get("params")), _steps(r)]
        for m in metrics:
            s = fmt_mean_std(r.get(f"{m}_mean"), r.get(f"{m}_std"), _digits(m))
            cells.append(s if r.get("is_baseline") or teacher else f"{s} ({fmt_pct(r.get(f'{m}_rel_gain'))})")
        if r.get("is_baseline") or teacher:
            cells += ["ref" if r.get("is_baseline") else NA] * n_diff
        else:
            diff = fmt_num(r.get("dice_diff")) + (f" {fmt_ci(r['dice_diff_ci'])}" if r.get("dice_diff_ci") else "")
            cells += [diff, fmt_ci(r.get("dice_diff_boot_ci"))]
            if gap:
                cells += [fmt_gap(r.get("gap_closed"), r.get("gap_closed_ci")),
                          fmt_gap(r.get("gap_closed"), r.get("gap_closed_boot_ci"))]
            q = fmt_p(r.get("p_adjusted"))
            cells += [fmt_p(r.get("p_value")), f"**{q}\\***" if r.get("significant") else q]
        lines.append("| " + " | ".join(cells) + " |")
    t = results.get("test") or {}
    lines += ["", caption(results), "",
              f"Statistical test: {t.get('description', '?')}; unit = {t.get('unit', '?')}; multiple comparisons: "
              f"{t.get('correction_description', '?')} (reference rows are not tested); significant when "
              f"{t.get('significant_if', '?')}. ΔDice = mean over those seeds of the per-seed mean per-case Dice "
              f"difference, with a {t.get('ci', '95% CI')} (p and this interval: new training runs, these test "
              f"cases) and a {t.get('boot_ci', 'bootstrap interval')} (new training runs and new patients). "
              f"steps = optimizer steps per run (measured; a range when seeds differ).", ""]
    if results.get("budget_rule"):
        lines += [f"Budget: {results['budget_rule']}.", ""]
    if results.get("gap"):
        lines += [f"Gap closed: {results['gap']['definition']}; 95% CI = {results['gap']['ci']}; bootstrap CI = "
                  f"{results['gap']['boot_ci']}.", ""]
    code = results.get("git_commit")
    lines += [f"Produced by medkd {results.get('medkd_version', '?')}"
              + (f" at commit {code}{' (with uncommitted changes)' if results.get('git_dirty') else ''}" if code
                 else "") + ".", ""]
    return "\n".join(lines)


def _steps(row: Dict[str, Any]) -> str:
    """The optimizer steps of a row's runs: ``"144"``, or ``"60–72"`` when its seeds differ."""
    steps = [n for n in (row.get("budget") or {}).get("optimizer_steps") or [] if n is not None]
    if not steps:
        return NA
    lo, hi = min(steps), max(steps)
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


CSV_FIXED = ["name", "is_baseline", "baseline", "scales", "loss", "pmd", "student", "fraction", "subset_seed", "epochs",
             "seeds", "params"]
# n_seeds / n_cases: what the test used (seeds finished in both the row and its baseline)
CSV_TAIL = ["pooled_dice_mean", "seeds_matched", "n_seeds", "n_cases", "dice_diff", "dice_diff_ci_low",
            "dice_diff_ci_high", "test", "statistic", "df", "p_value", "p_adjusted", "correction", "significant",
            "dice_diff_boot_ci_low", "dice_diff_boot_ci_high", "gap_closed", "gap_closed_ci_low", "gap_closed_ci_high",
            "gap_closed_boot_ci_low", "gap_closed_boot_ci_high", "gap_teacher_dice", "gap_baseline_dice",
            "reference", "setting", "steps_per_epoch", "optimizer_steps", "images_seen", "augment", "budget_matched"]
PAIRS = ("dice_diff_ci", "dice_diff_boot_ci", "gap_closed_ci", "gap_closed_boot_ci")  # [low, high] -> two columns


def csv_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for r in results.get("rows") or []:
        d: Dict[str, Any] = {k: r.get(k) for k in CSV_FIXED}
        d["scales"] = "+".join(r.get("scales") or []) or "none"
        d["seeds"] = " ".join(map(str, r.get("seeds") or []))
        for m in results.get("metrics") or METRIC_LABELS:
            for suffix in ("mean", "std", "rel_gain"):
                d[f"{m}_{suffix}"] = r.get(f"{m}_{suffix}")
        d.update({k: r.get(k) for k in CSV_TAIL})
        for k in PAIRS:
            d[f"{k}_low"], d[f"{k}_high"] = r.get(k) or [None, None]
        budget = r.get("budget") or {}
        d["steps_per_epoch"], d["augment"] = budget.get("steps_per_epoch"), budget.get("augment")
        for k in ("optimizer_steps", "images_seen"):
            d[k] = " ".join("" if n is None else str(n) for n in budget.get(k) or []) or None
        if r.get("seeds_matched") is not None:
            d["seeds_matched"] = " ".join(map(str, r["seeds_matched"]))
        d["correction"] = None if r.get("is_baseline") or r.get("reference") else \
            (results.get("test") or {}).get("correction")
        out.append(d)
    return out


def to_csv(results: Dict[str, Any]) -> str:
    """``results.csv``: one line per row; empty cells for undefined values; gains in percent."""
    rows = csv_rows(results)
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for d in rows:
            w.writerow({k: ("" if v is None else v) for k, v in d.items()})
    return buf.getvalue()


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_results(results: Dict[str, Any], path: Path) -> None:
    """``results.png``: Dice mean ± std per setting (seed values as dots), the baseline as a dashed line, the
    teacher as a dotted one, each distillation row's gap closed written at its right."""
    plt = _pyplot()
    rows = results.get("rows") or []
    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.36 * n))
    ys = list(range(n))[::-1]
    base = results.get("baseline") or {}
    teacher = next((r for r in rows if r.get("reference") == "teacher"), None)
    for y, r in zip(ys, rows):
        m, s = r.get("dice_mean"), r.get("dice_std")
        color = "0.35" if r.get("is_baseline") or r.get("reference") else \
            ("tab:green" if r.get("significant") else "tab:blue")
        marker = "s" if r.get("is_baseline") else {"teacher": "*", "all_labels": "D"}.get(r.get("reference"), "o")
        if m is not None:
            ax.errorbar([m], [y], xerr=[[s or 0.0], [s or 0.0]], fmt=marker, color=color, capsize=3, ms=6)
        pts = [v for v in r.get("dice_per_seed") or [] if v is not None]
        ax.scatter(pts, [y] * len(pts), s=10, color=color, alpha=0.45, zorder=3)
        if r.get("gap_closed") is not None:
            ax.annotate(f"gap {fmt_gap(r['gap_closed'], r.get('gap_closed_ci'))}", (1.0, y),
                        xycoords=("axes fraction", "data"), xytext=(4, 0), textcoords="offset points",
                        va="center", fontsize=7, color=color)
    if base.get("dice_mean") is not None:
        ax.axvline(base["dice_mean"], ls="--", color="0.35", lw=1, label=f"baseline {base['dice_mean']:.4f}")
    if teacher and teacher.get("dice_mean") is not None:
        ax.axvline(teacher["dice_mean"], ls=":", color="tab:purple", lw=1.2,
                   label=f"teacher {teacher['dice_mean']:.4f}")
    if base.get("dice_mean") is not None or teacher:
        ax.legend(loc="best", fontsize=8)
    labels = [r["name"] + (" *" if r.get("significant") else "") for r in rows]
    ax.set_yticks(ys, labels, fontsize=8)
    t = results.get("test") or {}
    ax.set_xlabel(f"test Dice (mean ± std over seeds; * p adj. < {t.get('alpha', 0.05)}, "
                  f"correction {t.get('correction', 'none')}; gap closed with its 95% CI)")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(textwrap.fill(title(results), 110), fontsize=8, loc="right")
    # room on the right for the gap-closed notes
    fig.tight_layout(rect=(0, 0, 0.86, 1) if any(r.get("gap_closed") is not None for r in rows) else (0, 0, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def has_label_efficiency(results: Dict[str, Any]) -> bool:
    """Whether the student rows span more than one labelled fraction (then ``label_efficiency.png`` is drawn)."""
    return len({r.get("fraction") for r in results.get("rows") or [] if not r.get("reference")}) > 1


def label_efficiency_series(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The curves of the label-efficiency figure: one per distillation setting (its rows by fraction) and one per
    distinct sequence of baselines they are compared with (each at the same fraction and budget as its row).

    Returns:
        ``[{"label", "kind": "kd"|"baseline", "of": setting or None, "rows": [row, ...] by fraction}]``.
    """
    rows = results.get("rows") or []
    by_name = {r["name"]: r for r in rows}
    kd: Dict[str, List[Dict[str, Any]]] = {}
    for r in rows:
        if not r.get("is_baseline") and not r.get("reference"):
            kd.setdefault(r.get("setting") or r["name"], []).append(r)
    series: List[Dict[str, Any]] = []
    baselines: Dict[Tuple[str, ...], List[str]] = {}
    for setting, rs in kd.items():
        rs = sorted(rs, key=lambda r: r.get("fraction") or 0)
        series.append({"label": setting, "kind": "kd", "of": setting, "rows": rs})
        baselines.setdefault(tuple(r["baseline"] for r in rs), []).append(setting)
    if not kd:  # a grid of baselines: one curve per setting
        for r in rows:
            if r.get("is_baseline"):
                baselines.setdefault((r["name"],), [])
    several = len(baselines) > 1
    for names, settings in baselines.items():
        brs = sorted((by_name[n] for n in dict.fromkeys(names)), key=lambda r: r.get("fraction") or 0)
        label = "baseline (same budget)" + (f" of {', '.join(settings)}" if several and settings else "")
        series.append({"label": label, "kind": "baseline", "of": settings[0] if several and settings else None,
                       "rows": brs})
    return series


def plot_label_efficiency(results: Dict[str, Any], path: Path) -> None:
    """``label_efficiency.png``: test Dice vs labelled fraction, each distillation setting and the baseline it is
    compared with (each point against a baseline of the same budget), with 95% t intervals over seeds as error
    bars; the teacher as a horizontal line, the all-labels student as a point at fraction 1."""
    plt = _pyplot()
    rows = results.get("rows") or []
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color_of: Dict[str, str] = {}
    all_series = label_efficiency_series(results)
    for k, s in enumerate(all_series):
        kd = s["kind"] == "kd"
        shift = 1 + 0.012 * (k - (len(all_series) - 1) / 2)  # side by side, so the error bars do not hide each other
        color = color_of.setdefault(s["of"], colors[len(color_of) % len(colors)]) if s["of"] else "0.35"
        pts = [(r["fraction"], r["dice_mean"], r.get("dice_ci")) for r in s["rows"] if r.get("dice_mean") is not None]
        if not pts:
            continue
        x, y, ci = zip(*pts)
        x = [f * shift for f in x]
        err = [[m - c[0] if c else 0.0 for m, c in zip(y, ci)], [c[1] - m if c else 0.0 for m, c in zip(y, ci)]]
        ax.errorbar(x, y, yerr=err, fmt="o-" if kd else "s--", color=color, capsize=3, ms=5, lw=1.5 if kd else 1,
                    label=s["label"])
    for r in rows:
        if r.get("reference") == "all_labels" and r.get("dice_mean") is not None:
            c = r.get("dice_ci")
            ax.errorbar([r["fraction"]], [r["dice_mean"]], yerr=[[r["dice_mean"] - c[0]], [c[1] - r["dice_mean"]]]
                        if c else None, fmt="D", color="black", capsize=3, ms=6, label=r["name"])
        if r.get("reference") == "teacher" and r.get("dice_mean") is not None:
            ax.axhline(r["dice_mean"], ls=":", color="tab:purple", lw=1.5, label=f"teacher ({r['dice_mean']:.3f})")
    fractions = sorted({r["fraction"] for r in rows if r.get("fraction") and not r.get("reference") == "teacher"})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0.0), min(hi, 1.0))  # Dice lives in [0, 1]; a t interval over 2 seeds need not
    ax.set_xlabel("labelled fraction of the train cases")
    ax.set_ylabel("test Dice (mean over seeds, 95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    trained = (results.get("teacher_training") or {}).get("fraction")
    note = "" if trained is None else (" (teacher: all train labels)" if trained >= 1 else
                                       f" (teacher: {trained:g} of the train labels)")
    ax.set_title(f"label efficiency, {len(results.get('seeds') or [])} seed(s){note}", fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: Dict[str, Any], out: Path, plot: bool = True) -> Dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` (and ``results.png``, plus ``label_efficiency.png``
    when the rows span several fractions) into ``out``."""
    from medkd.metrics import to_jsonable

    out = Path(out)
    paths = {k: out / f"results.{k}" for k in ("json", "csv", "md", "png")}
    rundir.write_json(paths["json"], to_jsonable(results))
    rundir.write_text(paths["csv"], to_csv(results))
    rundir.write_text(paths["md"], to_markdown(results))
    if plot:
        with rundir.atomic_path(paths["png"]) as tmp:
            plot_results(results, tmp)
        if has_label_efficiency(results):
            paths["label_efficiency"] = out / "label_efficiency.png"
            with rundir.atomic_path(paths["label_efficiency"]) as tmp:
                plot_label_efficiency(results, tmp)
    return paths


def load_results(out: Path) -> Optional[Dict[str, Any]]:
    p = Path(out) / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None
