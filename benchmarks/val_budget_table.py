"""Val Dice vs training budget: the student alone and the default distillation recipe at equal optimizer steps.

Reads the run summaries under ``benchmarks/results/2026-12-02-val-budget/`` (``base-e<E>-s<seed>``: the student
alone, ``--scales none --no-pmd``, 53 steps per epoch on its 21 labelled cases; ``kd-e<E>-s<seed>``: the default
``medkd distill``, PMD on all 42 train cases, 105 steps per epoch, so ``kd-e<E>`` and ``base-e<2E>`` take the same
number of optimizer steps) and prints, per budget, the mean best val Dice over seeds, the seed-paired difference
(two-sided paired t-test over seeds) and the share of the baseline-to-teacher gap it closes. Val split only (6
cases); the test split is not read.

The second table reads ``benchmarks/results/2026-12-02-val-levers/`` (runs at commit 7062dd1, see RESULTS.md):
the levers at the budget where the student alone stops improving (24 epochs x 105 steps), against the student alone
at the same steps (``base-e48`` of the first folder).

Usage: python benchmarks/val_budget_table.py [FOLDER]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from scipy import stats

FOLDER = Path(__file__).parent / "results" / "2026-12-02-val-budget"


def best(folder: Path, name: str, seeds=(0, 1, 2)):
    out = {}
    for s in seeds:
        p = folder / f"{name}-s{s}" / "summary.json"
        if p.is_file():
            out[s] = json.loads(p.read_text())["best_val_dice"]
    return out


def main(folder: Path = FOLDER) -> None:
    teacher = json.loads((folder / "teacher-summary.json").read_text())["best_val_dice"]
    print(f"teacher val Dice {teacher:.4f}")
    print("| optimizer steps | student alone (epochs) | val Dice | default distill (epochs) | val Dice | "
          "paired diff (seeds) | p | gap closed |")
    print("|---:|---|---:|---|---:|---:|---:|---:|")
    for kd_e in (6, 12, 24, 48):
        base, kd = best(folder, f"base-e{2 * kd_e}"), best(folder, f"kd-e{kd_e}")
        seeds = sorted(set(base) & set(kd))
        if not seeds:
            continue
        b, k = np.array([base[s] for s in seeds]), np.array([kd[s] for s in seeds])
        d = k - b
        p = stats.ttest_rel(k, b).pvalue if len(seeds) > 1 else float("nan")
        gap = (k.mean() - b.mean()) / (teacher - b.mean())
        print(f"| {105 * kd_e} | {2 * kd_e} | {b.mean():.4f} ± {b.std(ddof=1):.4f} | {kd_e} | "
              f"{k.mean():.4f} ± {k.std(ddof=1):.4f} | {d.mean():+.4f} ± {d.std(ddof=1):.4f} (n={len(seeds)}) | "
              f"{p:.2f} | {100 * gap:.0f} % |")
    print("student alone, every budget:", {e: round(float(np.mean(list(best(folder, f'base-e{e}').values()))), 4)
                                           for e in (6, 12, 24, 48, 96)})


LEVERS = {"kdnew": "default distill (PMD, T 4)", "ema": "+ EMA of the weights (--ema-decay 0.99)",
          "cwd": "PMD as CWD on the logits, T 1 (--pmd-loss cwd --temperature 1)",
          "pl": "+ teacher pseudo-labels on the unlabelled cases (--pseudo-label)"}


def levers(folder: Path = FOLDER.with_name("2026-12-02-val-levers"), budget: Path = FOLDER) -> None:
    teacher = json.loads((budget / "teacher-summary.json").read_text())["best_val_dice"]
    base = best(budget, "base-e48")
    print(f"\nlevers at 2 520 steps (24 epochs x 105), vs the student alone at 48 epochs x 53 steps: "
          f"{np.mean(list(base.values())):.4f}")
    print("| setting | seeds | val Dice | paired diff vs alone | p | gap closed |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in LEVERS.items():
        got = best(folder, name)
        seeds = sorted(set(got) & set(base))
        k, b = np.array([got[s] for s in seeds]), np.array([base[s] for s in seeds])
        d = k - b
        p = stats.ttest_rel(k, b).pvalue if len(seeds) > 2 else float("nan")
        gap = (k.mean() - b.mean()) / (teacher - b.mean())
        sd = f" ± {k.std(ddof=1):.4f}" if len(seeds) > 1 else ""
        print(f"| {label} | {len(seeds)} | {k.mean():.4f}{sd} | {d.mean():+.4f} | {p:.2f} | {100 * gap:.0f} % |")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER)
    levers()
