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
from typing import Any, Dict, List, Tuple

from rich import box
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

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
