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
    assert cfg.weights == {"seg": 0.9, "enc": 0.5, "bottleneck": 0.2, "dec": 0.1, "pmd": 0.0, "pl": 1.0}
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
    assert eff["weights"] == {"seg": 1.0, "enc": 0.3, "dec": 0.1, "pl": 1.0}  # over the default weights, used terms only
    assert eff["pseudo_label"] is True  # on by default with a teacher term and unlabelled images
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
    (TeacherConfig, {"arch": "vit"}, "unknown arch 'vit'; valid: transunet, unet"),
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
    # kd_images=labelled: the rows' budgets need no counting, so the plan needs no dataset
    plan = ab.build_plan(doc, Path("T2"), None, {"device": "cpu", "kd_images": "labelled"}, config=f)
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


# ---------------------------------------------------------------- option bounds in one place


def test_error_messages_cap_long_reprs():
    """A value is shown by options.short_repr: one line, at most 60 characters, cheap for a huge structure."""
    import time

    assert options.short_repr("x" * 500).startswith("'xxx") and len(options.short_repr("x" * 500)) <= 60
    assert options.short_repr(3) == "3" and options.short_repr("a\nb") == "'a\\nb'"
    nested = [1] * 10
    for _ in range(8):  # 10**9 elements, shared: what an alias-expanded YAML list looks like
        nested = [nested] * 10
    t0 = time.perf_counter()
    s = options.short_repr(nested)  # rendering it whole would take hours; 2 s leaves room for a loaded CI machine
    assert time.perf_counter() - t0 < 2.0 and len(s) <= 60 and "\n" not in s
    for bad, check in ((nested, options.check_weights), (nested, options.check_epochs), ("x" * 10_000, options.check_lr),
                       ({"k" * 500: 1}, lambda v: options.check_model_kwargs("unet", v))):
        with pytest.raises(OptionError) as e:
            check(bad)
        assert len(str(e.value)) < 200 and "\n" not in str(e.value), str(e.value)


def test_integer_options_are_bounded_for_torch_and_numpy():
    assert options.check_seed(2**63 - 1) == 2**63 - 1 and options.check_seed(3.0) == 3
    for bad, msg in ((-1, r"seed must be >= 0, got -1$"), (2**63, r"seed must be <= 2\*\*63 - 1 \(int64\)"),
                     (float("inf"), "seed must be an integer, got inf"), (True, "seed must be an integer"),
                     ("7", "seed must be an integer, got '7'"), (1.5, "seed must be an integer, got 1.5")):
        with pytest.raises(OptionError, match=msg):
            options.check_seed(bad)
    with pytest.raises(OptionError, match=r"width must be <= 1024, got 5000"):
        options.check_width(5000)
    with pytest.raises(OptionError, match=r"unknown in_channels 2; valid: 1, 3"):
        build_config(TeacherConfig, overrides={"in_channels": 2})
    # the largest seed trains: every seed derived from it stays within what torch takes
    from medkd.train.loop import epoch_loader

    cfg = build_config(TeacherConfig, overrides={"seed": 2**63 - 1, "batch_size": 2})
    loader, gen = epoch_loader(list(range(4)), cfg, epoch=3)
    assert len(list(loader)) == 2


def test_model_kwargs_are_checked_against_the_constructor():
    from medkd.models import model_options

    assert model_options("unet") == [] and "depth" in model_options("transunet")
    with pytest.raises(OptionError, match=r"model_kwargs: unet takes no option\(s\) \['foo'\]; valid: none$"):
        build_config(TeacherConfig, overrides={"model_kwargs": {"foo": 1}})
    with pytest.raises(OptionError, match=r"transunet takes no option\(s\) \['deep'\]; valid: depth, heads, "):
        build_config(TeacherConfig, overrides={"arch": "transunet", "model_kwargs": {"deep": 2}})
    with pytest.raises(OptionError, match=r"transunet refuses \{'depth': inf\} \(TypeError"):
        build_config(TeacherConfig, overrides={"arch": "transunet", "model_kwargs": {"depth": float("inf")}})
    cfg = build_config(TeacherConfig, overrides={"arch": "transunet", "width": 64, "model_kwargs": {"depth": 2}})
    assert cfg.model_kwargs == {"depth": 2}  # checked on the meta device: no memory for the 64-wide model


def test_yaml_alias_bombs_are_refused_before_they_are_built(tmp_path):
    import time

    from medkd.yamlfile import MAX_YAML_NODES, expanded_size, load_yaml

    f = tmp_path / "c.yaml"
    f.write_text("a: &x [1, 2, 3]\nb: [*x, *x]\nc: {<<: {k: 1}}\n")  # ordinary aliases still load
    assert load_yaml(f) == {"a": [1, 2, 3], "b": [[1, 2, 3], [1, 2, 3]], "c": {"k": 1}}
    assert expanded_size(yaml.compose(f.read_text()), 100) == 22  # each alias counted as its anchor's nodes
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    f.write_text(f"epochs: [{', '.join(items)}]\n")
    t0 = time.perf_counter()
    with pytest.raises(MedkdError, match=rf"c\.yaml: YAML too large: more than {MAX_YAML_NODES:,} values"):
        load_yaml(f)
    assert time.perf_counter() - t0 < 0.5
    f.write_text("- &c [1, *c]\n")  # an alias inside its own anchor: infinite once expanded
    with pytest.raises(MedkdError, match="contains itself"):
        load_yaml(f)
    f.write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")
    with pytest.raises(MedkdError, match=r"c\.yaml: invalid YAML \(nested too deeply\)"):
        load_yaml(f)


def test_resume_holds_the_run_identity_fixed():
    """--resume compares the same identity an ablation uses: options a run predates count at their defaults, options
    that do not act are not compared, and what may change on resume (epochs) or is no identity (device) is free."""
    from medkd.config import resume_differences

    old = {"kind": "student", **to_dict(DistillConfig(teacher="T", fraction=1.0))}
    old.pop("ema_decay")  # a run recorded before the option existed trained without EMA
    old["weights"] = {k: v for k, v in old["weights"].items() if k != "pl"}
    same = {"kind": "student", **to_dict(DistillConfig(teacher="T", fraction=1.0, subset_seed=3, epochs=40,
                                                       device="cpu", teacher_outputs="live"))}
    assert resume_differences(DistillConfig, old, same) == []  # subset_seed draws nothing at fraction 1
    other = {"kind": "student", **to_dict(DistillConfig(teacher="T", fraction=1.0, ema_decay=0.99))}
    assert resume_differences(DistillConfig, old, other) == ["ema_decay=0.0 there, 0.99 now"]
    teacher = {"kind": "teacher", **to_dict(TeacherConfig(width=8))}
    assert resume_differences(TeacherConfig, {"kind": "teacher", **to_dict(TeacherConfig(width=4))}, teacher) == [
        "width=4 there, 8 now"]
