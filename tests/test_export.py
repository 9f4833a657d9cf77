"""``medkd export`` and ``medkd predict MODEL.onnx``: metadata, self-verification, identical masks, refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

runner = CliRunner()


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else 2.0 * (a & b).sum() / s


@pytest.fixture(scope="module")
def student(tiny_data, tmp_path_factory) -> Path:
    """A 1-epoch no-KD S1 student (width 4)."""
    from rich.console import Console

    from medkd.config import DistillConfig, build_config
    from medkd.distill.run import distill

    cfg = build_config(DistillConfig, overrides=dict(student="s1", student_width=4, epochs=1, batch_size=4,
                                                     lr=3e-3, device="cpu", seed=0, scales=[], pmd=False))
    run = tmp_path_factory.mktemp("exp") / "student"
    distill(tiny_data, run, cfg, console=Console(stderr=True, quiet=True))
    return run


@pytest.fixture(scope="module")
def exported(student, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "s1.onnx"
    res = runner.invoke(app, ["export", str(student), "-o", str(out), "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["max_abs_diff"] <= doc["tolerance"] == 1e-3 and doc["slices"] > 1
    return out


def test_metadata_props_carry_the_recipe(exported, student, tiny_data):
    props = {p.key: p.value for p in onnx.load(str(exported)).metadata_props}
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    assert props["medkd.orientation"] == "RAS"
    assert int(props["medkd.input_channels"]) == 1 and int(props["medkd.prepared_size"]) == 32
    assert float(props["medkd.threshold"]) == 0.5 and int(props["medkd.label_value"]) == 1
    ct = json.loads(props["medkd.intensity"])["CT"]
    assert [ct["low"], ct["high"]] == manifest["settings"]["window"]
    assert json.loads(props["medkd.intensity"])["MR"]["percentiles"] == [0.5, 99.5]
    pp = json.loads(props["medkd.postprocessing"])
    assert pp["method"] == json.loads((student / "postprocessing.json").read_text())["method"]
    import hashlib

    assert props["medkd.run_config_sha256"] == hashlib.sha256((student / "config.yaml").read_bytes()).hexdigest()
    assert len(props["medkd.data_fingerprint"]) == 16
    assert json.loads(props["medkd.verification"])["max_abs_diff"] <= 1e-3
    for key in ("medkd.version", "medkd.spacing_policy", "medkd.kind", "medkd.arch"):
        assert props[key]
    onnx.checker.check_model(str(exported))
    # dynamic batch and spatial size
    m = onnx.load(str(exported))
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2] == "height" and dims[3] == "width"


def test_onnx_predict_equals_run_predict_without_the_run(exported, student, tiny_raw, tmp_path):
    """Same masks from the ONNX model (the run folder moved away) as from the run, NIfTI and DICOM inputs."""
    from medkd.predict import predict_paths

    inputs = [tiny_raw / "imagesTr" / "spleen_001.nii.gz", tiny_raw / "dicom" / "spleen_000"]
    ref = predict_paths(student, inputs, tmp_path / "ref", device="cpu")
    hidden = student.with_name("student_moved")
    shutil.move(str(student), str(hidden))
    try:
        res = runner.invoke(app, ["predict", str(exported), *map(str, inputs), "-o", str(tmp_path / "ort"), "--json"])
    finally:
        shutil.move(str(hidden), str(student))
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["engine"] == "onnxruntime" and len(doc["written"]) == 2 and ref.failed == []
    for w in ref.written:
        a = nib.load(w["seg"])
        b = nib.load(str(tmp_path / "ort" / Path(w["seg"]).name))
        np.testing.assert_allclose(a.affine, b.affine)
        assert a.shape == b.shape
        assert _dice(a.dataobj, b.dataobj) >= 0.999
        assert np.mean(np.asarray(a.dataobj) != np.asarray(b.dataobj)) < 1e-4


def test_torchscript_and_fp16_exports(student, tiny_raw, tmp_path):
    from medkd.export import export_run
    from medkd.exported import read_metadata
    from medkd.predict import predict_paths

    ts = export_run(student, tmp_path / "s1.pt", fmt="torchscript")
    assert ts.max_abs_diff <= 1e-5 and (tmp_path / "s1.pt.json").is_file()
    assert read_metadata(tmp_path / "s1.pt")["prepared_size"] == 32
    half = export_run(student, tmp_path / "s1-fp16.onnx", fp16=True)
    full = export_run(student, tmp_path / "s1.onnx")
    assert half.max_abs_diff <= half.tolerance and half.size_mb < 0.75 * full.size_mb
    nii = tiny_raw / "imagesTr" / "spleen_002.nii.gz"
    outs = {}
    for name in ("s1.pt", "s1-fp16.onnx"):
        res = predict_paths(tmp_path / name, [nii], tmp_path / name.replace(".", "_"))
        assert res.failed == [], res.failed
        outs[name] = np.asarray(nib.load(res.written[0]["seg"]).dataobj)
    ref = predict_paths(student, [nii], tmp_path / "ref", device="cpu")
    r = np.asarray(nib.load(ref.written[0]["seg"]).dataobj)
    assert _dice(outs["s1.pt"], r) >= 0.999 and _dice(outs["s1-fp16.onnx"], r) >= 0.99


def test_refusals_are_one_line(student, tmp_path, exported, monkeypatch):
    def one_line(res, *words, code=1):
        assert res.exit_code == code, (res.stdout, res.stderr)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
        for w in words:
            assert w in lines[0], lines[0]

    out = tmp_path / "x.onnx"
    # verification above the tolerance: refused, nothing written
    one_line(runner.invoke(app, ["export", str(student), "-o", str(out), "--fp16", "--tolerance", "1e-12"]),
             "verification failed", "tolerance")
    assert not out.exists() and not list(tmp_path.glob(".x.onnx*"))
    # existing file, bad format, missing run
    one_line(runner.invoke(app, ["export", str(student), "-o", str(exported)]), "already exists")
    one_line(runner.invoke(app, ["export", str(student), "-o", str(out), "--format", "tflite"]), "--format", code=2)
    one_line(runner.invoke(app, ["export", str(tmp_path / "nope"), "-o", str(out)]), "nope")
    # not a medkd model
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"not a model")
    one_line(runner.invoke(app, ["predict", str(bogus), str(tmp_path), "-o", str(tmp_path / "p")]), "bogus.onnx")
    # the extra missing: the message names it
    import importlib

    real = importlib.import_module

    def no_onnx(name, *a, **kw):
        if name.startswith("onnx"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(importlib, "import_module", no_onnx)
    one_line(runner.invoke(app, ["export", str(student), "-o", str(out)]), "medkd[deploy]")


def test_evaluate_reports_onnx_runtime_latency(student, exported, tiny_data):
    res = runner.invoke(app, ["evaluate", str(student), "--data", str(tiny_data), "--onnx", str(exported), "--json"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["latency_ms_ort"] > 0 and doc["latency_ms"] > 0 and doc["model_file"] == str(exported)
    assert "ORT ms" in res.stderr
    res = runner.invoke(app, ["evaluate", str(student), str(student), "--data", str(tiny_data), "--onnx", str(exported)])
    assert res.exit_code == 1 and "one model per run" in res.stderr


def test_transunet_teacher_exports_with_fixed_spatial_size(tiny_data, tmp_path):
    """TransUNet: the transformer fast path is bypassed for tracing; its position embeddings tie the graph to the
    prepared size, which export detects and records (spatial = fixed) instead of claiming a dynamic size."""
    from rich.console import Console

    from medkd.export import export_run
    from medkd.exported import OnnxModel
    from medkd.train.teacher import train_teacher
    from conftest import tiny_teacher_config

    run = tmp_path / "tu"
    train_teacher(tiny_data, run, tiny_teacher_config(arch="transunet", model_kwargs={"depth": 1, "heads": 2}),
                  console=Console(stderr=True, quiet=True))
    res = export_run(run, tmp_path / "tu.onnx")
    assert res.max_abs_diff <= 1e-3 and res.metadata["spatial"] == "fixed"
    m = OnnxModel(tmp_path / "tu.onnx")
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(tmp_path / "tu.onnx")).graph.input[0].type.tensor_type.shape.dim]
    assert dims[0] == "batch" and dims[2:] == [32, 32]
    assert m.metadata["spatial"] == "fixed"
