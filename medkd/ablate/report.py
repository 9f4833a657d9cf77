"""The results document of an ablation (``results.json``; every report format is rendered from it by
:mod:`medkd.report.ablate_table`): per-row means and spreads over seeds, gains and tests vs the baseline."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import medkd
from medkd.ablate.grid import SPLIT, Plan

METRICS = ("dice", "iou", "recall", "precision", "hd95")
LOWER_IS_BETTER = frozenset({"hd95"})
TESTS = ("auto", "wilcoxon", "ttest")
ALPHA = 0.05
WILCOXON_MIN_N = 6  # smallest n for which a two-sided exact Wilcoxon signed-rank test can give p < 0.05
BOOTSTRAP_SAMPLES = 10_000


def _finite(v: Any) -> Optional[float]:
    if v is None or isinstance(v, bool):
        return None
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def mean_std(values: Iterable[Any]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std (``ddof=1``) of the finite values; std is ``None`` with fewer than 2 values."""
    v = [f for f in (_finite(x) for x in values) if f is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def rel_gain(value: Optional[float], ref: Optional[float]) -> Optional[float]:
    """``100 * (value - ref) / |ref|`` (percent); ``None`` when undefined."""
    if value is None or ref is None or ref == 0:
        return None
    return 100.0 * (value - ref) / abs(ref)


def per_case_mean(evals: Sequence[Dict[str, Any]], metric: str = "dice") -> Dict[str, float]:
    """Case id -> the metric averaged over runs (seeds), over the runs where it is defined."""
    acc: Dict[str, List[float]] = {}
    for ev in evals:
        for c in ev.get("per_case") or []:
            v = _finite(c.get(metric))
            if v is not None:
                acc.setdefault(str(c["id"]), []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def choose_test(test: str, n: int) -> str:
    if test == "auto":
        return "wilcoxon" if n >= WILCOXON_MIN_N else "ttest"
    return test


def paired_test(a: Sequence[float], b: Sequence[float], test: str = "auto") -> Dict[str, Any]:
    """Two-sided paired test of ``a`` vs ``b`` (same order = same case).

    Returns:
        ``{"test": "wilcoxon"|"ttest", "n": n, "statistic", "p_value"}``; ``p_value`` is 1.0 when every
        difference is zero and ``None`` when undefined (n < 2; or, for the t-test, identical non-zero
        differences, where the variance is zero).
    """
    from scipy import stats

    a_, b_ = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    d = a_ - b_
    n = int(d.size)
    name = choose_test(test, n)
    res: Dict[str, Any] = {"test": name, "n": n, "statistic": None, "p_value": None}
    if n == 0:
        return res
    if np.all(d == 0):
        res["p_value"] = 1.0
        return res
    if name == "wilcoxon":
        r = stats.wilcoxon(a_, b_, zero_method="wilcox", alternative="two-sided")
        res.update(statistic=float(r.statistic), p_value=float(r.pvalue))
    else:
        if n < 2 or float(np.ptp(d)) <= 1e-12:  # identical differences: zero variance, t undefined
            return res
        r = stats.ttest_rel(a_, b_, alternative="two-sided")
        res.update(statistic=float(r.statistic), p_value=float(r.pvalue))
    return res


def bootstrap_ci(diffs: Sequence[float], n_boot: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                 seed: int = 0) -> Optional[List[float]]:
    """Percentile bootstrap interval of the mean of ``diffs`` (resampling cases); ``None`` for < 2 values."""
    d = np.asarray(diffs, dtype=float)
    if d.size < 2:
        return None
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return [float(lo), float(hi)]


def test_description(name: str, n: int) -> Dict[str, Any]:
    """The test used, in words, with the small-sample caveat."""
    words = {"wilcoxon": "two-sided Wilcoxon signed-rank test (exact for small n; zero differences dropped)",
             "ttest": "two-sided paired t-test"}[name]
    note = ""
    if n < WILCOXON_MIN_N:
        min_p = 2.0 / 2 ** n if n else 1.0
        note = (f"only {n} test case(s): a two-sided Wilcoxon signed-rank test cannot reach p < {ALPHA} "
                f"(its smallest p is {min_p:.3g})")
        note += "; the paired t-test used instead assumes normal differences, which so few cases cannot check" \
            if name == "ttest" else ", so no row can be significant"
    return {"name": name, "description": words, "alpha": ALPHA, "alternative": "two-sided", "n_cases": n,
            "unit": "test case: per-case Dice averaged over seeds, paired with the baseline's",
            "correction": "none", "bootstrap": f"95% percentile CI of the mean per-case Dice difference, "
                                                 f"{BOOTSTRAP_SAMPLES} resamples of cases",
            "note": note}


def compute_results(plan: Plan, evals: Dict[Tuple[str, int], Dict[str, Any]], test: str = "auto") -> Dict[str, Any]:
    """Statistics from evaluate dicts.

    Args:
        plan: the resolved ablation plan (rows, seeds).
        evals: ``{(row name, seed): evaluate dict}`` (``per_case`` and the top-level metric means are used);
            missing entries (failed runs) are left out of that row.
        test: ``"auto"``, ``"wilcoxon"`` or ``"ttest"``.

    Returns:
        ``{"schema", "kind": "ablation", "split", "seeds", "grid", "metrics", "test", "baseline", "rows", ...}``.
        Each row: ``name``, ``slug``, ``is_baseline``, ``baseline`` (its reference row), ``scales``, ``loss``,
        ``pmd``, ``student``, ``fraction``, ``epochs``, ``overrides``, ``seeds`` (those with results),
        ``runs``, ``params``, ``<m>_mean``, ``<m>_std``, ``<m>_rel_gain`` (percent), ``<m>_per_seed`` for every
        metric, ``pooled_dice_mean``, ``dice_diff`` (mean per-case Dice difference vs the baseline),
        ``dice_diff_ci``, ``n_pairs``, ``test``, ``statistic``, ``p_value``, ``significant``.
    """
    rows: List[Dict[str, Any]] = []
    per_case: Dict[str, Dict[str, float]] = {}
    for c in plan.cells:
        got = [(s, evals[(c.name, s)]) for s in plan.seeds if (c.name, s) in evals]
        cfg, eff = c.cfg, c.cfg.effective()
        row: Dict[str, Any] = {
            "name": c.name, "slug": c.slug, "is_baseline": c.is_baseline, "baseline": c.baseline,
            "scales": eff["scales"], "loss": eff.get("loss"),
            "pmd": cfg.pmd, "student": cfg.student, "fraction": cfg.fraction, "epochs": cfg.epochs,
            "overrides": c.overrides, "seeds": [s for s, _ in got],
            "runs": [f"runs/{c.slug}/seed{s}" for s, _ in got],
            "params": next((ev.get("params") for _, ev in got if ev.get("params") is not None), None),
        }
        for m in METRICS:
            vals = [_finite(ev.get(m)) for _, ev in got]
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
            row[f"{m}_per_seed"] = vals
        row["pooled_dice_mean"] = mean_std([(ev.get("pooled") or {}).get("dice") for _, ev in got])[0]
        per_case[c.name] = per_case_mean([ev for _, ev in got], "dice")
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    n_cases_all = []
    for r in rows:
        ref = by_name[r["baseline"]]
        for m in METRICS:
            r[f"{m}_rel_gain"] = rel_gain(r[f"{m}_mean"], ref[f"{m}_mean"])
        if r["is_baseline"]:
            r.update(dice_diff=0.0 if r["dice_mean"] is not None else None, dice_diff_ci=None, n_pairs=None,
                     test=None, statistic=None, p_value=None, significant=False)
            continue
        mine, theirs = per_case[r["name"]], per_case[ref["name"]]
        ids = sorted(set(mine) & set(theirs))
        a, b = [mine[i] for i in ids], [theirs[i] for i in ids]
        t = paired_test(a, b, test)
        n_cases_all.append(len(ids))
        diffs = [x - y for x, y in zip(a, b)]
        r.update(dice_diff=float(np.mean(diffs)) if diffs else None, dice_diff_ci=bootstrap_ci(diffs),
                 n_pairs=len(ids), test=t["test"], statistic=t["statistic"], p_value=t["p_value"],
                 significant=bool(t["p_value"] is not None and t["p_value"] < ALPHA))
    n = min(n_cases_all) if n_cases_all else 0
    test_doc = test_description(choose_test(test, n), n)
    test_doc["requested"] = test
    if not n_cases_all:  # only baseline rows: say so instead of "n = 0 case(s)"
        test_doc["note"] = "no distillation row in the grid, so nothing was compared with the baseline"
    primary = next((r for r in rows if r["is_baseline"]), None)
    base = plan.base
    return {
        "schema": 1, "kind": "ablation", "split": SPLIT, "grid": plan.source, "seeds": plan.seeds,
        "metrics": list(METRICS),
        "options": {"student": base.student, "student_width": base.student_width, "fraction": base.fraction,
                    "epochs": base.epochs, "batch_size": base.batch_size, "lr": base.lr, "device": base.device,
                    "in_channels": base.in_channels},
        "test": test_doc,
        "baseline": primary,
        "rows": rows,
        "medkd_version": medkd.__version__,
    }
