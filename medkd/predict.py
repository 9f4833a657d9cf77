"""``medkd predict``: segment new volumes with a trained run and write masks in the input's own geometry.

Per input (the same steps as :func:`medkd.data.preprocess.process_case`, then back):

1. read (NIfTI file or DICOM series folder, :func:`medkd.data.io.read_volume`);
2. reorient to RAS (:func:`~medkd.data.io.to_canonical`);
3. intensity: the run's preprocess rule (CT: the run's window; MR/other: 0.5/99.5 percentiles of this volume),
   modality from the DICOM ``Modality`` tag or, for NIfTI, :func:`~medkd.data.preprocess.detect_modality`
   (override with ``modality``);
4. ``(X, Y, Z) -> (Z, X, Y)``, resize in-plane to the run's size, predict slice by slice (batched);
5. foreground **probabilities** (sigmoid, or 1 - softmax background) resized back to the canonical in-plane size
   with bilinear interpolation, **then** thresholded at 0.5: smoother borders than resizing a small mask with
   nearest neighbour (which gives S-pixel staircases);
6. axes moved back and the RAS reorientation undone (:func:`~medkd.data.io.from_canonical`).

Output: ``OUT/<case>_seg.nii.gz`` (uint8, 0/1) with the input's shape and affine (for DICOM, the RAS affine
computed by the reader) and, with ``probabilities``, ``OUT/<case>_prob.nii.gz`` (float32). Files are written
to a temp name and moved into place; existing outputs are never replaced without ``overwrite``.
Bad inputs are reported one line each and skipped; the others are still written.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from medkd.data.io import NIFTI_SUFFIXES, Volume, from_canonical, is_nifti, read_volume, strip_nifti_suffix, to_canonical
from medkd.data.preprocess import WINDOW_PRESETS, detect_modality, normalise_intensity, resize_slices
from medkd.data.sources import LABEL_SUFFIX
from medkd.errors import DataError, MedkdError
from medkd.infer import predict_volume, resolve_device
from medkd.train.checkpoint import load_model_from_run, trained_size

THRESHOLD = 0.5


@dataclass
class PredictInput:
    """One volume to segment: its case name and path (NIfTI file or DICOM folder)."""

    case: str
    path: Path


@dataclass
class PredictResult:
    """What :func:`predict_paths` did: one dict per written case, one ``{"input", "reason"}`` per failure."""

    out: Path
    written: List[dict] = field(default_factory=list)
    failed: List[dict] = field(default_factory=list)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_dicom_file(p: Path) -> bool:
    try:
        from pydicom.misc import is_dicom

        return bool(is_dicom(str(p)))
    except Exception:
        return False


def collect_inputs(inputs: Sequence[Path]) -> Tuple[List[PredictInput], List[dict]]:
    """Expand INPUT arguments into cases.

    Rules: a NIfTI file is a case (name = file name without ``.nii[.gz]``); a folder whose files are DICOM (or
    that holds only non-NIfTI files and no subfolders) is one series (name = folder name); any other folder is a
    folder of cases: its NIfTI files (except ``*_label.nii[.gz]``, the folder-of-cases label rule) and its
    subfolders (each a DICOM series). Hidden entries are ignored.

    Returns:
        ``(cases, failures)``; failures are ``{"input", "reason"}`` (missing path, unknown file type,
        empty folder, duplicate case name).
    """
    cases: List[PredictInput] = []
    failed: List[dict] = []
    for raw in inputs:
        p = Path(raw)
        if not p.exists():
            failed.append({"input": str(p), "reason": f"{p}: not found"})
        elif p.is_file():
            if p.name.lower().endswith(NIFTI_SUFFIXES):
                cases.append(PredictInput(strip_nifti_suffix(p.name), p))
            else:
                failed.append({"input": str(p), "reason": f"{p}: not a NIfTI file (.nii/.nii.gz) or a DICOM folder"})
        else:
            entries = sorted(e for e in p.iterdir() if _visible(e))
            files = [e for e in entries if e.is_file()]
            dirs = [e for e in entries if e.is_dir()]
            niftis = [e for e in files if is_nifti(e)]
            if not entries:
                failed.append({"input": str(p), "reason": f"{p}: empty folder"})
            elif not niftis and (any(_is_dicom_file(f) for f in files[:5]) or (files and not dirs)):
                cases.append(PredictInput(p.name, p))
            else:
                found = [PredictInput(strip_nifti_suffix(e.name), e) for e in niftis
                         if not strip_nifti_suffix(e.name).endswith(LABEL_SUFFIX)]
                found += [PredictInput(d.name, d) for d in dirs]
                if not found:
                    failed.append({"input": str(p), "reason": f"{p}: no NIfTI files or DICOM series folders in it"})
                cases.extend(found)
    unique: List[PredictInput] = []
    seen = {}
    for c in cases:
        if c.case in seen:
            failed.append({"input": str(c.path),
                           "reason": f"{c.path}: case name {c.case!r} already used by {seen[c.case]} "
                                     f"(outputs would collide)"})
            continue
        seen[c.case] = c.path
        unique.append(c)
    return unique, failed


def _foreground_prob(logits: np.ndarray) -> np.ndarray:
    """``(Z, K, S, S)`` logits -> ``(Z, S, S)`` foreground probability."""
    t = torch.from_numpy(logits)
    if t.shape[1] == 1:
        return torch.sigmoid(t[:, 0]).numpy()
    return (1.0 - torch.softmax(t, dim=1)[:, 0]).numpy()


def _resize_prob(prob: np.ndarray, shape: Tuple[int, int]) -> np.ndarray:
    """Bilinear resize of ``(Z, S, S)`` probabilities to ``(Z, *shape)`` (antialiased when shrinking)."""
    if tuple(prob.shape[1:]) == tuple(shape):
        return prob.astype(np.float32)
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[:, None]
    shrink = shape[0] < prob.shape[1] or shape[1] < prob.shape[2]
    out = F.interpolate(t, size=tuple(shape), mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].clamp_(0.0, 1.0).numpy()


def segment_volume(
    model: torch.nn.Module,
    vol: Volume,
    settings: dict,
    device: torch.device,
    batch_size: int = 16,
    modality: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Segment one volume in its own voxel grid.

    Args:
        model: the run's model (eval mode, on ``device``).
        vol: the input as read (any orientation), array ``(I, J, K)``.
        settings: the run's preprocess settings (``size``, ``window``).
        device: where to predict.
        batch_size: slices per forward pass.
        modality: ``"CT"``/``"MR"``/... to override detection.

    Returns:
        ``(mask (I, J, K) uint8, prob (I, J, K) float32, info)``, same voxel grid as ``vol``;
        ``info`` has the modality and the intensity rule used.
    """
    if not np.all(np.isfinite(vol.array)):
        n = int(np.size(vol.array) - np.isfinite(vol.array).sum())
        raise DataError(f"{vol.source}: {n} NaN/inf voxels")
    size = int(settings["size"])
    window = tuple(float(v) for v in settings.get("window") or WINDOW_PRESETS["abdomen"])
    can, _ = to_canonical(vol)
    mod = detect_modality(modality or vol.modality, can.array)
    norm, rule = normalise_intensity(can.array, mod, window)  # type: ignore[arg-type]
    slices = np.moveaxis(norm, 2, 0)  # (X, Y, Z) -> (Z, X, Y)
    X, Y = slices.shape[1:]
    inp = resize_slices(slices, size, is_label=False)  # (Z, S, S)
    in_ch = int(getattr(model, "in_channels", 1))
    logits = predict_volume(model, inp, device, in_ch, batch_size)  # (Z, K, S, S)
    prob = _resize_prob(_foreground_prob(logits), (X, Y))  # (Z, X, Y)
    prob_c = np.moveaxis(prob, 0, 2)  # (X, Y, Z) canonical
    prob_o = from_canonical(prob_c, vol.affine, vol.array.shape).astype(np.float32)
    mask = (prob_o > THRESHOLD).astype(np.uint8)
    return mask, prob_o, {"modality": mod, "intensity": rule}


def _write_nifti(arr: np.ndarray, affine: np.ndarray, path: Path, overwrite: bool) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    tmp = path.with_name(f".{path.name[:-len('.nii.gz')]}.tmp-{os.getpid()}.nii.gz")
    try:
        nib.save(img, str(tmp))
        if path.exists() and not overwrite:  # appeared meanwhile
            raise DataError(f"{path}: already exists (use --overwrite to replace it)")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def predict_paths(
    run: Path,
    inputs: Sequence[Path],
    out: Path,
    probabilities: bool = False,
    overwrite: bool = False,
    device: str = "auto",
    batch_size: int = 16,
    modality: Optional[str] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> PredictResult:
    """Segment every input with ``RUN/best.pt`` and write ``OUT/<case>_seg.nii.gz`` (+ ``_prob``).

    Args:
        run: run folder.
        inputs: NIfTI files, DICOM series folders, or folders of them (see :func:`collect_inputs`).
        out: output folder (created).
        probabilities: also write ``<case>_prob.nii.gz`` (float32 foreground probability).
        overwrite: replace existing output files.
        device: ``auto | cpu | cuda``.
        batch_size: slices per forward pass.
        modality: override the CT/MR detection for every input.
        progress: ``fn(i, n, case)`` called before each case.

    Returns:
        A :class:`PredictResult`; ``failed`` lists bad inputs (one line each), the rest were written.

    Raises:
        MedkdError: the run cannot be loaded, ``out`` is a file, or ``--device cuda`` without CUDA.
    """
    run, out = Path(run), Path(out)
    dev = resolve_device(device)
    model, ckpt = load_model_from_run(run)
    settings = dict((ckpt.get("data") or {}).get("settings") or {})
    settings["size"] = trained_size(ckpt)
    if settings["size"] is None:
        raise MedkdError(f"{run}: checkpoint does not record the preprocess size")
    if out.exists() and not out.is_dir():
        raise MedkdError(f"{out}: exists and is not a folder")
    model = model.to(dev).eval()
    cases, failed = collect_inputs(inputs)
    result = PredictResult(out, [], list(failed))
    if cases:
        out.mkdir(parents=True, exist_ok=True)
    for i, c in enumerate(cases):
        if progress:
            progress(i + 1, len(cases), c.case)
        seg_path = out / f"{c.case}_seg.nii.gz"
        prob_path = out / f"{c.case}_prob.nii.gz"
        targets = [seg_path] + ([prob_path] if probabilities else [])
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            result.failed.append({"input": str(c.path), "case": c.case,
                                  "reason": f"{existing[0]}: already exists (use --overwrite to replace it)"})
            continue
        t0 = time.time()
        try:
            vol = read_volume(c.path)
            mask, prob, info = segment_volume(model, vol, settings, dev, batch_size, modality)
            _write_nifti(mask, vol.affine, seg_path, overwrite)
            if probabilities:
                _write_nifti(prob, vol.affine, prob_path, overwrite)
        except MedkdError as e:
            result.failed.append({"input": str(c.path), "case": c.case, "reason": " ".join(str(e).split())})
            continue
        except Exception as e:  # one broken input must not stop the others
            result.failed.append({"input": str(c.path), "case": c.case,
                                  "reason": f"{c.path}: {type(e).__name__}: {' '.join(str(e).split())[:160]}"})
            continue
        voxel_ml = float(abs(np.linalg.det(vol.affine[:3, :3]))) / 1000.0
        fg = int(mask.sum())
        result.written.append({
            "case": c.case, "input": str(c.path), "seg": str(seg_path),
            "prob": str(prob_path) if probabilities else None,
            "shape": [int(v) for v in mask.shape], "fg_voxels": fg, "fg_ml": round(fg * voxel_ml, 3),
            "modality": info["modality"], "seconds": round(time.time() - t0, 3),
        })
    return result
