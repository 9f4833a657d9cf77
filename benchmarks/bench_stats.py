"""Calibration and power of ``medkd.stats.compare`` (seed-paired t-test) against the case-level test ``medkd ablate``
used before (each case's Dice averaged over seeds, then Wilcoxon signed-rank over cases -- the old ``--test auto``
with >= 6 cases), on simulated ablations (``medkd.stats.simulate``: case difficulty shared by both arms, run-level
offsets independent between arms, case x run noise sd 0.03, Dice clipped to [0, 1]).

Prints markdown tables: the false-positive rate at p < 0.05 with no true effect, and the power for true effects of
+0.02 ... +0.10 Dice, over run-level sd 0 / 0.01 / 0.02 / 0.05, 3 and 5 seeds, 12 and 40 cases; then the time of
one ``compare`` call on 5 seeds x 40 cases next to the old test's.

Usage: python benchmarks/bench_stats.py [--sims 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
import scipy
from scipy import stats as st

from medkd.stats import compare, simulate

RUN_SD = (0.0, 0.01, 0.02, 0.05)
SEEDS = (3, 5)
CASES = (12, 40)
EFFECTS = (0.02, 0.04, 0.06, 0.08, 0.10)
NOISE_SD = 0.03


def old_case_level_p(base: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """The previous ablate test: per-case mean over seeds, two-sided exact Wilcoxon signed-rank over cases.

    Batches with a zero or tied difference (rare: both arms clipped at Dice 1) use the normal approximation,
    as scipy would otherwise run a slow permutation test for them."""
    d = treated.mean(axis=-2) - base.mean(axis=-2)  # (n_sims, n_cases)
    srt = np.sort(np.abs(d), axis=-1)
    ties = np.any(d == 0, axis=-1) | np.any(np.diff(srt, axis=-1) == 0, axis=-1)
    p = np.empty(d.shape[0])
    if (~ties).any():
        p[~ties] = st.wilcoxon(d[~ties], axis=-1, method="exact").pvalue
    if ties.any():
        p[ties] = st.wilcoxon(d[ties], axis=-1, zero_method="wilcox", method="asymptotic").pvalue
    return p


def rates(n_sims: int, n_seeds: int, n_cases: int, run_sd: float, effect: float, rng) -> tuple:
    b, t = simulate(n_sims, n_seeds, n_cases, run_sd=run_sd, effect=effect, noise_sd=NOISE_SD, rng=rng)
    new = float(np.mean(compare(b, t)["p_value"] < 0.05))
    old = float(np.mean(old_case_level_p(b, t) < 0.05))
    return new, old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sims", type=int, default=2000, help="simulated ablations per cell")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    t0 = time.perf_counter()
    print(f"# bench_stats: {args.sims} simulated ablations per cell, seed {args.seed}; {platform.machine()}, "
          f"{os.cpu_count()} cores, numpy {np.__version__}, scipy {scipy.__version__}\n")
    mc = 1.96 * np.sqrt(0.05 * 0.95 / args.sims)
    print(f"## False-positive rate at p < 0.05, no true effect (Monte Carlo 95% margin at 0.05: +-{mc:.3f})\n")
    print("| run-level sd | seeds | cases | seed-paired t-test (compare) | old case-level Wilcoxon |")
    print("|---:|---:|---:|---:|---:|")
    grid = [(sd, s, c) for sd in RUN_SD for s in SEEDS for c in CASES]
    for sd, s, c in grid:
        new, old = rates(args.sims, s, c, sd, 0.0, rng)
        print(f"| {sd:g} | {s} | {c} | {new:.3f} | {old:.3f} |")
    print("\n## Power at p < 0.05 (seed-paired t-test / old case-level Wilcoxon; the old test's power is not "
          "meaningful where its false-positive rate above is far over 0.05)\n")
    print("| run-level sd | seeds | cases | " + " | ".join(f"+{e:.2f}" for e in EFFECTS) + " |")
    print("|---:|---:|---:|" + "---:|" * len(EFFECTS))
    for sd, s, c in grid:
        cells = [rates(args.sims, s, c, sd, e, rng) for e in EFFECTS]
        print(f"| {sd:g} | {s} | {c} | " + " | ".join(f"{n:.2f} / {o:.2f}" for n, o in cells) + " |")

    b, t = simulate(1, 5, 40, rng=rng)
    reps = 200
    ta = time.perf_counter()
    for _ in range(reps):
        compare(b[0], t[0])
    tn = (time.perf_counter() - ta) / reps
    ta = time.perf_counter()
    for _ in range(reps):
        old_case_level_p(b, t)
    to = (time.perf_counter() - ta) / reps
    print(f"\none compare() call on 5 seeds x 40 cases: {tn * 1e3:.2f} ms (old case-level Wilcoxon: {to * 1e3:.2f} ms, "
          f"ratio {tn / to:.2f}); whole benchmark {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
