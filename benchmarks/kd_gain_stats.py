"""Seed-level statistics of a finished ``medkd ablate`` folder: each row against its baseline with
``medkd.stats.compare`` (per-seed mean differences, the training run as the replication unit) and Holm-adjusted
p-values over the distilled rows (``medkd.stats.adjust``).

    python benchmarks/kd_gain_stats.py ABLATE_DIR [--split test]

Prints one Markdown table: per row the mean test Dice over seeds +- the between-seed sd (sd of the per-seed mean
Dice over cases), the relative gain, the 95 % CI of the mean difference, p and the adjusted p.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from medkd import stats


def per_case(run: Path, split: str) -> dict:
    doc = json.loads((run / f"eval-{split}.json").read_text())
    return {c["id"]: c["dice"] for c in doc["per_case"]}


def matrix(folder: Path, seeds, cases, split: str) -> np.ndarray:
    """``(n_seeds, n_cases)`` per-case Dice; a missing run is a row of NaN."""
    out = np.full((len(seeds), len(cases)), np.nan)
    for i, s in enumerate(seeds):
        f = folder / f"seed{s}"
        if (f / f"eval-{split}.json").is_file():
            d = per_case(f, split)
            out[i] = [np.nan if d.get(c) is None else d[c] for c in cases]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dir", type=Path)
    ap.add_argument("--split", default="test")
    ap.add_argument("--seeds", default=None, help="comma list (default: every seed folder present)")
    a = ap.parse_args()
    plan = yaml.safe_load((a.dir / "ablation.yaml").read_text())
    rows = plan["rows"]
    folders = {r["name"]: a.dir / r["folder"] for r in rows}
    if a.seeds:
        seeds = [int(s) for s in a.seeds.split(",")]
    else:
        seeds = sorted({int(p.name[4:]) for f in folders.values() for p in f.glob("seed*")
                        if p.name[4:].isdigit() and (p / f"eval-{a.split}.json").is_file()})
    first = next(f / f"seed{s}" for f in folders.values() for s in seeds if (f / f"seed{s}" / f"eval-{a.split}.json").is_file())
    cases = sorted(per_case(first, a.split))
    mats = {name: matrix(f, seeds, cases, a.split) for name, f in folders.items()}
    kd = [r for r in rows if r["name"] != r["baseline"]]
    results = {r["name"]: stats.compare(mats[r["baseline"]], mats[r["name"]]) for r in kd}
    adjusted = dict(zip([r["name"] for r in kd], stats.adjust([results[r["name"]]["p_value"] for r in kd], "holm")))
    print(f"{a.dir}: split {a.split}, seeds {seeds}, {len(cases)} cases; p: seed-paired t-test "
          f"(medkd.stats.compare), adjusted: Holm over {len(kd)} row(s)\n")
    print("| setting | seeds | Dice (mean ± between-seed sd) | rel. gain | mean diff [95 % CI] | p | p adj. (Holm) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        m = mats[r["name"]]
        seed_means = np.nanmean(m, axis=1)
        ok = ~np.isnan(seed_means)
        cell = f"{np.mean(seed_means[ok]):.4f} ± {np.std(seed_means[ok], ddof=1) if ok.sum() > 1 else float('nan'):.4f}"
        if r["name"] == r["baseline"]:
            print(f"| {r['name']} | {ok.sum()} | {cell} | ref | ref | ref | ref |")
            continue
        c = results[r["name"]]
        lo, hi = c["ci"]
        print(f"| {r['name']} | {c['n_seeds']} | {cell} | {c['rel_gain']:+.2f} % | {c['mean_diff']:+.4f} "
              f"[{lo:+.4f}, {hi:+.4f}] | {c['p_value']:.3g} | {adjusted[r['name']]:.3g} |")


if __name__ == "__main__":
    main()
