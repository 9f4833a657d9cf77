"""MONAI bundles as teachers (medkd/teachers/bundle.py) and external teachers as ``medkd evaluate`` rows.

The bundle is real: written by ``monai.bundle.init_bundle`` and ``ckpt_export`` around a 2-D
``monai.networks.nets.UNet`` trained for 150 steps on the tiny dataset's raw NIfTI cases through the bundle's own
preprocessing, its test case held out (:mod:`monai_bundle`). So the bridge has real work (another CT window and
output range, another spacing: 32 px prepared slices -> the bundle's 48 px), the equality tests compare medkd's
teacher with MONAI's own transforms and network, and ``evaluate`` scores a teacher that segments something.
The bad inputs (a bundle without ``network_def``, weights of another network, a multi-class output without
``--teacher-label`` ...) are in tests/test_bad_inputs.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import monai_bundle
from medkd.data.prepared import PreparedData
from medkd.errors import MedkdError
from medkd.rundir import file_sha256
from medkd.teachers import TeacherRequest, detect_kind, open_teacher
from medkd.teachers.bundle import read_bundle
from conftest import run_copy
from conftest import cli as _cli


@pytest.fixture(scope="module")
def bundle(tiny_raw, tiny_data, tmp_path_factory) -> Path:
    """The trained bundle (with its TorchScript), not trained on the tiny dataset's test cases."""
    test_ids = PreparedData(tiny_data).case_ids("test")
    return monai_bundle.build_bundle(tmp_path_factory.mktemp("bundles") / "spleen", tiny_raw, exclude=test_ids)


def _listing(folder: Path):
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bundle_is_read_as_data(bundle):
    assert detect_kind(bundle) == "bundle"
    spec = read_bundle(bundle)
    assert spec.network_def["_target_"] == "monai.networks.nets.unet.UNet" and not spec.torchscript
    assert spec.classes == ["background", "spleen"] and spec.activation == "softmax"
    # "a_min": "@a_min" is resolved from the config; the arguments are MONAI's, as the config gives them
    assert spec.intensity == [("ScaleIntensityRange", {"a_min": monai_bundle.A_MIN, "a_max": monai_bundle.A_MAX,
                                                       "b_min": monai_bundle.B_MIN, "b_max": monai_bundle.B_MAX,
                                                       "clip": True})]
    assert spec.pixdim == list(monai_bundle.PIXDIM[:2]) and spec.multiple == 16 and spec.size is None
    assert spec.files == ["configs/metadata.json", "configs/inference.json", "models/model.pt"]


@pytest.mark.parametrize("how", sorted(monai_bundle.HOSTILE_TARGETS))
def test_hostile_targets_are_never_called(how, tiny_data, tmp_path):
    """A ``_target_`` named inside ``monai.networks`` that resolves to a function (directly or by walking a module's
    attributes to ``os``), top-level or nested in a network's arguments, is refused before MONAI builds anything:
    the file it would create never appears. (The one-line messages: tests/test_bad_inputs.py.)"""
    root = monai_bundle.broken(how)(tmp_path)
    with pytest.raises(MedkdError, match=r"is not a network of monai\.networks or torch\.nn"):
        open_teacher(root, TeacherRequest(), PreparedData(tiny_data))
    assert not monai_bundle.called_marker(tmp_path, how).exists()


def test_targets_are_rewritten_to_the_class_they_resolve_to(tmp_path):
    """What is checked is what MONAI builds: every ``_target_`` (a short name, a re-export) becomes the full name of
    the class it resolves to, nested components included."""
    root = monai_bundle.build_bundle(tmp_path / "b", torchscript=False)
    monai_bundle._edit_config(root, lambda d: d["network_def"].update(
        _target_="monai.networks.nets.UNet", act={"_target_": "torch.nn.ReLU"}))
    spec = read_bundle(root)
    assert spec.network_def["_target_"] == "monai.networks.nets.unet.UNet"
    assert spec.network_def["act"]["_target_"] == "torch.nn.modules.activation.ReLU"
    assert spec.network_name == "UNet"


def _monai_reference(bundle: Path, x: torch.Tensor, window, size: int) -> torch.Tensor:
    """The bundle run by MONAI itself on prepared slices ``x (B, 1, S, S)``: back to HU, its ``ScaleIntensityRanged``
    instantiated from its own config, resized to ``size``, its network with its weights, the spleen's logit
    ``z_1 - z_0`` (two softmax channels), resized back."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    scale = parser.get_parsed_content("preprocessing#transforms#4")
    assert type(scale).__name__ == "ScaleIntensityRanged"
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    net.eval()
    lo, hi = window
    v = torch.as_tensor(scale({"image": x * (hi - lo) + lo})["image"])
    v = F.interpolate(v, size=(size, size), mode="bilinear", align_corners=False)
    with torch.no_grad():
        z = net(v)
    logit = z[:, 1:2] - z[:, 0:1]
    return F.interpolate(logit, size=x.shape[-2:], mode="bilinear", align_corners=False, antialias=True)


def test_bundle_teacher_equals_monai_and_its_torchscript(bundle, tiny_data, tmp_path):
    """Plumbing equality: medkd's bundle teacher on prepared slices equals MONAI's own pipeline, and the bundle's
    TorchScript (``ckpt_export``, used when ``network_def`` is absent) equals its ``network_def`` + weights."""
    data = PreparedData(tiny_data)
    teacher = open_teacher(bundle, TeacherRequest(in_channels=1), data)
    assert teacher.kind == "bundle" and teacher.taps_ok and teacher.details["label"] == 1
    assert teacher.files == {f: file_sha256(bundle / f) for f in
                             ("configs/inference.json", "configs/metadata.json", "models/model.pt")}
    assert teacher.cache_key_file == bundle / "models" / "model.pt"
    assert Path(tiny_data) in teacher.cache_root.parents  # the disk cache lives in DATA, never in the bundle
    size = teacher.details["input_size"]
    assert size == 48  # 32 px at 8.7 mm (float32 in the manifest: 8.7000002861) brought to the bundle's 5.8 mm
    x = torch.from_numpy(np.array(data.image(data.case_ids("test")[0]), dtype=np.float32))[:, None]
    with torch.no_grad():
        got = teacher.module(x)
    window = data.settings["window"]
    ref = _monai_reference(bundle, x, window, size)
    assert got.shape == (x.shape[0], 1, 32, 32)
    assert type(got) is torch.Tensor  # MONAI's transforms return MetaTensors: none flows on into targets and losses
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert (got > 0).any()  # the trained teacher finds spleen on its held-out case

    ts_only = tmp_path / "ts-only"
    shutil.copytree(bundle, ts_only)
    doc = json.loads((ts_only / "configs" / "inference.json").read_text())
    del doc["network_def"]
    (ts_only / "configs" / "inference.json").write_text(json.dumps(doc))
    ts = open_teacher(ts_only, TeacherRequest(in_channels=1), data)
    assert ts.details["format"] == "torchscript" and not ts.taps_ok and "models/model.ts" in ts.files
    with torch.no_grad():
        torch.testing.assert_close(ts.module(x), got, atol=1e-5, rtol=1e-5)


def test_distill_from_bundle_and_evaluate_it_beside_the_student(bundle, tiny_data, tmp_path):
    """End to end through the CLI: a PMD-only student from the bundle, then one table with the bundle as a row."""
    before = _listing(bundle)
    student = tmp_path / "s"
    r = _cli(["distill", tiny_data, "-o", student, "--teacher", bundle, "--scales", "none", "--pmd", "--epochs", "1",
              "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    assert f"teacher: bundle {bundle} (in_channels 1, network UNet" in r.stderr
    rec = json.loads((student / "summary.json").read_text())["teacher_source"]
    assert rec["kind"] == "bundle" and rec["files"]["models/model.pt"] == file_sha256(bundle / "models" / "model.pt")
    assert rec["details"]["classes"] == ["background", "spleen"] and "features" in rec["terms"]

    r = _cli(["evaluate", bundle, student, "--data", tiny_data, "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    t_row, s_row = json.loads(r.stdout)["runs"]
    net = torch.load(bundle / "models" / "model.pt", weights_only=True)
    assert t_row["kind"] == "teacher" and t_row["arch"] == "bundle:UNet" and t_row["run"] == str(bundle)
    assert t_row["params"] == sum(v.numel() for k, v in net.items() if "running" not in k and "num_batches" not in k)
    assert t_row["flops"] > 0 and t_row["latency_ms"] > 0 and t_row["checkpoint"] == "model.pt"
    assert t_row["n_cases"] == s_row["n_cases"] and [c["id"] for c in t_row["per_case"]] == [
        c["id"] for c in s_row["per_case"]]
    assert t_row["teacher_source"]["kind"] == "bundle" and t_row["resolution"] == "native"
    assert any("does not know which cases it was trained on" in w for w in t_row["warnings"])
    assert t_row["dice"] > 0.3  # a teacher worth distilling (held-out case; 0.58 when written)
    assert s_row["kind"] == "student" and (student / "eval-test.json").is_file()
    assert _listing(bundle) == before  # nothing written into the user's bundle (no eval or postprocessing file)


def test_feature_terms_from_a_bundle_network(bundle, tiny_data, tmp_path):
    """``--teacher-taps`` name module paths of the bundle's own network; its TorchScript has none to hook."""
    r = _cli(["distill", tiny_data, "-o", tmp_path / "s", "--teacher", bundle, "--scales", "enc", "--teacher-taps",
              "enc=model.0", "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 0, r.stderr
    history = [json.loads(line) for line in (tmp_path / "s" / "history.jsonl").read_text().splitlines()]
    assert "enc" in json.dumps(history[0])


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_teacher_row_scores_like_its_run(fmt, tiny_teacher, tiny_data, tmp_path):
    """``evaluate RUN.ts|RUN.onnx RUN``: the tiny teacher exported (``medkd export``) and opened as a file teacher
    (medkd's own metadata describes it) gets the run's own Dice on the same cases; ONNX adds ONNX Runtime's
    latency and, not being a torch graph, reports no parameter count."""
    from medkd.teachers import KINDS

    if fmt not in KINDS:
        pytest.skip(f"the {fmt} teacher kind is not in this checkout")
    model = tmp_path / ("teacher.ts" if fmt == "torchscript" else "teacher.onnx")
    run = run_copy(tiny_teacher, tmp_path)  # export and evaluate write into a run: never into the shared one
    r = _cli(["export", run, "-o", model, "--format", fmt])
    assert r.exit_code == 0, r.stderr
    r = _cli(["evaluate", model, run, "--data", tiny_data, "--json", "--device", "cpu", "--no-postprocessing"])
    assert r.exit_code == 0, r.stderr
    f_row, r_row = json.loads(r.stdout)["runs"]  # stdout is the one JSON document
    assert f_row["teacher_source"]["kind"] == fmt and f_row["kind"] == "teacher" and r_row["kind"] == "teacher"
    # the external row says what it opened, in the one line distill prints, on stderr; the run row prints none
    said = [line for line in r.stderr.splitlines() if line.startswith("teacher: ")]
    assert len(said) == 1 and said[0].startswith(f"teacher: {fmt} {model} (") and "model_kind teacher" in said[0]
    assert f_row["dice"] == pytest.approx(r_row["dice"], abs=1e-6 if fmt == "torchscript" else 1e-3)
    assert [c["id"] for c in f_row["per_case"]] == [c["id"] for c in r_row["per_case"]]
    if fmt == "onnx":
        assert f_row["params"] is None and f_row["flops"] is None and f_row["latency_ms_ort"] > 0
    else:
        assert f_row["params"] == r_row["params"] and "latency_ms_ort" not in f_row


def test_exported_student_row_is_a_student(tiny_data, tmp_path):
    """An exported student given to evaluate is a ``student`` row (its metadata's kind), not a teacher."""
    from rich.console import Console

    from medkd.config import DistillConfig, build_config
    from medkd.distill.run import distill

    cfg = build_config(DistillConfig, overrides=dict(student="s1", student_width=4, epochs=1, batch_size=4,
                                                     device="cpu", seed=0, scales=[], pmd=False))
    distill(tiny_data, tmp_path / "student", cfg, console=Console(stderr=True, quiet=True))
    model = tmp_path / "student.onnx"
    r = _cli(["export", tmp_path / "student", "-o", model])
    assert r.exit_code == 0, r.stderr
    r = _cli(["evaluate", model, "--data", tiny_data, "--json", "--device", "cpu", "--no-postprocessing"])
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)
    assert row["kind"] == "student" and row["teacher_source"]["details"]["model_kind"] == "student"
    assert f"{model}: external onnx student;" in r.stderr


def test_per_image_zscore_bundle(tiny_data, tmp_path):
    """A bundle normalising each image by its own statistics (``NormalizeIntensityd``, ``nonzero``): MONAI's
    transform runs slice by slice on the prepared values (a z-score needs no Hounsfield units back). Random weights:
    this checks plumbing only."""
    from monai.transforms import NormalizeIntensity

    transforms = [{"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
                  {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True}]
    root = monai_bundle.build_bundle(tmp_path / "z", transforms=transforms, torchscript=False)
    data = PreparedData(tiny_data)
    teacher = open_teacher(root, TeacherRequest(in_channels=1), data)
    assert teacher.details["intensity"] == [{"transform": "NormalizeIntensity", "nonzero": True}]
    assert teacher.details["input_size"] == 32  # no Spacingd: the prepared size, a multiple of 16
    x = torch.from_numpy(np.array(data.image(data.case_ids("test")[0]), dtype=np.float32))[:, None]
    net = teacher.module.net
    with torch.no_grad():
        z = net(torch.stack([torch.as_tensor(NormalizeIntensity(nonzero=True)(s)) for s in x]))
        torch.testing.assert_close(teacher.module(x), z[:, 1:2] - z[:, 0:1], atol=1e-5, rtol=1e-5)


def test_per_case_teacher_row(tiny_data, tmp_path):
    """A teacher that gives per-case probabilities (no slice model: saved probabilities, a 3-D nnU-Net) is scored
    from them: the labels themselves as probabilities score Dice 1 on the prepared grid, and a volume of another
    shape is one line naming the case."""
    from medkd.teachers import KINDS, register_kind
    from medkd.teachers.base import LoadedTeacher

    data = PreparedData(tiny_data)
    shape = {"ok": None}

    def load(path, request, data):
        def probs(cid):
            p = np.asarray(data.label(cid), dtype=np.float32)
            return p if shape["ok"] is None else p[:, :-1]
        return LoadedTeacher(kind="labels", source=path, module=None, in_channels=1, files={}, details={},
                             taps_ok=False, default_taps=None, cache_key_file=None, cache_root=None, case_probs=probs)

    folder = tmp_path / "label-probs"
    folder.mkdir()
    (folder / "labels.marker").write_text("")
    register_kind("labels", lambda p: (Path(p) / "labels.marker").is_file(), load, expects="a test folder")
    try:
        r = _cli(["evaluate", folder, "--data", tiny_data, "--json", "--resolution", "prepared"])
        assert r.exit_code == 0, r.stderr
        row = json.loads(r.stdout)
        assert row["dice"] == 1.0 and row["params"] is None and row["latency_ms"] is None
        assert row["arch"] == "labels:label-probs" and row["checkpoint"] == "label-probs"
        shape["ok"] = False
        r = _cli(["evaluate", folder, "--data", tiny_data, "--resolution", "prepared"])
        assert r.exit_code == 1
        err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and re.match(r"^error: .*label-probs: case '[^']+': probabilities of shape "
                                          r"\[\d+, 31, 32\], expected the prepared \[\d+, 32, 32\]$", err[0]), r.stderr
    finally:
        KINDS.pop("labels", None)


# ------------------------------------------------------------------------------------- folders of predicted masks


def test_mask_folder_rows(tiny_raw, tiny_teacher, tiny_data, tmp_path):
    """A folder of predicted masks (``<case>.nii.gz`` in the source geometry, as nnU-Net writes them) is a row:
    the labels themselves score Dice 1 on both grids; ``medkd predict``'s own output for the teacher scores what
    the run scores; several labels need ``--teacher-label``; a mask of another shape is one line naming the file."""
    import nibabel as nib

    data = PreparedData(tiny_data)
    test_ids = data.case_ids("test")
    labels = tmp_path / "labels"
    labels.mkdir()
    for cid in test_ids:
        img = nib.load(str(tiny_raw / "labelsTr" / f"{cid}.nii.gz"))
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj) * 2).astype(np.uint8), img.affine), labels / f"{cid}.nii.gz")
    for resolution in ("native", "prepared"):
        r = _cli(["evaluate", labels, "--data", tiny_data, "--json", "--resolution", resolution,
                  "--teacher-label", "2"])
        assert r.exit_code == 0, r.stderr
        row = json.loads(r.stdout)
        assert row["dice"] == 1.0 and row["kind"] == "masks" and row["params"] is None, resolution
    assert sorted(p.name for p in labels.iterdir()) == [f"{c}.nii.gz" for c in sorted(test_ids)]  # nothing written

    r = _cli(["evaluate", labels, "--data", tiny_data])  # labels {2}: one foreground label, found without a choice
    assert r.exit_code == 0, r.stderr
    img = nib.load(str(labels / f"{test_ids[0]}.nii.gz"))
    arr = np.asarray(img.dataobj).copy()
    arr[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(arr, img.affine), labels / f"{test_ids[0]}.nii.gz")
    r = _cli(["evaluate", labels, "--data", tiny_data])
    assert r.exit_code == 1 and re.search(r"^error: .*\.nii\.gz: mask holds labels 1, 2: choose the foreground with "
                                          r"--teacher-label N$", r.stderr, re.M), r.stderr
    nib.save(nib.Nifti1Image(arr.astype(np.float32) * 0.4, img.affine), labels / f"{test_ids[0]}.nii.gz")
    r = _cli(["evaluate", labels, "--data", tiny_data])
    assert r.exit_code == 1 and re.search(r"^error: .*\.nii\.gz: holds non-integer values, not a mask of labels",
                                          r.stderr, re.M), r.stderr
    nib.save(nib.Nifti1Image(arr[:-1], img.affine), labels / f"{test_ids[0]}.nii.gz")
    r = _cli(["evaluate", labels, "--data", tiny_data, "--teacher-label", "2"])
    assert r.exit_code == 1 and re.search(r"^error: .*\.nii\.gz: mask shape \[47, 48, \d+\] differs from the image "
                                          r"of case '[^']+' \[48, 48, \d+\]$", r.stderr, re.M), r.stderr

    preds = tmp_path / "predicted"
    run = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, run)
    images = [tiny_raw / "imagesTr" / f"{cid}.nii.gz" for cid in test_ids]
    r = _cli(["predict", run, *images, "-o", preds, "--no-postprocessing"])
    assert r.exit_code == 0, r.stderr
    r = _cli(["evaluate", preds, run, "--data", tiny_data, "--json", "--no-postprocessing"])
    assert r.exit_code == 0, r.stderr
    m_row, r_row = json.loads(r.stdout)["runs"]
    assert m_row["dice"] == pytest.approx(r_row["dice"], abs=1e-9) and m_row["n_cases"] == r_row["n_cases"]


def test_sidecar_overrides_a_preprocessing_medkd_cannot_reproduce(tiny_data, tmp_path):
    """A bundle whose preprocessing has a ``CropForegroundd`` is refused, naming the transform; with a sidecar
    ``BUNDLE.json`` beside it (the documented override) the sidecar's intensity and spacing are used instead and
    recorded (its hash among the teacher's files). Random weights: plumbing only."""
    root = monai_bundle.broken("crop-foreground")(tmp_path)
    data = PreparedData(tiny_data)
    with pytest.raises(MedkdError, match=r"preprocessing#transforms#3 \(CropForegroundd\).*describe it in "
                                        r"bundle-crop-foreground\.json beside the bundle$"):
        open_teacher(root, TeacherRequest(in_channels=1), data)
    sidecar = tmp_path / "bundle-crop-foreground.json"
    sidecar.write_text(json.dumps({"intensity": {"normalise": "window", "low": -100, "high": 200}, "size": 48}))
    teacher = open_teacher(root, TeacherRequest(in_channels=1), data)
    assert teacher.details["intensity"] == {"sidecar": sidecar.name, "normalise": "window", "low": -100.0,
                                            "high": 200.0}
    assert teacher.details["input_size"] == 48
    assert teacher.files["../bundle-crop-foreground.json"] == file_sha256(sidecar)
    x = torch.from_numpy(np.array(data.image(data.case_ids("test")[0]), dtype=np.float32))[:, None]
    lo, hi = data.settings["window"]
    v = ((x * (hi - lo) + lo).clamp(-100, 200) + 100) / 300
    v = F.interpolate(v, size=(48, 48), mode="bilinear", align_corners=False)
    with torch.no_grad():
        z = teacher.module.net(v)
        ref = F.interpolate(z[:, 1:2] - z[:, 0:1], size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        torch.testing.assert_close(teacher.module(x), ref, atol=1e-5, rtol=1e-5)
    sidecar.write_text(json.dumps({"intensity": {"normalise": "window", "low": -100, "high": 200}, "pixdim": 1}))
    with pytest.raises(MedkdError, match=r"bundle-crop-foreground\.json: unknown field\(s\) pixdim; valid: intensity, "
                                        r"spacing, size$"):
        open_teacher(root, TeacherRequest(in_channels=1), data)
