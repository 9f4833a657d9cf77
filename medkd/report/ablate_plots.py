"""The figures of an ablation, rendered from its ``results.json`` document: ``results.png`` (each row's Dice over
seeds) and ``label_efficiency.png`` (test Dice vs labelled fraction, baseline and distilled with seed intervals, the
teacher as a line)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Dict, List, Tuple

from medkd.report.ablate_table import fmt_gap, title


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
