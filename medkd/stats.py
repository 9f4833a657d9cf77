"""Statistics for ablation studies where the *training run* is a replication unit.

Public functions, usable on any table of per-case results:

* :func:`compare` -- does a setting (``treated``) differ from its baseline, given a per-case metric of several
  training runs of each, paired by seed? (New training runs, these test cases.)
* :func:`bootstrap_diff` -- a two-level (seeds and cases) bootstrap interval of the same difference, and of the
  share of the baseline-to-teacher gap it closes. (New training runs *and* new patients.)
* :func:`adjust` -- Holm or Benjamini-Hochberg adjustment of a family of p-values.

Why seeds are the unit
    Two training runs of the same setting differ (initialisation, data order, augmentation and, when the
    student trains on a seeded ``--fraction`` of the data, a different subset). That run-to-run variation moves
    *every* test case of a run together, so per-case results of one run are not independent replicates of the
    setting. A test over cases (each case's metric averaged over seeds, paired with the baseline's) treats the
    run-level noise as if it were signal: simulated with no true effect, 3 seeds and run-level sd 0.02 Dice, a
    case-level Wilcoxon test calls 37 % (12 cases) to 63 % (40 cases) of the comparisons significant at 0.05
    (``benchmarks/bench_stats.py``), and more cases make it worse. The unit of replication is the run, so the
    test here is over seeds.

Model
    ``metric[s, c, arm] = case_c + run[s, arm] + effect * (arm == treated) + noise[s, c, arm]``: case
    difficulty is shared by both arms (it cancels in the paired difference), each run has its own offset,
    independent between the two arms of a seed, plus case x run noise. Row ``s`` of ``baseline`` and of
    ``treated`` come from the same seed (the same data subset and test cases), so they are paired.

Test (``method="seed-paired t-test"``)
    For each seed *s*, ``d_s`` = mean over the cases defined in *both* arms of that seed of
    ``treated - baseline``; then a two-sided one-sample Student t-test of the ``d_s`` (``n_seeds - 1`` degrees
    of freedom) and the matching t interval of their mean. Assumptions: the ``d_s`` are independent and roughly
    normal with a common variance (each is a mean over many cases, which helps); exact when run offsets and
    noise are normal. In a balanced design (no missing cases) this is exactly the F-test of the treatment in a
    linear mixed model with a random effect per run (the "run" error stratum), so a mixed model would give the
    same p-value at much higher cost, and with unbalanced data it needs estimated degrees of freedom and a
    variance component that 3 seeds cannot estimate.

Alternatives considered, and what they can reach
    * Exact sign-flip (randomisation) test over seeds: distribution-free, but with *n* seeds its smallest
      two-sided p is ``2 / 2**n``: **0.25 with 3 seeds**, 0.125 with 4, 0.0625 with 5, 0.031 with 6; it cannot
      reach p < 0.05 below 6 seeds, and after a Holm correction over 29 rows (needs p < 0.05 / 29) not below 11.
    * Hierarchical bootstrap (resample seeds, then cases): with 3 seeds there are only 10 distinct seed
      resamples and the percentile interval ignores the t quantile, so its seed part is too narrow
      (anticonservative) exactly where seeds are few. It is not the test here; :func:`bootstrap_diff` reports it
      beside the t interval because it answers another question (below).
    * The t-test can give any p with >= 2 seeds, but with 2 seeds it has 1 degree of freedom (|t| > 12.7 needed
      for p < 0.05): such a design can show only very large, very consistent effects. With 1 seed there is no
      test (``p_value`` is NaN).

    Calibration and power (``benchmarks/RESULTS.md``, 2000 simulated ablations per setting): with no true
    effect the false-positive rate at 0.05 is 0.042-0.061 for every run-level sd (0-0.05), 3 or 5 seeds, 12 or
    40 cases; with run-level sd 0.02 a +0.10 Dice effect is found 81-83 % of the time with 3 seeds and ~100 %
    with 5, a +0.04 effect 25-28 % (3 seeds) and 61-63 % (5 seeds). Power comes from seeds, not cases.

What the p-value means
    The probability, if the setting made no difference *on average over training runs*, of a seed-matched mean
    difference at least this far from zero. The test cases are held fixed: it generalises over training runs
    (init, order, data subset), not over new patients -- a case-level effect that varies by patient adds
    uncertainty this test does not see. Cases are weighted equally within a seed and seeds equally overall.

Which question each interval answers
    * :func:`compare` (t interval, p): "would new training runs of this setting beat new runs of the baseline
      *on these test cases*?" The cases are fixed; only run-to-run variation counts.
    * :func:`bootstrap_diff` (two-level percentile interval): "... *on new patients from the same population*?"
      Seeds and cases are both resampled (crossed: one case draw for every seed and both arms), so a gain that
      holds for some patients and not others widens it. With few seeds its seed part is too narrow (see above);
      with few cases its case part is. Read the two together: a difference is convincing for new patients only
      when both exclude zero.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

ALPHA = 0.05
METHOD = "seed-paired t-test"
CORRECTIONS = ("holm", "bh", "none")


def _as_pair(baseline: Any, treated: Any):
    b = np.asarray(baseline, dtype=float)
    t = np.asarray(treated, dtype=float)
    if b.shape != t.shape:
        raise ValueError(f"baseline and treated must have the same shape (n_seeds, n_cases); got {b.shape} and "
                         f"{t.shape}")
    if b.ndim < 2:
        raise ValueError(f"expected arrays of shape (n_seeds, n_cases) (or (..., n_seeds, n_cases)); got {b.shape}")
    return b, t


def compare(
    baseline: Any,
    treated: Any,
    *,
    metric_higher_is_better: bool = True,
    alpha: float = ALPHA,
    level: float = 0.95,
) -> Dict[str, Any]:
    """Seed-paired comparison of a per-case metric between two settings (see the module docstring).

    Args:
        baseline: array ``(n_seeds, n_cases)`` of the baseline's per-case metric; row *s* is the run with seed
            *s*; NaN where the metric is undefined for a case (e.g. Dice with both masks empty) or the run is
            missing (a whole row of NaN).
        treated: the same for the setting under test; row *s* must come from the same seed as ``baseline[s]``
            and column *c* be the same case. A batch of independent comparisons may be given as
            ``(..., n_seeds, n_cases)`` arrays: every numeric entry of the result is then an array of shape
            ``(...)`` (``per_seed_diff``: ``(..., n_seeds)``).
        metric_higher_is_better: direction of the metric (``False`` for HD95); sets ``better``.
        alpha: significance level for ``significant`` (uncorrected: adjust a family with :func:`adjust`).
        level: confidence level of ``ci``.

    Returns:
        A dict:

        * ``p_value``: two-sided p of the seed-paired t-test; NaN with fewer than 2 usable seeds, or when every
          seed gives the same non-zero difference (zero variance); 1.0 when every difference is zero.
        * ``ci``: ``(low, high)`` t interval of the mean difference treated - baseline (NaN when undefined).
        * ``mean_diff``: mean over seeds of the per-seed mean difference treated - baseline.
        * ``per_seed_diff``: the per-seed differences ``d_s`` (NaN for a seed without any defined pair).
        * ``mean_baseline``, ``mean_treated``: seed-matched means over the same (seed, case) pairs as
          ``mean_diff``; ``rel_gain`` = ``100 * mean_diff / |mean_baseline|`` (percent; NaN when undefined).
        * ``better``: ``True`` when the treated setting is better on average (direction from
          ``metric_higher_is_better``), ``False`` when worse, ``None`` when equal or undefined (batch: NaN).
        * ``significant``: ``p_value < alpha``.
        * ``statistic`` (t), ``df`` (``n_seeds - 1``; ``None`` below 2 seeds), ``n_seeds`` (seeds with at least
          one defined pair), ``n_cases`` (cases defined in both arms for at least one seed), ``method``,
          ``alternative`` (``"two-sided"``), ``alpha``, ``level``, ``min_p_note`` (what the design can reach, in
          words; single comparisons only).

    Raises:
        ValueError: the shapes differ or are not ``(..., n_seeds, n_cases)``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> base = 0.8 + rng.normal(0, 0.02, (5, 1)) + rng.normal(0, 0.03, (5, 40))
        >>> kd = base + 0.05 + rng.normal(0, 0.02, (5, 1))  # each KD run has its own offset too
        >>> r = compare(base, kd)
        >>> round(r["mean_diff"], 3), r["n_seeds"], r["df"], round(r["p_value"], 4), r["significant"]
        (0.047, 5, 4, 0.006, True)
    """
    from scipy import stats as st

    b, t = _as_pair(baseline, treated)
    both = np.isfinite(b) & np.isfinite(t)
    n_pair = both.sum(axis=-1)  # (..., n_seeds)
    diff = np.where(both, t - b, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        d = diff.sum(axis=-1) / n_pair  # (..., n_seeds) per-seed mean difference; NaN for a seed without pairs
        mb = np.where(both, b, 0.0).sum(axis=-1) / n_pair
        mt = np.where(both, t, 0.0).sum(axis=-1) / n_pair
    used = n_pair > 0
    n = used.sum(axis=-1)  # (...)
    n_cases = both.any(axis=-2).sum(axis=-1)
    d0 = np.where(used, d, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = d0.sum(axis=-1) / n
        mean_b = np.where(used, mb, 0.0).sum(axis=-1) / n
        mean_t = np.where(used, mt, 0.0).sum(axis=-1) / n
        var = np.where(used, (d0 - mean[..., None]) ** 2, 0.0).sum(axis=-1) / (n - 1)
        sd = np.sqrt(var)
        se = sd / np.sqrt(n)
        # a spread below float noise of the mean counts as zero (identical differences: t undefined)
        zero_sd = sd <= 1e-12 * np.maximum(1.0, np.abs(mean))
        tstat = np.where(zero_sd, np.nan, mean / se)
        df = (n - 1).astype(float)
        df = np.where(n >= 2, df, np.nan)
        p = 2.0 * st.t.sf(np.abs(tstat), df)
        p = np.where((n >= 2) & zero_sd & (np.abs(mean) <= 1e-15), 1.0, p)  # every difference exactly zero
        q = st.t.ppf(0.5 + level / 2.0, df)
        half = np.where(zero_sd, np.nan, q * se)
        lo, hi = mean - half, mean + half
        rel = np.where(np.abs(mean_b) > 0, 100.0 * mean / np.abs(mean_b), np.nan)
    sign = 1.0 if metric_higher_is_better else -1.0
    better = np.where(np.isfinite(mean) & (mean != 0), (sign * mean) > 0, np.nan)
    out: Dict[str, Any] = {
        "p_value": p, "ci": (lo, hi), "mean_diff": mean, "per_seed_diff": np.where(used, d, np.nan),
        "mean_baseline": mean_b, "mean_treated": mean_t, "rel_gain": rel, "better": better,
        "significant": p < alpha, "statistic": tstat, "df": df, "n_seeds": n, "n_cases": n_cases,
    }
    if b.ndim == 2:  # one comparison: plain Python scalars
        out = {k: _scalar(v) for k, v in out.items()}
        out["ci"] = (float(lo), float(hi))
        out["per_seed_diff"] = [float(x) for x in out["per_seed_diff"]]
        out["better"] = None if math.isnan(float(better)) else bool(better)
        out["significant"] = bool(p < alpha)
        out["n_seeds"], out["n_cases"] = int(n), int(n_cases)
        out["df"] = int(df) if n >= 2 else None
        out["min_p_note"] = design_note(int(n))
    out.update(method=METHOD, alternative="two-sided", alpha=alpha, level=level)
    return out


def bootstrap_diff(
    baseline: Any,
    treated: Any,
    n_boot: int = 2000,
    seed: int = 0,
    *,
    teacher: Any = None,
    level: float = 0.95,
) -> Dict[str, Any]:
    """Two-level bootstrap of the seed-paired mean difference (and of the gap closed towards a teacher).

    The estimator is :func:`compare`'s: for each seed, the mean over the cases defined in both arms of
    ``treated - baseline``, then the mean over seeds. Each bootstrap replicate resamples the seeds with
    replacement (a seed keeps its pair of runs: row *s* of both arms) and, independently, the cases with
    replacement -- one case draw for every seed and both arms, as the test cases are crossed with the seeds --
    and recomputes the estimator. Random draws, in this order, from ``numpy.random.default_rng(seed)``:
    ``integers(0, n_seeds, (n_boot, n_seeds))`` then ``integers(0, n_cases, (n_boot, n_cases))``. The interval
    is the percentile interval of the replicates (``numpy.percentile``, linear interpolation).

    Assumptions: seeds are exchangeable training runs and test cases an exchangeable sample of patients, the two
    crossed (every seed scored on every case); no parametric form. With one seed it is a plain case bootstrap;
    with no case-to-case variation it is a plain seed bootstrap. It answers whether the difference would hold
    for new training runs *and new patients*; :func:`compare`'s t interval holds the cases fixed. With few seeds
    (3) the seed part of a percentile interval is too narrow: do not read it as a test over runs.

    Args:
        baseline, treated: arrays ``(n_seeds, n_cases)`` paired by row (seed) and column (case), as for
            :func:`compare`; NaN where a value is missing.
        n_boot: replicates.
        seed: seed of the resampling.
        teacher: the teacher's per-case metric ``(n_cases,)`` (resampled with the same case draw), or one number;
            with it the gap closed ``mean_diff / (teacher - baseline)`` is bootstrapped too (means over the same
            drawn cases; replicates where the teacher is not above the baseline are left out of its interval).
        level: confidence level of the intervals.

    Returns:
        ``mean_diff`` and ``ci`` (``(low, high)``); ``gap_closed`` and ``gap_closed_ci`` (``None`` without a
        teacher, or when the teacher is not above the baseline: the gap is then undefined); ``n_seeds``,
        ``n_cases`` (as :func:`compare` counts them), ``n_boot``, ``seed``, ``level``, ``method``. Intervals are
        NaN when no replicate is defined.

    Raises:
        ValueError: shapes differ or are not ``(n_seeds, n_cases)``; a teacher array of another length.
    """
    b, t = _as_pair(baseline, treated)
    if b.ndim != 2:
        raise ValueError(f"expected arrays of shape (n_seeds, n_cases); got {b.shape}")
    n_seeds, n_cases = b.shape
    rng = np.random.default_rng(seed)
    seed_draw = rng.integers(0, n_seeds, (n_boot, n_seeds))
    case_draw = rng.integers(0, n_cases, (n_boot, n_cases))
    weight = np.zeros((n_boot, n_cases))  # how often each case is drawn in each replicate
    np.add.at(weight, (np.arange(n_boot)[:, None], case_draw), 1.0)
    both = np.isfinite(b) & np.isfinite(t)

    def per_seed(w: np.ndarray, values: np.ndarray) -> np.ndarray:
        """``(n_rep, n_seeds)``: per seed, the case-weighted mean of ``values`` over the pairs defined in both."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ np.where(both, values, 0.0).T) / (w @ both.T.astype(float))

    def over_seeds(x: np.ndarray, draw: np.ndarray) -> np.ndarray:
        picked = np.take_along_axis(x, draw, axis=1)
        ok = np.isfinite(picked)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(ok, picked, 0.0).sum(axis=1) / ok.sum(axis=1)

    ones, all_seeds = np.ones((1, n_cases)), np.arange(n_seeds)[None, :]
    diff = over_seeds(per_seed(weight, t - b), seed_draw)  # (n_boot,)
    point = float(over_seeds(per_seed(ones, t - b), all_seeds)[0])
    q = 100 * np.array([(1 - level) / 2, (1 + level) / 2])
    out: Dict[str, Any] = {
        "mean_diff": point, "ci": _percentile(diff, q), "gap_closed": None, "gap_closed_ci": None,
        "n_seeds": int(both.any(axis=1).sum()), "n_cases": int(both.any(axis=0).sum()), "n_boot": int(n_boot),
        "seed": seed, "level": level, "method": "two-level bootstrap (seeds and cases, crossed)",
    }
    if teacher is None:
        return out
    tch = np.broadcast_to(np.asarray(teacher, dtype=float), (n_cases,)) if np.ndim(teacher) == 0 else \
        np.asarray(teacher, dtype=float)
    if tch.shape != (n_cases,):
        raise ValueError(f"teacher must be one number or ({n_cases},) per-case values; got shape {tch.shape}")
    fin = np.isfinite(tch)
    with np.errstate(invalid="ignore", divide="ignore"):
        teacher_boot = (weight @ np.where(fin, tch, 0.0)) / (weight @ fin.astype(float))
        teacher_point = float(np.where(fin, tch, 0.0).sum() / fin.sum())
        base_boot = over_seeds(per_seed(weight, b), seed_draw)
        base_point = float(over_seeds(per_seed(ones, b), all_seeds)[0])
        gap = teacher_point - base_point
        if not gap > 0:
            return out
        out["gap_closed"] = point / gap
        gaps = teacher_boot - base_boot
        out["gap_closed_ci"] = _percentile(np.where(gaps > 0, diff / gaps, np.nan), q)
    return out


def _percentile(x: np.ndarray, q: np.ndarray):
    x = x[np.isfinite(x)]
    if not x.size:
        return (math.nan, math.nan)
    lo, hi = np.percentile(x, q)
    return (float(lo), float(hi))


def _scalar(v: Any) -> Any:
    a = np.asarray(v)
    return float(a) if a.ndim == 0 else a


def design_note(n_seeds: int, n_tests: int = 1, correction: str = "none", alpha: float = ALPHA) -> str:
    """What a seed-paired t-test over ``n_seeds`` seeds can reach, in words (``""`` when nothing to say).

    With 1 seed there is no test. With 2 seeds (1 degree of freedom) p < ``alpha`` needs |t| > 12.7. With a Holm
    correction over ``n_tests`` rows no row is significant unless the strongest reaches p < ``alpha / n_tests``
    (|t| > 24 with 3 seeds and 29 rows); with Benjamini-Hochberg that is the bar for a lone effect.
    """
    if n_seeds < 2:
        return (f"{n_seeds} seed(s): no between-run variation can be estimated, so no test is possible and no "
                f"row can be significant; use >= 3 seeds (5 for useful power)")
    from scipy import stats as st

    df = n_seeds - 1
    corrected = correction in ("holm", "bh") and n_tests > 1
    if n_seeds > 2 and not corrected:
        return ""
    crit = float(st.t.ppf(1 - alpha / 2, df))
    text = f"{n_seeds} seeds ({df} degree{'s' if df > 1 else ''} of freedom): p < {alpha:g} needs |t| > {crit:.3g}"
    if corrected:
        bar = f"p < {alpha / n_tests:.2g}, i.e. |t| > {float(st.t.ppf(1 - alpha / n_tests / 2, df)):.3g}"
        if correction == "holm":
            text += f"; after Holm over {n_tests} rows no row is significant unless the strongest reaches {bar}"
        else:
            text += (f"; after Benjamini-Hochberg over {n_tests} rows a lone effect needs {bar} (less when several "
                     f"rows have small p)")
    if n_seeds == 2:
        text += ": only a very large and very consistent difference can be significant; use >= 3 seeds (5 for " \
                "useful power)"
    return text


def adjust(p_values: Sequence[Optional[float]], method: str = "holm") -> List[Optional[float]]:
    """Adjust a family of p-values for multiple comparisons.

    Args:
        p_values: raw p-values (any sequence or 1-D array). ``None`` and NaN mark undefined tests: they are
            left out of the family (they do not count in *m*) and come back as ``None`` in their position.
        method: ``"holm"`` (Holm-Bonferroni step-down: controls the family-wise error rate, no assumption on
            the dependence between tests), ``"bh"`` (Benjamini-Hochberg step-up: controls the false discovery
            rate, valid for independent or positively dependent tests), or ``"none"`` (the p-values unchanged).

    Returns:
        Adjusted p-values in the input order, capped at 1, monotone in the raw p-values (the same as
        ``statsmodels.stats.multitest.multipletests(p, method="holm"|"fdr_bh")[1]``), rounded to 15 significant
        digits so that hand-computed values compare equal (``3 * 0.01 == 0.03``).

    Raises:
        ValueError: unknown ``method``, or a p-value outside [0, 1].

    Example:
        >>> adjust([0.01, 0.04, 0.03], method="holm")
        [0.03, 0.06, 0.06]
        >>> adjust([0.01, 0.04, 0.03], method="bh")
        [0.03, 0.04, 0.04]
    """
    if method not in CORRECTIONS:
        raise ValueError(f"unknown correction {method!r}; valid: {', '.join(CORRECTIONS)}")
    raw = [None if v is None else float(v) for v in p_values]
    defined = [i for i, v in enumerate(raw) if v is not None and not math.isnan(v)]
    out: List[Optional[float]] = [None] * len(raw)
    if not defined:
        return out
    p = np.array([raw[i] for i in defined])
    if np.any((p < 0) | (p > 1)):
        raise ValueError(f"p-values must lie in [0, 1]; got {p[(p < 0) | (p > 1)][0]!r}")
    m = p.size
    order = np.argsort(p, kind="mergesort")
    ps = p[order]
    if method == "holm":
        adj = np.maximum.accumulate(np.minimum(1.0, (m - np.arange(m)) * ps))
    elif method == "bh":
        adj = np.minimum.accumulate(np.minimum(1.0, m * ps / np.arange(1, m + 1))[::-1])[::-1]
    else:
        for i, v in zip(defined, p):
            out[i] = float(v)
        return out
    res = np.empty(m)
    res[order] = adj
    for i, v in zip(defined, res):
        out[i] = float(f"{v:.15g}")
    return out


def simulate(
    n_sims: int,
    n_seeds: int,
    n_cases: int,
    *,
    run_sd: float = 0.02,
    effect: float = 0.0,
    noise_sd: float = 0.03,
    case_sd: float = 0.08,
    mean: float = 0.8,
    rng: Optional[np.random.Generator] = None,
):
    """Simulated ablations under the model of the module docstring, for calibration and power checks.

    ``metric[s, c, arm] = clip(mean + case_c + run[s, arm] + effect * (arm == treated) + noise[s, c, arm], 0, 1)``
    with ``case_c ~ N(0, case_sd)`` shared by both arms and all seeds (the test cases are fixed), run offsets
    ``run[s, arm] ~ N(0, run_sd)`` independent between arms, and case x run noise ``N(0, noise_sd)``.

    Returns:
        ``(baseline, treated)``, each ``(n_sims, n_seeds, n_cases)``: a batch for :func:`compare`.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    case = rng.normal(0.0, case_sd, (n_sims, 1, n_cases))
    arms = []
    for shift in (0.0, effect):
        run = rng.normal(0.0, run_sd, (n_sims, n_seeds, 1)) if run_sd > 0 else 0.0
        noise = rng.normal(0.0, noise_sd, (n_sims, n_seeds, n_cases))
        arms.append(np.clip(mean + case + run + shift + noise, 0.0, 1.0))
    return arms[0], arms[1]
