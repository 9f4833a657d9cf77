"""``medkd.stats``: the seed-paired comparison (hand-computed values, scipy reference, NaN handling, batch = single),
its calibration and power by seeded simulation, and Holm / Benjamini-Hochberg against hand-computed values and a
definition-based reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as st

from medkd.stats import adjust, bootstrap_diff, compare, design_note, simulate


def old_case_level_p(base: np.ndarray, treated: np.ndarray) -> np.ndarray:
    """The test ablate used before: per-case metric averaged over seeds, paired t-test over cases."""
    return st.ttest_rel(treated.mean(axis=-2), base.mean(axis=-2), axis=-1).pvalue


# ------------------------------------------------------------------------------------------------------ compare


def test_compare_hand_computed():
    base = np.array([[0.5, 0.7, 0.6], [0.4, 0.6, 0.5], [0.6, 0.8, 0.7]])
    # per-seed mean differences: 0.1, 0.2, 0.3 -> mean 0.2, sd 0.1, se 0.1/sqrt(3), t = 2*sqrt(3)
    treated = base + np.array([[0.1], [0.2], [0.3]])
    r = compare(base, treated)
    assert r["n_seeds"] == 3 and r["n_cases"] == 3 and r["df"] == 2
    assert r["mean_diff"] == pytest.approx(0.2)
    assert r["per_seed_diff"] == pytest.approx([0.1, 0.2, 0.3])
    assert r["statistic"] == pytest.approx(2 * math.sqrt(3))
    assert r["p_value"] == pytest.approx(2 * st.t.sf(2 * math.sqrt(3), 2))
    half = st.t.ppf(0.975, 2) * 0.1 / math.sqrt(3)
    assert r["ci"] == pytest.approx((0.2 - half, 0.2 + half))
    assert r["mean_baseline"] == pytest.approx(0.6) and r["mean_treated"] == pytest.approx(0.8)
    assert r["rel_gain"] == pytest.approx(100 * 0.2 / 0.6)
    assert r["better"] is True and r["method"] == "seed-paired t-test" and r["alternative"] == "two-sided"
    # reference: scipy's one-sample t-test of the per-seed differences
    assert r["p_value"] == pytest.approx(st.ttest_1samp([0.1, 0.2, 0.3], 0).pvalue)
    # lower-is-better metric: the same difference is worse
    assert compare(base, treated, metric_higher_is_better=False)["better"] is False
    # swapping the arms mirrors the result
    s = compare(treated, base)
    assert s["mean_diff"] == pytest.approx(-0.2) and s["p_value"] == pytest.approx(r["p_value"])


def test_compare_nan_cases_and_missing_seed():
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.9, (4, 6))
    treated = base + rng.normal(0.05, 0.02, (4, 1))
    treated[0, 2] = np.nan  # undefined case in one run: only that (seed, case) pair drops out
    base[3, :] = np.nan  # the baseline's seed 3 failed: that seed drops out of both arms
    r = compare(base, treated)
    assert r["n_seeds"] == 3 and r["n_cases"] == 6
    d = [np.nanmean(treated[0] - base[0]), np.mean(treated[1] - base[1]), np.mean(treated[2] - base[2])]
    assert r["per_seed_diff"][:3] == pytest.approx(d) and math.isnan(r["per_seed_diff"][3])
    assert r["p_value"] == pytest.approx(st.ttest_1samp(d, 0).pvalue)
    # the seed-matched means use the same pairs
    mb = np.mean([np.mean(np.delete(base[0], 2)), base[1].mean(), base[2].mean()])
    assert r["mean_baseline"] == pytest.approx(mb)


def test_compare_degenerate_designs():
    base = np.full((1, 5), 0.7)
    one = compare(base, base + 0.1)
    assert one["n_seeds"] == 1 and math.isnan(one["p_value"]) and not one["significant"]
    assert math.isnan(one["ci"][0]) and "no test" in one["min_p_note"]
    same = compare(np.full((3, 4), 0.5), np.full((3, 4), 0.5))
    assert same["p_value"] == 1.0 and same["better"] is None and not same["significant"]
    const = compare(np.full((3, 4), 0.5), np.full((3, 4), 0.6))  # identical non-zero differences: t undefined
    assert math.isnan(const["p_value"]) and const["mean_diff"] == pytest.approx(0.1)
    assert "1 degree of freedom" in design_note(2) and design_note(3) == ""
    with pytest.raises(ValueError, match="same shape"):
        compare(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="n_seeds, n_cases"):
        compare(np.zeros(4), np.zeros(4))


def test_compare_batch_matches_single():
    b, t = simulate(6, 3, 12, effect=0.03, rng=np.random.default_rng(2))
    t[0, 1, 3] = np.nan
    batch = compare(b, t)
    assert batch["p_value"].shape == (6,) and batch["per_seed_diff"].shape == (6, 3)
    for i in range(6):
        one = compare(b[i], t[i])
        for k in ("p_value", "mean_diff", "statistic", "rel_gain"):
            assert batch[k][i] == pytest.approx(one[k])
        assert batch["ci"][0][i] == pytest.approx(one["ci"][0])


# -------------------------------------------------------------------------------------- calibration and power


def test_null_false_positive_rate_is_calibrated_over_seeds():
    """No true effect, run-level sd 0.02, 3 seeds x 12 cases: the seed-level test stays near 0.05 while the old
    case-level test (cases as the unit) calls about half of the comparisons significant."""
    b, t = simulate(400, 3, 12, run_sd=0.02, effect=0.0, rng=np.random.default_rng(20261126))
    fpr = float(np.mean(compare(b, t)["p_value"] < 0.05))
    assert fpr <= 0.08
    assert float(np.mean(old_case_level_p(b, t) < 0.05)) > 0.3  # why the unit matters


def test_power_for_a_large_effect_with_five_seeds():
    b, t = simulate(300, 5, 12, run_sd=0.02, effect=0.10, rng=np.random.default_rng(7))
    assert float(np.mean(compare(b, t)["p_value"] < 0.05)) >= 0.8


# --------------------------------------------------------------------------------------------------- adjust


def ref_adjust(p, method):
    """Definition-based reference (quadratic): Holm = max over smaller-or-equal p of (m - rank + 1) p;
    BH = min over larger-or-equal p of m p / rank."""
    p = np.asarray(p, float)
    m = p.size
    rank = np.empty(m, int)
    rank[np.argsort(p, kind="mergesort")] = np.arange(1, m + 1)
    out = []
    for i in range(m):
        if method == "holm":
            out.append(min(1.0, max((m - rank[j] + 1) * p[j] for j in range(m) if rank[j] <= rank[i])))
        else:
            out.append(min(1.0, min(m * p[j] / rank[j] for j in range(m) if rank[j] >= rank[i])))
    return out


def test_adjust_hand_computed():
    assert adjust([0.01, 0.04, 0.03], method="holm") == [0.03, 0.06, 0.06]
    assert adjust([0.01, 0.04, 0.03], method="bh") == [0.03, 0.04, 0.04]
    assert adjust([0.01, 0.04, 0.03]) == [0.03, 0.06, 0.06]  # Holm is the default
    # Holm: 4 x 0.005, 3 x 0.02 -> 0.06, 2 x 0.03 -> 0.06 (monotone), 1 x 0.5; capped at 1
    assert adjust([0.5, 0.005, 0.03, 0.02], "holm") == [0.5, 0.02, 0.06, 0.06]
    assert adjust([0.4, 0.9], "holm") == [0.8, 0.9]
    # BH: ranks 1..4 -> 4p/rank = 0.02, 0.04, 0.04, 0.5 with the step-up minimum from the top
    assert adjust([0.5, 0.005, 0.03, 0.02], "bh") == [0.5, 0.02, 0.04, 0.04]
    assert adjust([0.2, 0.7], "none") == [0.2, 0.7]


def test_adjust_nan_none_and_errors():
    # undefined tests are left out of the family (m = 2 here) and come back as None
    assert adjust([0.01, None, float("nan"), 0.04], "holm") == [0.02, None, None, 0.04]
    assert adjust([None, float("nan")], "bh") == [None, None]
    assert adjust([], "holm") == []
    with pytest.raises(ValueError, match="unknown correction"):
        adjust([0.1], "bonferroni")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        adjust([1.5], "holm")


@pytest.mark.parametrize("method", ["holm", "bh"])
def test_adjust_matches_reference(method):
    rng = np.random.default_rng(3)
    for m in (1, 2, 5, 29):
        p = rng.uniform(0, 0.2, m) ** 2
        p[rng.integers(0, m)] = p[0]  # ties
        assert adjust(p, method) == pytest.approx(ref_adjust(p, method), abs=1e-14)
    if method == "bh" and hasattr(st, "false_discovery_control"):
        p = rng.uniform(0, 0.1, 12)
        assert adjust(p, "bh") == pytest.approx(list(st.false_discovery_control(p, method="bh")), abs=1e-14)


def test_docstring_examples_run():
    import doctest

    import medkd.stats

    assert doctest.testmod(medkd.stats).failed == 0


def test_design_note_states_what_the_design_can_reach():
    assert "no test is possible" in design_note(1)
    assert "|t| > 12.7" in design_note(2) and "1 degree of freedom" in design_note(2)
    assert design_note(5) == "" and design_note(3, 29, "none") == ""
    holm = design_note(3, 29, "holm")  # the study preset's 29 rows with 3 seeds
    assert "p < 0.0017" in holm and f"|t| > {st.t.ppf(1 - 0.05 / 58, 2):.3g}" in holm
    assert "lone effect" in design_note(3, 29, "bh")


# ------------------------------------------------------------------------------------- two-level bootstrap


def loop_bootstrap(base, treated, n_boot, seed, teacher=None):
    """Reference: the documented draws, one replicate at a time, plainly (seeds, then one case draw for all)."""
    rng = np.random.default_rng(seed)
    n_s, n_c = base.shape
    sd, cd = rng.integers(0, n_s, (n_boot, n_s)), rng.integers(0, n_c, (n_boot, n_c))
    diffs, gaps = [], []
    for r in range(n_boot):
        b, t = base[sd[r]][:, cd[r]], treated[sd[r]][:, cd[r]]
        per_d, per_b = [], []
        for s in range(n_s):
            ok = np.isfinite(b[s]) & np.isfinite(t[s])
            if ok.any():
                per_d.append(np.mean(t[s][ok] - b[s][ok]))
                per_b.append(np.mean(b[s][ok]))
        diffs.append(np.mean(per_d) if per_d else np.nan)
        if teacher is not None:
            gaps.append(diffs[-1] / (np.mean(np.asarray(teacher)[cd[r]]) - np.mean(per_b)))
    pct = lambda x: tuple(np.percentile(np.asarray(x)[np.isfinite(x)], [2.5, 97.5]))  # noqa: E731
    return pct(diffs), (pct(gaps) if teacher is not None else None)


def test_bootstrap_matches_a_loop_reference():
    rng = np.random.default_rng(1)
    base = 0.7 + rng.normal(0, 0.05, (4, 1)) + rng.normal(0, 0.1, (4, 9))
    treated = base + 0.03 + rng.normal(0, 0.04, (4, 9))
    base[1, 3] = np.nan  # a missing pair is left out of its seed's mean
    teacher = 0.9 + rng.normal(0, 0.05, 9)
    r = bootstrap_diff(base, treated, n_boot=300, seed=5, teacher=teacher)
    ci, gap_ci = loop_bootstrap(base, treated, 300, 5, teacher)
    assert r["ci"] == pytest.approx(ci) and r["gap_closed_ci"] == pytest.approx(gap_ci)
    c = compare(base, treated)
    assert r["mean_diff"] == pytest.approx(c["mean_diff"])  # the same estimator as the t-test's
    assert r["gap_closed"] == pytest.approx(c["mean_diff"] / (np.mean(teacher) - c["mean_baseline"]))
    assert r["n_seeds"] == 4 and r["n_cases"] == 9 and r["n_boot"] == 300


def test_bootstrap_without_case_variation_is_a_seed_bootstrap():
    per_seed = np.array([0.02, 0.05, -0.01, 0.04, 0.03])
    base = np.tile(np.array([[0.6], [0.7], [0.65], [0.62], [0.68]]), (1, 6))
    treated = base + per_seed[:, None]  # every case of a seed moves alike
    r = bootstrap_diff(base, treated, n_boot=500, seed=3, teacher=0.9)
    draws = np.random.default_rng(3).integers(0, 5, (500, 5))
    ref = np.percentile(per_seed[draws].mean(axis=1), [2.5, 97.5])
    assert r["ci"] == pytest.approx(tuple(ref))
    gap_ref = per_seed[draws].mean(axis=1) / (0.9 - base[:, 0][draws].mean(axis=1))
    assert r["gap_closed_ci"] == pytest.approx(tuple(np.percentile(gap_ref, [2.5, 97.5])))


def test_bootstrap_with_one_seed_is_a_case_bootstrap():
    base = np.array([[0.5, 0.8, 0.7, 0.9, 0.6, 0.75, 0.4]])
    treated = base + np.array([[0.1, -0.05, 0.2, 0.0, 0.15, 0.05, 0.3]])
    r = bootstrap_diff(base, treated, n_boot=400, seed=11)
    draws = np.random.default_rng(11).integers(0, 7, (400, 7))
    d = (treated - base)[0]
    assert r["ci"] == pytest.approx(tuple(np.percentile(d[draws].mean(axis=1), [2.5, 97.5])))
    assert r["gap_closed"] is None and r["gap_closed_ci"] is None
    # case-to-case variation in the gain widens the interval; the t-test over seeds cannot see it (no seeds)
    assert math.isnan(compare(base, treated)["p_value"])


def test_bootstrap_gap_needs_a_teacher_above_the_baseline():
    base = np.full((3, 4), 0.8)
    r = bootstrap_diff(base, base + 0.01, n_boot=50, teacher=0.7)
    assert r["gap_closed"] is None and r["gap_closed_ci"] is None and r["mean_diff"] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="teacher must be one number"):
        bootstrap_diff(base, base, n_boot=10, teacher=[0.9, 0.9])
