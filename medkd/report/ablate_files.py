"""An ablation's result files, all rendered from one ``results.json`` document: ``results.json``, ``.csv``, ``.md``
(:mod:`medkd.report.ablate_table`) and the figures (:mod:`medkd.report.ablate_plots`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from medkd import rundir
from medkd.report.ablate_plots import has_label_efficiency, plot_label_efficiency, plot_results
from medkd.report.ablate_table import to_csv, to_markdown


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
