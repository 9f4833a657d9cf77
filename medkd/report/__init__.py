"""Reporting: Rich tables and overlay plots, all rendered from the same result dicts as the JSON.

- :mod:`medkd.report.tables`: ``eval_table`` and the shared formatters (``fmt_pct_change``, ``fmt_mean_std``, ...).
- :mod:`medkd.report.overlays`: per-case overlay PNGs (matplotlib, Agg backend, imported lazily).
"""

from medkd.report.tables import (
    eval_table,
    fmt_count,
    fmt_mean_std,
    fmt_ms,
    fmt_num,
    finite,
    fmt_pct,
    fmt_pct_change,
    pct_change,
    run_labels,
)

__all__ = [
    "eval_table",
    "fmt_count",
    "fmt_mean_std",
    "fmt_ms",
    "fmt_num",
    "finite",
    "fmt_pct",
    "fmt_pct_change",
    "pct_change",
    "run_labels",
]
