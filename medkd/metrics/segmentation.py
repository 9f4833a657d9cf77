"""Per-case segmentation metrics as plain dicts, plus their summary over a test split.

Every metric is computed on one case's binary volume (``(Z, H, W)`` or a 2D ``(H, W)`` slice);
``summarize`` turns the list of per-case dicts into the numbers that the Rich table, the evaluate
JSON and the plots are all rendered from (style habit 9).

Metrics
-------
- ``dice`` = 2TP / (2TP + FP + FN), ``iou`` = TP / (TP + FP + FN), ``recall`` = TP / (TP + FN),
  ``precision`` = TP / (TP + FP).
- ``hd95``: symmetric 95th-percentile Hausdorff distance in millimetres, MONAI's convention
  (``compute_hausdorff_distance(percentile=95)``): the 95th percentile (linear interpolation) of the
  distances from prediction-surface voxels to the ground-truth surface, likewise from ground truth to
  prediction, and the larger of the two. Surfaces are MONAI's mask edges; distances are Euclidean
  with the voxel ``spacing``.
- ``surface_dice``: normalised surface Dice (Nikolov et al., 2021, "Clinically applicable segmentation
  of head and neck anatomy for radiotherapy", arXiv:1809.04430) at ``tolerance_mm``, counted on edge
  voxels as in MONAI's ``compute_surface_dice``: the fraction of both surfaces lying within the
  tolerance of the other surface.

Empty-mask policy (the only one; see ``EMPTY_MASK_POLICY``)
-----------------------------------------------------------
case                       dice, iou   recall   precision   surface_dice   hd95       in means
-------------------------  ----------  -------  ----------  -------------  ---------  ---------------------------
both empty                 NaN         NaN      NaN         NaN            NaN        excluded; counted as n_empty
GT empty, prediction not   0           NaN      0           0              diagonal   yes (worst case)
prediction empty, GT not   0           0        NaN         0              diagonal   yes (worst case)
both non-empty             usual       usual    usual       usual          usual      yes

The overlap columns are exactly "0/0 is undefined (NaN)" applied to the formulas above. "diagonal" is
the worst possible distance inside the image, ``sqrt(sum((shape * spacing) ** 2))`` in mm
(``worst_case_distance``): a missed or hallucinated structure is never silently dropped from HD95.
NaN values are excluded from means (``np.nanmean``), never replaced.

Pooled metrics
--------------
``pooled`` (the reference study's convention) sums TP/FP/FN over every slice of every case and applies
the formulas once. Since a volume's counts are the sum of its slices' counts, pooling over slices
equals pooling over volumes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance

NAN = float("nan")

#: Percentile used for the robust Hausdorff distance.
HD_PERCENTILE = 95.0
#: Default surface-Dice tolerance in millimetres.
DEFAULT_TOLERANCE_MM = 2.0

#: Overlap metrics derived from TP/FP/FN (also the keys of ``pooled``).
OVERLAP_KEYS: tuple[str, ...] = ("dice", "iou", "recall", "precision")
#: Every per-case metric that ``summarize`` averages, in table order.
METRIC_KEYS: tuple[str, ...] = (*OVERLAP_KEYS, "hd95", "surface_dice")
#: The reference study's table columns (Table 4.2): what ``medkd ablate`` compares across settings.
STUDY_KEYS: tuple[str, ...] = (*OVERLAP_KEYS, "hd95")
#: Metrics where a lower value is better (distances in mm).
LOWER_IS_BETTER: frozenset = frozenset({"hd95"})
#: Per-case counts and empty-mask flags stored beside the metrics.
COUNT_KEYS: tuple[str, ...] = ("tp", "fp", "fn")

#: Marker in ``EMPTY_MASK_POLICY`` for "the image diagonal in mm" (``worst_case_distance``).
WORST_CASE = "diagonal"

#: The empty-mask policy as data: (gt_empty, pred_empty) -> value per metric.
#: ``None`` marks "the usual value" (both masks non-empty).
EMPTY_MASK_POLICY: dict[tuple[bool, bool], dict[str, Any]] = {
    (True, True): {
        "dice": NAN, "iou": NAN, "recall": NAN, "precision": NAN, "surface_dice": NAN, "hd95": NAN,
    },
    (True, False): {
        "dice": 0.0, "iou": 0.0, "recall": NAN, "precision": 0.0, "surface_dice": 0.0, "hd95": WORST_CASE,
    },
    (False, True): {
        "dice": 0.0, "iou": 0.0, "recall": 0.0, "precision": NAN, "surface_dice": 0.0, "hd95": WORST_CASE,
    },
    (False, False): {k: None for k in METRIC_KEYS},
}


def _as_bool(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x if x.dtype == bool else x != 0


def _ratio(num: float, den: float) -> float:
    """``num / den`` as a float, NaN when ``den == 0`` (undefined)."""
    return float(num) / float(den) if den else NAN


def confusion(pred: np.ndarray, gt: np.ndarray) -> dict[str, int]:
    """Voxel confusion counts of two binary masks.

    Args:
        pred: predicted mask, any shape; nonzero/True is foreground.
        gt: ground-truth mask, same shape as ``pred``.

    Returns:
        ``{"tp", "fp", "fn", "tn"}`` as Python ints.

    Raises:
        ValueError: if the shapes differ.
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p & ~g))
    fn = int(np.count_nonzero(~p & g))
    return {"tp": tp, "fp": fp, "fn": fn, "tn": int(p.size) - tp - fp - fn}


def overlap_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Dice, IoU, recall and precision from counts; a 0/0 ratio is NaN (see the module policy).

    Args:
        tp: true-positive voxels.
        fp: false-positive voxels.
        fn: false-negative voxels.

    Returns:
        ``{"dice", "iou", "recall", "precision"}`` as Python floats.
    """
    return {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "recall": _ratio(tp, tp + fn),
        "precision": _ratio(tp, tp + fp),
    }


def slice_confusion_sum(
    pred_slices: Iterable[np.ndarray], gt_slices: Iterable[np.ndarray]
) -> dict[str, int]:
    """Sum confusion counts over paired slices (or volumes).

    Pooling over slices equals pooling over volumes: a volume's counts are the sum of its slices'.

    Args:
        pred_slices: iterable of predicted masks, e.g. ``(H, W)`` slices.
        gt_slices: iterable of ground-truth masks, paired with ``pred_slices``.

    Returns:
        ``{"tp", "fp", "fn", "tn"}`` summed.

    Raises:
        ValueError: if the iterables differ in length or a pair differs in shape.
    """
    total = {"tp": 0, "fp": 0, "fn": 0, "tn": 0}
    sentinel = object()
    preds, gts = iter(pred_slices), iter(gt_slices)
    while True:
        p, g = next(preds, sentinel), next(gts, sentinel)
        if p is sentinel and g is sentinel:
            return total
        if p is sentinel or g is sentinel:
            raise ValueError("pred_slices and gt_slices have different lengths")
        for k, v in confusion(p, g).items():  # type: ignore[arg-type]
            total[k] += v


def worst_case_distance(shape: Sequence[int], spacing: Sequence[float]) -> float:
    """The image diagonal in mm, ``sqrt(sum((shape * spacing) ** 2))``: HD95 for a one-sided empty case.

    Args:
        shape: array shape, e.g. ``(Z, H, W)``.
        spacing: mm per axis, same order as ``shape``.

    Returns:
        The diagonal length in mm.
    """
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape, spacing))))


def surface_distances(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Distances between the mask surfaces, via MONAI's ``get_edge_surface_distance``.

    Args:
        pred: non-empty binary mask ``(Z, H, W)`` or ``(H, W)``.
        gt: non-empty binary mask, same shape.
        spacing: mm per axis, same order as the array axes.

    Returns:
        ``(pred_to_gt, gt_to_pred)``: float64 arrays of distances in mm, one per surface voxel of
        ``pred`` (resp. ``gt``) to the nearest surface voxel of the other mask.
    """
    with warnings.catch_warnings():
        # MONAI 1.5+ passes its own deprecated ``always_return_as_numpy`` argument internally.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        _, dists, _ = get_edge_surface_distance(
            torch.from_numpy(np.ascontiguousarray(pred)),
            torch.from_numpy(np.ascontiguousarray(gt)),
            distance_metric="euclidean",
            spacing=[float(s) for s in spacing],
            symmetric=True,
            warn_empty=False,
        )
    d_pg, d_gp = (np.asarray(d.cpu().numpy() if isinstance(d, torch.Tensor) else d, dtype=np.float64)
                  for d in dists)
    return d_pg, d_gp


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
) -> dict[str, Any]:
    """All metrics of one case, following the module's empty-mask policy.

    Args:
        pred: predicted binary mask ``(Z, H, W)`` or ``(H, W)``; nonzero/True is foreground.
        gt: ground-truth binary mask, same shape.
        spacing: voxel size in mm per axis, same order as the array axes (e.g. ``(z, y, x)``).
        tolerance_mm: surface-Dice tolerance in mm.

    Returns:
        ``{"dice", "iou", "recall", "precision", "hd95", "surface_dice"}`` (floats, NaN where
        undefined), ``"gt_empty"``, ``"pred_empty"`` (bools) and ``"tp"``, ``"fp"``, ``"fn"`` (ints).

    Raises:
        ValueError: if shapes differ, the arrays are not 2D/3D, or ``spacing`` has the wrong length
            or a non-positive entry.
    """
    p, g = _as_bool(pred), _as_bool(gt)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt shapes differ: {p.shape} vs {g.shape}")
    if p.ndim not in (2, 3):
        raise ValueError(f"expected a (Z, H, W) or (H, W) mask, got shape {p.shape}")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != p.ndim or any(not s > 0 for s in spacing):
        raise ValueError(f"spacing {spacing} does not fit a mask of shape {p.shape} (one positive value per axis)")

    counts = confusion(p, g)
    gt_empty, pred_empty = counts["tp"] + counts["fn"] == 0, counts["tp"] + counts["fp"] == 0
    out: dict[str, Any] = overlap_from_counts(counts["tp"], counts["fp"], counts["fn"])

    if gt_empty or pred_empty:
        policy = EMPTY_MASK_POLICY[(gt_empty, pred_empty)]
        hd95 = policy["hd95"]
        out["hd95"] = worst_case_distance(p.shape, spacing) if hd95 == WORST_CASE else hd95
        out["surface_dice"] = policy["surface_dice"]
    else:
        d_pg, d_gp = surface_distances(p, g, spacing)
        q = HD_PERCENTILE
        out["hd95"] = float(max(np.percentile(d_pg, q), np.percentile(d_gp, q)))
        within = np.count_nonzero(d_pg <= tolerance_mm) + np.count_nonzero(d_gp <= tolerance_mm)
        out["surface_dice"] = _ratio(within, d_pg.size + d_gp.size)

    out.update(gt_empty=bool(gt_empty), pred_empty=bool(pred_empty),
               tp=counts["tp"], fp=counts["fp"], fn=counts["fn"])
    return out


def _nan_stats(values: list[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return NAN, NAN
    return float(arr.mean()), float(arr.std(ddof=0))


def summarize(per_case: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Means over cases and pooled overlap metrics.

    Args:
        per_case: dicts from ``case_metrics`` (extra keys such as ``"id"`` are ignored).

    Returns:
        For each ``m`` in ``METRIC_KEYS``: ``m`` = mean over cases ignoring NaN, ``m_std`` = population
        standard deviation (``ddof=0``) ignoring NaN (both NaN when no case defines ``m``);
        ``n_cases``; ``n_empty`` (cases where both masks are empty); ``pooled`` = dice, iou, recall,
        precision from TP/FP/FN summed over all cases. Values are plain Python floats/ints; pass the
        result through ``to_jsonable`` before ``json.dumps``.
    """
    out: dict[str, Any] = {}
    for key in METRIC_KEYS:
        out[key], out[f"{key}_std"] = _nan_stats([float(c[key]) for c in per_case])
    out["n_cases"] = len(per_case)
    out["n_empty"] = sum(1 for c in per_case if c["gt_empty"] and c["pred_empty"])
    tp, fp, fn = (sum(int(c[k]) for c in per_case) for k in ("tp", "fp", "fn"))
    out["pooled"] = overlap_from_counts(tp, fp, fn)
    return out


def to_jsonable(obj: Any) -> Any:
    """Recursively convert to JSON-safe Python: NaN/inf -> ``None``, numpy/torch scalars -> Python,
    arrays and tuples -> lists, mapping keys -> ``str``.

    Args:
        obj: any nesting of dicts, lists, tuples, numbers, numpy/torch values and strings.

    Returns:
        An object that ``json.dumps(..., allow_nan=False)`` accepts.
    """
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return [to_jsonable(v) for v in obj.tolist()] if obj.ndim else to_jsonable(obj.item())
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj
