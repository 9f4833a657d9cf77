"""One prepared case, predicted and compared: its predicted and true masks on the native grid (each case's original
voxels, the label file read again) or on the prepared training grid. What evaluation and the postprocessing choice
score."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from medkd.data.prepared import PreparedData
from medkd.errors import MedkdError
from medkd.infer import THRESHOLD, foreground_prob, logits_to_mask, predict_volume, prob_to_native


def predict_mask(model: nn.Module, volume: np.ndarray, device: torch.device, in_channels: int,
                 batch_size: int = 16) -> np.ndarray:
    """Foreground mask ``(Z, S, S)`` bool of a prepared ``(Z, S, S)`` image stack."""
    return logits_to_mask(predict_volume(model, volume, device, in_channels, batch_size))


def _case_file(data: PreparedData, path: str) -> Path:
    """A manifest's source path: as stored (absolute, or relative to the working directory), else relative to
    the folder that was preprocessed (the manifest's top-level ``source``)."""
    p = Path(path)
    if p.exists() or p.is_absolute():
        return p
    src = data.manifest.get("source")
    if src:
        parts = p.parts
        for k in range(len(parts)):  # strip the leading components that named the source folder
            q = Path(src).joinpath(*parts[k:])
            if q.exists():
                return q
    return p


def native_label(data: PreparedData, cid: str):
    """The case's original label file: ``(mask (I, J, K) bool, spacing (3,) mm)`` in its own voxel grid.

    Raises:
        MedkdError: the label file is gone or no longer matches the manifest's geometry.
    """
    from medkd.data.io import read_nifti

    entry = data.case(cid)
    if "label_source" not in entry or "canonical_shape" not in entry:
        raise MedkdError(f"{data.root}: manifest has no original geometry for case {cid!r} "
                         f"(re-run medkd preprocess, or use --resolution prepared)")
    path = _case_file(data, entry["label_source"])
    if not path.is_file():
        raise MedkdError(f"{path}: original label of case {cid!r} not found (needed for --resolution native; "
                         f"use --resolution prepared)")
    vol = read_nifti(path)
    if list(vol.array.shape) != list(entry["shape"]):
        raise MedkdError(f"{path}: label shape {list(vol.array.shape)} differs from the manifest's {entry['shape']} "
                         f"(the source changed since preprocessing)")
    return np.asarray(vol.array) > 0, tuple(float(v) for v in vol.spacing)


def case_masks(
    model: nn.Module,
    data: PreparedData,
    cid: str,
    device: torch.device,
    in_channels: int,
    batch_size: int = 16,
    resolution: str = "native",
):
    """Predict one case and return ``(pred, gt, spacing, prepared_pred)`` on the chosen grid.

    ``prepared_pred`` is the ``(Z, S, S)`` mask on the training grid (for overlays) whatever ``resolution`` is.
    """
    logits = predict_volume(model, data.image(cid), device, in_channels, batch_size)  # (Z, K, S, S)
    prepared_pred = logits_to_mask(logits)
    if resolution == "prepared":
        gt = np.asarray(data.label(cid)) > 0
        return prepared_pred, gt, tuple(data.case(cid)["prepared_spacing"]), prepared_pred
    return _native_masks(data, cid, foreground_prob(logits), prepared_pred)


def prob_masks(prob: np.ndarray, data: PreparedData, cid: str, resolution: str = "native", what: str = "teacher"):
    """:func:`case_masks` of a foreground probability ``(Z, S, S)`` already on the prepared grid (a teacher that
    gives per-case probabilities instead of a slice model; ``what`` names it in errors)."""
    prob = np.asarray(prob, dtype=np.float32)
    entry = data.case(cid)
    if prob.shape != tuple(entry["prepared_shape"]):
        raise MedkdError(f"{what}: case {cid!r}: probabilities of shape {list(prob.shape)}, expected the prepared "
                         f"{entry['prepared_shape']}")
    prepared_pred = prob > THRESHOLD
    if resolution == "prepared":
        return prepared_pred, np.asarray(data.label(cid)) > 0, tuple(entry["prepared_spacing"]), prepared_pred
    return _native_masks(data, cid, prob, prepared_pred)


def _native_masks(data: PreparedData, cid: str, prob: np.ndarray, prepared_pred: np.ndarray):
    """``(pred, gt, spacing, prepared_pred)`` on the case's original voxel grid from its prepared-grid
    foreground probability ``(Z, S, S)``."""
    entry = data.case(cid)
    gt, spacing = native_label(data, cid)
    prob = prob_to_native(prob, entry["canonical_shape"][:2], entry["affine"], entry["shape"])
    return prob > THRESHOLD, gt, spacing, prepared_pred


#: File names a folder of predicted masks may hold per case: ``<case>.nii.gz`` (``nnUNetv2_predict``), ``.nii``,
#: ``<case>_seg.nii.gz`` (``medkd predict``).
MASK_SUFFIXES = (".nii.gz", ".nii", "_seg.nii.gz")


def mask_file(folder: Path, cid: str) -> Path:
    """``FOLDER/<case>.nii.gz`` (or another of :data:`MASK_SUFFIXES`) of a folder of predicted masks.

    Raises:
        MedkdError: no file for the case.
    """
    from medkd.rundir import case_file

    path = case_file(folder, cid, MASK_SUFFIXES)
    if path is not None:
        return path
    raise MedkdError(f"{folder}: no predicted mask for case {cid!r} (expected {cid}{MASK_SUFFIXES[0]})")


def read_mask(folder: Path, data: PreparedData, cid: str, label=None):
    """A case's predicted mask from a folder of masks in the source images' geometry, as the case's
    :class:`~medkd.data.io.Volume` with a bool array: voxels ``> 0``, or ``== label`` with ``--teacher-label``.

    Raises:
        MedkdError: missing file, another shape or voxel grid than the case's image, non-integer values (a
            probability volume), several foreground labels without ``label`` (listing them).
    """
    from dataclasses import replace

    from medkd.data.io import read_nifti
    from medkd.data.preprocess import check_affine

    path = mask_file(folder, cid)
    vol = read_nifti(path)
    entry = data.case(cid)
    if list(vol.array.shape) != list(entry["shape"]):
        raise MedkdError(f"{path}: mask shape {list(vol.array.shape)} differs from the image of case {cid!r} "
                         f"{entry['shape']}")
    check_affine(vol.affine, entry["affine"], f"{path}: mask voxel grid (affine) differs from the image of case "
                                              f"{cid!r}", "save masks in the source image's voxel grid")
    arr = np.asarray(vol.array)
    if np.issubdtype(arr.dtype, np.floating) and not np.array_equal(arr, np.round(arr)):
        raise MedkdError(f"{path}: holds non-integer values, not a mask of labels (probabilities are a teacher's "
                         f"outputs: distill reads them with --teacher-probs)")
    if label is None:
        values = [int(v) for v in np.unique(arr) if v != 0][:10]
        if len(values) > 1:
            raise MedkdError(f"{path}: mask holds labels {', '.join(map(str, values))}: choose the foreground with "
                             f"--teacher-label N")
        mask = arr > 0
    else:
        mask = arr == label
    return replace(vol, array=mask)


def mask_masks(folder: Path, data: PreparedData, cid: str, resolution: str = "native", label=None):
    """:func:`case_masks` of a saved predicted mask (``FOLDER/<case>.nii.gz``, the source image's geometry): on the
    native grid as it is; on the prepared grid brought there as the labels were at preprocessing
    (:func:`medkd.data.recipe.prepared_slices`)."""
    from medkd.data.recipe import prepared_slices

    vol = read_mask(folder, data, cid, label)
    prepared_pred = prepared_slices(np.asarray(vol.array, dtype=np.uint8), vol.affine, data.size, is_label=True) > 0
    if resolution == "prepared":
        entry = data.case(cid)
        return prepared_pred, np.asarray(data.label(cid)) > 0, tuple(entry["prepared_spacing"]), prepared_pred
    gt, spacing = native_label(data, cid)
    return np.asarray(vol.array, dtype=bool), gt, spacing, prepared_pred
