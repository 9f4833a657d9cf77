"""``medkd evaluate``: the result dict (Evaluate JSON contract), its numbers, the CLI and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.metrics import case_metrics

CONTRACT_KEYS = {"run", "split", "n_cases", "dice", "iou", "recall", "precision", "hd95", "pooled", "per_case",
                 "params", "flops", "latency_ms", "device"}
EXTRA_KEYS = {"dice_std", "iou_std", "recall_std", "precision_std", "hd95_std", "surface_dice", "n_empty", "kind",
              "arch", "checkpoint_mb", "tolerance_mm"}
CASE_KEYS = {"id", "dice", "iou", "recall", "precision", "hd95", "gt_empty", "pred_empty", "surface_dice"}

runner = CliRunner()


@pytest.fixture(scope="module")
def run_a(tiny_teacher, tmp_path_factory) -> Path:
    """A private copy of the teacher run (evaluate writes eval-<split>.json into the run folder)."""
    dst = tmp_path_factory.mktemp("eval") / "teacher_a"
    shutil.copytree(tiny_teacher, dst)
    return dst


@pytest.fixture(scope="module")
def run_b(run_a) -> Path:
    dst = run_a.parent / "teacher_b"
    shutil.copytree(run_a, dst)
    return dst


@pytest.fixture(scope="module")
def train_result(run_a, tiny_data):
    from medkd.evaluate import evaluate_run

    return evaluate_run(run_a, tiny_data, split="train", device="cpu", resolution="prepared", tolerance_mm=2.0)


def _independent_masks(run: Path, data_dir: Path, split: str):
    """Predict each case of ``split`` with plain torch (whole volume in one batch), no medkd.infer."""
    from medkd.data.prepared import PreparedData
    from medkd.checkpoint import load_model_from_run

    model, _ = load_model_from_run(run)
    data = PreparedData(data_dir)
    out = {}
    with torch.no_grad():
        for cid in data.case_ids(split):
            x = torch.from_numpy(np.array(data.image(cid), dtype=np.float32))[:, None]  # (Z, 1, S, S)
            seg = model(x)[0]  # teacher: (seg, recon)
            out[cid] = (seg[:, 0].numpy() > 0, np.asarray(data.label(cid)) > 0, data.case(cid)["prepared_spacing"])
    return out


def _monai_surface(pred: np.ndarray, gt: np.ndarray, spacing, tol_mm: float):
    """HD95 (mm) and surface Dice at ``tol_mm`` of two 3D masks, computed by MONAI."""
    import warnings

    from monai.metrics import HausdorffDistanceMetric, compute_surface_dice

    yp = torch.from_numpy(pred)[None, None].float()  # (1, 1, Z, H, W)
    yt = torch.from_numpy(gt)[None, None].float()
    sp = [float(v) for v in spacing]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(yp, yt, spacing=sp)
        nsd = compute_surface_dice(yp, yt, class_thresholds=[tol_mm], include_background=True, spacing=sp)
    return float(hd), float(nsd)


def test_result_schema_and_saved_json(train_result, run_a, tiny_data):
    r = train_result
    assert CONTRACT_KEYS | EXTRA_KEYS <= set(r)
    assert set(r["pooled"]) == {"dice", "iou", "recall", "precision"}
    assert r["split"] == "train" and r["run"] == str(run_a) and r["resolution"] == "prepared"
    assert r["kind"] == "teacher" and r["arch"] == "unet" and r["device"] == "cpu"
    assert r["n_cases"] == len(r["per_case"]) == 4
    for c in r["per_case"]:
        assert CASE_KEYS <= set(c)
        assert isinstance(c["gt_empty"], bool) and isinstance(c["pred_empty"], bool)
    assert r["params"] > 0 and r["flops"] > 0 and r["latency_ms"] > 0 and r["checkpoint_mb"] > 0
    saved = json.loads((run_a / "eval-train.json").read_text())
    assert saved == json.loads(json.dumps(r))
    json.dumps(r, allow_nan=False)  # NaN already mapped to null


def test_numbers_match_independent_recomputation(train_result, run_a, tiny_data):
    masks = _independent_masks(run_a, tiny_data, "train")
    by_id = {c["id"]: c for c in train_result["per_case"]}
    assert set(by_id) == set(masks)
    # per case: overlap by hand (numpy counts), HD95 and surface Dice by MONAI, on the case's 3D volume
    n_checked = 0
    for cid, (pred, gt, spacing) in masks.items():
        got = by_id[cid]
        if not pred.any() or not gt.any():  # empty masks follow the documented policy (tested in test_metrics)
            continue
        tp, fp, fn = int((pred & gt).sum()), int((pred & ~gt).sum()), int((~pred & gt).sum())
        assert got["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
        assert got["iou"] == pytest.approx(tp / (tp + fp + fn))
        assert got["recall"] == pytest.approx(tp / (tp + fn))
        assert got["precision"] == pytest.approx(tp / (tp + fp))
        hd, nsd = _monai_surface(pred, gt, spacing, 2.0)
        assert got["hd95"] == pytest.approx(hd, rel=1e-5, abs=1e-4)  # MONAI's distances are float32
        assert got["surface_dice"] == pytest.approx(nsd, abs=1e-6)
        n_checked += 1
    assert n_checked >= 2
    # pooled = overlap from TP/FP/FN summed over every slice of every case
    tp = fp = fn = 0
    for pred, gt, _ in masks.values():
        for p, g in zip(pred, gt):
            tp += int((p & g).sum())
            fp += int((p & ~g).sum())
            fn += int((~p & g).sum())
    pooled = train_result["pooled"]
    assert pooled["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert pooled["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert pooled["recall"] == pytest.approx(tp / (tp + fn))
    assert pooled["precision"] == pytest.approx(tp / (tp + fp))
    # top-level = mean over cases
    dices = [c["dice"] for c in train_result["per_case"] if c["dice"] is not None]
    assert train_result["dice"] == pytest.approx(np.mean(dices))
    assert train_result["dice_std"] == pytest.approx(np.std(dices))


def test_cli_json_single_run(run_a, tiny_data):
    res = runner.invoke(app, ["evaluate", str(run_a), "--data", str(tiny_data), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)  # the whole of stdout is one JSON document
    assert CONTRACT_KEYS <= set(doc) and doc["split"] == "test"
    assert doc["resolution"] == "native"
    assert (run_a / "eval-test.json").is_file()
    assert "Dice" in res.stderr  # the table went to stderr


def test_cli_two_runs_json_order_and_table(run_a, run_b, tiny_data, tmp_path):
    res = runner.invoke(app, ["evaluate", str(run_b), str(run_a), "--data", str(tiny_data), "--json", "-q"])
    assert res.exit_code == 0, res.stderr
    doc = json.loads(res.stdout)
    assert [r["run"] for r in doc["runs"]] == [str(run_b), str(run_a)]
    assert res.stderr == ""  # --quiet
    ov = tmp_path / "ov"
    res = runner.invoke(app, ["evaluate", str(run_a), str(run_b), "--data", str(tiny_data), "--overlays", str(ov)])
    assert res.exit_code == 0, res.stderr
    assert "teacher_a" in res.stdout and "teacher_b" in res.stdout
    assert "ref" in res.stdout and "0.00%" in res.stdout  # same weights: no relative change
    pngs = sorted(ov.glob("*.png"))
    from medkd.data.prepared import PreparedData

    assert [p.stem for p in pngs] == sorted(PreparedData(tiny_data).case_ids("test"))
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _one_error_line(res) -> str:
    assert res.exit_code == 1, (res.stdout, res.stderr)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    assert res.stdout == ""
    return lines[0]


def test_bad_inputs(run_a, tiny_data, tiny_raw, tmp_path):
    no_ckpt = tmp_path / "empty_run"
    no_ckpt.mkdir()
    line = _one_error_line(runner.invoke(app, ["evaluate", str(no_ckpt), "--data", str(tiny_data)]))
    assert "empty_run" in line and "checkpoint" in line

    line = _one_error_line(runner.invoke(app, ["evaluate", str(run_a), "--data", str(tmp_path)]))
    assert "manifest.json" in line

    # a manifest without validation cases
    no_val = tmp_path / "no_val"
    no_val.mkdir()
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    for c in manifest["cases"]:
        c["split"] = "train" if c["split"] == "val" else c["split"]
    (no_val / "manifest.json").write_text(json.dumps(manifest))
    line = _one_error_line(runner.invoke(app, ["evaluate", str(run_a), "--data", str(no_val), "--split", "val"]))
    assert "'val'" in line

    from medkd.data.preprocess import PreprocessSettings, preprocess

    small = tmp_path / "data16"
    preprocess(tiny_raw, small, PreprocessSettings(size=16, test_fraction=0.2, val_fraction=0.2, seed=0))
    line = _one_error_line(runner.invoke(app, ["evaluate", str(run_a), "--data", str(small)]))
    assert "32x32" in line and "16x16" in line


def test_table_relative_change_and_formatters():
    from rich.console import Console

    from medkd.report.tables import eval_table, fmt_count, fmt_mean_std, fmt_pct, fmt_pct_change, pct_change

    assert fmt_pct_change(0.7555, 0.6997) == "+7.97%"
    assert fmt_pct_change(0.5, 0.6) == "-16.67%"
    assert fmt_pct_change(0.5, None) == fmt_pct_change(0.5, 0.0) == fmt_pct_change(None, 0.5) == "–"
    assert pct_change(float("nan"), 0.5) is None and pct_change(0.66, 0.6) == pytest.approx(10.0)
    assert fmt_pct(7.971) == "+7.97%" and fmt_pct(-0.001) == "0.00%" and fmt_pct(None) == "–"
    assert fmt_count(57297) == "57.3k" and fmt_count(43236036) == "43.24M"
    assert fmt_mean_std(0.5, None) == "0.5000"
    rows = [{"name": "base", "dice": 0.6997, "dice_std": 0.1, "split": "test", "n_cases": 3},
            {"name": "kd", "dice": 0.7555, "dice_std": 0.1, "pooled": {"dice": 0.8}},
            {"name": "kd", "dice": None}]
    console = Console(width=200, record=True)
    console.print(eval_table(rows))
    text = console.export_text()
    assert "+7.97%" in text and "ref" in text and "kd (2)" in text and "0.8000" in text


def test_pick_slices():
    from medkd.report.overlays import pick_slices

    gt = np.zeros((10, 8, 8), bool)
    gt[3, 2:4, 2:4] = True  # edge slice (small)
    gt[4, 1:7, 1:7] = True  # largest
    gt[5, 2:6, 2:6] = True
    pred = np.zeros_like(gt)
    pred[8, :2, :2] = True  # false positives on an empty-GT slice
    assert pick_slices(gt, [pred]) == [(3, "GT edge"), (4, "largest GT"), (8, "GT empty")]
    assert pick_slices(gt) == [(2, "GT empty"), (3, "GT edge"), (4, "largest GT")]  # nearest empty slice


# ----------------------------------------------------------------------------------- native-geometry metrics


class _Oracle(torch.nn.Module):
    """Returns the given ``(Z, S, S)`` mask as logits, batch after batch (as predict_volume calls it)."""

    def __init__(self, mask):
        super().__init__()
        self.logits = torch.from_numpy(np.where(np.asarray(mask) > 0, 10.0, -10.0).astype(np.float32))[:, None]
        self.z = 0
        self.in_channels = 1

    def forward(self, x):
        out = self.logits[self.z:self.z + len(x)]
        self.z += len(x)
        return out


@pytest.fixture(scope="module")
def native_size_data(tiny_raw, tmp_path_factory):
    """The tiny dataset prepared at its native in-plane size (48): the prepared label is the native one."""
    from medkd.data.preprocess import PreprocessSettings, preprocess

    out = tmp_path_factory.mktemp("prep48") / "data"
    preprocess(tiny_raw, out, PreprocessSettings(size=48, test_fraction=0.2, val_fraction=0.2, seed=0))
    return out


def test_native_dice_is_one_when_prediction_equals_label(native_size_data):
    """Every case (NIfTI and the DICOM series' reoriented grid) through the inverse mapping that predict uses:
    a prediction equal to the label scores Dice 1 and HD95 0 against the original label file."""
    from medkd.data.io import read_nifti
    from medkd.data.prepared import PreparedData
    from medkd.cases import case_masks

    data = PreparedData(native_size_data)
    for cid in [c["id"] for c in data.cases]:
        oracle = _Oracle(data.label(cid))
        pred, gt, spacing, _ = case_masks(oracle, data, cid, torch.device("cpu"), 1, batch_size=5)
        ref = read_nifti(Path(data.case(cid)["label_source"]))
        assert gt.shape == ref.array.shape and spacing == pytest.approx(ref.spacing)
        m = case_metrics(pred, gt, spacing)
        if m["gt_empty"]:
            assert m["pred_empty"]
            continue
        assert m["dice"] == 1.0 and m["hd95"] == 0.0, cid


def test_native_hd95_of_a_shifted_mask_is_the_shift_in_mm(tmp_path):
    """A one-voxel-thick plate shifted by 3 voxels along axis 0 of an anisotropic, non-RAS label file: every
    surface voxel is exactly 3 x 0.7 mm from the other plate, so HD95 = 2.1 mm (not 3 or 9 mm: the native
    spacing is taken per voxel axis)."""
    import nibabel as nib

    from medkd.data.prepared import PreparedData
    from medkd.cases import native_label

    lab = np.zeros((20, 12, 6), np.uint8)
    lab[5, 2:10, 1:5] = 1
    affine = np.diag([-0.7, 1.0, 3.0, 1.0])  # LAS-like: axis 0 flipped
    nib.save(nib.Nifti1Image(lab, affine), str(tmp_path / "lab.nii.gz"))
    manifest = {"schema": 1, "settings": {"size": 16}, "cases": [
        {"id": "c", "split": "test", "label_source": str(tmp_path / "lab.nii.gz"), "shape": [20, 12, 6],
         "canonical_shape": [20, 12, 6], "affine": affine.tolist()}]}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    gt, spacing = native_label(PreparedData(tmp_path), "c")
    assert spacing == pytest.approx((0.7, 1.0, 3.0))
    shifted = np.roll(gt, 3, axis=0)
    m = case_metrics(shifted, gt, spacing, tolerance_mm=2.0)
    assert m["hd95"] == pytest.approx(3 * 0.7)
    assert m["dice"] == 0.0 and m["surface_dice"] == 0.0
    assert case_metrics(shifted, gt, spacing, tolerance_mm=2.2)["surface_dice"] == 1.0


def test_native_json_with_postprocessing(run_b, tiny_data):
    """Default evaluate: native resolution, the postprocessing rule chosen on val and saved in the run,
    metrics with and without it, per-case tolerance never below the voxel size."""
    from medkd.evaluate import evaluate_run

    r = evaluate_run(run_b, tiny_data, split="test", device="cpu")
    assert r["resolution"] == "native"
    manifest = json.loads((tiny_data / "manifest.json").read_text())
    shapes = {c["id"]: c["shape"] for c in manifest["cases"]}
    for c in r["per_case"]:
        assert c["tolerance_mm"] >= 2.0
        assert c["tp"] + c["fn"] > 0 or c["gt_empty"]
        vox = np.prod(shapes[c["id"]])
        assert c["tp"] + c["fp"] + c["fn"] <= vox  # counted on the native grid
    pp = json.loads((run_b / "postprocessing.json").read_text())
    assert pp["chosen_on"] == "val" and pp["method"] == r["postprocessing"]["method"]
    assert pp["val_dice_with"] >= pp["val_dice_without"]
    post = r["postprocessed"]
    assert set(post) >= {"dice", "hd95", "pooled", "per_case"} and len(post["per_case"]) == r["n_cases"]
    if pp["method"] == "none":
        assert post["dice"] == r["dice"]
    # reused, not chosen again, while the checkpoint is unchanged
    mtime = (run_b / "postprocessing.json").stat().st_mtime_ns
    evaluate_run(run_b, tiny_data, split="test", device="cpu", save=False)
    assert (run_b / "postprocessing.json").stat().st_mtime_ns == mtime
    res = runner.invoke(app, ["evaluate", str(run_b), "--data", str(tiny_data), "--resolution", "bogus"])
    assert res.exit_code == 1 and "--resolution" in res.stderr
