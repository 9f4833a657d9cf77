"""``medkd predict``: segment new volumes with a trained run or an exported model and write masks in the input's
own geometry.

MODEL is a run folder (PyTorch, ``best.pt``) or a file written by ``medkd export`` (``.onnx`` under ONNX Runtime,
or TorchScript with its ``.json`` sidecar). An exported model carries the whole recipe in its metadata
(:mod:`medkd.export`), so it needs neither the run folder nor the training data. Both paths share every step
but the network call:

1. read (NIfTI file or DICOM series folder, :func:`medkd.data.io.read_volume`);
2. reorient to RAS (:func:`~medkd.data.io.to_canonical`);
3. intensity: the preprocess rule (CT: the run's window; MR/other: 0.5/99.5 percentiles of this volume),
   modality from the DICOM ``Modality`` tag or, for NIfTI, :func:`~medkd.data.recipe.detect_modality`
   (override with ``modality``);
4. ``(X, Y, Z) -> (Z, X, Y)``, resize in-plane to the prepared size, predict slice by slice (batched);
5. foreground **probabilities** (sigmoid, or 1 - softmax background) taken back to the input's voxel grid by
   :func:`medkd.infer.prob_to_native` (bilinear in-plane resize, axes back, RAS reorientation undone; the same
   mapping native-resolution ``evaluate`` uses), **then** thresholded at 0.5;
6. the run's connected-component postprocessing (:mod:`medkd.postprocess`, chosen on val; embedded in exported
   models), unless disabled.

Output: ``OUT/<case>_seg.nii.gz`` (uint8, 0/1) with the input's shape and affine (for DICOM, the RAS affine
computed by the reader) and, with ``probabilities``, ``OUT/<case>_prob.nii.gz`` (float32, before
postprocessing). Files are written to a temp name and moved into place; existing outputs are never replaced
without ``overwrite``. Bad inputs are reported one line each and skipped; the others are still written.

ONNX path and torch: the network runs in ONNX Runtime only (no checkpoint, no run folder); the slice resampling
still uses the same torch functions as the PyTorch path (``resize_slices``/``prob_to_native``), which is what makes
the masks identical, so torch (CPU) remains a dependency of ``medkd`` itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from medkd.data.io import NIFTI_SUFFIXES, Volume, is_nifti, read_volume, strip_nifti_suffix, to_canonical
from medkd.data.recipe import CT_MIN_HU, WINDOW_PRESETS, detect_modality, normalise_intensity, resize_slices
from medkd.data.sources import LABEL_SUFFIX
from medkd.errors import DataError, MedkdError, ModelError, OutputError
from medkd.infer import THRESHOLD, foreground_prob, prob_to_native, resolve_device, seg_logits
from medkd.options import DEFAULT_DEVICE
from medkd import rundir
from medkd.postprocess import Postprocessing
from medkd.rundir import run_checkpoint
from medkd.checkpoint import load_model_from_run, trained_size


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
    engine: str = "pytorch"
    postprocessing: dict = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _is_dicom_file(p: Path) -> bool:
    try:
        from pydicom.misc import is_dicom

        return bool(is_dicom(str(p)))
    except Exception:
        return False


def _images(niftis) -> List[Path]:
    """NIfTI files that are images, not ``*_label`` files (the folder-of-cases label rule)."""
    return sorted(e for e in niftis if not strip_nifti_suffix(e.name).endswith(LABEL_SUFFIX))


def collect_inputs(inputs: Sequence[Path]) -> Tuple[List[PredictInput], List[dict]]:
    """Expand INPUT arguments into cases.

    Rules: a NIfTI file is a case (name = file name without ``.nii[.gz]``); a folder whose files are DICOM (or
    that holds only non-NIfTI files and no subfolders) is one series (name = folder name); any other folder is a
    folder of cases: its NIfTI files (except ``*_label.nii[.gz]``, the folder-of-cases label rule) and its
    subfolders: a subfolder holding one NIfTI image is that case (name = subfolder name), one holding several
    is a folder of NIfTI cases (names = file names), any other is a DICOM series (``labels*`` folders, MSD's
    ``labelsTr/``, are skipped). Hidden entries are ignored.

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
                found = [PredictInput(strip_nifti_suffix(e.name), e) for e in _images(niftis)]
                for d in dirs:
                    if d.name.lower().startswith("labels"):  # MSD labelsTr/ labelsTs/: ground truth, not input
                        continue
                    inner = _images(e for e in d.iterdir() if _visible(e) and is_nifti(e))
                    if len(inner) == 1:  # case folder holding one NIfTI image: named after the folder
                        found.append(PredictInput(d.name, inner[0]))
                    elif inner:  # a folder of NIfTI cases (e.g. imagesTs/)
                        found += [PredictInput(strip_nifti_suffix(e.name), e) for e in inner]
                    else:  # a DICOM series
                        found.append(PredictInput(d.name, d))
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


@dataclass
class Segmenter:
    """What ``predict`` needs from a model: a logits function and the recipe it was trained with.

    Attributes:
        logits: ``(B, C, S, S)`` float32 numpy -> ``(B, K, S, S)`` logits (numpy).
        in_channels: C.
        size: prepared slice size S.
        window: CT window ``(low, high)``.
        postprocessing: the connected-component rule to apply.
        engine: ``pytorch`` | ``onnxruntime`` | ``torchscript``.
        source: the run folder or model file.
    """

    logits: Callable[[np.ndarray], np.ndarray]
    in_channels: int
    size: int
    window: Tuple[float, float]
    postprocessing: Postprocessing
    engine: str
    source: str
    notes: List[str] = field(default_factory=list)
    profile: Optional[dict] = None  # what the model was trained on (PreparedData.profile); None for old runs


def load_segmenter(model: Path, device: str = DEFAULT_DEVICE, postprocessing: bool = True) -> Segmenter:
    """A run folder (PyTorch) or an exported model file (metadata only; no run folder needed).

    Raises:
        MedkdError: not loadable, no recorded size, ``--device cuda`` without CUDA (run folders), or an exported
            model without the deploy extra installed.
    """
    from medkd import postprocess as pp

    model = Path(model)
    notes: List[str] = []
    if model.is_file():
        from medkd.exported import load_exported, probe_exported

        m = load_exported(model)
        meta = m.metadata
        probe_exported(m, int(meta["input_channels"]), int(meta["prepared_size"]))
        ct = (meta.get("intensity") or {}).get("CT") or {}
        window = (float(ct.get("low", WINDOW_PRESETS["abdomen"][0])), float(ct.get("high", WINDOW_PRESETS["abdomen"][1])))
        rule = Postprocessing.from_dict(meta.get("postprocessing")) if postprocessing else Postprocessing()
        return Segmenter(m, int(meta["input_channels"]), int(meta["prepared_size"]), window, rule, m.engine,
                         str(model), notes, meta.get("training_profile"))
    dev = resolve_device(device)
    net, ckpt = load_model_from_run(model)
    settings = dict((ckpt.get("data") or {}).get("settings") or {})
    size = trained_size(ckpt)
    if size is None:
        raise MedkdError(f"{model}: checkpoint does not record the preprocess size")
    net = net.to(dev).eval()
    in_ch = int(getattr(net, "in_channels", 1))
    rule = Postprocessing()
    if postprocessing:
        doc = pp.for_checkpoint(model, run_checkpoint(model), (ckpt.get("data") or {}).get("fingerprint"))
        if doc is None:
            notes.append(f"{model}: no postprocessing chosen yet (medkd evaluate or export chooses it on val); "
                         f"masks are not postprocessed")
        else:
            rule = Postprocessing.from_dict(doc)

    def logits(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
            return seg_logits(net(t)).float().cpu().numpy()

    window = tuple(float(v) for v in settings.get("window") or WINDOW_PRESETS["abdomen"])
    return Segmenter(logits, in_ch, int(size), window, rule, "pytorch", str(model), notes,  # type: ignore[arg-type]
                     (ckpt.get("data") or {}).get("profile"))


def segment_volume(
    seg: Segmenter,
    vol: Volume,
    batch_size: int = 16,
    modality: Optional[str] = None,
) -> Tuple[np.ndarray, np.ndarray, dict]:
    """Segment one volume in its own voxel grid.

    Args:
        seg: the model and its recipe (:func:`load_segmenter`).
        vol: the input as read (any orientation), array ``(I, J, K)``.
        batch_size: slices per forward pass.
        modality: ``"CT"``/``"MR"``/... to override detection.

    Returns:
        ``(mask (I, J, K) uint8, prob (I, J, K) float32, info)``, same voxel grid as ``vol``; the mask is
        postprocessed, the probability is not; ``info`` has the modality and the intensity rule used.
    """
    if not np.all(np.isfinite(vol.array)):
        n = int(np.size(vol.array) - np.isfinite(vol.array).sum())
        raise DataError(f"{vol.source}: {n} NaN/inf voxels")
    can, _ = to_canonical(vol)
    mod = detect_modality(modality or vol.modality, can.array)
    norm, rule = normalise_intensity(can.array, mod, seg.window)  # type: ignore[arg-type]
    slices = np.moveaxis(norm, 2, 0)  # (X, Y, Z) -> (Z, X, Y)
    X, Y = slices.shape[1:]
    inp = resize_slices(slices, seg.size, is_label=False)  # (Z, S, S)
    outs = []
    for z0 in range(0, inp.shape[0], batch_size):
        x = inp[z0:z0 + batch_size][:, None]  # (B, 1, S, S)
        if seg.in_channels > 1:
            x = np.repeat(x, seg.in_channels, axis=1)
        outs.append(np.asarray(seg.logits(x), dtype=np.float32))
    logits = np.concatenate(outs)  # (Z, K, S, S)
    prob_o = prob_to_native(foreground_prob(logits), (X, Y), vol.affine, vol.array.shape)
    mask = seg.postprocessing.apply(prob_o > THRESHOLD, vol.spacing).astype(np.uint8)
    warnings = input_warnings(vol, can.spacing, mod, bool(modality or vol.modality), norm, seg.profile)
    return mask, prob_o, {"modality": mod, "intensity": rule, "postprocessing": seg.postprocessing.method,
                          "warnings": warnings}


#: predict's plausibility checks of an input against the training data (warnings; the input is still segmented).
SPACING_FACTOR = 2.0  # a voxel spacing more than 2x outside the training range (per axis)
SPACING_PLAUSIBLE_MM = (0.05, 20.0)  # outside this, the header's geometry is likely missing or wrong
INTENSITY_MARGIN = 0.15  # mean prepared intensity outside the training cases' range +- this margin
LABEL_MAX_VALUES = 16  # an "image" with at most this many distinct integer values looks like a label map


def input_warnings(vol: Volume, spacing: Sequence[float], modality: str, modality_declared: bool,
                   norm: np.ndarray, profile: Optional[dict]) -> List[str]:
    """One line per way ``vol`` differs from what the model was trained on.

    Args:
        vol: the input as read.
        spacing: its canonical (RAS) voxel spacing, mm.
        modality: the modality used; ``modality_declared``: from a DICOM tag or ``--modality`` (else detected).
        norm: the intensities after the run's preprocessing rule (canonical ``(X, Y, Z)``, [0, 1]).
        profile: :meth:`medkd.data.prepared.PreparedData.profile` of the training cases (``None``: old run;
            only the label-map and plausible-spacing checks are made).
    """
    src, out = vol.source, []
    arr = vol.array
    sample = arr.ravel()[:: max(1, arr.size // 2_000_000)]
    values = np.unique(sample)
    if values.size <= LABEL_MAX_VALUES and np.all(values == np.round(values)):
        shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if values.size > 6 else "")
        out.append(f"{src}: looks like a label map, not an image (only {values.size} distinct integer value(s): "
                   f"{shown})")
    sp = [float(v) for v in spacing]
    lo_ok, hi_ok = SPACING_PLAUSIBLE_MM
    sp_text = "x".join(f"{v:.3g}" for v in sp)
    if any(not lo_ok <= v <= hi_ok for v in sp):
        out.append(f"{src}: implausible voxel spacing {sp_text} mm (header geometry missing or wrong?)")
    if not profile:
        return out
    mods = profile.get("modalities") or []
    if mods and modality not in mods:
        how = "declared" if modality_declared else f"detected: no voxel below {CT_MIN_HU:g} HU" if modality != "CT" \
            else "detected: voxels below -500, i.e. Hounsfield units"
        out.append(f"{src}: {modality} input ({how}) but the model was trained on {'/'.join(mods)} "
                   f"(use --modality if the detection is wrong)")
    smin, smax = profile.get("spacing_min"), profile.get("spacing_max")
    if smin and smax:
        far = [i for i, v in enumerate(sp) if v < smin[i] / SPACING_FACTOR or v > smax[i] * SPACING_FACTOR]
        if far:
            train = "x".join(f"{a:.3g}" if a == b else f"{a:.3g}-{b:.3g}" for a, b in zip(smin, smax))
            out.append(f"{src}: voxel spacing {sp_text} mm is far from the training data's {train} mm "
                       f"(axis {', '.join('RAS'[i] for i in far)})")
    rng = profile.get("intensity_mean")
    if rng:
        mean = float(np.mean(norm))
        if not rng[0] - INTENSITY_MARGIN <= mean <= rng[1] + INTENSITY_MARGIN:
            out.append(f"{src}: mean intensity after preprocessing {mean:.2f} is outside the training cases' "
                       f"{rng[0]:.2f}-{rng[1]:.2f} (another modality, contrast or intensity scaling?)")
    return out


def _write_nifti(arr: np.ndarray, affine: np.ndarray, path: Path, overwrite: bool) -> None:
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    with rundir.atomic_path(path) as tmp:
        nib.save(img, str(tmp))
        if path.exists() and not overwrite:  # appeared meanwhile
            raise DataError(f"{path}: already exists (use --overwrite to replace it)")


def predict_paths(
    run: Path,
    inputs: Sequence[Path],
    out: Path,
    probabilities: bool = False,
    overwrite: bool = False,
    device: str = DEFAULT_DEVICE,
    batch_size: int = 16,
    modality: Optional[str] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    postprocessing: bool = True,
) -> PredictResult:
    """Segment every input with a run's ``best.pt`` or an exported model; write ``OUT/<case>_seg.nii.gz`` (+ ``_prob``).

    Args:
        run: run folder, or a model file from ``medkd export`` (``.onnx`` / TorchScript).
        inputs: NIfTI files, DICOM series folders, or folders of them (see :func:`collect_inputs`).
        out: output folder (created).
        probabilities: also write ``<case>_prob.nii.gz`` (float32 foreground probability).
        overwrite: replace existing output files.
        device: ``auto | cpu | cuda`` (run folders; exported models run on the CPU).
        batch_size: slices per forward pass.
        modality: override the CT/MR detection for every input.
        progress: ``fn(i, n, case)`` called before each case.
        postprocessing: apply the run's / model's connected-component rule.

    Returns:
        A :class:`PredictResult`; ``failed`` lists bad inputs (one line each), the rest were written.

    Raises:
        MedkdError: the model cannot be loaded, ``out`` is a file, or ``--device cuda`` without CUDA.
    """
    run, out = Path(run), Path(out)
    seg = load_segmenter(run, device, postprocessing)
    if out.exists() and not out.is_dir():
        raise MedkdError(f"{out}: exists and is not a folder")
    cases, failed = collect_inputs(inputs)
    result = PredictResult(out, [], list(failed), engine=seg.engine, postprocessing=seg.postprocessing.to_dict(),
                           notes=list(seg.notes) + rundir.clean_stale_temps(out))  # temps of a killed predict
    if cases:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    for i, c in enumerate(cases):
        if progress:
            progress(i + 1, len(cases), c.case)
        try:  # names come from input file names: kept inside OUT
            seg_path, prob_path = (rundir.confined(out, f"{c.case}_{kind}.nii.gz") for kind in ("seg", "prob"))
        except MedkdError as e:
            result.failed.append({"input": str(c.path), "case": c.case, "reason": str(e)})
            continue
        targets = [seg_path] + ([prob_path] if probabilities else [])
        existing = [t for t in targets if t.exists()]
        if existing and not overwrite:
            result.failed.append({"input": str(c.path), "case": c.case,
                                  "reason": f"{existing[0]}: already exists (use --overwrite to replace it)"})
            continue
        t0 = time.time()
        try:
            vol = read_volume(c.path)
            mask, prob, info = segment_volume(seg, vol, batch_size, modality)
            _write_nifti(mask, vol.affine, seg_path, overwrite)
            if probabilities:
                _write_nifti(prob, vol.affine, prob_path, overwrite)
        except (OutputError, ModelError):  # the output cannot be written / the model is broken: stop, it is not
            raise                           # this input's fault
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
            "modality": info["modality"], "postprocessing": info["postprocessing"],
            "warnings": info["warnings"], "seconds": round(time.time() - t0, 3),
        })
    return result
