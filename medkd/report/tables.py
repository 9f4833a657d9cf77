"""Rich tables rendered from result dicts (the same dicts that are written as JSON).

Number helpers (:func:`finite`, :func:`pct_change`) and formatters (``fmt_*``) are shared by ``evaluate`` and ``ablate``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from rich.table import Table
from rich.text import Text

NA = "–"


def finite(value: Any) -> Optional[float]:
    """``value`` as a finite float, else ``None`` (``None``/NaN/inf/bool/non-numbers)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def pct_change(value: Any, ref: Any) -> Optional[float]:
    """Relative change in percent, ``100 * (value - ref) / |ref|``; ``None`` when either is missing or ``ref`` is 0."""
    v, r = finite(value), finite(ref)
    if v is None or r is None or r == 0:
        return None
    return 100.0 * (v - r) / abs(r)


def fmt_pct(pct: Any, digits: int = 2) -> str:
    """A change already in percent, signed: ``7.97 -> "+7.97%"``, ``"0.00%"`` when it rounds to 0, ``"–"`` when
    undefined."""
    p = finite(pct)
    if p is None:
        return NA
    if round(p, digits) == 0:
        return f"{0:.{digits}f}%"
    return f"{p:+.{digits}f}%"


def fmt_pct_change(value: Any, ref: Any, digits: int = 2) -> str:
    """Relative change as a signed percentage, e.g. ``fmt_pct_change(0.7555, 0.6997) == "+7.97%"``.

    Returns ``"–"`` when undefined (missing value, NaN, or a zero reference).
    """
    return fmt_pct(pct_change(value, ref), digits)


def fmt_num(value: Any, digits: int = 4) -> str:
    """A float with ``digits`` decimals; ``"–"`` for ``None``/NaN."""
    v = finite(value)
    return NA if v is None else f"{v:.{digits}f}"


def fmt_mean_std(mean: Any, std: Any, digits: int = 4) -> str:
    """``"0.8123 ± 0.0456"``; the ``± std`` part is left out when the std is undefined."""
    m, s = finite(mean), finite(std)
    if m is None:
        return NA
    return f"{m:.{digits}f}" if s is None else f"{m:.{digits}f} ± {s:.{digits}f}"


def fmt_count(n: Any) -> str:
    """Compact count: ``57297 -> "57.3k"``, ``43236036 -> "43.24M"``, ``1.2e9 -> "1.20G"``."""
    v = finite(n)
    if v is None:
        return NA
    for div, suffix, d in ((1e9, "G", 2), (1e6, "M", 2), (1e3, "k", 1)):
        if abs(v) >= div:
            return f"{v / div:.{d}f}{suffix}"
    return f"{v:.0f}"


def fmt_ms(value: Any) -> str:
    """Milliseconds with precision that fits the magnitude (``0.412``, ``12.3``, ``1234``)."""
    v = finite(value)
    if v is None:
        return NA
    if v < 1:
        return f"{v:.3f}"
    if v < 100:
        return f"{v:.1f}"
    return f"{v:.0f}"


def _styled_change(value: Any, ref: Any) -> Text:
    s = fmt_pct_change(value, ref)
    rc = pct_change(value, ref)
    style = "" if rc is None or s.startswith("0") else ("green" if rc > 0 else "red")
    return Text(s, style=style)


def run_labels(results: Sequence[Dict[str, Any]]) -> List[str]:
    """Row labels: each run's folder name, made unique (``name``, ``name (2)``, ...)."""
    labels, seen = [], {}
    for r in results:
        name = str(r.get("name") or Path(str(r.get("run", "?"))).name)
        seen[name] = seen.get(name, 0) + 1
        labels.append(name if seen[name] == 1 else f"{name} ({seen[name]})")
    return labels


def eval_table(results: Sequence[Dict[str, Any]], title: Optional[str] = None) -> Table:
    """One row per evaluated run (dicts from :func:`medkd.evaluate.evaluate_run`).

    Columns: run, kind, arch, params, Dice ± std, ΔDice (relative to the first row), IoU, recall, precision,
    HD95 (mm), pooled Dice, latency (ms per slice). The caption states the split, cases and conventions.
    """
    results = list(results)
    first = results[0] if results else {}
    split = first.get("split", "?")
    table = Table(title=title or f"evaluation on the {split} split", title_justify="left")
    has_pp = any(r.get("postprocessed") for r in results)
    has_ort = any(r.get("latency_ms_ort") is not None for r in results)
    cols = [("run", "left"), ("kind", "left"), ("arch", "left"), ("params", "right"), ("Dice ± std", "right"),
            ("Δ Dice", "right"), ("IoU", "right"), ("recall", "right"), ("precision", "right"),
            ("HD95 mm", "right"), ("pooled Dice", "right")]
    if has_pp:
        cols += [("postproc", "left"), ("Dice pp", "right"), ("HD95 pp", "right")]
    cols += [("ms/slice", "right")] + ([("ORT ms", "right")] if has_ort else [])
    for name, justify in cols:
        table.add_column(name, justify=justify, no_wrap=name != "run")  # type: ignore[arg-type]
    ref = first.get("dice")
    for i, (label, r) in enumerate(zip(run_labels(results), results)):
        change = Text("ref", style="dim") if i == 0 else _styled_change(r.get("dice"), ref)
        if r.get("train_overlap") and r.get("split") != "train":  # evaluated with --force on its training cases
            label = Text(f"{label} ⚠ LEAKAGE", style="bold red")
        row = [
            label,
            str(r.get("kind") or NA),
            str(r.get("arch") or NA),
            fmt_count(r.get("params")),
            fmt_mean_std(r.get("dice"), r.get("dice_std")),
            change,
            fmt_num(r.get("iou")),
            fmt_num(r.get("recall")),
            fmt_num(r.get("precision")),
            fmt_num(r.get("hd95"), 2),
            fmt_num((r.get("pooled") or {}).get("dice")),
        ]
        if has_pp:
            pp, rule = r.get("postprocessed") or {}, r.get("postprocessing") or {}
            row += [_rule_label(rule), fmt_num(pp.get("dice")), fmt_num(pp.get("hd95"), 2)]
        row.append(fmt_ms(r.get("latency_ms")))
        if has_ort:
            row.append(fmt_ms(r.get("latency_ms_ort")))
        table.add_row(*row)
    n_cases = first.get("n_cases", "?")
    n_empty = first.get("n_empty", 0)
    devices = sorted({str(r.get("device")) for r in results if r.get("device")})
    resolution = first.get("resolution", "prepared")
    grid = "native voxel grid" if resolution == "native" else "prepared (resized) grid"
    caption = (
        f"{split}: {n_cases} case(s){f', {n_empty} with both masks empty (excluded)' if n_empty else ''}; "
        f"means over cases of 3D metrics on the {grid}; pooled = TP/FP/FN summed over all voxels; "
        f"{'pp = after the run' + chr(39) + 's postprocessing (chosen on val); ' if has_pp else ''}"
        f"Δ Dice relative to the first row; latency on {', '.join(devices) or '?'}"
    )
    leaked = [f"{lab} was trained on {len(r['train_overlap'])} of these case(s)"
              for lab, r in zip(run_labels(results), results) if r.get("train_overlap") and split != "train"]
    if leaked:
        caption += f"; ⚠ LEAKAGE (--force): {'; '.join(leaked)}, so its metrics are optimistic"
    table.caption = caption
    return table


def _rule_label(rule: Dict[str, Any]) -> str:
    method = rule.get("method") or "none"
    if method == "largest":
        return "largest CC"
    if method == "min_volume":
        return f"CC ≥ {fmt_num(rule.get('min_volume_ml'), 2)} mL"
    return "none"


def prepared_table(rows: Sequence[Dict[str, Any]], out: Path, n_bad: int, seconds: float) -> Table:
    """``medkd preprocess``: one row per split (from :func:`medkd.data.preprocess.split_summary`)."""
    table = Table(title=f"prepared dataset: {out}")
    for col in ("split", "cases", "slices", "slices with fg", "fg fraction", "empty labels"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for r in rows:
        table.add_row(r["split"], str(r["cases"]), str(r["slices"]), str(r["fg_slices"]),
                      f"{r['fg_fraction']:.4f}", str(r["empty_labels"]))
    table.caption = f"skipped: {n_bad} · {seconds:.1f} s"
    return table


def predict_table(written: Sequence[Dict[str, Any]], out: Path) -> Table:
    """``medkd predict``: one row per written mask (the ``written`` dicts of the predict result)."""
    table = Table(title=f"predicted masks: {out}", title_justify="left")
    for col, j in (("case", "left"), ("output", "left"), ("shape", "right"), ("modality", "left"),
                   ("fg voxels", "right"), ("fg mL", "right"), ("s", "right")):
        table.add_column(col, justify=j)  # type: ignore[arg-type]
    for w in written:
        table.add_row(w["case"], Path(w["seg"]).name, "×".join(str(v) for v in w["shape"]), w["modality"],
                      f"{w['fg_voxels']:,}", f"{w['fg_ml']:.1f}", f"{w['seconds']:.1f}")
    return table


def print_table(console, table: Table) -> None:
    """Print ``table`` whole: on a terminal Rich fits it to the window; when the output is piped or captured
    (Rich's default width there is 80 columns) it is rendered at the table's natural width instead of
    truncating cells to ``…``."""
    if console.quiet:
        return
    if not console.is_terminal:
        from rich.console import Console
        from rich.measure import Measurement

        need = Measurement.get(console, console.options.update(max_width=1000), table).maximum
        if need > console.width:
            console = Console(file=console.file, width=need, color_system=console.color_system and "auto",
                              no_color=console.no_color)
    console.print(table)
