"""Overlay PNGs: a few representative slices per case, the input, the ground truth and each run's prediction.

One PNG per case (``<case>.png``), rows = slices, columns = input | ground truth | one per run. Predictions are
colour-coded against the ground truth: true positives green, false positives red, false negatives blue, so a
missed or hallucinated region is visible at a glance. Slices are shown in radiological convention (patient's
right on the left, anterior up) with the physical pixel aspect ratio.

Slices picked (:func:`pick_slices`): the slice with the largest ground-truth area, the slice at the edge of the
ground-truth extent (the end slice with the smaller area), and one slice with an empty ground truth if the case
has any (the one where the runs predict the most foreground, i.e. the worst false positives; ties go to the
slice nearest the structure).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

TP_RGB = (0.10, 0.85, 0.25)
FP_RGB = (0.95, 0.15, 0.15)
FN_RGB = (0.20, 0.45, 1.00)
GT_RGB = (1.00, 0.80, 0.10)
ALPHA = 0.55


def pick_slices(gt: np.ndarray, preds: Sequence[np.ndarray] = ()) -> List[Tuple[int, str]]:
    """Representative slice indices of a ``(Z, H, W)`` case.

    Args:
        gt: ground-truth mask ``(Z, H, W)``.
        preds: predicted masks, same shape, used to pick the empty-GT slice with the most false positives.

    Returns:
        ``[(z, reason), ...]`` (1-3 entries, distinct slices, in z order).
    """
    gt = np.asarray(gt) > 0
    area = gt.reshape(gt.shape[0], -1).sum(axis=1)
    picks: Dict[int, str] = {}
    fg = np.flatnonzero(area)
    if fg.size:
        picks[int(np.argmax(area))] = "largest GT"
        lo, hi = int(fg[0]), int(fg[-1])
        edge = lo if area[lo] <= area[hi] else hi
        picks.setdefault(edge, "GT edge")
    else:
        picks[gt.shape[0] // 2] = "middle (GT empty)"
    empty = np.flatnonzero(area == 0)
    if fg.size and empty.size:
        fp = np.zeros(gt.shape[0])
        for p in preds:
            fp += (np.asarray(p) > 0).reshape(gt.shape[0], -1).sum(axis=1)
        dist = np.min(np.abs(empty[:, None] - fg[None, :]), axis=1)
        # most predicted foreground first, then nearest to the structure
        z = int(empty[np.lexsort((dist, -fp[empty]))[0]])
        picks.setdefault(z, "GT empty")
    return sorted(picks.items())


def _display(sl: np.ndarray) -> np.ndarray:
    """``(X, Y)`` RAS slice -> display rows/cols: anterior up, patient's right on the left."""
    return np.asarray(sl).T[::-1, ::-1]


def _rgba(mask: np.ndarray, rgb: Tuple[float, float, float]) -> np.ndarray:
    out = np.zeros((*mask.shape, 4), dtype=np.float32)
    out[mask] = (*rgb, ALPHA)
    return out


def _error_rgba(pred: np.ndarray, gt: np.ndarray) -> np.ndarray:
    out = _rgba(pred & gt, TP_RGB)
    out[pred & ~gt] = (*FP_RGB, ALPHA)
    out[~pred & gt] = (*FN_RGB, ALPHA)
    return out


def _fmt(d: Any) -> str:
    return f"{d:.3f}" if isinstance(d, (int, float)) and not isinstance(d, bool) and np.isfinite(d) else "–"


def _slice_dice(pred: np.ndarray, gt: np.ndarray) -> str:
    tp, s = int((pred & gt).sum()), int(pred.sum() + gt.sum())
    return "both empty" if s == 0 else f"Dice {2 * tp / s:.3f}"


def render_case(
    path: Path,
    case_id: str,
    image: np.ndarray,
    gt: np.ndarray,
    runs: Sequence[Tuple[str, np.ndarray, Any]],
    spacing: Sequence[float],
    slices: Sequence[Tuple[int, str]] = (),
) -> Path:
    """Write one case's overlay PNG.

    Args:
        path: the PNG to write.
        case_id: shown in the title.
        image: ``(Z, X, Y)`` prepared image in [0, 1] (RAS, axial slices ``image[z]``).
        gt: ``(Z, X, Y)`` ground-truth mask.
        runs: ``(label, pred (Z, X, Y) mask, case Dice or None)`` per run.
        spacing: ``(z, x, y)`` mm of the arrays (for the pixel aspect ratio).
        slices: ``[(z, reason)]``; default :func:`pick_slices`.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    gt = np.asarray(gt) > 0
    preds = [np.asarray(p) > 0 for _, p, _ in runs]
    slices = list(slices) or pick_slices(gt, preds)
    ncol, nrow = 2 + len(runs), len(slices)
    aspect = float(spacing[2]) / float(spacing[1])  # display rows run along y, columns along x
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.6 * nrow + 0.9), squeeze=False)
    for r, (z, reason) in enumerate(slices):
        img = _display(image[z])
        g = _display(gt[z])
        panels = [("input", None, None), ("ground truth", _rgba(g, GT_RGB), None)]
        for (label, _, d), p in zip(runs, preds):
            pz = _display(p[z])
            head = f"{label}\ncase Dice {_fmt(d)}"
            panels.append((head, _error_rgba(pz, g), f"slice {_slice_dice(pz, g)}"))
        for c, (name, over, note) in enumerate(panels):
            ax = axes[r, c]
            ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, aspect=aspect, interpolation="nearest")
            if over is not None:
                ax.imshow(over, aspect=aspect, interpolation="nearest")
            if note:
                ax.text(0.02, 0.98, note, transform=ax.transAxes, ha="left", va="top", fontsize=7, color="white",
                        bbox={"facecolor": "black", "alpha": 0.6, "pad": 1.5, "linewidth": 0})
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=8)
            if c == 0:
                ax.set_ylabel(f"z={z}\n{reason}", fontsize=8)
    dices = "  ·  ".join(f"{label}: Dice {_fmt(d)}" for label, _, d in runs)
    fig.suptitle(f"{case_id}   {dices}", fontsize=10)
    fig.legend(
        handles=[Patch(color=GT_RGB, label="ground truth"), Patch(color=TP_RGB, label="true positive"),
                 Patch(color=FP_RGB, label="false positive"), Patch(color=FN_RGB, label="false negative")],
        loc="lower center", ncol=4, fontsize=8, frameon=False,
    )
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_overlays(out: Path, data, results: Sequence[Dict[str, Any]]) -> List[Path]:
    """One PNG per evaluated case into ``out``, from evaluate results holding ``"_predictions"``.

    Args:
        out: folder (created).
        data: the :class:`~medkd.data.prepared.PreparedData` evaluated.
        results: evaluate dicts in table order, each with ``_predictions`` ``{case_id: (Z, S, S) bool}``.

    Returns:
        The written paths.
    """
    from medkd.report.tables import run_labels
    from medkd.rundir import confined

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = run_labels(results)
    written = []
    for cid in (results[0]["_predictions"] if results else {}):
        runs = []
        for label, r in zip(labels, results):
            dice = next((c.get("dice") for c in r["per_case"] if c["id"] == cid), None)
            runs.append((label, r["_predictions"][cid], dice))
        written.append(render_case(confined(out, f"{cid}.png"), cid, np.asarray(data.image(cid)),
                                   np.asarray(data.label(cid)), runs, data.case(cid)["prepared_spacing"]))
    return written
