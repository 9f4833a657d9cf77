"""The prepared-slice recipe: how a volume's intensities become [0, 1] (a CT window in HU, or MR percentiles) and
how its axial slices are resized to the prepared size. ``medkd preprocess`` applies it to training data, ``medkd
predict`` to new inputs, and ``medkd export`` writes it into a model's metadata, so all three read it from here."""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import numpy as np

from medkd.options import OptionError

CT_MIN_HU = -500.0
MR_PERCENTILES = (0.5, 99.5)
WINDOW_PRESETS: Dict[str, Tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),  # soft tissue W400/L40
    "liver": (-45.0, 105.0),  # W150/L30
    "bone": (-450.0, 1050.0),  # W1500/L300
    "lung": (-1350.0, 150.0),  # W1500/L-600
    "brain": (0.0, 80.0),  # W80/L40
}


def check_window(lo: float, hi: float, what: str = "--window") -> Tuple[float, float]:
    """A CT window in HU: finite bounds with ``HIGH > LOW`` (an infinite bound would map every voxel to NaN).

    Raises:
        OptionError: naming ``what``.
    """
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise OptionError(f"{what} must be finite LOW,HIGH in HU (e.g. -160,240), got {lo:g},{hi:g}", what)
    if not hi > lo:
        raise OptionError(f"{what} must be LOW,HIGH with HIGH > LOW, got {lo:g},{hi:g}", what)
    return lo, hi


def parse_window(window: Optional[str], preset: Optional[str]) -> Tuple[Tuple[float, float], Optional[str]]:
    """Resolve ``--window LOW,HIGH`` / ``--window-preset NAME`` (default: abdomen).

    Raises:
        OptionError: both given, not two numbers, non-finite or empty window, unknown preset (a usage error on the
            command line).
    """
    if window is not None and preset is not None:
        raise OptionError("give either --window or --window-preset, not both", "--window")
    if window is not None:
        try:
            lo, hi = (float(v) for v in window.split(","))
        except ValueError:
            raise OptionError(f"--window must be LOW,HIGH (e.g. -160,240), got {window!r}", "--window") from None
        return check_window(lo, hi), None
    preset = preset or "abdomen"
    if preset not in WINDOW_PRESETS:
        raise OptionError(f"unknown --window-preset {preset!r}; valid: {', '.join(sorted(WINDOW_PRESETS))}",
                          "--window-preset")
    return WINDOW_PRESETS[preset], preset


def detect_modality(declared: Optional[str], arr: np.ndarray) -> str:
    if declared:
        return declared.upper()
    return "CT" if float(np.min(arr)) < CT_MIN_HU else "MR"


def normalise_intensity(arr: np.ndarray, modality: str, window: Tuple[float, float]) -> Tuple[np.ndarray, dict]:
    """Map intensities to [0, 1]. Returns the array and the parameters used (for the manifest/predict)."""
    arr = arr.astype(np.float32)
    if modality == "CT":
        lo, hi = window
        rule = {"rule": "ct_window", "low": float(lo), "high": float(hi)}
    else:
        nz = arr[arr != 0]
        ref = nz if nz.size else arr.ravel()
        lo, hi = (float(v) for v in np.percentile(ref, MR_PERCENTILES))
        if hi <= lo:
            hi = lo + 1.0
        rule = {"rule": "percentile", "low": lo, "high": hi, "percentiles": list(MR_PERCENTILES)}
    out = (np.clip(arr, lo, hi) - lo) / (hi - lo)
    return out.astype(np.float32), rule


def prepared_slices(array: np.ndarray, affine: np.ndarray, size: int, is_label: bool) -> np.ndarray:
    """A volume in its own voxel grid -> its prepared axial slices: reoriented to RAS (closest canonical, the
    rule of :func:`~medkd.data.io.to_canonical`), one axial slice per row ``(X, Y, Z) -> (Z, X, Y)``, resized
    in-plane by :func:`resize_slices`. The one way a label (``is_label=True``: nearest) or a teacher's
    foreground probability (``is_label=False``: antialiased bilinear) reaches a prepared case's slice grid, so
    both land on the same rows and pixels.

    Args:
        array: ``(I, J, K)`` voxel values in the grid of ``affine``.
        affine: 4x4 voxel-to-world (RAS+, mm) of that grid.
        size: In-plane size of the prepared slices.
        is_label: Nearest-neighbour resize (labels) rather than bilinear (intensities, probabilities).

    Returns:
        float32 ``(Z, size, size)``.
    """
    from medkd.data.io import Volume, to_canonical

    canonical, _ = to_canonical(Volume(array, np.asarray(affine, dtype=np.float64)))
    return resize_slices(np.moveaxis(canonical.array, 2, 0), size, is_label).astype(np.float32, copy=False)


def resize_slices(vol: np.ndarray, size: int, is_label: bool) -> np.ndarray:
    """Resize a ``(Z, X, Y)`` stack in-plane to ``(Z, size, size)``."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(vol, dtype=np.float32))[:, None]
    if tuple(t.shape[-2:]) == (size, size):
        out = t
    elif is_label:
        out = F.interpolate(t, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return out[:, 0].numpy()
