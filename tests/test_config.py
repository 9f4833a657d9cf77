"""Config layering, the effective form of a distill config, and the shared option validators (used by both the
configs' ``validate()`` and the CLI pre-checks, which only choose exit code 2)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import medkd.ablate as ab
from medkd import options
from medkd.cli import app
from medkd.config import DEFAULT_WEIGHTS, DistillConfig, TeacherConfig, build_config, to_dict
from medkd.errors import MedkdError
from medkd.options import OptionError

runner = CliRunner()


def test_dict_options_merge_layer_by_layer(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump({"weights": {"enc": 0.5}, "loss_options": {"proj_dim": 64}, "taps": {"student": {"enc": "x"}}}))
    cfg = build_config(DistillConfig, f, {"teacher": "T", "weights": {"seg": 0.9}},
                       layers=[{"weights": {"pmd": 0.0}, "loss_options": {"hidden_dim": 32}, "taps": {"student": {"dec": "y"}}}])
    assert cfg.weights == {"seg": 0.9, "enc": 0.5, "bottleneck": 0.2, "dec": 0.1, "pmd": 0.0}
    assert cfg.loss_options == {"proj_dim": 64, "hidden_dim": 32}
    assert cfg.taps == {"student": {"enc": "x", "dec": "y"}}
    # lists replace, None is "not given"
    cfg = build_config(DistillConfig, f, {"teacher": "T", "scales": ["dec"], "epochs": None})
    assert cfg.scales == ["dec"] and cfg.epochs == DistillConfig().epochs


def test_effective_form():
    cfg = build_config(DistillConfig, overrides={"teacher": "T", "scales": "dec,enc", "pmd": False,
                                                  "weights": {"enc": 0.3}, "scale_losses": {"dec": "mse"}})
    eff = cfg.effective()
    assert cfg.scales == ["enc", "dec"] and eff["scales"] == ["enc", "dec"]  # canonical order
    assert eff["weights"] == {"seg": 1.0, "enc": 0.3, "dec": 0.1}  # over the default weights, used terms only
    assert "temperature" not in eff and eff["loss"] == "contrastive" and eff["scale_losses"] == {"dec": "mse"}
    base = build_config(DistillConfig, overrides={"scales": "none", "pmd": False, "loss": "mse", "temperature": 9})
    eff = base.effective()
    assert eff["weights"] == {"seg": 1.0} and eff["scales"] == [] and eff["pmd"] is False
    for k in ("loss", "scale_losses", "loss_options", "temperature", "teacher", "taps"):
        assert k not in eff
    # the same training, written two ways, has one effective form
    a = DistillConfig(teacher="T", scales=["dec", "enc"], weights={"seg": 0.4})
    b = DistillConfig(teacher="T", scales=["enc", "dec"], weights={**DEFAULT_WEIGHTS, "seg": 0.4})
    assert a.effective() == b.effective()
    assert DistillConfig.from_record({"kind": "student", "data": "D", **to_dict(b)}).effective() == b.effective()


def test_validators_name_the_option_and_valid_values():
    with pytest.raises(OptionError, match=r"unknown --student 's9'; valid: s1, s2"):
        options.check_student("s9", "--student")
    with pytest.raises(OptionError, match=r"unknown teacher arch 'x'; valid: transunet, unet"):
        options.check_teacher("x")
    with pytest.raises(OptionError, match=r"unknown scales \['mid'\]; valid: enc, bottleneck, dec or none"):
        options.parse_scales("enc,mid")
    with pytest.raises(OptionError, match="none"):
        options.parse_scales(["none", "enc"])
    assert options.parse_scales("dec, enc,enc") == ["enc", "dec"] and options.parse_scales("none") == []
    assert options.check_device("cuda:1") == "cuda:1"
    for bad in ("gpu", "cuda:", "cuda:x", "CPU"):
        with pytest.raises(OptionError, match="valid: auto, cpu, cuda"):
            options.check_device(bad)
    with pytest.raises(OptionError, match="unknown split 'tst'"):
        options.check_split("tst")
    with pytest.raises(OptionError, match=r"fraction must be in \(0, 1\], got 1.5"):
        options.check_range(1.5, "fraction", lo=0, hi=1, lo_open=True)
    with pytest.raises(OptionError, match="epochs must be >= 1, got 0"):
        options.check_range(0, "epochs", lo=1)
    with pytest.raises(OptionError, match="must be > 0"):
        options.check_range(float("nan"), "lr", lo=0, lo_open=True)
    with pytest.raises(OptionError, match=r"unknown --weights name\(s\) \['kd'\]"):
        options.parse_weights("seg=1,kd=2")
    assert options.parse_weights("seg=1, enc=0") == {"seg": 1.0, "enc": 0.0}


@pytest.mark.parametrize("cls,over,msg", [
    (DistillConfig, {"student": "s9"}, "unknown student 's9'"),
    (DistillConfig, {"scales": ["mid"], "teacher": "T"}, "unknown scales"),
    (DistillConfig, {"loss": "kl", "teacher": "T"}, "unknown loss 'kl'"),
    (DistillConfig, {"device": "gpu", "teacher": "T"}, "unknown device 'gpu'"),
    (DistillConfig, {"weights": {"seg": -1}, "teacher": "T"}, "weights seg must be >= 0"),
    (TeacherConfig, {"arch": "vit"}, "unknown teacher arch 'vit'"),
    (TeacherConfig, {"optimizer": "lion"}, "unknown optimizer 'lion'"),
])
def test_configs_use_the_same_validators(cls, over, msg):
    with pytest.raises(OptionError, match=msg):
        build_config(cls, overrides=over)


def test_a_runs_config_yaml_is_a_config_for_distill_and_ablate(tmp_path):
    """``config.yaml`` as written into a run folder (with its ``kind``/``data`` metadata, teacher and seed)."""
    rec = {"kind": "student", "data": "/x/data",
           **to_dict(build_config(DistillConfig, overrides={"teacher": "/x/teacher", "epochs": 3, "seed": 7,
                                                            "weights": {"enc": 0.3}, "fraction": 0.25}))}
    f = tmp_path / "config.yaml"
    f.write_text(yaml.safe_dump(rec, sort_keys=False))
    cfg = build_config(DistillConfig, f)
    assert cfg.epochs == 3 and cfg.fraction == 0.25 and cfg.weights["enc"] == 0.3 and cfg.seed == 7
    doc = {"source": "g.yaml", "cells": [{"scales": ["dec"], "weights": {"dec": 0.5}}], "seeds": None,
           "options": {"epochs": 9}}
    plan = ab.build_plan(doc, Path("T2"), None, {"device": "cpu"}, config=f)
    cell = next(c for c in plan.cells if not c.is_baseline)
    # grid options < --config < command line < cell; the ablation sets teacher and seed
    assert cell.cfg.epochs == 3 and cell.cfg.fraction == 0.25 and cell.cfg.device == "cpu"
    assert cell.cfg.weights == {**DEFAULT_WEIGHTS, "enc": 0.3, "dec": 0.5}
    assert cell.cfg.teacher == str(Path("T2").resolve()) and cell.cfg.seed == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nscalez: [enc]\n")
    with pytest.raises(MedkdError, match=r"bad.yaml: unknown option\(s\) \['scalez'\]"):
        ab.build_plan(doc, Path("T2"), None, {}, config=bad)


@pytest.mark.parametrize("cmd", ["evaluate", "predict", "distill", "train-teacher", "ablate", "export"])
def test_cli_device_typo_is_a_usage_error(cmd, tmp_path):
    args = {"evaluate": ["evaluate", str(tmp_path / "RUN"), "--data", str(tmp_path)],
            "predict": ["predict", str(tmp_path / "RUN"), str(tmp_path / "x.nii.gz"), "-o", str(tmp_path / "o")],
            "distill": ["distill", str(tmp_path), "-o", str(tmp_path / "r")],
            "train-teacher": ["train-teacher", str(tmp_path), "-o", str(tmp_path / "r")],
            "export": ["export", str(tmp_path / "RUN"), "-o", str(tmp_path / "m.onnx")],
            "ablate": ["ablate", str(tmp_path), "--teacher", str(tmp_path), "-o", str(tmp_path / "a"),
                       "--preset", "quick"]}[cmd]
    r = runner.invoke(app, [*args, "--device", "typo"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "--device 'typo'" in lines[0] and "auto, cpu, cuda" in lines[0]


def test_cli_evaluate_split_typo_is_a_usage_error(tmp_path):
    r = runner.invoke(app, ["evaluate", str(tmp_path), "--data", str(tmp_path), "--split", "tset"])
    assert r.exit_code == 2 and len(r.stderr.strip().splitlines()) == 1 and "train, val, test" in r.stderr


def test_training_presets_are_packaged_option_files():
    from medkd.config import preset_file, preset_names

    assert preset_names("train") == ["study"] and preset_names("ablate") == ["quick", "study"]
    t = build_config(TeacherConfig, preset="study", overrides={"epochs": 3})
    assert (t.epochs, t.lr, t.weight_decay, t.in_channels, t.width) == (3, 1e-4, 0.05, 3, 64)
    d = build_config(DistillConfig, preset="study", overrides={"teacher": "T"})  # width is a teacher option
    assert d.epochs == 200 and d.in_channels == 3
    with pytest.raises(OptionError, match="unknown preset 'huge'; valid: study"):
        build_config(TeacherConfig, preset="huge")
    root = Path(__file__).resolve().parents[1]  # configs/ links to the packaged files
    assert (root / "configs" / "train-study.yaml").read_text() == preset_file("train", "study").read_text()
