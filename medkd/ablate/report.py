"""The results document of an ablation (``results.json``; every report format is rendered from it by
:mod:`medkd.report.ablate_table`): per-row means and spreads over seeds, seed-matched gains and tests vs the
baseline, the gap closed towards the teacher, the reference rows and each row's measured training budget. The
statistics themselves live in :mod:`medkd.stats`."""

from __future__ import annotations

import subprocess
from pathlib import Path
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
N_BOOT = 2000  # replicates of the two-level bootstrap (seeded: the same results every time)
#: results.json's schema: 2 added reference rows, gap closed, bootstrap intervals and budgets (keys only added).
SCHEMA = 2


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
        "boot_ci": f"95% two-level bootstrap interval ({N_BOOT} replicates; seeds and test cases resampled)",
        "questions": {"p_value, ci": "would new training runs of the setting beat new runs of the baseline on these "
                                     "test cases? (cases fixed)",
                      "boot_ci": "... and on new patients? (cases resampled too)"},
        "note": "; ".join(notes) if tested else "no distillation row in the grid, so nothing was compared with the "
                                                 "baseline",
    }


def code_version() -> Dict[str, Any]:
    """The code a result was produced with: ``medkd_version``, and when medkd runs from a git checkout its
    ``git_commit`` and ``git_dirty`` (uncommitted changes), else ``None``."""
    root = Path(medkd.__file__).resolve().parent

    def git(*args: str) -> Optional[str]:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".") if commit else None
    return {"medkd_version": medkd.__version__, "git_commit": commit,
            "git_dirty": None if status is None else bool(status)}


def teacher_training(summary: Optional[Dict[str, Any]], source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """What the teacher was trained on, from its ``summary.json``: the fraction of the train cases (1 = all of them,
    the default and the reference study's setting) and a sentence for the captions. An external teacher
    (``source``: its record, of a kind other than ``medkd``) was trained on cases medkd does not know: the fraction
    and cases are ``None`` and the sentence says so."""
    kind = (source or {}).get("kind", "medkd")
    if kind != "medkd":
        name = Path(str(source.get("source"))).name
        text = (f"the teacher is an external {kind} model ({name}): medkd does not know which cases it was trained on "
                f"(if it saw these test cases, its row and the gap closed are optimistic; if it saw the students' "
                f"'unlabelled' cases, it has seen their labels)")
        return {"kind": kind, "fraction": None, "subset_seed": None, "train_cases": None, "description": text}
    s = summary or {}
    fraction = s.get("fraction", 1.0)  # teachers trained before --fraction existed used every train case
    n = s.get("train_cases")
    cases = f"{n} " if n is not None else ""
    if fraction is None or fraction >= 1:
        text = (f"the teacher was trained on all {cases}train cases, so it has seen the labels of the students' "
                f"'unlabelled' cases (as in the reference study)")
    else:
        text = (f"the teacher was trained on a {fraction:g} fraction ({cases}cases, subset seed "
                f"{s.get('subset_seed')}) of the train cases (the semi-supervised setting)")
    return {"kind": kind, "fraction": fraction, "subset_seed": s.get("subset_seed"), "train_cases": n,
            "description": text}


def row_budget(cell_cfg: Any, budgets: Dict[int, Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """A row's training budget: its planned options and, per seed with a finished run, the measured optimizer
    steps and images (``summary.json``'s ``budget``; ``None`` where a run did not record it)."""
    got = {s: b or {} for s, b in budgets.items()}
    return {"epochs": cell_cfg.epochs, "steps_per_epoch": cell_cfg.steps_per_epoch, "batch_size": cell_cfg.batch_size,
            "augment": bool(cell_cfg.augment), "seeds": list(got),
            "optimizer_steps": [b.get("optimizer_steps") for b in got.values()],
            "images_seen": [b.get("images_seen") for b in got.values()]}


def budget_matched(mine: Dict[str, Any], ref: Dict[str, Any]) -> Optional[bool]:
    """Whether the baseline took at least as many optimizer steps as the row on every seed both finished, with the
    same augmentation (``None`` when a budget was not recorded)."""
    theirs = dict(zip(ref["seeds"], ref["optimizer_steps"]))
    pairs = [(n, theirs[s]) for s, n in zip(mine["seeds"], mine["optimizer_steps"]) if s in theirs]
    if not pairs or any(a is None or b is None for a, b in pairs):
        return None
    return mine["augment"] == ref["augment"] and all(b >= a for a, b in pairs)


def subset_description(subset_seed: Optional[int]) -> str:
    if subset_seed is None:
        return "drawn from each run's seed: the training subset varies with the seed (seeds replicate data too)"
    return f"fixed across seeds (drawn with subset seed {subset_seed}): seeds replicate training only"


#: The comparison keys of a row that is not compared with a baseline (baselines, the teacher).
NOT_COMPARED = dict(seeds_matched=None, n_seeds=None, n_cases=None, dice_diff=None, dice_diff_ci=None,
                    dice_diff_boot_ci=None, gap_closed=None, gap_closed_ci=None, gap_closed_boot_ci=None,
                    gap_teacher_dice=None, gap_baseline_dice=None, test=None, statistic=None, df=None, p_value=None,
                    p_adjusted=None, significant=False, budget_matched=None)

GAP_DEFINITION = ("gap closed = (row - baseline) / (teacher - baseline) on mean test Dice, over the seeds both "
                  "finished and the same test cases (a case empty in the label and the prediction scores 1); 1 = "
                  "the distilled student matches its teacher, 0 = no gain over the baseline of the same budget")
BUDGET_RULE = ("every distillation row is compared with a baseline (the student alone) of the same training budget: "
               "same epochs, batch size, augmentation and labelled fraction, and as many optimizer steps per epoch "
               "(a row that also trains on the unlabelled cases takes more steps, so its baseline draws its labelled "
               "cases again until it has taken as many); rows of different budgets get their own baselines")


def compute_results(plan: Plan, evals: Dict[Tuple[str, int], Dict[str, Any]], correction: str = "holm", *,
                    teacher_eval: Optional[Dict[str, Any]] = None, teacher_summary: Optional[Dict[str, Any]] = None,
                    budgets: Optional[Dict[Tuple[str, int], Optional[Dict[str, Any]]]] = None,
                    teacher_source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Statistics from evaluate dicts.

    Args:
        plan: the resolved ablation plan (rows, seeds, references).
        evals: ``{(row name, seed): evaluate dict}`` (``per_case`` and the top-level metric means are used);
            missing entries (failed runs) are left out of that row.
        correction: ``"holm"`` (default), ``"bh"`` or ``"none"``: multiple-comparison adjustment over the
            distillation rows (:func:`medkd.stats.adjust`; reference rows are not in the family).
        teacher_eval: the teacher's evaluate dict on the same split (the ``teacher`` reference row and the gap
            closed); ``None``: neither.
        teacher_summary: the teacher run's ``summary.json`` (what it was trained on).
        teacher_source: the teacher's record (:meth:`medkd.teachers.LoadedTeacher.record`: kind, source, files,
            details), as ``results["teacher_source"]``; an external kind's training cases are unknown.
        budgets: ``{(row name, seed): summary.json's "budget"}`` of the finished runs.

    Returns:
        ``{"schema", "kind": "ablation", "split", "seeds", "grid", "metrics", "test", "subset", "baseline",
        "rows", "references", "fractions", "teacher_training", "teacher_source", "gap", "budget_rule",
        "medkd_version",
        "git_commit", "git_dirty", ...}``. Each row: ``name``, ``slug``, ``setting`` (the name without fraction
        and budget), ``reference`` (``None``, ``"all_labels"`` or ``"teacher"``), ``is_baseline``, ``baseline``
        (its reference row), ``scales``, ``loss``, ``pmd``, ``student``, ``fraction``, ``subset_seed``,
        ``epochs``, ``overrides``, ``seeds`` (those with results), ``runs``, ``params``, ``budget`` (planned
        ``epochs``, ``steps_per_epoch``, ``batch_size``, ``augment``; measured ``optimizer_steps`` and
        ``images_seen`` per seed); for every metric ``<m>_mean``, ``<m>_std`` and ``<m>_per_seed`` over the
        row's own finished seeds, and ``<m>_rel_gain``: percent change of the mean over the seeds finished in both
        the row and its baseline (seed-matched); ``pooled_dice_mean``. Comparison (``None`` for baselines and the
        teacher): ``seeds_matched``, ``n_seeds``, ``n_cases``, ``dice_diff`` (mean over matched seeds of the
        per-seed mean per-case Dice difference), ``dice_diff_ci`` (95 % t interval over seeds),
        ``dice_diff_boot_ci`` (95 % two-level bootstrap interval, seeds and cases), ``gap_closed`` =
        ``dice_diff / (gap_teacher_dice - gap_baseline_dice)`` with ``gap_closed_ci`` (the t interval divided by
        that gap) and ``gap_closed_boot_ci``, ``budget_matched`` (the baseline took at least the row's optimizer
        steps on every matched seed, same augmentation), ``test`` (the method), ``statistic`` (t), ``df``,
        ``p_value`` (raw), ``p_adjusted`` (after ``correction``; ``None`` for references), ``significant``
        (``p_adjusted < 0.05``).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"unknown correction {correction!r}; valid: {', '.join(CORRECTIONS)}")
    budgets = budgets or {}
    rows: List[Dict[str, Any]] = []
    runs: Dict[str, Dict[int, Dict[str, Any]]] = {}
    for c in plan.cells:
        got = {s: evals[(c.name, s)] for s in plan.seeds if (c.name, s) in evals}
        runs[c.name] = got
        rows.append(_row(c, got, {s: budgets.get((c.name, s)) for s in got}))
    by_name = {r["name"]: r for r in rows}
    tested: List[Dict[str, Any]] = []
    for r in rows:
        ref = by_name[r["baseline"]]
        mine, theirs = runs[r["name"]], runs[ref["name"]]
        for m in METRICS:
            r[f"{m}_rel_gain"] = matched_gain({s: ev.get(m) for s, ev in mine.items()},
                                              {s: ev.get(m) for s, ev in theirs.items()})[0]
        if r["is_baseline"]:
            r.update(NOT_COMPARED)
            continue
        r.update(_comparison(mine, theirs, teacher_eval))
        r["budget_matched"] = budget_matched(r["budget"], ref["budget"])
        if r["reference"] is None:
            tested.append(r)
        else:  # a reference row is described, not tested: it is not in the family of adjusted p-values
            r.update(p_adjusted=None, significant=False)
    adjusted = stats.adjust([r["p_value"] for r in tested], "none" if correction == "none" else correction)
    for r, q in zip(tested, adjusted):
        r["p_adjusted"] = q
        r["significant"] = bool(q is not None and q < ALPHA)
    if teacher_eval is not None:
        rows.append(_teacher_row(teacher_eval, teacher_summary, teacher_source))
    primary = next((r for r in rows if r["is_baseline"]), None)
    base = plan.base
    return {
        "schema": SCHEMA, "kind": "ablation", "split": SPLIT, "grid": plan.source, "seeds": plan.seeds,
        "metrics": list(METRICS),
        "options": {"student": base.student, "student_width": base.student_width, "fraction": base.fraction,
                    "subset_seed": base.subset_seed, "epochs": base.epochs, "batch_size": base.batch_size,
                    "steps_per_epoch": base.steps_per_epoch, "lr": base.lr, "device": base.device,
                    "in_channels": base.in_channels},
        "test": test_description(tested, correction),
        "subset": {"subset_seed": base.subset_seed, "description": subset_description(base.subset_seed)},
        "baseline": primary,
        "rows": rows,
        "references": list(plan.references),
        "fractions": plan.fractions,
        "teacher_training": teacher_training(teacher_summary, teacher_source)
        if teacher_eval is not None or teacher_summary else None,
        "teacher_source": teacher_source,
        "gap": {"definition": GAP_DEFINITION,
                "ci": "the 95% t interval over seeds of the Dice difference, divided by (teacher - baseline)",
                "boot_ci": f"95% two-level bootstrap ({N_BOOT} replicates, seeds and cases resampled)"}
        if teacher_eval is not None else None,
        "budget_rule": BUDGET_RULE,
        **code_version(),
    }


def _row(c: Any, got: Dict[int, Dict[str, Any]], budgets: Dict[int, Optional[Dict[str, Any]]]) -> Dict[str, Any]:
    """A plan row's identity, budget and per-metric mean/std/per-seed values over its finished seeds."""
    cfg, eff = c.cfg, c.cfg.effective()
    row: Dict[str, Any] = {
        "name": c.name, "slug": c.slug, "setting": c.setting, "reference": c.reference,
        "is_baseline": c.is_baseline, "baseline": c.baseline,
        "scales": eff["scales"], "loss": eff.get("loss"),
        "pmd": cfg.pmd, "student": cfg.student, "fraction": cfg.fraction, "subset_seed": cfg.subset_seed,
        "epochs": cfg.epochs, "overrides": c.overrides, "seeds": list(got),
        "runs": [f"runs/{c.slug}/seed{s}" for s in got],
        "params": next((ev.get("params") for ev in got.values() if ev.get("params") is not None), None),
        "budget": row_budget(cfg, budgets),
    }
    for m in METRICS:
        vals = [finite(ev.get(m)) for ev in got.values()]
        row[f"{m}_mean"], row[f"{m}_std"] = mean_std(vals)
        row[f"{m}_per_seed"] = vals
    row["dice_ci"] = seed_interval(row["dice_per_seed"])
    row["pooled_dice_mean"] = mean_std([(ev.get("pooled") or {}).get("dice") for ev in got.values()])[0]
    return row


def seed_interval(values: Iterable[Any], level: float = 0.95) -> Optional[List[float]]:
    """The t interval over seeds of a row's mean (``None`` below 2 finite values): what the label-efficiency
    figure draws."""
    from scipy import stats as st

    v = [f for f in (finite(x) for x in values) if f is not None]
    if len(v) < 2:
        return None
    half = float(st.t.ppf(0.5 + level / 2, len(v) - 1) * np.std(v, ddof=1) / np.sqrt(len(v)))
    return [float(np.mean(v)) - half, float(np.mean(v)) + half]


def _comparison(mine: Dict[int, Dict[str, Any]], theirs: Dict[int, Dict[str, Any]],
                teacher_eval: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A row against its baseline over the seeds both finished: the seed-paired t-test and interval, the two-level
    bootstrap interval, and (with the teacher's evaluation) the gap closed with both intervals."""
    matched = [s for s in mine if s in theirs]
    ids = sorted({str(c.get("id")) for s in matched for ev in (mine[s], theirs[s]) for c in ev.get("per_case") or []})
    out = dict(NOT_COMPARED, seeds_matched=matched, n_seeds=0, n_cases=0, test=stats.METHOD)
    if not (matched and ids):
        return out
    b = per_case_matrix([theirs[s] for s in matched], ids)
    t = per_case_matrix([mine[s] for s in matched], ids)
    cmp = stats.compare(b, t)
    teacher = per_case_matrix([teacher_eval], ids)[0] if teacher_eval is not None else None
    boot = stats.bootstrap_diff(b, t, N_BOOT, seed=0, teacher=teacher)
    ci, boot_ci = _interval(cmp["ci"]), _interval(boot["ci"])
    out.update(n_seeds=cmp["n_seeds"], n_cases=cmp["n_cases"], dice_diff=finite(cmp["mean_diff"]), dice_diff_ci=ci,
               dice_diff_boot_ci=boot_ci if cmp["n_seeds"] else None, statistic=finite(cmp["statistic"]),
               df=cmp["df"], p_value=finite(cmp["p_value"]))
    if teacher is not None and np.isfinite(teacher).any() and out["dice_diff"] is not None:
        top, bottom = float(np.nanmean(teacher)), finite(cmp["mean_baseline"])
        out.update(gap_teacher_dice=top, gap_baseline_dice=bottom)
        if bottom is not None and top - bottom > 0:
            gap = top - bottom
            out.update(gap_closed=out["dice_diff"] / gap,
                       gap_closed_ci=[v / gap for v in ci] if ci else None,
                       gap_closed_boot_ci=_interval(boot["gap_closed_ci"] or (None, None)))
    return out


def _interval(ci: Sequence[Any]) -> Optional[List[float]]:
    lo, hi = (finite(x) for x in ci)
    return None if lo is None or hi is None else [lo, hi]


def _teacher_budget(summary: Dict[str, Any]) -> Dict[str, Any]:
    """The teacher's measured budget in a row's form (its one run, under its seed)."""
    b = summary.get("budget") or {}
    return {"epochs": b.get("epochs", summary.get("epochs_done")), "steps_per_epoch": b.get("steps_per_epoch"),
            "batch_size": None, "augment": b.get("augment"), "seeds": [summary.get("seed")],
            "optimizer_steps": [b.get("optimizer_steps")], "images_seen": [b.get("images_seen")]}


def _teacher_row(ev: Dict[str, Any], summary: Optional[Dict[str, Any]],
                 source: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``teacher`` reference row: its test metrics from one evaluation (no seeds, no comparison)."""
    s = summary or {}
    trained = teacher_training(summary, source)
    row: Dict[str, Any] = {
        "name": "teacher", "slug": None, "setting": "teacher", "reference": "teacher", "is_baseline": False,
        "baseline": None, "scales": None, "loss": None, "pmd": None, "student": None, "arch": ev.get("arch"),
        "fraction": trained["fraction"], "subset_seed": trained["subset_seed"], "epochs": s.get("epochs_done"),
        "overrides": {}, "seeds": [], "runs": [ev.get("run")], "params": ev.get("params"),
        "budget": _teacher_budget(s),
    }
    for m in METRICS:
        row[f"{m}_mean"], row[f"{m}_std"], row[f"{m}_per_seed"] = finite(ev.get(m)), None, []
        row[f"{m}_rel_gain"] = None
    row["dice_ci"] = None
    row["pooled_dice_mean"] = finite((ev.get("pooled") or {}).get("dice"))
    row.update(NOT_COMPARED)
    return row
