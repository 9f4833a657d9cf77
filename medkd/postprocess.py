"""Connected-component postprocessing, chosen per run on the validation split (as nnU-Net does it).

Stray false positives far from the organ make HD95 explode even when Dice is fine. nnU-Net's remedy
(``nnunetv2/postprocessing/remove_connected_components.py``) is to try removing connected components on the
validation predictions and keep the rule only if it improves the mean validation Dice. medkd does the same:

- candidates: ``none``; ``largest`` (keep only the largest connected foreground component); ``min_volume``
  (drop components smaller than ``min_volume_ml`` millilitres) with thresholds at :data:`MIN_VOLUME_FRACTIONS`
  of the smallest non-empty validation ground-truth volume;
- components: :func:`scipy.ndimage.label` with face connectivity (6 neighbours in 3D; scipy's default
  structure, the one nnU-Net v1 used);
- choice: the candidate with the highest mean validation Dice (cases where both masks are empty excluded);
  a rule is kept only if it beats ``none`` strictly (ties keep the simpler rule), so postprocessing never
  lowers validation Dice. The **test** split is never looked at.

The rule is stored as ``RUN/postprocessing.json`` (:data:`POSTPROCESSING_FILE`), embedded in exported models,
and applied by ``predict`` and ``evaluate`` (which reports metrics with and without it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from medkd import rundir
from medkd.errors import MedkdError

#: Run-folder file that records the chosen rule.
POSTPROCESSING_FILE = rundir.POSTPROCESSING
#: ``min_volume`` thresholds tried, as fractions of the smallest non-empty validation ground-truth volume.
MIN_VOLUME_FRACTIONS = (0.05, 0.1, 0.25, 0.5)
METHODS = ("none", "largest", "min_volume")
CONNECTIVITY = "face"


@dataclass(frozen=True)
class Postprocessing:
    """One connected-component rule.

    Attributes:
        method: ``"none"``, ``"largest"`` or ``"min_volume"``.
        min_volume_ml: for ``min_volume``: components below this volume (mL) are removed.
    """

    method: str = "none"
    min_volume_ml: Optional[float] = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise MedkdError(f"unknown postprocessing method {self.method!r}; valid: {', '.join(METHODS)}")
        if self.method == "min_volume" and not (self.min_volume_ml or 0) > 0:
            raise MedkdError("postprocessing min_volume needs min_volume_ml > 0")

    def apply(self, mask: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
        """The mask after the rule (a new bool array; ``mask`` is not modified).

        Args:
            mask: binary mask, 2D or 3D; nonzero is foreground.
            spacing: voxel size in mm per axis (used by ``min_volume``).
        """
        m = np.asarray(mask) != 0
        if self.method == "none" or not m.any():
            return m.copy()
        labels, n = ndimage.label(m)  # face connectivity
        if n <= 1:
            return m.copy()
        sizes = np.bincount(labels.ravel())[1:]  # voxels per component 1..n
        if self.method == "largest":
            keep = np.zeros(n + 1, bool)
            keep[1 + int(np.argmax(sizes))] = True
        else:
            voxel_ml = float(np.prod([float(s) for s in spacing])) / 1000.0
            keep = np.concatenate([[False], sizes * voxel_ml >= float(self.min_volume_ml)])
        return keep[labels]

    def describe(self) -> str:
        if self.method == "largest":
            return "keep the largest component"
        if self.method == "min_volume":
            return f"drop components < {self.min_volume_ml:.3g} mL"
        return "none"

    def to_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "connectivity": CONNECTIVITY}

    @classmethod
    def from_dict(cls, d: Optional[Dict[str, Any]]) -> "Postprocessing":
        if not d:
            return cls()
        return cls(str(d.get("method", "none")), d.get("min_volume_ml"))


def _mean_dice(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray]) -> float:
    from medkd.metrics import confusion, overlap_from_counts

    vals = []
    for p, g in zip(preds, gts):
        c = confusion(p, g)
        d = overlap_from_counts(c["tp"], c["fp"], c["fn"])["dice"]
        if not np.isnan(d):
            vals.append(d)
    return float(np.mean(vals)) if vals else float("nan")


def candidates(gts: Sequence[np.ndarray], spacings: Sequence[Sequence[float]]) -> List[Postprocessing]:
    """The rules tried: none, largest, and ``min_volume`` at fractions of the smallest validation organ."""
    out = [Postprocessing("none"), Postprocessing("largest")]
    vols = [float(np.count_nonzero(g)) * float(np.prod(s)) / 1000.0 for g, s in zip(gts, spacings)]
    vols = [v for v in vols if v > 0]
    if vols:
        out += [Postprocessing("min_volume", round(f * min(vols), 6)) for f in MIN_VOLUME_FRACTIONS]
    return out


def choose(
    preds: Sequence[np.ndarray], gts: Sequence[np.ndarray], spacings: Sequence[Sequence[float]]
) -> Tuple[Postprocessing, Dict[str, Any]]:
    """Pick the rule that maximises mean validation Dice (kept only if it beats ``none`` strictly).

    Args:
        preds: validation predictions (bool masks), one per case.
        gts: the matching ground truths.
        spacings: voxel size in mm per case, same axis order as the masks.

    Returns:
        ``(rule, report)``; ``report`` has ``val_dice_without``, ``val_dice_with`` and every candidate's Dice.
    """
    cands = candidates(gts, spacings)
    scores = []
    for c in cands:
        after = [c.apply(p, s) for p, s in zip(preds, spacings)]
        scores.append(_mean_dice(after, gts))
    base = scores[0]
    best_i = 0
    for i, s in enumerate(scores):
        if not np.isnan(s) and (np.isnan(scores[best_i]) or s > scores[best_i]):
            best_i = i
    rule = cands[best_i] if not np.isnan(base) and scores[best_i] > base else cands[0]
    report = {
        "val_dice_without": base,
        "val_dice_with": scores[cands.index(rule)],
        "candidates": [{**c.to_dict(), "val_dice": s} for c, s in zip(cands, scores)],
    }
    return rule, report


def load(run: Path) -> Optional[Dict[str, Any]]:
    """``RUN/postprocessing.json`` as a dict, or ``None`` when the run has none yet.

    Raises:
        MedkdError: the file exists but is not valid.
    """
    path = Path(run) / POSTPROCESSING_FILE
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        Postprocessing.from_dict(doc)
    except (ValueError, TypeError, AttributeError, RecursionError) as e:
        raise MedkdError(f"{path}: invalid postprocessing file ({type(e).__name__}: {e})") from None
    return doc


def checkpoint_stamp(checkpoint: Path) -> Dict[str, Any]:
    """What ties a rule to the checkpoint it was chosen for (name, size, mtime; copies keep them)."""
    st = Path(checkpoint).stat()
    return {"checkpoint": Path(checkpoint).name, "checkpoint_size": st.st_size, "checkpoint_mtime_ns": st.st_mtime_ns}


def for_checkpoint(run: Path, checkpoint: Path, data_fingerprint: Optional[str]) -> Optional[Dict[str, Any]]:
    """``RUN/postprocessing.json`` if it was chosen for ``checkpoint`` as it is now, on the val split of the prepared
    dataset whose fingerprint is ``data_fingerprint``; else ``None`` (stale, missing, or chosen on other data: a rule
    chosen on one dataset's val says nothing about another's)."""
    doc = load(run)
    if doc is None or data_fingerprint is None or doc.get("data_fingerprint") != data_fingerprint:
        return None
    stamp = checkpoint_stamp(checkpoint)
    return doc if all(doc.get(k) == v for k, v in stamp.items()) else None


def save(run: Path, doc: Dict[str, Any]) -> Path:
    """Write ``RUN/postprocessing.json`` atomically."""
    from medkd.metrics import to_jsonable

    path = Path(run) / POSTPROCESSING_FILE
    rundir.write_json(path, to_jsonable(doc))
    return path
