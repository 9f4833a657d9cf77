"""``medkd ablate``: grid parsing/validation, baseline, statistics (hand-computed), resume, shared teacher cache,
output files and schema, and the CLI on a 2-cell x 2-seed tiny grid."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import medkd.ablate as ab
from medkd.ablate.names import identity
from medkd.cli import app
from medkd.config import STUDY_WEIGHTS, DistillConfig, build_config, to_dict
from medkd.errors import MedkdError

runner = CliRunner()
# kd_images=labelled keeps these runs small and their names the plain study names ("+unlabelled" is tested in
# test_kd_recipe.py)
TINY = dict(student="s1", student_width=4, epochs=1, batch_size=4, device="cpu", kd_images="labelled")
GRID = [{"scales": ["dec"], "loss": "mse", "pmd": False, "kd_images": "labelled"},
        {"scales": "none", "pmd": True, "kd_images": "labelled"}]
ROW_KEYS = {"name", "scales", "loss", "pmd", "seeds", "dice_mean", "dice_std", "dice_rel_gain", "iou_mean",
            "iou_std", "iou_rel_gain", "recall_mean", "precision_mean", "hd95_mean", "hd95_rel_gain", "p_value",
            "p_adjusted", "seeds_matched", "n_seeds", "n_cases", "significant", "params", "is_baseline", "baseline", "dice_diff_ci"}


def write_grid(path: Path, cells=GRID) -> Path:
    path.write_text(yaml.safe_dump(cells))
    return path


def plan_of(cells, base=None, teacher="T", seeds=None, options=None, **kw):
    doc = {"source": "grid.yaml", "cells": cells, "seeds": None, "options": options or {}}
    return ab.build_plan(doc, Path(teacher), seeds, {**TINY, **(base or {})}, **kw)


# --------------------------------------------------------------------------------------------- grid and validation


def test_grid_file_forms_and_errors(tmp_path):
    doc = ab.load_grid_doc(write_grid(tmp_path / "g.yaml"))
    assert doc["cells"] == GRID and doc["seeds"] is None
    m = tmp_path / "m.yaml"
    m.write_text(yaml.safe_dump({"seeds": [3, 4], "options": {"epochs": 2}, "cells": GRID}))
    doc = ab.load_grid_doc(m)
    assert doc["seeds"] == [3, 4] and doc["options"] == {"epochs": 2}
    with pytest.raises(MedkdError, match="exactly one"):
        ab.load_grid_doc(None, None)
    with pytest.raises(MedkdError, match="exactly one"):
        ab.load_grid_doc(m, "quick")
    with pytest.raises(MedkdError, match="unknown preset"):
        ab.load_grid_doc(None, "huge")
    (tmp_path / "bad.yaml").write_text("- {scales: [enc\n")
    with pytest.raises(MedkdError, match="invalid YAML"):
        ab.load_grid_doc(tmp_path / "bad.yaml")
    (tmp_path / "empty.yaml").write_text("[]")
    with pytest.raises(MedkdError, match="non-empty"):
        ab.load_grid_doc(tmp_path / "empty.yaml")
    (tmp_path / "top.yaml").write_text("cells: []\nepochs: 3\n")
    with pytest.raises(MedkdError, match="'epochs'"):
        ab.load_grid_doc(tmp_path / "top.yaml")


def test_unknown_and_reserved_keys_are_named():
    with pytest.raises(MedkdError, match=r"cell 2: unknown key 'scale'"):
        plan_of([{"scales": ["enc"]}, {"scale": ["dec"]}])
    with pytest.raises(MedkdError, match=r"cell 1: 'seed' cannot be set per cell \(use --seeds\)"):
        plan_of([{"seed": 3}])
    with pytest.raises(MedkdError, match=r"cell 1: .*unknown loss 'l2'"):
        plan_of([{"scales": ["enc"], "loss": "l2"}])
    with pytest.raises(MedkdError, match=r"cell 1: .*unknown scale"):
        plan_of([{"scales": ["middle"]}])
    with pytest.raises(MedkdError, match="same setting as cell 1"):
        plan_of([{"scales": ["enc"], "loss": "mse"}, {"scales": "enc", "loss": "mse", "temperature": 4.0}])
    with pytest.raises(MedkdError, match="needs --teacher"):
        ab.build_plan({"source": "g", "cells": [{"scales": ["enc"]}]}, None, None, TINY)
    with pytest.raises(MedkdError, match="seeds must be an integer, got 'x'"):
        ab.parse_seeds("0,x")


def test_baseline_always_present_names_and_precedence():
    plan = plan_of([{"scales": ["enc", "bottleneck", "dec"], "loss": "contrastive", "pmd": True},
                    {"scales": "none", "pmd": True}, {"scales": ["dec"], "loss": "mse", "pmd": False, "epochs": 3}],
                   base={"epochs": 2}, options={"epochs": 5, "lr": 0.01})
    names = [c.name for c in plan.cells]
    assert names == ["baseline", "baseline [epochs=3]", "E+B+D contrastive +PMD", "PMD only", "D mse [epochs=3]"]
    base = plan.cells[0]
    assert base.is_baseline and base.cfg.scales == [] and base.cfg.pmd is False and base.cfg.teacher is None
    assert base.cfg.student_width == 4 and base.cfg.fraction == 0.5
    assert plan.cells[2].cfg.epochs == 2  # command line beats grid options
    assert plan.cells[2].cfg.lr == 0.01  # grid options beat defaults
    assert plan.cells[4].cfg.epochs == 3  # the cell beats the command line
    # ... and D mse at 3 epochs is compared with its own 3-epoch baseline
    assert plan.cells[4].baseline == "baseline [epochs=3]" and plan.cells[1].cfg.epochs == 3
    assert plan.cells[2].baseline == plan.cells[3].baseline == "baseline"
    assert plan.seeds == [0, 1, 2]
    assert [c.slug for c in plan.cells] == ["baseline", "baseline-epochs-3", "e-b-d-contrastive-pmd", "pmd-only",
                                            "d-mse-epochs-3"]


def test_baseline_per_fraction_and_grid_baseline_merged():
    plan = plan_of([{"scales": "none", "pmd": False, "name": "student alone"}, {"scales": ["enc"], "loss": "mse"},
                    {"scales": ["enc"], "loss": "mse", "fraction": 0.25}])
    by = {c.name: c for c in plan.cells}
    assert [c.name for c in plan.cells if c.is_baseline] == ["student alone", "baseline [fraction=0.25]"]
    assert by["E mse +PMD"].baseline == "student alone"
    assert by["E mse +PMD [fraction=0.25]"].baseline == "baseline [fraction=0.25]"
    assert by["baseline [fraction=0.25]"].cfg.fraction == 0.25


def test_pseudo_label_cells_are_named_and_their_baseline_is_the_student_alone(tiny_data):
    """A cell whose only teacher term is the pseudo-label term is a distillation row (not "baseline"), and every
    baseline is the student alone: no pseudo-labels, no teacher, KD-only options at their defaults."""
    from medkd.data.prepared import PreparedData

    plan = plan_of([{"scales": "none", "pmd": False, "pseudo_label": True, "kd_images": "all"},
                    {"scales": "none", "pmd": True, "pseudo_label": True, "kd_images": "all", "pmd_loss": "cwd",
                     "kd_warmup_epochs": 2}], data=PreparedData(tiny_data))
    names = [c.name for c in plan.cells if not c.is_baseline]
    assert names[0].startswith("pseudo-labels only +unlabelled") and names[1].startswith("PMD only +PL +unlabelled")
    for c in plan.cells:
        if c.is_baseline:
            assert not c.cfg.uses_teacher and c.cfg.teacher is None and not c.cfg.pseudo_label
            assert c.cfg.pmd_loss == "kl" and c.cfg.kd_warmup_epochs == 0


def test_presets_load_and_validate(tiny_data):
    from medkd.data.prepared import PreparedData

    data = PreparedData(tiny_data)
    quick = ab.build_plan(ab.load_grid_doc(preset="quick"), Path("T"), None, {"device": "cpu"}, data=data)
    assert len(quick.cells) == 5 and quick.seeds == [0, 1] and quick.cells[0].name == "baseline"
    assert quick.references == ["all_labels", "teacher"]
    # the first KD row is the default distill setting, compared with a baseline of its (larger) budget; the second
    # the reference study's recipe, on its labelled images only like the student alone; then all labels
    names = [c.name for c in quick.cells]
    steps = ab.natural_steps_per_epoch(quick.cells[2].cfg, data)
    assert names == ["baseline", f"baseline [steps/epoch={steps}]", "PMD only +PL +unlabelled",
                     "E+B+D contrastive +PMD [w_seg=0.4, w_pmd=0.2]", "all labels"]
    assert [c.baseline for c in quick.cells[2:]] == [names[1], "baseline", names[1]]
    assert quick.cells[4].reference == "all_labels" and quick.cells[4].cfg.fraction == 1.0
    # the default distill recipe at the quick preset's budget (12 epochs: half of distill's default, for minutes)
    default = build_config(DistillConfig, overrides={"teacher": "T", "device": "cpu", "epochs": 12})
    assert identity(to_dict(quick.cells[2].cfg)) == identity(to_dict(default)) and quick.cells[2].cfg.epochs == 12
    assert quick.cells[3].cfg.effective_weights() == STUDY_WEIGHTS and quick.cells[3].cfg.kd_images == "labelled"
    study = ab.build_plan(ab.load_grid_doc(preset="study"), Path("T"), None, {"student": "s2"}, data=data)
    assert len(study.cells) == 31 and study.seeds == [0, 1, 2]
    assert study.cells[-1].reference == "all_labels" and study.cells[-1].name.startswith("all labels")
    assert all(c.cfg.student == "s2" for c in study.cells)
    kd = [c for c in study.cells if c.cfg.scales]
    assert len(kd) == 28 and {c.cfg.loss for c in kd} == {"contrastive", "mse"}
    assert {tuple(c.cfg.scales) for c in kd} == {("enc",), ("bottleneck",), ("dec",), ("enc", "bottleneck"),
                                                 ("enc", "dec"), ("bottleneck", "dec"), ("enc", "bottleneck", "dec")}
    # configs/ holds the same files (links), not copies that could drift
    root = Path(__file__).resolve().parents[1]
    for name in ab.GRID_PRESETS:
        assert (root / "configs" / f"ablate-{name}.yaml").read_text() == ab.preset_file(name).read_text()


@pytest.mark.parametrize("fractions", [None, [0.25, 0.5, 1.0]])
@pytest.mark.parametrize("preset", ab.GRID_PRESETS)
def test_no_preset_row_is_compared_with_a_smaller_budget(tiny_data, preset, fractions):
    """Every distillation row of every packaged preset (and at several fractions) is compared with a baseline that
    takes at least as many optimizer steps on every seed, with the same epochs, augmentation and fraction; the
    all-labels ceiling takes at least as many as any row."""
    from dataclasses import replace

    from medkd.data.prepared import PreparedData

    data = PreparedData(tiny_data)
    for options in ({"batch_size": 4}, {"batch_size": 8, "augment": True}):
        plan = ab.build_plan(ab.load_grid_doc(preset=preset), Path("T"), None, options, data=data,
                             fractions=fractions)
        by_name = {c.name: c for c in plan.cells}

        def steps(cfg, seed):
            return ab.optimizer_steps(replace(cfg, seed=seed), data)

        kd = [c for c in plan.cells if not c.is_baseline and c.reference is None]
        assert kd
        for c in kd:
            b = by_name[c.baseline]
            assert b.is_baseline and not b.cfg.uses_teacher
            assert (b.cfg.augment, b.cfg.epochs, b.cfg.fraction, b.cfg.batch_size) == \
                (c.cfg.augment, c.cfg.epochs, c.cfg.fraction, c.cfg.batch_size)
            for s in plan.seeds:
                assert steps(b.cfg, s) >= steps(c.cfg, s), (c.name, b.name, s)
        for r in (c for c in plan.cells if c.reference == "all_labels"):
            assert r.cfg.fraction == 1.0 and not r.cfg.uses_teacher
            assert all(steps(r.cfg, s) >= steps(c.cfg, s) for c in kd for s in plan.seeds)


def test_budget_matched_baselines_dedupe_and_name_their_budget(tiny_data):
    from medkd.data.prepared import PreparedData

    data = PreparedData(tiny_data)
    cells = [{"scales": "none", "pmd": True, "kd_images": "all"},
             {"scales": ["dec"], "loss": "mse", "kd_images": "all"}, {"scales": ["dec"], "loss": "mse"}]
    plan = plan_of(cells, data=data, references=[])
    names = [c.name for c in plan.cells]
    steps = ab.natural_steps_per_epoch(plan.cells[2].cfg, data)
    # the two +unlabelled rows share one baseline of their budget; the labelled row keeps the plain one
    assert names == ["baseline", f"baseline [steps/epoch={steps}]", "PMD only +PL +unlabelled",
                     "D mse +PMD +PL +unlabelled", "D mse +PMD"]
    assert [c.baseline for c in plan.cells[2:]] == [names[1], names[1], "baseline"]
    assert plan.cells[1].cfg.steps_per_epoch == steps and plan.cells[0].cfg.steps_per_epoch is None
    # with only +unlabelled rows there is one baseline, and its name need not tell budgets apart
    plan = plan_of(cells[:1], data=data, references=[])
    assert [c.name for c in plan.cells] == ["baseline", "PMD only +PL +unlabelled"]
    assert plan.cells[0].cfg.steps_per_epoch == steps
    with pytest.raises(MedkdError, match="needs the prepared dataset"):
        plan_of(cells[:1])


# --------------------------------------------------------------------------------------------------- statistics


def test_helpers():
    assert ab.mean_std([0.5, 0.7, None]) == (pytest.approx(0.6), pytest.approx(np.sqrt(0.02)))
    assert ab.mean_std([0.5]) == (0.5, None) and ab.mean_std([None, float("nan")]) == (None, None)
    # seed-matched: seed 2 of the reference is ignored because the row has no seed 2
    g, seeds = ab.matched_gain({0: 0.66, 1: 0.66}, {0: 0.6, 1: 0.6, 2: 0.0})
    assert g == pytest.approx(10.0) and seeds == [0, 1]
    assert ab.matched_gain({0: 1.0}, {1: 1.0}) == (None, [])
    m = ab.per_case_matrix([{"per_case": [{"id": "b", "dice": 0.5}, {"id": "a", "dice": None}]}], ["a", "b", "c"])
    assert np.isnan(m[0, 0]) and m[0, 1] == 0.5 and np.isnan(m[0, 2])


def test_empty_label_and_empty_prediction_stays_in_the_comparison():
    """A case empty in the label and correctly empty in one arm scores 1 there (not dropped), 0 in the arm that
    predicted something on it."""
    quiet = {"id": "e", "dice": None, "iou": None, "gt_empty": True, "pred_empty": True}
    noisy = {"id": "e", "dice": 0.0, "iou": 0.0, "gt_empty": True, "pred_empty": False}
    m = ab.per_case_matrix([{"per_case": [quiet, {"id": "a", "dice": 0.5}]}, {"per_case": [noisy]}], ["a", "e"])
    assert m[0].tolist() == [0.5, 1.0] and np.isnan(m[1, 0]) and m[1, 1] == 0.0
    assert np.isnan(ab.per_case_matrix([{"per_case": [quiet]}], ["e"], "recall")[0, 0])  # recall: undefined
    plan = plan_of([{"scales": ["dec"], "loss": "mse", "pmd": False}], seeds=[0, 1])
    base, kd = (c.name for c in plan.cells)
    per = lambda *cases: {"dice": 0.7, "iou": 0.5, "recall": 0.5, "precision": 0.5, "hd95": 1.0,  # noqa: E731
                          "pooled": {"dice": 0.5}, "per_case": [{"id": "a", "dice": 0.7}, *cases]}
    evals = {(base, s): per(quiet) for s in (0, 1)}
    evals.update({(kd, s): per(noisy) for s in (0, 1)})
    r = ab.compute_results(plan, evals)["rows"][1]
    assert r["n_cases"] == 2 and r["dice_diff"] == pytest.approx(-0.5)  # (0 + (0 - 1)) / 2 per seed


def _fake_eval(per_case, **means):
    return {"dice": float(np.mean([v for v in per_case.values() if v is not None])), "iou": means.get("iou", 0.5), "recall": 0.5,
            "precision": 0.5, "hd95": means.get("hd95", 10.0), "params": 1234, "pooled": {"dice": 0.5},
            "per_case": [{"id": k, "dice": v} for k, v in per_case.items()]}


BASE_RUNS = {0: ({"a": 0.5, "b": 0.6, "c": None}, 10.0), 1: ({"a": 0.7, "b": 0.6, "c": 0.2}, 20.0),
             2: ({"a": 0.6, "b": 0.6, "c": 0.6}, 30.0)}


def test_resume_mismatch_names_the_saved_probabilities_a_run_read(tmp_path):
    """A run distilled from --teacher-probs records no ``teacher``: the mismatch names the folder it did read."""
    (tmp_path / "data").mkdir()
    old = DistillConfig(teacher=None, teacher_probs=str(tmp_path / "probs-a"), scales=[], pmd=True)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({**to_dict(old), "data": str(tmp_path / "data")}))
    new = DistillConfig(teacher=None, teacher_probs=str(tmp_path / "probs-b"), scales=[], pmd=True)
    diff = ab.config_diff(tmp_path / "config.yaml", new, tmp_path / "data")
    assert f"teacher: {tmp_path / 'probs-a'} -> {tmp_path / 'probs-b'}" in diff and "None" not in diff


def test_compute_results_hand_computed():
    from scipy import stats as st

    plan = plan_of([{"scales": ["dec"], "loss": "mse", "pmd": False}, {"scales": "none", "pmd": True}],
                   seeds=[0, 1, 2])
    base, kd, pmd = (c.name for c in plan.cells)
    evals = {(base, s): _fake_eval(pc, hd95=h) for s, (pc, h) in BASE_RUNS.items()}
    evals.update({
        (kd, 0): _fake_eval({"a": 0.8, "b": 0.8, "c": 0.3}, hd95=9.0),
        (kd, 1): _fake_eval({"a": 0.8, "b": 0.9, "c": None}, hd95=9.0),
        (kd, 2): _fake_eval({"a": 0.7, "b": 0.8, "c": 0.6}, hd95=9.0),
        (pmd, 0): _fake_eval({"a": 0.6, "b": 0.6, "c": 0.1}, hd95=10.0),
        (pmd, 1): _fake_eval({"a": 0.9, "b": 0.7, "c": 0.4}, hd95=10.0),
    })
    res = ab.compute_results(plan, evals)
    b, r, q = res["rows"]
    assert res["baseline"] is b and b["is_baseline"] and b["p_value"] is None and b["p_adjusted"] is None
    assert b["dice_per_seed"] == pytest.approx([0.55, 0.5, 0.6]) and b["dice_rel_gain"] == 0.0
    # per-seed mean differences over the cases defined in both runs of the seed:
    # seed 0: a .3, b .2 (c undefined in the baseline) -> .25; seed 1: a .1, b .3 (c undefined in KD) -> .2;
    # seed 2: a .1, b .2, c 0 -> .1
    d = [0.25, 0.2, 0.1]
    assert r["seeds_matched"] == [0, 1, 2] and r["n_seeds"] == 3 and r["n_cases"] == 3 and r["df"] == 2
    assert r["dice_diff"] == pytest.approx(np.mean(d))
    assert r["p_value"] == pytest.approx(st.ttest_1samp(d, 0).pvalue)
    half = st.t.ppf(0.975, 2) * np.std(d, ddof=1) / np.sqrt(3)
    assert r["dice_diff_ci"] == pytest.approx([np.mean(d) - half, np.mean(d) + half])
    assert r["test"] == "seed-paired t-test"
    kd_seed = [(0.8 + 0.8 + 0.3) / 3, 0.85, 0.7]
    assert r["dice_mean"] == pytest.approx(np.mean(kd_seed))
    assert r["dice_rel_gain"] == pytest.approx(100 * (np.mean(kd_seed) - 0.55) / 0.55)
    assert r["hd95_rel_gain"] == pytest.approx(100 * (9 - 20) / 20)
    # the PMD row lost seed 2: it is compared with the baseline's seeds 0 and 1 only (not its 3-seed mean)
    assert q["seeds"] == [0, 1] and q["seeds_matched"] == [0, 1] and q["n_seeds"] == 2 and q["df"] == 1
    pmd_seed = [(0.6 + 0.6 + 0.1) / 3, (0.9 + 0.7 + 0.4) / 3]
    assert q["dice_rel_gain"] == pytest.approx(100 * (np.mean(pmd_seed) - 0.525) / 0.525)
    assert q["hd95_rel_gain"] == pytest.approx(100 * (10 - 15) / 15)
    assert q["dice_diff"] == pytest.approx(np.mean([0.05, (0.2 + 0.1 + 0.2) / 3]))
    # Holm over the two non-baseline rows; significance only on the adjusted p
    pr, pq = r["p_value"], q["p_value"]
    lo, hi = sorted([pr, pq])
    assert sorted([r["p_adjusted"], q["p_adjusted"]]) == pytest.approx([2 * lo, max(2 * lo, hi)])
    assert r["significant"] == (r["p_adjusted"] < 0.05) and q["significant"] is False
    t = res["test"]
    assert t["method"] == "seed-paired t-test" and t["correction"] == "holm" and t["n_tests"] == 2
    assert t["n_seeds"] == 2 and t["n_cases"] == 3 and "1 degree of freedom" in t["note"]
    assert res["subset"]["subset_seed"] is None and "each run's seed" in res["subset"]["description"]
    # other corrections
    none = ab.compute_results(plan, evals, correction="none")["rows"]
    assert none[1]["p_adjusted"] == none[1]["p_value"]
    bh = ab.compute_results(plan, evals, correction="bh")["rows"]
    assert bh[1]["p_adjusted"] <= ab.compute_results(plan, evals)["rows"][1]["p_adjusted"]
    with pytest.raises(ValueError, match="unknown correction"):
        ab.compute_results(plan, evals, correction="sidak")


def test_subset_seed_is_recorded():
    plan = plan_of([{"scales": ["dec"], "loss": "mse", "pmd": False}], base={"subset_seed": 3}, seeds=[0, 1])
    assert all(c.cfg.subset_seed == 3 for c in plan.cells)
    res = ab.compute_results(plan, {})
    assert res["subset"]["subset_seed"] == 3 and "fixed across seeds" in res["subset"]["description"]
    assert res["options"]["subset_seed"] == 3 and res["rows"][1]["subset_seed"] == 3
    # a cell may hold its own subset: it is named by what differs
    plan = plan_of([{"scales": ["dec"], "loss": "mse", "pmd": False, "subset_seed": 7}], seeds=[0])
    assert plan.cells[-1].name == "D mse [subset_seed=7]"


def test_compute_results_one_seed_cannot_be_significant():
    plan = plan_of([{"scales": ["dec"], "loss": "mse", "pmd": False}], seeds=[0])
    base, kd = plan.cells[0].name, plan.cells[1].name
    evals = {(base, 0): _fake_eval({"a": 0.5, "b": 0.6}), (kd, 0): _fake_eval({"a": 0.9, "b": 0.95})}
    res = ab.compute_results(plan, evals)
    r = res["rows"][1]
    assert r["p_value"] is None and r["p_adjusted"] is None and r["significant"] is False
    assert r["dice_diff"] == pytest.approx(0.375) and r["dice_diff_ci"] is None
    assert "no test is possible" in res["test"]["note"]
    from medkd.report.ablate_table import caption

    assert "no row can be significant" in caption(res)
    # a row without any run that matches the baseline's seeds
    del evals[(kd, 0)]
    r = ab.compute_results(plan, evals)["rows"][1]
    assert r["n_seeds"] == 0 and r["p_value"] is None and r["dice_rel_gain"] is None


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tmp_path_factory) -> Path:
    """A private copy of the teacher without any teacher-output cache."""
    dst = tmp_path_factory.mktemp("abl_teacher") / "teacher"
    shutil.copytree(tiny_teacher, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


class Counter:
    def __init__(self):
        self.distill_calls, self.eval_calls, self.cache_keys, self.live_forwards = [], 0, [], 0


@pytest.fixture(scope="module")
def ablation(tiny_data, teacher, tmp_path_factory):
    """The CLI on a 2-cell x 2-seed grid (+ baseline = 6 runs) with --json, counting the teacher's work."""
    import medkd.ablate.plan_outputs as plan_mod
    import medkd.distill.run as run_mod
    import medkd.distill.teacher_outputs as to_mod

    mp = pytest.MonkeyPatch()
    count = Counter()
    orig_fill = plan_mod.fill_together

    def fill(caches, keys, compute, batch_size=16):
        count.cache_keys += sorted({k for c in caches for k in c.missing(keys)})
        return orig_fill(caches, keys, compute, batch_size)

    # CPU-like costs at study scale (the teacher dominates): the plan shares one disk cache across the runs
    mp.setattr(plan_mod, "measure_costs", lambda *a, **kw: to_mod.Costs(teacher_s=5.0, disk_read_s=0.01,
                                                                         disk_write_s=0.01, memory_read_s=0.005))
    mp.setattr(plan_mod, "fill_together", fill)

    views = []  # the runs' teacher views (the plan's are its own)
    orig_setup = run_mod.setup_teacher_outputs

    def setup(view, *a, **kw):
        views.append(view)
        return orig_setup(view, *a, **kw)

    mp.setattr(run_mod, "setup_teacher_outputs", setup)
    distillers = []
    orig_distiller = run_mod.Distiller

    def distiller(*a, **kw):
        d = orig_distiller(*a, **kw)
        distillers.append(d)
        return d

    mp.setattr(run_mod, "Distiller", distiller)
    root = tmp_path_factory.mktemp("ablate")
    out = root / "abl"
    grid = write_grid(root / "grid.yaml")
    args = ["ablate", str(tiny_data), "--teacher", str(teacher), "-o", str(out), "--grid", str(grid),
            "--seeds", "0,1", "--student-width", "4", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    try:
        res = runner.invoke(app, [*args, "--json"])
    finally:
        mp.undo()
    assert res.exit_code == 0, res.stderr
    count.live_forwards = sum(v.forwards for v in views)
    count.n_runs = len(distillers)
    return {"out": out, "grid": grid, "cli": res, "args": args, "results": json.loads(res.stdout), "count": count,
            "root": root}


def students(rows):
    return [r for r in rows if r["reference"] != "teacher"]


def test_runs_outputs_and_schema(ablation, tiny_data):
    out, res = ablation["out"], ablation["results"]
    assert ablation["count"].n_runs == 6
    for slug in ("baseline", "d-mse", "pmd-only"):
        for s in (0, 1):
            run = out / "runs" / slug / f"seed{s}"
            assert (run / "summary.json").is_file() and (run / "eval-test.json").is_file()
    summ = json.loads((out / "runs" / "d-mse" / "seed1" / "summary.json").read_text())
    assert summ["scales"] == ["dec"] and summ["loss"] == "mse" and summ["seed"] == 1 and summ["pmd"] is False
    assert json.loads((out / "runs" / "baseline" / "seed0" / "summary.json").read_text())["teacher"] is None
    doc = json.loads((out / "results.json").read_text())
    assert doc == res  # --json printed the results.json document
    assert [r["name"] for r in doc["rows"]] == ["baseline", "D mse", "PMD only", "teacher"]
    assert doc["baseline"]["name"] == "baseline"
    for r in doc["rows"]:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    for r in students(doc["rows"]):
        assert r["seeds"] == [0, 1] and 0 <= r["dice_mean"] <= 1 and r["params"] > 0
    assert doc["rows"][0]["dice_rel_gain"] == 0.0
    t = doc["test"]
    assert t["method"] == "seed-paired t-test" and t["correction"] == "holm" and t["n_cases"] >= 1
    assert t["n_seeds"] == 2 and t["n_tests"] == 2 and "1 degree of freedom" in t["note"]
    assert doc["subset"]["subset_seed"] is None
    for r in doc["rows"][1:3]:
        assert r["seeds_matched"] == [0, 1] and r["test"] == "seed-paired t-test"
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert len(csv_lines) == 5 and csv_lines[0].startswith("name,is_baseline,baseline,scales")
    header = csv_lines[0].split(",")
    assert {"p_value", "p_adjusted", "test", "correction", "seeds_matched", "n_seeds", "n_cases"} <= set(header)
    assert "seed-paired t-test" in csv_lines[1 + 1] and ",holm," in csv_lines[1 + 1]
    md = (out / "results.md").read_text()
    assert "| **baseline** |" in md and "D mse" in md and "Statistical test" in md
    assert "| p | p adj. |" in md and "seed-paired t-test" in md and "Holm" in md and "2 seed(s)" in md
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = yaml.safe_load((out / "ablation.yaml").read_text())
    assert [r["folder"] for r in plan["rows"]] == ["runs/baseline", "runs/d-mse", "runs/pmd-only"]


def test_teacher_runs_once_per_ablation(ablation, tiny_data):
    """Every training slice reaches the teacher at most once; no run computes the teacher live."""
    from medkd.data.prepared import PreparedData

    c = ablation["count"]
    keys = c.cache_keys
    assert keys and len(keys) == len(set(keys))
    n_train = sum(int(PreparedData(tiny_data).case(cid)["prepared_shape"][0])
                  for cid in PreparedData(tiny_data).case_ids("train"))
    assert len(keys) <= n_train
    assert c.live_forwards == 0
    plan = ablation["results"]["teacher_outputs"]
    assert plan["mode"] == "disk" and plan["runs"] == 4 and plan["distinct_targets"] == 2  # D mse, PMD only
    assert plan["teacher_slices"] == len(keys)  # one teacher pass for both cells' targets
    assert plan["estimates"]["disk"] == min(plan["estimates"].values()), plan
    assert "teacher outputs for 4 run(s): disk, planned teacher-output cost" in ablation["cli"].stderr


def test_gpu_like_costs_plan_no_shared_cache(tiny_data, teacher, monkeypatch):
    """Where the teacher is fast and reads are slow (a GPU), the ablation plan never starts a disk cache."""
    import medkd.ablate.plan_outputs as plan_mod
    import medkd.distill.teacher_outputs as to_mod
    from medkd.config import DistillConfig, build_config
    from medkd.data.prepared import PreparedData
    from rich.console import Console

    monkeypatch.setattr(plan_mod, "measure_costs", lambda *a, **kw: to_mod.Costs(
        teacher_s=0.03, disk_read_s=0.23, disk_write_s=0.05, memory_read_s=0.002))
    cfgs = [build_config(DistillConfig, overrides={**TINY, "epochs": 20, "teacher": str(teacher), "seed": s, **cell})
            for s in (0, 1) for cell in ({"scales": ["dec"], "loss": "mse", "pmd": False}, {"scales": [], "pmd": True})]
    cache = teacher / "cache"
    before = sorted(cache.rglob("*")) if cache.exists() else []
    mode, rec = plan_mod.plan_runs(cfgs, teacher, PreparedData(tiny_data), Console(stderr=True, quiet=True))
    assert mode == "memory" and rec["estimates"]["memory"] < rec["estimates"]["live"] < rec["estimates"]["disk"]
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before  # nothing written to the cache


def _copy(ablation, name):
    dst = ablation["root"] / name
    shutil.copytree(ablation["out"], dst)
    return dst


def _patch_counts(monkeypatch):
    import medkd.distill.run as run_mod
    import medkd.evaluate as ev_mod

    calls = {"distill": [], "eval": 0}
    orig, orig_ev = run_mod.distill, ev_mod.evaluate_runs

    def distill(data, run, cfg, resume=False, overwrite=False, **kw):
        calls["distill"].append((Path(run), resume, overwrite))
        return orig(data, run, cfg, resume=resume, overwrite=overwrite, **kw)

    def evaluate_runs(*a, **kw):
        calls["eval"] += 1
        return orig_ev(*a, **kw)

    monkeypatch.setattr(run_mod, "distill", distill)
    monkeypatch.setattr(ev_mod, "evaluate_runs", evaluate_runs)
    return calls


def test_rerun_skips_finished_runs(ablation, tiny_data, teacher, monkeypatch):
    out = _copy(ablation, "rerun")
    calls = _patch_counts(monkeypatch)
    res = ab.ablate(tiny_data, teacher, out, grid=ablation["grid"], seeds=[0, 1], base_overrides=TINY)
    assert calls == {"distill": [], "eval": 0}
    assert [r["dice_mean"] for r in res["rows"]] == [r["dice_mean"] for r in ablation["results"]["rows"]]


def test_resume_killed_runs(ablation, tiny_data, teacher, monkeypatch):
    out = _copy(ablation, "resume")
    run = out / "runs" / "pmd-only" / "seed1"
    # a run killed after its last epoch: RUN.partial with last.pt, no summary.json
    partial = run.with_name("seed1.partial")
    run.rename(partial)
    (partial / "summary.json").unlink()
    # a run killed during its first epoch: RUN.partial with config.yaml only
    run0 = out / "runs" / "d-mse" / "seed0"
    shutil.rmtree(run0)
    p0 = run0.with_name("seed0.partial")
    p0.mkdir()
    shutil.copy(out / "runs" / "d-mse" / "seed1" / "config.yaml", p0 / "config.yaml")
    cfgdoc = yaml.safe_load((p0 / "config.yaml").read_text())
    cfgdoc["seed"] = 0
    (p0 / "config.yaml").write_text(yaml.safe_dump(cfgdoc))
    calls = _patch_counts(monkeypatch)
    res = ab.ablate(tiny_data, teacher, out, grid=ablation["grid"], seeds=[0, 1], base_overrides=TINY)
    assert sorted(calls["distill"]) == sorted([(run, True, False), (run0, False, True)])
    assert (run / "summary.json").is_file() and not partial.exists() and (run0 / "summary.json").is_file()
    assert all(r["seeds"] == [0, 1] for r in students(res["rows"]))


def test_restart_with_another_teacher_output_mode_resumes(ablation, tiny_data, teacher, monkeypatch):
    """A restarted ablation whose plan picks another teacher-output mode resumes its partial runs: where the targets
    come from is not part of a run's identity (one definition for --resume and ablate)."""
    import medkd.ablate.plan_outputs as plan_mod
    import medkd.distill.teacher_outputs as to_mod

    out = _copy(ablation, "remode")
    run = out / "runs" / "pmd-only" / "seed1"
    partial = run.with_name("seed1.partial")
    run.rename(partial)
    (partial / "summary.json").unlink()
    before = yaml.safe_load((partial / "config.yaml").read_text())["teacher_outputs"]
    monkeypatch.setattr(plan_mod, "measure_costs", lambda *a, **kw: to_mod.Costs(  # a GPU: fast teacher, slow reads
        teacher_s=0.03, disk_read_s=0.23, disk_write_s=0.05, memory_read_s=0.002))
    calls = _patch_counts(monkeypatch)
    ab.ablate(tiny_data, teacher, out, grid=ablation["grid"], seeds=[0, 1], base_overrides=TINY)
    assert calls["distill"] == [(run, True, False)]
    after = yaml.safe_load((run / "config.yaml").read_text())["teacher_outputs"]
    assert before == "disk" and after != before
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 1


def test_changed_config_is_an_error_unless_overwrite(ablation, tiny_data, teacher, monkeypatch):
    out = _copy(ablation, "changed")
    grid = write_grid(ablation["root"] / "grid2.yaml", [{"scales": "none", "pmd": False}])  # the baseline alone
    with pytest.raises(MedkdError, match=r"seed0: finished with a different config \(epochs: 1 -> 2\)"):
        ab.ablate(tiny_data, teacher, out, grid=grid, seeds=[0], base_overrides={**TINY, "epochs": 2})
    calls = _patch_counts(monkeypatch)
    res = ab.ablate(tiny_data, teacher, out, grid=grid, seeds=[0], base_overrides={**TINY, "epochs": 2},
                    overwrite=True)
    assert len(calls["distill"]) == 1 and calls["eval"] == 1
    assert res["rows"][0]["epochs"] == 2
    assert json.loads((out / "runs" / "baseline" / "seed0" / "summary.json").read_text())["epochs_done"] == 2


@pytest.mark.parametrize("error, message", [
    ("training", "loss term(s) ['pmd'] became non-finite"),
    ("runtime", "RuntimeError: CUDA error: an illegal memory access was encountered"),  # not a MedkdError
])
def test_failed_run_reported_others_kept(ablation, tiny_data, teacher, monkeypatch, error, message):
    import medkd.distill.run as run_mod
    from medkd.errors import TrainingError

    out = _copy(ablation, f"failing-{error}")
    shutil.rmtree(out / "runs" / "pmd-only" / "seed0")

    def distill(data, run, cfg, **kw):
        if error == "runtime":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")
        raise TrainingError(f"{run}: loss term(s) ['pmd'] became non-finite")

    monkeypatch.setattr(run_mod, "distill", distill)
    with pytest.raises(MedkdError, match="1 run\\(s\\) failed"):
        ab.ablate(tiny_data, teacher, out, grid=ablation["grid"], seeds=[0, 1], base_overrides=TINY)
    doc = json.loads((out / "results.json").read_text())
    assert doc["failed"][0]["name"] == "PMD only" and message in doc["failed"][0]["error"]
    assert [r["seeds"] for r in students(doc["rows"])] == [[0, 1], [0, 1], [1]]
    assert "1 run(s) failed" in (out / "results.md").read_text()


def test_references_gap_closed_and_budgets(tiny_data, teacher, tmp_path):
    """The all-labels student and the teacher as reference rows; gap closed with its intervals in every format; the
    measured budgets of the runs; the commit the results were produced at."""
    import csv
    import io

    grid = write_grid(tmp_path / "grid.yaml", [{"scales": "none", "pmd": True}])
    out = tmp_path / "abl"
    res = ab.ablate(tiny_data, teacher, out, grid=grid, seeds=[0, 1], base_overrides=TINY,
                    references=["all_labels", "teacher"])
    base, pmd, all_labels, tch = res["rows"]
    assert [r["reference"] for r in res["rows"]] == [None, None, "all_labels", "teacher"]
    assert all_labels["fraction"] == 1.0 and all_labels["baseline"] == "baseline" and all_labels["seeds"] == [0, 1]
    assert all_labels["p_adjusted"] is None and res["test"]["n_tests"] == 1  # described, not tested
    # the teacher: evaluated once on the test split, into the ablation folder (not the teacher's)
    ev = json.loads((out / "references" / "teacher" / "eval-test.json").read_text())
    assert not (teacher / "eval-test.json").exists()
    assert tch["dice_mean"] == pytest.approx(ev["dice"]) and tch["seeds"] == [] and tch["params"] == ev["params"]
    assert res["teacher_training"]["fraction"] == 1.0 and "all" in res["teacher_training"]["description"]
    # gap closed = diff / (teacher - baseline) on the same cases; its t interval is the diff's divided by that gap
    gap = pmd["gap_teacher_dice"] - pmd["gap_baseline_dice"]
    assert pmd["gap_closed"] == pytest.approx(pmd["dice_diff"] / gap)
    assert pmd["gap_closed_ci"] == pytest.approx([v / gap for v in pmd["dice_diff_ci"]])
    lo, hi = pmd["gap_closed_boot_ci"]
    assert lo <= hi and pmd["dice_diff_boot_ci"][0] <= pmd["dice_diff_boot_ci"][1]
    ids = [c["id"] for c in ev["per_case"]]
    assert pmd["gap_teacher_dice"] == pytest.approx(np.nanmean(ab.per_case_matrix([ev], ids)))
    # budgets: measured in every run, equal between the row and its baseline (labelled images only)
    for r in (base, pmd, all_labels):
        for s, n in zip(r["budget"]["seeds"], r["budget"]["optimizer_steps"]):
            summ = json.loads((out / "runs" / r["slug"] / f"seed{s}" / "summary.json").read_text())
            assert summ["budget"]["optimizer_steps"] == n and summ["budget"]["epochs"] == 1
    assert pmd["budget"]["optimizer_steps"] == base["budget"]["optimizer_steps"] and pmd["budget_matched"] is True
    assert min(all_labels["budget"]["optimizer_steps"]) >= max(pmd["budget"]["optimizer_steps"])
    # every format carries the gap closed
    rows = list(csv.DictReader(io.StringIO((out / "results.csv").read_text())))
    assert float(rows[1]["gap_closed"]) == pytest.approx(pmd["gap_closed"]) and rows[3]["reference"] == "teacher"
    assert rows[1]["gap_closed_boot_ci_low"] and rows[1]["optimizer_steps"]
    md = (out / "results.md").read_text()
    assert "gap closed (95% CI)" in md and "| *teacher* |" in md and "| *all labels" in md
    assert "the teacher was trained on all" in md and "new patients" in md
    from medkd.report.ablate_table import ablate_table, fmt_gap
    from rich.console import Console

    console = Console(width=250, record=True, file=io.StringIO())
    console.print(ablate_table(res))
    assert fmt_gap(pmd["gap_closed"], pmd["gap_closed_ci"]) in console.export_text()
    # reproducible: the code version and, from a checkout, the commit
    assert res["medkd_version"] and res["schema"] == 2
    root = Path(__file__).resolve().parents[1]
    if (root / ".git").exists():
        import subprocess

        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
        assert res["git_commit"] == head.strip()


def test_fractions_label_efficiency(tiny_data, teacher, tmp_path):
    """--fractions: every cell and its own equal-budget baseline at each fraction, and the label-efficiency figure."""
    out = tmp_path / "abl"
    r = runner.invoke(app, ["ablate", str(tiny_data), "--teacher", str(teacher), "-o", str(out), "--grid",
                            str(write_grid(tmp_path / "g.yaml", [{"scales": "none", "pmd": True}])),
                            "--fractions", "0.5,1", "--seeds", "0", "--student-width", "4", "--epochs", "1",
                            "--batch-size", "4", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    by = {row["name"]: row for row in res["rows"]}
    assert res["fractions"] == [0.5, 1.0] and set(by) >= {"PMD only +PL +unlabelled [fraction=0.5]",
                                                          "PMD only [fraction=1]", "baseline [fraction=1]", "teacher"}
    half = by["PMD only +PL +unlabelled [fraction=0.5]"]
    b = by[half["baseline"]]
    assert b["fraction"] == 0.5 and b["budget"]["steps_per_epoch"] is not None  # its budget, not one pass
    assert b["budget"]["optimizer_steps"] == half["budget"]["optimizer_steps"] and half["budget_matched"] is True
    assert by["PMD only [fraction=1]"]["baseline"] == "baseline [fraction=1]"
    assert {row["setting"] for row in res["rows"] if not row["is_baseline"]} == {"PMD only +PL +unlabelled", "teacher"}
    assert "all labels" not in by  # at fraction 1 the baseline is the all-labels student already
    assert (out / "label_efficiency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "label_efficiency.png" in r.stderr
    assert runner.invoke(app, ["ablate", str(tiny_data), "--teacher", str(teacher), "-o", str(tmp_path / "x"),
                               "--preset", "quick", "--fractions", "0.5", "--fraction", "0.5"]).exit_code == 2
    assert runner.invoke(app, ["ablate", str(tiny_data), "--teacher", str(teacher), "-o", str(tmp_path / "x"),
                               "--preset", "quick", "--fractions", "0,1"]).exit_code == 2


# --------------------------------------------------------------------------------------------------------- CLI


def test_cli_json_then_table(ablation):
    res = ablation["cli"]
    assert ablation["results"]["rows"][0]["name"] == "baseline"  # stdout was exactly one JSON document
    assert "6 run(s)" in res.stderr and "0 already finished" in res.stderr
    assert "Dice" in res.stderr  # with --json the table goes to stderr
    res = runner.invoke(app, ablation["args"])  # resumed: nothing to train, table on stdout
    assert res.exit_code == 0, res.stderr
    assert "6 already finished" in res.stderr
    assert "PMD only" in res.stdout and "(ref)" in res.stdout and "Dice" in res.stdout and "HD95" in res.stdout
    assert "p adj." in res.stdout and "seed-paired t-test" in res.stdout and "Holm" in res.stdout
    assert json.loads((ablation["out"] / "results.json").read_text())["rows"] == ablation["results"]["rows"]


def test_cli_errors(tiny_data, teacher, tmp_path):
    base = ["ablate", str(tiny_data), "--teacher", str(teacher), "-o", str(tmp_path / "x")]
    bad = write_grid(tmp_path / "bad.yaml", [{"scales": ["enc"]}, {"sclaes": ["dec"]}])
    res = runner.invoke(app, [*base, "--grid", str(bad)])
    assert res.exit_code == 1 and res.stdout == ""
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "bad.yaml: cell 2: unknown key 'sclaes'" in lines[0]
    assert runner.invoke(app, [*base, "--preset", "huge"]).exit_code == 2
    assert runner.invoke(app, base).exit_code == 2
    assert runner.invoke(app, [*base, "--preset", "quick", "--grid", str(bad)]).exit_code == 2
    assert runner.invoke(app, [*base, "--preset", "quick", "--seeds", "a"]).exit_code == 2
    assert runner.invoke(app, [*base, "--preset", "quick", "--student", "s9"]).exit_code == 2
    assert runner.invoke(app, [*base, "--preset", "quick", "--correction", "sidak"]).exit_code == 2
    assert runner.invoke(app, [*base, "--preset", "quick", "--subset-seed", "-1"]).exit_code == 2
    assert not (tmp_path / "x").exists()


def test_teacher_reference_is_reused_only_for_the_same_teacher(tiny_data, teacher, tmp_path):
    """The teacher row's saved evaluation is reused only when it is of this teacher (the same kind, source, file
    contents and details): an ablation re-run with another --teacher, or a teacher trained again, must not report the
    gap against the previous one."""
    from rich.console import Console

    from medkd.ablate.runner import _teacher_reference
    from medkd.data.prepared import PreparedData

    prepared, quiet = PreparedData(tiny_data), Console(stderr=True, quiet=True)
    cfg = build_config(DistillConfig, overrides={"device": "cpu", "teacher": str(teacher)})
    doc, why = _teacher_reference(Path(teacher), prepared, tmp_path, cfg, quiet)
    assert why == "" and Path(doc["run"]).resolve() == Path(teacher).resolve()
    assert doc["teacher_identity"]["kind"] == "medkd" and list(doc["teacher_identity"]["files"]) == ["best.pt"]
    path = tmp_path / "references" / "teacher" / "eval-test.json"
    ident = doc["teacher_identity"]
    for other in ({**ident, "source": str(tmp_path / "another-teacher")}, {**ident, "files": {"best.pt": "0" * 64}}):
        path.write_text(json.dumps({**doc, "teacher_identity": other, "dice": -1.0}))
        again, _ = _teacher_reference(Path(teacher), prepared, tmp_path, cfg, quiet)
        assert again["dice"] == doc["dice"] and json.loads(path.read_text())["dice"] == doc["dice"]
    path.write_text(json.dumps({**doc, "dice": -1.0}))  # this teacher's: reused as it is
    assert _teacher_reference(Path(teacher), prepared, tmp_path, cfg, quiet)[0]["dice"] == -1.0
