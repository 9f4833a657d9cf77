"""nnU-Net v2 model folders as teachers (medkd/teachers/nnunet.py), on a REAL model folder made by nnU-Net's own
commands and trainer (tests/nnunet_teacher.py): its MSD converter, ``nnUNetv2_plan_and_preprocess -c 2d`` and its
``nnUNetTrainer`` for one short epoch, on 6 thick-slice phantom cases (22-49 s on 2 shared cores, once per run).

``MEDKD_SLOW_TESTS=1`` also runs the full-length build (one epoch of 250 iterations and nnU-Net's validation, as
``nnUNetv2_train -tr nnUNetTrainer_1epoch``) and checks the teacher a student is distilled from segments.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")

import nnunet_teacher  # noqa: E402  (tests/ is on sys.path)
from medkd.data.prepared import PreparedData  # noqa: E402
from medkd.data.preprocess import PreprocessSettings, preprocess, resize_slices  # noqa: E402
from medkd.errors import MedkdError  # noqa: E402
from medkd.rundir import file_sha256  # noqa: E402
from medkd.teachers import TeacherRequest, detect_kind, open_teacher  # noqa: E402
from medkd.teachers import nnunet as nn_kind  # noqa: E402
from conftest import cli as _cli, one_error as _one_error

PMD_ONLY = ["--scales", "none", "--pmd", "--student-width", "4", "--epochs", "1", "--batch-size", "4", "--device",
            "cpu", "--seed", "3", "--teacher-outputs", "live", "--json"]


@pytest.fixture(scope="module")
def nnunet_build(tmp_path_factory):
    """``(model folder, nnU-Net's working folder)``: 6 phantom cases, one epoch of 30 iterations."""
    out = tmp_path_factory.mktemp("nnunet")
    with contextlib.redirect_stdout(io.StringIO()):
        folder = nnunet_teacher.build(None, out, cases=6, iterations=30, validate=False)
    return folder, out


@pytest.fixture(scope="module")
def nnunet_folder(nnunet_build) -> Path:
    return nnunet_build[0]


def _prepare(nnunet_build, tmp_path_factory, size: int) -> Path:
    out = tmp_path_factory.mktemp("nnprep") / "data"
    preprocess(nnunet_build[1] / "phantom", out, PreprocessSettings(size=size, test_fraction=0.2, val_fraction=0.2,
                                                                    seed=0))
    return out


@pytest.fixture(scope="module")
def nn_data(nnunet_build, tmp_path_factory) -> Path:
    """The teacher's own phantom cases prepared by medkd at 32 px (nnU-Net saw them at 48 px)."""
    return _prepare(nnunet_build, tmp_path_factory, 32)


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


# -------------------------------------------------------------------------------------------------- loading
def test_detected_and_recorded(nnunet_folder, nn_data):
    assert detect_kind(nnunet_folder) == "nnunet"
    t = open_teacher(nnunet_folder, TeacherRequest(in_channels=1, device="cpu"), PreparedData(nn_data))
    rec = t.record()
    ckpt = nnunet_folder / "fold_0" / "checkpoint_final.pth"
    assert rec["kind"] == "nnunet" and rec["files"] == {
        "dataset.json": file_sha256(nnunet_folder / "dataset.json"),
        "fold_0/checkpoint_final.pth": file_sha256(ckpt), "plans.json": file_sha256(nnunet_folder / "plans.json")}
    d = rec["details"]
    assert (d["fold"], d["checkpoint"], d["configuration"], d["trainer"], d["label"]) == (
        "0", "checkpoint_final.pth", "2d", "nnUNetTrainer", 1)
    assert d["classes"] == {"1": "spleen"} and d["normalization"] == ["CTNormalization"]
    assert "features" in rec["terms"] and t.cache_key_file == ckpt
    assert Path(t.cache_root).parent == Path(nn_data) / "teacher-cache"  # never inside the user's model folder
    assert not t.module.training and not any(p.requires_grad for p in t.module.parameters())


def _nnunet_probabilities(folder: Path, case: dict, size: int, mirroring: bool = False) -> np.ndarray:
    """nnU-Net's own prediction of a source case (its reader, preprocessing, sliding window; mirroring as asked),
    the foreground probability brought to the prepared grid as medkd brings a label there."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    with nn_kind.weights_only_loads(), contextlib.redirect_stdout(io.StringIO()):
        predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=mirroring, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(folder), ("0",), "checkpoint_final.pth")
        image, props = SimpleITKIO().read_images([case["source"]])
        _, probs = predictor.predict_single_npy_array(image, props, None, None, True)
    p = probs[1].transpose(2, 1, 0).astype(np.float32)  # SimpleITK (z, y, x) -> the file's voxel order (x, y, z)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(p, np.asarray(case["affine"])))
    return resize_slices(np.moveaxis(np.asarray(canonical.dataobj), 2, 0), size, is_label=False)


def _logits_both_ways(folder: Path, data: PreparedData, n_cases: int = 3):
    """Our module's logits on the prepared slices, and nnU-Net's own per-case prediction as logits on that grid."""
    t = open_teacher(folder, TeacherRequest(in_channels=1, device="cpu"), data)
    ours, ref = [], []
    for case in data.cases[:n_cases]:
        x = torch.tensor(np.asarray(data.image(case["id"]), dtype=np.float32))[:, None]
        with torch.no_grad():
            logits = t.module(x)
        assert logits.shape == (x.shape[0], 1, data.size, data.size)
        ours.append(logits[:, 0].numpy())
        p = np.clip(_nnunet_probabilities(folder, case, data.size), 1e-6, 1 - 1e-6)
        ref.append(np.log(p) - np.log1p(-p))
    return t, np.concatenate(ours), np.concatenate(ref)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def test_slices_on_nnunets_grid_answer_exactly_like_nnunet(nnunet_build, nnunet_folder, tmp_path_factory):
    """Prepared at nnU-Net's own 48 px: medkd's window -> HU -> nnU-Net's CTNormalization (its clip lies inside the
    window) and the orientation give nnU-Net's own prediction of the source case."""
    data = PreparedData(_prepare(nnunet_build, tmp_path_factory, 48))
    t, ours, ref = _logits_both_ways(nnunet_folder, data)
    assert t.details["input_size"] == 48 and t.details["orientation"] == {"flip": [True, True], "transpose": True}
    diff = np.abs(np.clip(ours, -10, 10) - np.clip(ref, -10, 10))  # nnU-Net's probabilities saturate past that
    assert diff.max() < 0.25 and diff.mean() < 0.01, (diff.max(), diff.mean())  # its output is stored in float16


def test_slices_resized_to_nnunets_spacing_and_back(nnunet_folder, nn_data):
    """Prepared at 32 px (8.7 mm pixels): resized to nnU-Net's 5.8 mm (48 px) and back, close to nnU-Net's own
    prediction brought to that grid; a wrong orientation is far from it."""
    t, ours, ref = _logits_both_ways(nnunet_folder, PreparedData(nn_data))
    assert t.details["input_size"] == 48
    right = _corr(ours, ref)
    assert right > 0.8, right  # 0.89 with the fixture's seed
    for wrong in (ours[:, ::-1], ours[:, :, ::-1], ours.transpose(0, 2, 1)):
        assert _corr(wrong, ref) < right - 0.1, (right, _corr(wrong, ref))  # 0.64, 0.46, 0.22


# ---------------------------------------------------------------------------------------------- bad inputs
def _written_by_trainer(trainer_class, folder: Path, dest: Path, labels=None, configuration: str = "2d") -> Path:
    """A model folder written by nnU-Net's own trainer class (its network, its ``save_checkpoint``) on the trained
    folder's plans, with ``labels`` in its dataset.json (None: the same). Needs nnU-Net's environment set."""
    dest.mkdir()
    shutil.copy(folder / "plans.json", dest / "plans.json")
    ds = json.loads((folder / "dataset.json").read_text())
    ds["labels"] = labels or ds["labels"]
    (dest / "dataset.json").write_text(json.dumps(ds))
    plans = dict(json.loads((folder / "plans.json").read_text()), continue_training=False)  # as run_training does
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = trainer_class(plans, configuration, 0, ds, device=torch.device("cpu"))
        trainer.initialize()
        (dest / "fold_0").mkdir()
        trainer.save_checkpoint(str(dest / "fold_0" / "checkpoint_final.pth"))
    return dest


@pytest.fixture(scope="module")
def multiclass(nnunet_folder, nnunet_build, tmp_path_factory):
    """A 3-class model folder (a second foreground class, liver), untrained."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    with nnunet_teacher.nnunet_environment(nnunet_build[1]):
        return _written_by_trainer(nnUNetTrainer, nnunet_folder, tmp_path_factory.mktemp("multi") / "m",
                                   {"background": 0, "spleen": 1, "liver": 2})


def test_a_trainer_variants_folder_loads_or_says_why(nnunet_folder, nnunet_build, nn_data, tmp_path):
    """nnunetv2 finds a trainer class other than nnUNetTrainer by importing all its trainer modules (timm and so
    torchvision too): where that works the folder loads, else (PyPI's torchvision beside a CPU torch) one line."""
    from nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs import nnUNetTrainer_1epoch

    with nnunet_teacher.nnunet_environment(nnunet_build[1]):
        folder = _written_by_trainer(nnUNetTrainer_1epoch, nnunet_folder, tmp_path / "v")
    try:
        t = open_teacher(folder, TeacherRequest(in_channels=1, device="cpu"), PreparedData(nn_data))
    except MedkdError as e:
        assert "\n" not in str(e) and "could not build trainer nnUNetTrainer_1epoch's network" in str(e), e
        assert "torchvision" in str(e)
    else:
        assert t.details["trainer"] == "nnUNetTrainer_1epoch"


def test_multiclass_needs_a_label_then_gives_its_logit(multiclass, nn_data, tmp_path):
    r = _cli(["distill", nn_data, "-o", tmp_path / "s", "--teacher", multiclass, *PMD_ONLY])
    assert r.exit_code == 1
    line = _one_error(r)
    assert "--teacher-label" in line and "1 spleen, 2 liver" in line, line
    t = open_teacher(multiclass, TeacherRequest(in_channels=1, label=2, device="cpu"), PreparedData(nn_data))
    assert t.details["label"] == 2 and t.details["classes"] == {1: "spleen", 2: "liver"}
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        z = t.module(x)
        out = t.module.net(t.module.intensity(torch.nn.functional.interpolate(x, size=48, mode="bilinear")))
    p = torch.softmax(out, 1)[:, 2:3]
    assert z.shape == (2, 1, 32, 32) and torch.isfinite(z).all() and p.shape == (2, 1, 48, 48)


@pytest.fixture(scope="module")
def folder_3d(nnunet_folder, nnunet_build, tmp_path_factory) -> Path:
    """A 3d_fullres model folder: nnU-Net's preprocessing of that configuration, its trainer's network and
    checkpoint (untrained)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    nnunet_teacher._run(nnunet_build[1], "nnUNetv2_preprocess", "-d", str(nnunet_teacher.DATASET_ID), "-c",
                        "3d_fullres", "-np", "1")
    with nnunet_teacher.nnunet_environment(nnunet_build[1]):
        return _written_by_trainer(nnUNetTrainer, nnunet_folder, tmp_path_factory.mktemp("m3d") / "m",
                                   configuration="3d_fullres")


def test_a_3d_model_gives_per_case_probabilities_like_nnunets_own(folder_3d, nn_data):
    """Per case: nnU-Net's preprocessing and sliding window on the source image, the class probability brought to
    the prepared slices as a label is; equal to nnU-Net's own prediction of the file (its reader) brought there."""
    data = PreparedData(nn_data)
    t = open_teacher(folder_3d, TeacherRequest(in_channels=1, device="cpu"), data)
    assert t.module is None and t.case_probs is not None and t.terms() == ["pmd", "cwd", "pseudo_label"]
    assert t.details["configuration"] == "3d_fullres" and t.details["label"] == 1
    case = data.cases[0]
    p = t.case_probs(case["id"])
    assert p.shape == tuple(data.expected_shape(case["id"], "lbl")) and p.dtype == np.float32
    ref = _nnunet_probabilities(folder_3d, case, data.size, mirroring=True)  # nnUNetv2_predict's default
    assert p.std() > 0.05 and np.abs(p - ref).max() < 1e-4, (p.std(), np.abs(p - ref).max())  # 0.16, 0.0


def test_distill_and_evaluate_with_a_3d_model(folder_3d, nn_data, tmp_path):
    """A 3-D teacher's per-case probabilities are computed once into its store (under the prepared data, keyed by
    the model's files); a second distill on it computes none and trains the same."""
    doc = json.loads(_run_ok(["distill", nn_data, "-o", tmp_path / "s", "--teacher", folder_3d, *PMD_ONLY]))
    out = doc["teacher_outputs"]
    assert doc["teacher_source"]["kind"] == "nnunet" and out["mode"] == "disk", out
    assert "live does not apply" in out["reason"]  # PMD_ONLY asks for live
    root = Path(out["cache_root"])
    assert root.parent.parent == Path(nn_data) / "teacher-cache" and root.parent.name.startswith("nnunet-")
    n = len(list(root.glob("*.npy")))
    assert n >= 2 and f"{n} of {n} case(s) computed now" in out["reason"]
    again = json.loads(_run_ok(["distill", nn_data, "-o", tmp_path / "s2", "--teacher", folder_3d, *PMD_ONLY[:-3],
                                "--teacher-outputs", "auto", "--json"]))
    assert again["teacher_outputs"]["mode"] == "disk" and f"0 of {n} case(s)" in again["teacher_outputs"]["reason"]
    hist = [[{k: v for k, v in json.loads(line).items() if k != "seconds"}
             for line in (tmp_path / r / "history.jsonl").read_text().splitlines()] for r in ("s", "s2")]
    assert hist[0] == hist[1] and again["best_val_dice"] == doc["best_val_dice"]
    r = _cli(["distill", nn_data, "-o", tmp_path / "f", "--teacher", folder_3d, *PMD_ONLY[2:], "--scales", "enc",
              "--teacher-taps", "enc=encoder.stages.2"])
    assert r.exit_code == 1 and "no modules to tap" in _one_error(r)
    ev = json.loads(_run_ok(["evaluate", tmp_path / "s", folder_3d, "--data", nn_data, "--split", "test", "--json"]))
    assert len(ev["runs"]) == 2


def _drop_configuration(folder: Path, dest: Path) -> Path:
    _copy(folder, dest)
    plans = json.loads((dest / "plans.json").read_text())
    del plans["configurations"]["2d"]
    (dest / "plans.json").write_text(json.dumps(plans))
    return dest


def _other_architecture(folder: Path, multi: Path, dest: Path) -> Path:
    """The trained folder with the 3-class checkpoint in its fold: weights of another network."""
    _copy(folder, dest)
    shutil.copy(multi / "fold_0" / "checkpoint_final.pth", dest / "fold_0" / "checkpoint_final.pth")
    return dest


@pytest.mark.parametrize("case, extra, pattern", [
    ("missing_fold", ["--teacher-fold", "3"], r"--teacher-fold 3: no fold_3 with checkpoint_final\.pth; folds with "
                                              r"it: 0$"),
    ("missing_checkpoint", ["--teacher-checkpoint", "checkpoint_typo.pth"],
     r"fold_0/checkpoint_typo\.pth: checkpoint not found .*fold_0 has: checkpoint_best\.pth, checkpoint_final\.pth"),
    ("no_configuration", [], r"plans\.json: no configuration '2d' \(the checkpoint's\); the plans have 3d_fullres$"),
    ("other_architecture", [], r"checkpoint_final\.pth: its weights do not fit the network its plans describe "
                               r"\(trainer nnUNetTrainer, configuration 2d: decoder\.seg_layers\.0\.weight is "
                               r"\[3, \d+, 1, 1\] in the checkpoint, \[2, \d+, 1, 1\] in the network "
                               r"\(\+\d+ more\)\)$"),
])
def test_bad_nnunet_teacher_is_one_line(case, extra, pattern, nnunet_folder, multiclass, nn_data, tmp_path):
    import re

    folder = {"missing_fold": lambda: nnunet_folder, "missing_checkpoint": lambda: nnunet_folder,
              "no_configuration": lambda: _drop_configuration(nnunet_folder, tmp_path / "m"),
              "other_architecture": lambda: _other_architecture(nnunet_folder, multiclass, tmp_path / "m")}[case]()
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*")}
    r = _cli(["distill", nn_data, "-o", tmp_path / "s", "--teacher", folder, *PMD_ONLY, *extra])
    assert r.exit_code == 1, r.stderr
    assert re.search(pattern, _one_error(r)), r.stderr
    assert not (tmp_path / "s").exists() and {p: p.stat().st_mtime_ns for p in folder.rglob("*")} == before


def test_missing_nnunetv2_names_the_extra(nnunet_folder, nn_data, monkeypatch):
    monkeypatch.setitem(sys.modules, "nnunetv2", None)  # what an environment without the extra gives an import
    with pytest.raises(MedkdError, match=r"needs nnunetv2 \(pip install 'medkd\[nnunet\]'\)"):
        nn_kind.load(nnunet_folder, TeacherRequest(in_channels=1, device="cpu"), PreparedData(nn_data))


def test_a_pickled_object_in_the_checkpoint_is_refused(nnunet_folder, nn_data, tmp_path):
    """Files are data: a checkpoint that needs more than tensors, plain values and numpy scalars never unpickles,
    not even inside nnU-Net's own ``torch.load(weights_only=False)``."""
    folder = _copy(nnunet_folder, tmp_path / "m")
    ckpt = folder / "fold_0" / "checkpoint_final.pth"
    doc = torch.load(ckpt, weights_only=False)
    doc["init_args"]["extra"] = Path("/tmp")  # a pickled object: loading it means calling pathlib's code
    torch.save(doc, ckpt)
    with pytest.raises(MedkdError, match=r"refused, not a checkpoint medkd can load weights-only \(Unsupported "
                                         r"global: GLOBAL pathlib"):
        nn_kind.load(folder, TeacherRequest(in_channels=1, device="cpu"), PreparedData(nn_data))


# ---------------------------------------------------------------------------------------------- end to end
def test_distill_from_nnunet_then_export_onnx(nnunet_folder, nn_data, tmp_path):
    """``medkd distill DATA --teacher NNUNET_FOLDER --scales none --pmd`` (and a feature scale on one of nnU-Net's
    module paths), then the student exports to ONNX and runs in ONNX Runtime."""
    doc = json.loads(_run_ok(["distill", nn_data, "-o", tmp_path / "s", "--teacher", nnunet_folder, *PMD_ONLY]))
    src = doc["teacher_source"]
    assert src["kind"] == "nnunet" and src["details"]["configuration"] == "2d" and doc["pmd"] is True
    feat = json.loads(_run_ok(["distill", nn_data, "-o", tmp_path / "f", "--teacher", nnunet_folder,
                               *PMD_ONLY[2:], "--scales", "enc", "--teacher-taps", "enc=encoder.stages.2"]))
    assert feat["scales"] == ["enc"] and feat["teacher_source"]["kind"] == "nnunet"
    _run_ok(["export", tmp_path / "s", "-o", tmp_path / "s.onnx"])
    case = PreparedData(nn_data).cases[0]["source"]
    _run_ok(["predict", tmp_path / "s.onnx", case, "-o", tmp_path / "pred"])
    assert any((tmp_path / "pred").iterdir())


def _run_ok(args) -> str:
    r = _cli(args)
    assert r.exit_code == 0, r.stderr
    return r.stdout


@pytest.mark.skipif(not os.environ.get("MEDKD_SLOW_TESTS"), reason="full nnU-Net build: MEDKD_SLOW_TESTS=1")
def test_full_length_nnunet_teacher_segments(tmp_path):
    """nnUNetTrainer_1epoch's length (250 iterations) and nnU-Net's validation; the teacher, seen through medkd's
    slices, finds the spleen on the prepared validation cases."""
    folder = nnunet_teacher.build(None, tmp_path / "nn", cases=8)
    assert (folder / "fold_0" / "validation" / "summary.json").is_file()
    data = tmp_path / "data"
    preprocess(tmp_path / "nn" / "phantom", data, PreprocessSettings(size=48, seed=0))
    pd = PreparedData(data)
    t = open_teacher(folder, TeacherRequest(in_channels=1, device="cpu"), pd)
    inter = total = 0.0
    for cid in pd.case_ids("val") + pd.case_ids("test"):
        x = torch.tensor(np.asarray(pd.image(cid), dtype=np.float32))[:, None]
        with torch.no_grad():
            m = (t.module(x)[:, 0] > 0).numpy()
        y = np.asarray(pd.label(cid)) > 0
        inter, total = inter + (m & y).sum(), total + m.sum() + y.sum()
    assert 2 * inter / total > 0.5
