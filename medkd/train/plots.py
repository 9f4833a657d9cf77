"""``curves.png``: a run's loss terms and validation Dice per epoch, drawn from ``history.jsonl``'s rows."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List

from medkd import rundir


def plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    """Left: every weighted loss term (log scale; gradient shares left out); right: validation Dice."""
    import matplotlib  # late: only runs that finish an epoch draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    skip = {"epoch", "val_dice", "lr", "seconds", "kd_ramp"}
    names = [k for k in history[0] if k not in skip and not k.startswith("gshare_")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in names:
        a.plot(epochs, [r.get(k, math.nan) for r in history], label=k, lw=2 if k == "loss" else 1)
    a.set_xlabel("epoch"), a.set_ylabel("loss term (weighted)"), a.set_yscale("log"), a.legend(fontsize=7)
    b.plot(epochs, [r["val_dice"] for r in history], marker="o")
    b.set_xlabel("epoch"), b.set_ylabel("val Dice"), b.set_ylim(0, 1), b.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)
