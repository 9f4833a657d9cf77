"""Ablation reports, all rendered from the one results dict of :func:`medkd.ablate.report.compute_results`:
the Rich table (stdout), ``results.json``, ``results.csv``, ``results.md`` and ``results.png``.

Rows are the settings in grid order with the baseline(s) first; a rule separates groups of the same
(loss, PMD) so that scale subsets read down a column, as in the reference study's Table 4.2.
"""

from __future__ import annotations

import csv
import io
import json
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
    return (row.get("is_baseline"), row.get("loss") if row.get("scales") else None, bool(row.get("pmd")))


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
    if t.get("note"):
        text += f" Note: {t['note']}."
    failed = results.get("failed") or []
    if failed:
        which = ", ".join(f"{f['name']} seed {f['seed']}" for f in failed)
        text += (f" {len(failed)} run(s) failed and are left out (rows are compared over the seeds both "
                 f"finished): {which}.")
    return text


def title(results: Dict[str, Any]) -> str:
    o = results.get("options") or {}
    rows = results.get("rows") or []
    params = {r.get("params") for r in rows} - {None}
    student = f"student {o.get('student', '?')}" + (f" ({fmt_count(params.pop())} params)" if len(params) == 1 else "")
    return (f"ablation ({results.get('grid', '?')}): {len(rows)} settings, {student}, "
            f"fraction {o.get('fraction', '?')}, {o.get('epochs', '?')} epochs")


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
    show_seeds = any(len(r.get("seeds") or []) != n_seeds for r in rows)
    show_params = len({r.get("params") for r in rows}) > 1
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
    table.add_column("p", justify="right", no_wrap=True)
    table.add_column("p adj.", justify="right", no_wrap=True)
    sep = "\n±" if compact else " ± "
    for i, r in enumerate(rows):
        cells: List[Any] = [Text(r["name"], style="bold" if r.get("is_baseline") else "")]
        if show_seeds:
            cells.append(f"{len(r.get('seeds') or [])}/{n_seeds}")
        if show_params:
            cells.append(fmt_count(r.get("params")))
        for m in metrics:
            mean, std = r.get(f"{m}_mean"), r.get(f"{m}_std")
            top = fmt_num(mean, _digits(m)) + ("" if std is None or mean is None else sep + fmt_num(std, _digits(m)))
            if r.get("is_baseline"):
                cells.append(Text(top + "\n") + Text("(ref)", style="dim"))
                continue
            g = r.get(f"{m}_rel_gain")
            better = None if g is None or round(g, 1) == 0 else ((g < 0) if m in LOWER_IS_BETTER else (g > 0))
            style = "" if better is None else ("green" if better else "red")
            cells.append(Text(top + "\n") + Text(f"({fmt_pct(g, 1)})", style=style))
        if r.get("is_baseline"):
            cells += [Text("ref", style="dim"), Text("ref", style="dim")]
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
    head = ["setting", "scales", "loss", "PMD", "seeds", "params",
            *[METRIC_LABELS.get(m, m) for m in metrics], "ΔDice (95% CI)", "p", "p adj."]
    lines = [f"# {title(results)}", "", "| " + " | ".join(head) + " |",
             "|" + "|".join([":---", ":---:", ":---:", ":---:", "---:", "---:"] + ["---:"] * (len(metrics) + 3)) + "|"]
    for r in results.get("rows") or []:
        sc, loss, pmd = setting_cells(r)
        cells = [f"**{r['name']}**" if r.get("is_baseline") else r["name"], sc, loss, pmd,
                 str(len(r.get("seeds") or [])), fmt_count(r.get("params"))]
        for m in metrics:
            s = fmt_mean_std(r.get(f"{m}_mean"), r.get(f"{m}_std"), _digits(m))
            cells.append(s if r.get("is_baseline") else f"{s} ({fmt_pct(r.get(f'{m}_rel_gain'))})")
        if r.get("is_baseline"):
            cells += ["ref", "ref", "ref"]
        else:
            ci = r.get("dice_diff_ci")
            diff = fmt_num(r.get("dice_diff"))
            if ci:
                diff += f" [{fmt_num(ci[0])}, {fmt_num(ci[1])}]"
            q = fmt_p(r.get("p_adjusted"))
            cells += [diff, fmt_p(r.get("p_value")), f"**{q}\\***" if r.get("significant") else q]
        lines.append("| " + " | ".join(cells) + " |")
    t = results.get("test") or {}
    lines += ["", caption(results), "",
              f"Statistical test: {t.get('description', '?')}; unit = {t.get('unit', '?')}; multiple comparisons: "
              f"{t.get('correction_description', '?')}; significant when {t.get('significant_if', '?')}. "
              f"ΔDice = mean over those seeds of the per-seed mean per-case Dice difference, with a "
              f"{t.get('ci', '95% CI')}.", ""]
    return "\n".join(lines)


CSV_FIXED = ["name", "is_baseline", "baseline", "scales", "loss", "pmd", "student", "fraction", "subset_seed", "epochs",
             "seeds", "params"]
# n_seeds / n_cases: what the test used (seeds finished in both the row and its baseline)
CSV_TAIL = ["pooled_dice_mean", "seeds_matched", "n_seeds", "n_cases", "dice_diff", "dice_diff_ci_low",
            "dice_diff_ci_high", "test", "statistic", "df", "p_value", "p_adjusted", "correction", "significant"]


def csv_rows(results: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for r in results.get("rows") or []:
        d: Dict[str, Any] = {k: r.get(k) for k in CSV_FIXED}
        d["scales"] = "+".join(r.get("scales") or []) or "none"
        d["seeds"] = " ".join(map(str, r.get("seeds") or []))
        for m in results.get("metrics") or METRIC_LABELS:
            for suffix in ("mean", "std", "rel_gain"):
                d[f"{m}_{suffix}"] = r.get(f"{m}_{suffix}")
        ci = r.get("dice_diff_ci") or [None, None]
        d.update({k: r.get(k) for k in CSV_TAIL})
        d["dice_diff_ci_low"], d["dice_diff_ci_high"] = ci
        if r.get("seeds_matched") is not None:
            d["seeds_matched"] = " ".join(map(str, r["seeds_matched"]))
        d["correction"] = None if r.get("is_baseline") else (results.get("test") or {}).get("correction")
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


def plot_results(results: Dict[str, Any], path: Path) -> None:
    """``results.png``: Dice mean ± std per setting (seed values as dots), the baseline as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("rows") or []
    n = max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.36 * n))
    ys = list(range(n))[::-1]
    base = results.get("baseline") or {}
    for y, r in zip(ys, rows):
        m, s = r.get("dice_mean"), r.get("dice_std")
        color = "0.35" if r.get("is_baseline") else ("tab:green" if r.get("significant") else "tab:blue")
        if m is not None:
            ax.errorbar([m], [y], xerr=[[s or 0.0], [s or 0.0]], fmt="s" if r.get("is_baseline") else "o",
                        color=color, capsize=3, ms=6)
        pts = [v for v in r.get("dice_per_seed") or [] if v is not None]
        ax.scatter(pts, [y] * len(pts), s=10, color=color, alpha=0.45, zorder=3)
    if base.get("dice_mean") is not None:
        ax.axvline(base["dice_mean"], ls="--", color="0.35", lw=1, label=f"baseline {base['dice_mean']:.4f}")
        ax.legend(loc="lower right", fontsize=8)
    labels = [r["name"] + (" *" if r.get("significant") else "") for r in rows]
    ax.set_yticks(ys, labels, fontsize=8)
    t = results.get("test") or {}
    ax.set_xlabel(f"test Dice (mean ± std over seeds; * p adj. < {t.get('alpha', 0.05)}, "
                  f"correction {t.get('correction', 'none')})")
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title(results), fontsize=9, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_reports(results: Dict[str, Any], out: Path, plot: bool = True) -> Dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` (and ``results.png``) into ``out``."""
    from medkd.metrics import to_jsonable

    out = Path(out)
    paths = {k: out / f"results.{k}" for k in ("json", "csv", "md", "png")}
    rundir.write_json(paths["json"], to_jsonable(results))
    rundir.write_text(paths["csv"], to_csv(results))
    rundir.write_text(paths["md"], to_markdown(results))
    if plot:
        with rundir.atomic_path(paths["png"]) as tmp:
            plot_results(results, tmp)
    return paths


def load_results(out: Path) -> Optional[Dict[str, Any]]:
    p = Path(out) / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None
