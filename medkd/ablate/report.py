"""The results document of an ablation (``results.json``; every report format is rendered from it by
:mod:`medkd.report.ablate_table`): per-row means and spreads over seeds, seed-matched gains and tests vs the
baseline. The statistics themselves live in :mod:`medkd.stats`."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

import medkd
from medkd import stats
from medkd.ablate.grid import SPLIT, Plan
from medkd.metrics import LOWER_IS_BETTER, STUDY_KEYS  # noqa: F401 (LOWER_IS_BETTER re-exported by medkd.ablate)
from medkd.report.tables import finite, pct_change

METRICS = STUDY_KEYS
CORRECTIONS = stats.CORRECTIONS
ALPHA = stats.ALPHA


def mean_std(values: Iterable[Any]) -> Tuple[Optional[float], Optional[float]]:
    """Mean and sample std (``ddof=1``) of the finite values; std is ``None`` with fewer than 2 values."""
    v = [f for f in (finite(x) for x in values) if f is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


#: Score of an overlap metric in a comparison when the label and the prediction are both empty: a correct answer.
#: (Evaluate's means leave such a case out as undefined, NaN; a comparison must not: one arm may find the case
#: correctly empty while the other predicts something there and scores 0.)
EMPTY_BOTH_SCORE = {"dice": 1.0, "iou": 1.0}


def per_case_matrix(evals: Sequence[Dict[str, Any]], case_ids: Sequence[str], metric: str = "dice") -> np.ndarray:
    """``(len(evals), len(case_ids))`` array of a per-case metric, one row per run (seed); NaN where the case is
    missing from a run or its metric is undefined. An overlap metric of a case whose label and prediction are both
    empty is :data:`EMPTY_BOTH_SCORE` (1), so the case stays in the comparison (an empty label with a non-empty
    prediction is 0, as evaluate scores it)."""
    out = np.full((len(evals), len(case_ids)), np.nan)
    col = {cid: j for j, cid in enumerate(case_ids)}
    for i, ev in enumerate(evals):
        for c in ev.get("per_case") or []:
            v, j = finite(c.get(metric)), col.get(str(c.get("id")))
            if v is None and metric in EMPTY_BOTH_SCORE and c.get("gt_empty") is True and c.get("pred_empty") is True:
                v = EMPTY_BOTH_SCORE[metric]
            if v is not None and j is not None:
                out[i, j] = v
    return out


def matched_gain(mine: Dict[int, Any], ref: Dict[int, Any]) -> Tuple[Optional[float], List[int]]:
    """Relative change in percent of the mean over the seeds where both ``mine[seed]`` and ``ref[seed]`` are
    finite, and those seeds (``{seed: value}`` inputs)."""
    seeds = [s for s in mine if s in ref and finite(mine[s]) is not None and finite(ref[s]) is not None]
    if not seeds:
        return None, []
    return pct_change(np.mean([mine[s] for s in seeds]), np.mean([ref[s] for s in seeds])), seeds


def test_description(tested: Sequence[Dict[str, Any]], correction: str) -> Dict[str, Any]:
    """The test, its unit and correction in words, n (smallest over the compared rows; ``n_seeds_range`` when rows
    differ), and what the design can reach (``note``, naming the rows when they differ)."""
    seeds = [r["n_seeds"] for r in tested]
    n_seeds, n_cases, n_tests = min(seeds, default=0), min((r["n_cases"] for r in tested), default=0), len(tested)
    notes = []
    for n in sorted(set(seeds)):
        note = stats.design_note(n, n_tests, correction)
        if note and len(set(seeds)) > 1:
            note = f"{', '.join(r['name'] for r in tested if r['n_seeds'] == n)}: {note}"
        if note:
            notes.append(note)
    corr = {"holm": f"Holm (family-wise error) over the {n_tests} non-baseline row(s)",
            "bh": f"Benjamini-Hochberg (false discovery rate) over the {n_tests} non-baseline row(s)",
            "none": "none"}[correction]
    return {
        "name": stats.METHOD, "method": stats.METHOD,
        "description": "two-sided paired t-test over seeds of the per-seed mean Dice difference vs the baseline "
                       "run of the same seed (df = seeds - 1)",
        "unit": "training run (seed): only seeds finished in both the row and its baseline are compared",
        "alpha": ALPHA, "alternative": "two-sided", "n_seeds": n_seeds, "n_cases": n_cases,
        "n_seeds_range": [n_seeds, max(seeds, default=0)],
        "correction": correction, "correction_description": corr, "n_tests": n_tests,
        "significant_if": f"p_adjusted < {ALPHA}" if correction != "none" else f"p_value < {ALPHA}",
        "ci": "95% t interval over seeds of the mean Dice difference",
        "note": "; ".join(notes) if tested else "no distillation row in the grid, so nothing was compared with the "
                                                 "baseline",
    }


def subset_description(subset_seed: Optional[int]) -> str:
    if subset_seed is None:
        return "drawn from each run's seed: the training subset varies with the seed (seeds replicate data too)"
    return f"fixed across seeds (drawn with subset seed {subset_seed}): seeds replicate training only"


def compute_results(plan: Plan, evals: Dict[Tuple[str, int], Dict[str, Any]],
                    correction: str = "holm") -> Dict[str, Any]:
    """Statistics from evaluate dicts.

    Args:
        plan: the resolved ablation plan (rows, seeds).
        evals: ``{(row name, seed): evaluate dict}`` (``per_case`` and the top-level metric means are used);
            missing entries (failed runs) are left out of that row.
        correction: ``"holm"`` (default), ``"bh"`` or ``"none"``: multiple-comparison adjustment over all
            non-baseline rows (:func:`medkd.stats.adjust`).

    Returns:
        ``{"schema", "kind": "ablation", "split", "seeds", "grid", "metrics", "test", "subset", "baseline",
        "rows", ...}``. Each row: ``name``, ``slug``, ``is_baseline``, ``baseline`` (its reference row),
        ``scales``, ``loss``, ``pmd``, ``student``, ``fraction``, ``subset_seed``, ``epochs``, ``overrides``,
        ``seeds`` (those with results), ``runs``, ``params``; for every metric ``<m>_mean``, ``<m>_std`` and
        ``<m>_per_seed`` over the row's own finished seeds, and ``<m>_rel_gain``: percent change of the mean over
        the seeds finished in both the row and its baseline (seed-matched); ``pooled_dice_mean``. Comparison
        (``None`` for baselines): ``seeds_matched``, ``n_seeds``, ``n_cases``, ``dice_diff`` (mean over matched
        seeds of the per-seed mean per-case Dice difference), ``dice_diff_ci`` (95 % t interval), ``test``
        (the method), ``statistic`` (t), ``df``, ``p_value`` (raw), ``p_adjusted`` (after ``correction``),
        ``significant`` (``p_adjusted < 0.05``).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    rows: List[Dict[str, Any]] = []
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for c in plan.cells:
        got = {s: evals[(c.name, s)] for s in plan.seeds if (c.name, s) in evals}
        runs[c.name] = got
        cfg, eff = c.cfg, c.cfg.effective()
        row: Dict[str, Any] = {
            "name": c.name, "slug": c.slug, "is_baseline": c.is_baseline, "baseline": c.baseline,
            "scales": eff["scales"], "loss": eff.get("loss"),
            "pmd": cfg.pmd, "student": cfg.student, "fraction": cfg.fraction, "subset_seed": cfg.subset_seed,
            "epochs": cfg.epochs, "overrides": c.overrides, "seeds": list(got),
            "runs": [f"runs/{c.slug}/seed{s}" for s in got],
            "params": next((ev.get("params") for ev in got.values() if ev.get("params") is not None), None),
        }
        for m in METRICS:
            vals = [finite(ev.get(m)) for ev in got.values()]
            row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
            row[f"{m}_per_seed"] = vals
        row["pooled_dice_mean"] = mean_std([(ev.get("pooled") or {}).get("dice") for ev in got.values()])[0]
        rows.append(row)
    by_name = {r["name"]: r for r in rows}
    tested: List[Dict[str, Any]] = []
    for r in rows:
        ref = by_name[r["baseline"]]
        mine, theirs = runs[r["name"]], runs[ref["name"]]
        for m in METRICS:
            r[f"{m}_rel_gain"] = matched_gain({s: ev.get(m) for s, ev in mine.items()},
                                              {s: ev.get(m) for s, ev in theirs.items()})[0]
        if r["is_baseline"]:
            r.update(seeds_matched=None, n_seeds=None, n_cases=None, dice_diff=None, dice_diff_ci=None, test=None,
                     statistic=None, df=None, p_value=None, p_adjusted=None, significant=False)
            continue
        matched = [s for s in mine if s in theirs]
        ids = sorted({str(c.get("id")) for s in matched for ev in (mine[s], theirs[s])
                      for c in ev.get("per_case") or []})
        if matched and ids:
            cmp = stats.compare(per_case_matrix([theirs[s] for s in matched], ids),
                                per_case_matrix([mine[s] for s in matched], ids))
        else:
            cmp = {"n_seeds": 0, "n_cases": 0, "mean_diff": None, "ci": (None, None), "statistic": None,
                   "df": None, "p_value": None}
        ci = [finite(x) for x in cmp["ci"]]
        r.update(seeds_matched=matched, n_seeds=cmp["n_seeds"], n_cases=cmp["n_cases"],
                 dice_diff=finite(cmp["mean_diff"]), dice_diff_ci=ci if None not in ci else None,
                 test=stats.METHOD, statistic=finite(cmp["statistic"]), df=cmp["df"],
                 p_value=finite(cmp["p_value"]))
        tested.append(r)
    adjusted = stats.adjust([r["p_value"] for r in tested], "none" if correction == "none" else correction)
    for r, q in zip(tested, adjusted):
        r["p_adjusted"] = q
        r["significant"] = bool(q is not None and q < ALPHA)
    primary = next((r for r in rows if r["is_baseline"]), None)
    base = plan.base
    return {
        "schema": 1, "kind": "ablation", "split": SPLIT, "grid": plan.source, "seeds": plan.seeds,
        "metrics": list(METRICS),
        "options": {"student": base.student, "student_width": base.student_width, "fraction": base.fraction,
                    "subset_seed": base.subset_seed, "epochs": base.epochs, "batch_size": base.batch_size,
                    "lr": base.lr, "device": base.device, "in_channels": base.in_channels},
        "test": test_description(tested, correction),
        "subset": {"subset_seed": base.subset_seed, "description": subset_description(base.subset_seed)},
        "baseline": primary,
        "rows": rows,
        "medkd_version": medkd.__version__,
    }
