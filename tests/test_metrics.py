"""Golden values and MONAI agreement for medkd.metrics."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric, compute_surface_dice
from scipy.ndimage import gaussian_filter
from torch import nn

from medkd.metrics import (
    EMPTY_MASK_POLICY,
    METRIC_KEYS,
    WORST_CASE,
    case_metrics,
    checkpoint_size_mb,
    confusion,
    count_params,
    flops_per_slice,
    latency_ms,
    slice_confusion_sum,
    summarize,
    to_jsonable,
    worst_case_distance,
)

nan = float("nan")


def same(a: float, b: float, tol: float = 1e-9) -> bool:
    """Equal within tol, with NaN == NaN."""
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return abs(a - b) <= tol


# ---------------------------------------------------------------------------------------------
# Hand-computed golden cases
# ---------------------------------------------------------------------------------------------

# 1x4x4: GT is a 2x2 square at columns 0-1, the prediction a 2x3 block at columns 1-3.
GT_2D = np.array([[1, 1, 0, 0],
                  [1, 1, 0, 0],
                  [0, 0, 0, 0],
                  [0, 0, 0, 0]], dtype=bool)[None]
PRED_2D = np.array([[0, 1, 1, 1],
                    [0, 1, 1, 1],
                    [0, 0, 0, 0],
                    [0, 0, 0, 0]], dtype=bool)[None]


def test_confusion_golden():
    assert confusion(PRED_2D, GT_2D) == {"tp": 2, "fp": 4, "fn": 2, "tn": 8}
    c = confusion(PRED_2D, GT_2D)
    assert all(type(v) is int for v in c.values())
    with pytest.raises(ValueError):
        confusion(PRED_2D, GT_2D[0])


def test_case_metrics_overlap_golden():
    m = case_metrics(PRED_2D, GT_2D, spacing=(1.0, 1.0, 1.0))
    # tp=2 fp=4 fn=2: dice 4/10, iou 2/8, recall 2/4, precision 2/6
    assert m["dice"] == pytest.approx(0.4)
    assert m["iou"] == pytest.approx(0.25)
    assert m["recall"] == pytest.approx(0.5)
    assert m["precision"] == pytest.approx(1 / 3)
    assert (m["tp"], m["fp"], m["fn"]) == (2, 4, 2)
    assert m["gt_empty"] is False and m["pred_empty"] is False
    assert set(m) == {*METRIC_KEYS, "gt_empty", "pred_empty", "tp", "fp", "fn"}


def test_case_metrics_surface_golden_anisotropic_in_plane():
    # One-voxel-thick masks: every voxel is a surface voxel. With x spacing 0.8 mm:
    # pred->gt distances: columns 1,2,3 -> 0, 0.8, 1.6 (twice each); gt->pred: columns 0,1 -> 0.8, 0.
    # 95th percentiles: pred->gt sorted [0,0,.8,.8,1.6,1.6] -> 1.6; gt->pred [0,0,.8,.8] -> 0.8.
    m = case_metrics(PRED_2D, GT_2D, spacing=(3.0, 0.5, 0.8), tolerance_mm=1.0)
    assert m["hd95"] == pytest.approx(1.6, abs=1e-5)
    # within 1.0 mm: 4 of 6 pred surface voxels, 4 of 4 gt surface voxels -> 8/10
    assert m["surface_dice"] == pytest.approx(0.8)


def test_hd95_golden_offset_along_z():
    # Two single voxels two slices apart with spacing (2.5, 0.8, 0.8): distance 2 * 2.5 = 5 mm.
    gt = np.zeros((4, 3, 3), bool)
    pred = np.zeros_like(gt)
    gt[0, 1, 1] = True
    pred[2, 1, 1] = True
    m = case_metrics(pred, gt, spacing=(2.5, 0.8, 0.8), tolerance_mm=2.0)
    assert m["hd95"] == pytest.approx(5.0, abs=1e-5)
    assert m["surface_dice"] == 0.0
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert case_metrics(pred, gt, spacing=(2.5, 0.8, 0.8), tolerance_mm=5.0)["surface_dice"] == 1.0
    # the same offset along x is 2 * 0.8 mm
    pred2 = np.zeros_like(gt)
    pred2[0, 1, 2] = True
    gt2 = np.zeros_like(gt)
    gt2[0, 1, 0] = True
    assert case_metrics(pred2, gt2, spacing=(2.5, 0.8, 0.8))["hd95"] == pytest.approx(1.6, abs=1e-5)


def test_hd95_golden_percentile_interpolation():
    # GT one voxel; prediction a 4-voxel line along x (spacing 0.8 mm).
    # pred->gt = [0, 0.8, 1.6, 2.4]; linear 95th percentile at position 0.95*3 = 2.85 -> 1.6 + 0.85*0.8 = 2.28.
    # gt->pred = [0]. HD95 = max(2.28, 0) = 2.28. Surface Dice at 2 mm: (3 + 1) / (4 + 1) = 0.8.
    gt = np.zeros((4, 3, 5), bool)
    pred = np.zeros_like(gt)
    gt[1, 1, 0] = True
    pred[1, 1, 0:4] = True
    m = case_metrics(pred, gt, spacing=(2.5, 0.8, 0.8), tolerance_mm=2.0)
    assert m["hd95"] == pytest.approx(2.28, abs=1e-5)
    assert m["surface_dice"] == pytest.approx(0.8)
    assert m["recall"] == 1.0 and m["precision"] == 0.25


def test_identical_masks_are_perfect():
    gt = np.zeros((3, 6, 6), bool)
    gt[1:3, 2:5, 1:4] = True
    m = case_metrics(gt, gt.copy(), spacing=(2.0, 1.0, 1.0))
    for k in ("dice", "iou", "recall", "precision", "surface_dice"):
        assert m[k] == 1.0
    assert m["hd95"] == 0.0


def test_2d_input_supported():
    m = case_metrics(PRED_2D[0], GT_2D[0], spacing=(0.5, 0.8), tolerance_mm=1.0)
    assert m["dice"] == pytest.approx(0.4)
    assert m["hd95"] == pytest.approx(1.6, abs=1e-5)


@pytest.mark.parametrize(
    "shape, spacing",
    [((4, 4), (1.0, 1.0, 1.0)), ((1, 4, 4), (1.0, 1.0)), ((1, 4, 4), (1.0, 0.0, 1.0))],
)
def test_case_metrics_rejects_bad_input(shape, spacing):
    gt = np.zeros((1, 4, 4), bool)
    with pytest.raises(ValueError):
        case_metrics(np.zeros(shape, bool), gt if len(shape) == 3 else gt[0], spacing=spacing)
    with pytest.raises(ValueError):
        case_metrics(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 5), bool), spacing=(1, 1, 1))


# ---------------------------------------------------------------------------------------------
# Empty-mask policy: all four combinations, every key
# ---------------------------------------------------------------------------------------------

SHAPE = (2, 4, 5)
SPACING = (2.5, 0.8, 0.8)
DIAG = math.sqrt((2 * 2.5) ** 2 + (4 * 0.8) ** 2 + (5 * 0.8) ** 2)


def _mask(voxels):
    m = np.zeros(SHAPE, bool)
    for v in voxels:
        m[v] = True
    return m


EMPTY_TABLE = [
    # (pred, gt, expected)
    (
        _mask([]), _mask([]),
        {"dice": nan, "iou": nan, "recall": nan, "precision": nan, "surface_dice": nan, "hd95": nan,
         "gt_empty": True, "pred_empty": True, "tp": 0, "fp": 0, "fn": 0},
    ),
    (
        _mask([(0, 1, 1), (1, 2, 3)]), _mask([]),
        {"dice": 0.0, "iou": 0.0, "recall": nan, "precision": 0.0, "surface_dice": 0.0, "hd95": DIAG,
         "gt_empty": True, "pred_empty": False, "tp": 0, "fp": 2, "fn": 0},
    ),
    (
        _mask([]), _mask([(0, 1, 1), (1, 2, 3), (1, 0, 0)]),
        {"dice": 0.0, "iou": 0.0, "recall": 0.0, "precision": nan, "surface_dice": 0.0, "hd95": DIAG,
         "gt_empty": False, "pred_empty": True, "tp": 0, "fp": 0, "fn": 3},
    ),
    (
        _mask([(0, 1, 1)]), _mask([(0, 1, 1)]),
        {"dice": 1.0, "iou": 1.0, "recall": 1.0, "precision": 1.0, "surface_dice": 1.0, "hd95": 0.0,
         "gt_empty": False, "pred_empty": False, "tp": 1, "fp": 0, "fn": 0},
    ),
]


@pytest.mark.parametrize("pred, gt, expected", EMPTY_TABLE, ids=["both", "gt-only-empty", "pred-only-empty", "none"])
def test_empty_mask_policy(pred, gt, expected):
    m = case_metrics(pred, gt, spacing=SPACING)
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert same(m[k], v), (k, m[k], v)
        if isinstance(v, float):
            assert type(m[k]) is float, k


def test_documented_empty_policy_table_matches_hand_values():
    """``EMPTY_MASK_POLICY`` (the documented table) against the hand-written expectations above, and the
    worst-case distance against the image diagonal computed by hand."""
    assert worst_case_distance(SHAPE, SPACING) == pytest.approx(DIAG)
    for _, _, expected in EMPTY_TABLE[:3]:
        policy = EMPTY_MASK_POLICY[(expected["gt_empty"], expected["pred_empty"])]
        for k, v in policy.items():
            if v is not None:  # None: computed from the masks
                assert same(DIAG if v == WORST_CASE else v, expected[k]), k


# ---------------------------------------------------------------------------------------------
# Agreement with MONAI on random 3D masks
# ---------------------------------------------------------------------------------------------


def _blob(rng: np.random.Generator, shape, sigma, thresh) -> np.ndarray:
    return gaussian_filter(rng.standard_normal(shape), sigma) > thresh


@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy.*:FutureWarning")
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_agrees_with_monai(seed):
    rng = np.random.default_rng(seed)
    shape = (8, 24, 20)
    gt = _blob(rng, shape, sigma=2.0, thresh=0.05)
    pred = gt ^ (_blob(rng, shape, sigma=1.5, thresh=0.12))  # perturb the GT
    assert gt.any() and pred.any()
    spacing = [(2.5, 0.8, 0.8), (1.0, 1.0, 1.0), (3.0, 0.7, 0.9), (5.0, 0.6, 0.6), (1.5, 1.2, 0.5)][seed]
    tol = 1.5

    m = case_metrics(pred, gt, spacing=spacing, tolerance_mm=tol)

    yp = torch.from_numpy(pred)[None, None].float()  # (1, 1, Z, H, W)
    yt = torch.from_numpy(gt)[None, None].float()
    dice = DiceMetric(include_background=True, reduction="none")(yp, yt)
    hd = HausdorffDistanceMetric(include_background=True, percentile=95, reduction="none")(yp, yt, spacing=spacing)
    nsd = compute_surface_dice(yp, yt, class_thresholds=[tol], include_background=True, spacing=spacing)

    assert m["dice"] == pytest.approx(float(dice), abs=1e-6)
    assert m["hd95"] == pytest.approx(float(hd), abs=1e-4)
    assert m["surface_dice"] == pytest.approx(float(nsd), abs=1e-6)
    # and hd95 is not trivially zero or the diagonal
    assert 0 < m["hd95"] < worst_case_distance(shape, spacing)


# ---------------------------------------------------------------------------------------------
# summarize, pooled sums, to_jsonable
# ---------------------------------------------------------------------------------------------


def _case(dice, iou, recall, precision, hd95, sd, tp, fp, fn, gt_empty=False, pred_empty=False):
    return {"dice": dice, "iou": iou, "recall": recall, "precision": precision, "hd95": hd95,
            "surface_dice": sd, "tp": tp, "fp": fp, "fn": fn, "gt_empty": gt_empty, "pred_empty": pred_empty}


def test_summarize_hand_example():
    cases = [
        _case(0.4, 0.25, 0.5, 1 / 3, 2.0, 0.8, tp=2, fp=4, fn=2),
        _case(nan, nan, nan, nan, nan, nan, tp=0, fp=0, fn=0, gt_empty=True, pred_empty=True),
        _case(0.0, 0.0, nan, 0.0, 10.0, 0.0, tp=0, fp=3, fn=0, gt_empty=True),
        _case(1.0, 1.0, 1.0, 1.0, 0.0, 1.0, tp=5, fp=0, fn=0),
    ]
    s = summarize(cases)
    assert s["n_cases"] == 4
    assert s["n_empty"] == 1
    # dice over the 3 defined cases: mean 1.4/3, population std
    mean = 1.4 / 3
    assert s["dice"] == pytest.approx(mean)
    assert s["dice_std"] == pytest.approx(math.sqrt(((0.4 - mean) ** 2 + mean**2 + (1 - mean) ** 2) / 3))
    # recall defined only for cases 1 and 4: mean 0.75, std 0.25
    assert s["recall"] == pytest.approx(0.75)
    assert s["recall_std"] == pytest.approx(0.25)
    assert s["precision"] == pytest.approx((1 / 3 + 0 + 1) / 3)
    assert s["hd95"] == pytest.approx(4.0)  # (2 + 10 + 0) / 3, the worst case counted
    assert s["surface_dice"] == pytest.approx(0.6)
    # pooled: tp=7 fp=7 fn=2
    assert s["pooled"]["dice"] == pytest.approx(14 / 23)
    assert s["pooled"]["iou"] == pytest.approx(7 / 16)
    assert s["pooled"]["recall"] == pytest.approx(7 / 9)
    assert s["pooled"]["precision"] == pytest.approx(0.5)
    for k in METRIC_KEYS:
        assert type(s[k]) is float and type(s[f"{k}_std"]) is float


def test_summarize_all_nan_and_empty_list():
    s = summarize([_case(nan, nan, nan, nan, nan, nan, 0, 0, 0, True, True)])
    assert math.isnan(s["dice"]) and math.isnan(s["dice_std"])
    assert s["n_empty"] == 1
    assert math.isnan(s["pooled"]["dice"])
    s0 = summarize([])
    assert s0["n_cases"] == 0 and math.isnan(s0["hd95"])


def test_summarize_from_case_metrics_end_to_end():
    per_case = [case_metrics(p, g, spacing=SPACING) for p, g, _ in EMPTY_TABLE]
    s = summarize(per_case)
    assert s["n_cases"] == 4 and s["n_empty"] == 1
    assert s["dice"] == pytest.approx(1 / 3)  # (0 + 0 + 1) / 3
    assert s["hd95"] == pytest.approx(2 * DIAG / 3)
    assert s["pooled"]["dice"] == pytest.approx(2 / (2 + 2 + 3))
    json.dumps(to_jsonable(s), allow_nan=False)


def test_pooled_sums_counts_over_every_slice_hand_example():
    """Two 2-slice "volumes" whose counts are written out by hand: pooled metrics use TP/FP/FN summed over all
    slices of all cases, which differs from the mean of the per-case Dice."""
    p1 = np.array([[[1, 1], [0, 0]], [[1, 0], [0, 0]]], bool)  # 3 predicted voxels
    g1 = np.array([[[1, 0], [0, 0]], [[1, 1], [0, 0]]], bool)  # 3 true voxels; TP 2, FP 1, FN 1
    p2 = np.array([[[0, 0], [0, 0]], [[0, 0], [1, 1]]], bool)  # TP 0, FP 2, FN 1
    g2 = np.array([[[0, 0], [0, 1]], [[0, 0], [0, 0]]], bool)
    by_slice = slice_confusion_sum([p1[0], p1[1], p2[0], p2[1]], [g1[0], g1[1], g2[0], g2[1]])
    assert by_slice == {"tp": 2, "fp": 3, "fn": 2, "tn": 9}
    s = summarize([case_metrics(p, g, spacing=(1, 1, 1)) for p, g in ((p1, g1), (p2, g2))])
    assert s["pooled"]["dice"] == pytest.approx(4 / 9)  # 2*2 / (2*2 + 3 + 2)
    assert s["pooled"]["iou"] == pytest.approx(2 / 7)
    assert s["pooled"]["recall"] == pytest.approx(2 / 4) and s["pooled"]["precision"] == pytest.approx(2 / 5)
    assert s["dice"] == pytest.approx((2 / 3 + 0.0) / 2)  # mean of per-case Dice, not the pooled one
    with pytest.raises(ValueError):
        slice_confusion_sum([PRED_2D], [])


def test_to_jsonable():
    obj = {
        "a": nan, "b": float("inf"), "c": -float("inf"), "d": 1.5, "e": [np.float32(2.0), np.nan, (3, np.int64(4))],
        "f": {"g": np.bool_(True), "h": None, "i": "x"}, "j": np.array([1.0, np.nan]), 5: torch.tensor(0.5),
    }
    out = to_jsonable(obj)
    assert out == {"a": None, "b": None, "c": None, "d": 1.5, "e": [2.0, None, [3, 4]],
                   "f": {"g": True, "h": None, "i": "x"}, "j": [1.0, None], "5": 0.5}
    assert type(out["e"][2][1]) is int and type(out["f"]["g"]) is bool
    json.dumps(out, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Efficiency
# ---------------------------------------------------------------------------------------------


class TwoHeads(nn.Module):
    """Returns a tuple, like a multi-task teacher."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y, y.sum(dim=1, keepdim=True)


def test_count_params():
    conv = nn.Conv2d(1, 2, 3)
    assert count_params(conv) == 20
    conv.bias.requires_grad_(False)
    assert count_params(conv, trainable_only=True) == 18
    assert count_params(conv) == 20


def test_flops_single_conv_matches_formula():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert flops_per_slice(conv, (3, 8, 8)) == 2 * 4 * 3 * 3 * 3 * 8 * 8
    conv1 = nn.Conv2d(1, 2, 3)  # no padding: 6x6 output
    assert flops_per_slice(conv1, (1, 8, 8)) == 2 * 2 * 1 * 3 * 3 * 6 * 6


def test_flops_tuple_output_and_mode_restored():
    m = TwoHeads().train()
    assert flops_per_slice(m, (1, 8, 8)) == 2 * 2 * 1 * 9 * 64
    assert m.training
    assert float(m.bn.num_batches_tracked) == 0  # ran in eval mode: BN stats untouched


def test_latency_positive_float():
    m = TwoHeads()
    t = latency_ms(m, (1, 16, 16), "cpu", warmup=1, repeats=3, batch=2)
    assert isinstance(t, float) and t > 0
    assert m.training
    with pytest.raises(ValueError):
        latency_ms(m, (1, 16, 16), "cpu", repeats=0)


def test_checkpoint_size_mb(tmp_path):
    p = tmp_path / "best.pt"
    p.write_bytes(b"\0" * 2**20)
    assert checkpoint_size_mb(p) == pytest.approx(1.0)
    torch.save(nn.Conv2d(1, 2, 3).state_dict(), tmp_path / "c.pt")
    assert 0 < checkpoint_size_mb(tmp_path / "c.pt") < 0.1
