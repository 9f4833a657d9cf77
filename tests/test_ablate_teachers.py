"""``medkd ablate`` with an external teacher (here the tiny teacher exported to ONNX by ``medkd export``): every
row distils from the file, the ``teacher`` reference row is the file scored as ``medkd evaluate`` scores it, the
gap closed is computed against that row, the captions say the teacher's training cases are unknown, and the
teacher's options and files are part of what makes a finished run reusable."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import medkd.ablate as ab
from medkd.cli import app
from medkd.config import DistillConfig, to_dict
from medkd.errors import MedkdError
from conftest import run_copy

runner = CliRunner()
TINY = ["--seeds", "0", "--student-width", "4", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def onnx_teacher(tiny_teacher, tmp_path_factory) -> Path:
    """The tiny teacher as an ONNX file (medkd's export metadata describes its input)."""
    model = tmp_path_factory.mktemp("abl_onnx") / "t.onnx"
    run = run_copy(tiny_teacher, model.parent)  # export saves the run's postprocessing rule: not into the shared run
    r = runner.invoke(app, ["export", str(run), "-o", str(model), "--format", "onnx", "--device", "cpu",
                            "--quiet"])
    assert r.exit_code == 0, r.stderr
    return model


def test_ablate_with_an_onnx_teacher(onnx_teacher, tiny_data, tmp_path):
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"scales": "none", "pmd": True, "kd_images": "labelled"}]))
    out = tmp_path / "abl"
    plain = ["ablate", str(tiny_data), "--teacher", str(onnx_teacher), "-o", str(out), "--grid", str(grid), *TINY,
             "--json"]
    args = [*plain, "--teacher-label", "1"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    base, pmd, tch = res["rows"]
    assert tch["reference"] == "teacher" and tch["arch"] == "onnx:t.onnx" and tch["fraction"] is None
    assert "evaluating the onnx teacher" in r.stderr
    # the --teacher-* options reach the runs (and their recorded configs)
    run = out / "runs" / pmd["slug"] / "seed0"
    assert yaml.safe_load((run / "config.yaml").read_text())["teacher_label"] == 1
    assert json.loads((run / "summary.json").read_text())["teacher_source"]["kind"] == "onnx"
    # the teacher row is the file as `medkd evaluate` scores it, on the same split
    e = runner.invoke(app, ["evaluate", str(onnx_teacher), "--data", str(tiny_data), "--teacher-label", "1",
                            "--device", "cpu", "--no-postprocessing", "--json"])
    assert e.exit_code == 0, e.stderr
    ev = json.loads(e.stdout)
    assert tch["dice_mean"] == pytest.approx(ev["dice"], abs=1e-12) and tch["iou_mean"] == pytest.approx(ev["iou"])
    ref = json.loads((out / "references" / "teacher" / "eval-test.json").read_text())
    assert [c["id"] for c in ref["per_case"]] == [c["id"] for c in ev["per_case"]]
    assert not any(p.name.startswith("eval") for p in onnx_teacher.parent.iterdir())  # nothing beside the file
    # the gap closed is computed against that row
    ids = [c["id"] for c in ev["per_case"]]
    assert pmd["gap_teacher_dice"] == pytest.approx(float(np.nanmean(ab.per_case_matrix([ev], ids))))
    assert pmd["gap_closed"] == pytest.approx(pmd["dice_diff"] / (pmd["gap_teacher_dice"] - pmd["gap_baseline_dice"]))
    # the caption names the kind and says its training cases are unknown (no "trained on all train cases")
    src = res["teacher_source"]
    assert src["kind"] == "onnx" and src["files"] == ref["teacher_identity"]["files"]
    assert res["teacher_training"]["kind"] == "onnx" and res["teacher_training"]["fraction"] is None
    md = (out / "results.md").read_text()
    assert "external onnx model (t.onnx)" in md and "does not know which cases it was trained on" in md
    assert "trained on all" not in md + r.stderr
    # rerun: nothing trained, the teacher row reused
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.stderr
    assert "2 already finished" in again.stderr and "evaluating the" not in again.stderr
    assert json.loads(again.stdout)["rows"][-1]["dice_mean"] == tch["dice_mean"]
    # the teacher's options are part of a run's identity: without --teacher-label the finished runs differ
    other = runner.invoke(app, plain)
    assert other.exit_code == 1 and "finished with a different config (teacher_label: 1 -> None)" in other.stderr
    # and its files: a run distilled from another file of that name is stale
    cfg = DistillConfig.from_record(yaml.safe_load((run / "config.yaml").read_text()))
    files = {"t.onnx": "0" * 64}
    state, detail = ab.run_state(run, cfg, tiny_data, teacher_files=files)
    assert state == "mismatch" and detail == f"teacher {onnx_teacher.resolve()} changed after this run (t.onnx)"
    assert ab.run_state(run, cfg, tiny_data, teacher_files=src["files"]) == ("done", "")


def test_teacher_wide_options_are_not_per_cell(tmp_path):
    """Which fold, checkpoint or class of the teacher is one choice for the whole ablation (command line or the
    grid's options); a cell may still tap other module paths."""
    doc = {"source": "grid.yaml", "cells": [{"scales": "none", "pmd": True, "teacher_fold": "1"}], "seeds": None,
           "options": {}}
    with pytest.raises(MedkdError, match="grid.yaml: cell 1: 'teacher_fold' cannot be set per cell: .*--teacher-fold"):
        ab.build_plan(doc, Path("T"), None, {"device": "cpu"})
    doc = {"source": "grid.yaml", "seeds": None, "options": {"teacher_fold": "1"},
           "cells": [{"scales": ["dec"], "loss": "mse", "kd_images": "labelled", "teacher_taps": {"dec": "net.up.1"}}]}
    plan = ab.build_plan(doc, Path("T"), None, {"device": "cpu", "teacher_checkpoint": "checkpoint_best.pth"})
    kd = [c for c in plan.cells if c.cfg.uses_teacher]
    assert [(c.cfg.teacher_fold, c.cfg.teacher_checkpoint) for c in kd] == [("1", "checkpoint_best.pth")]
    ident = ab.identity(to_dict(kd[0].cfg))
    assert ident["teacher_taps"] == {"dec": "net.up.1"} and ident["teacher_fold"] == "1"
