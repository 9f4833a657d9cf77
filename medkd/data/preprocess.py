"""``medkd preprocess``: raw volumes -> a prepared dataset of axial slices.

Per case (one pass, every problem reported, good cases still written):

1. read the image (NIfTI or DICOM series) and its label (NIfTI);
2. integrity: readable, 3D, finite voxels, label present, label shape equal to the image's,
   label affine equal to the image's within ``AFFINE_ATOL`` mm (+ ``AFFINE_RTOL`` relative),
   label values within the allowed set (``dataset.json`` labels, else {0, 1}); an empty label is allowed and counted;
3. reorient both to RAS (closest canonical); axial slices are ``vol[:, :, k]`` stored as ``(Z, X, Y)``;
4. intensity: CT -> clip to the window and scale to [0, 1]; MR/other -> clip to the 0.5/99.5 percentiles of the
   non-zero voxels and scale to [0, 1] (modality from ``dataset.json``, the DICOM ``Modality`` tag, or, for a bare
   NIfTI, CT when the minimum is below -500, which only Hounsfield units reach);
5. resize in-plane to ``size``x``size`` (images: antialiased bilinear; labels: nearest) and record the new spacing.

Output folder: ``manifest.json`` and ``cases/<id>_img.npy`` (float32 ``(Z, S, S)``) + ``cases/<id>_lbl.npy``
(uint8), opened later as memmaps. Splits are by case, seeded, disjoint, stored in the manifest.
"""

from __future__ import annotations

import math
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import medkd
from medkd.data.io import read_nifti, read_volume, to_canonical
from medkd.data.recipe import (WINDOW_PRESETS, check_window, detect_modality, normalise_intensity, prepared_slices,
                               resize_slices)
from medkd.data.sources import CaseSource, discover
from medkd import options as opt
from medkd.errors import DataError, MedkdError, OutputError
from medkd.rundir import clean_stale_temps, confined, replace_dir, temp_dir_beside, write_json

SCHEMA = 1
AFFINE_ATOL = 1e-2  # mm
AFFINE_RTOL = 1e-4

@dataclass
class PreprocessSettings:
    """Options of ``medkd preprocess`` (the manifest stores them under ``settings``)."""

    size: int = opt.option(128, help="In-plane size of the prepared slices.", check=opt.check_size)
    # the window is given as text (--window LOW,HIGH or --window-preset NAME) and resolved by parse_window
    window: Tuple[float, float] = opt.option(WINDOW_PRESETS["abdomen"], help="CT window in HU.", cli=False)
    window_preset: Optional[str] = opt.option("abdomen", help="Named CT window.", cli=False)
    test_fraction: float = opt.option(0.2, help="Fraction of cases for the test split.",
                                      check=opt.check_split_fraction)
    val_fraction: float = opt.option(0.1, help="Fraction of cases for the validation split.",
                                     check=opt.check_split_fraction)
    seed: int = opt.option(0, help="Seed of the case-level split.", check=opt.check_seed)
    workers: int = opt.option(1, help="Cases processed in parallel (processes).", check=opt.check_workers,
                              identity=False)

    def validate(self) -> None:
        """The declared checks, the window, and splits that leave training cases.

        Raises:
            OptionError: the first bad value, named.
        """
        opt.check_fields(self)
        check_window(*self.window)
        if self.test_fraction + self.val_fraction >= 1.0:
            raise opt.OptionError("--test-fraction + --val-fraction must leave training cases (< 1)")


class PreprocessFailed(MedkdError):
    """Preprocessing stopped (no usable case, too few good cases for the splits); ``bad`` holds the bad cases
    (``{"id", "source", "reason"}``) so that the reasons can be shown before the error."""

    def __init__(self, message: str, bad: List[dict]):
        super().__init__(message)
        self.bad = bad


@dataclass
class PreprocessResult:
    out: Path
    manifest: dict
    bad: List[dict] = field(default_factory=list)
    seconds: float = 0.0


def check_affine(affine: np.ndarray, expected: np.ndarray, what: str, fix: str) -> None:
    """``affine`` and ``expected`` (4x4) describe the same voxel grid: equal within :data:`AFFINE_ATOL` mm (+
    :data:`AFFINE_RTOL` relative). One check for a label against its image, and for a saved probability volume
    or predicted mask against the manifest's source image.

    Raises:
        DataError: ``<what> (max difference <d>; <fix>)``.
    """
    affine, expected = np.asarray(affine, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    if not np.allclose(affine, expected, atol=AFFINE_ATOL, rtol=AFFINE_RTOL):
        diff = float(np.max(np.abs(affine - expected)))
        raise DataError(f"{what} (max difference {diff:.3g}; {fix})")


def check_label(case: CaseSource, image_vol, label_vol) -> None:
    if tuple(label_vol.array.shape) != tuple(image_vol.array.shape):
        raise DataError(
            f"{case.label}: label shape {tuple(label_vol.array.shape)} != image shape {tuple(image_vol.array.shape)}"
        )
    check_affine(label_vol.affine, image_vol.affine, f"{case.label}: label affine differs from the image's",
                 "label and image must share the same voxel grid")
    lab = label_vol.array
    if not np.all(np.isfinite(lab)):
        raise DataError(f"{case.label}: label contains NaN/inf")
    values = np.unique(lab)
    if np.any(values != np.round(values)):
        raise DataError(f"{case.label}: label has non-integer values")
    extra = sorted(int(v) for v in values if int(v) not in case.label_values)
    if extra:
        raise DataError(
            f"{case.label}: label values {extra[:5]} outside allowed {sorted(case.label_values)}"
        )


class _PythonWrites:
    """A file wrapper numpy cannot see through: ``write_array`` then writes with Python's ``write()`` (an
    ``OSError`` with the real errno, e.g. EFBIG or ENOSPC) instead of C ``fwrite`` (a bare "N requested and M
    written")."""

    def __init__(self, f):
        self.write = f.write


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` whose failure is one line naming the file and the OS reason.

    Raises:
        OutputError: the file cannot be written (never a bad input).
    """
    try:
        with open(path, "wb") as f:
            np.lib.format.write_array(_PythonWrites(f), np.ascontiguousarray(arr), allow_pickle=False)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None


def process_case(case: CaseSource, settings: PreprocessSettings, cases_dir: Path) -> dict:
    """Check, normalise, resize and write one case. Returns its manifest entry.

    Raises:
        DataError: any integrity problem, naming the file and the reason.
    """
    if case.label is None:
        where = "no \"label\" in its dataset.json entry" if case.layout == "msd" else (
            f"expected {case.id}_label.nii.gz beside it")
        raise DataError(f"{case.image}: missing label ({where})")
    if not case.label.is_file():
        raise DataError(f"{case.label}: label file not found (listed for image {case.image.name})")
    image = read_volume(case.image)
    finite = np.isfinite(image.array)
    if not finite.all():
        n = int(finite.size - finite.sum())
        raise DataError(f"{case.image}: image has {n} NaN/inf voxel(s)")
    label = read_nifti(case.label)
    check_label(case, image, label)

    img_c, _ = to_canonical(image)
    modality = detect_modality(case.modality or image.modality, image.array)
    norm, rule = normalise_intensity(img_c.array, modality, settings.window)
    # (X, Y, Z) -> (Z, X, Y): one axial slice per row.
    img_s = np.moveaxis(norm, 2, 0)
    img_r = resize_slices(img_s, settings.size, is_label=False).astype(np.float32)
    # the label reaches the slice grid by the one function a teacher's probabilities use too (--teacher-probs)
    lbl_r = prepared_slices(label.array, label.affine, settings.size, is_label=True).astype(np.uint8)

    save_npy(confined(cases_dir, f"{case.id}_img.npy"), img_r)
    save_npy(confined(cases_dir, f"{case.id}_lbl.npy"), lbl_r)

    sx, sy, sz = img_c.spacing
    X, Y, Z = img_c.array.shape
    fg = int((lbl_r > 0).sum())
    return {
        "id": case.id,
        "split": None,
        "source": str(case.image),
        "label_source": str(case.label),
        "modality": modality,
        "shape": [int(v) for v in image.array.shape],
        "spacing": [float(v) for v in image.spacing],
        "affine": np.asarray(image.affine).round(6).tolist(),
        "canonical_shape": [int(X), int(Y), int(Z)],
        "canonical_affine": np.asarray(img_c.affine).round(6).tolist(),
        "n_slices": int(Z),
        "prepared_shape": [int(v) for v in img_r.shape],
        # spacing of the stored (Z, S, S) arrays, in that axis order
        "prepared_spacing": [float(sz), float(sx * X / settings.size), float(sy * Y / settings.size)],
        "intensity": rule,
        "fg_voxels": fg,
        "fg_slices": int((lbl_r.reshape(lbl_r.shape[0], -1) > 0).any(axis=1).sum()),
        "empty_label": fg == 0,
    }


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)  # one case per process; no oversubscription


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _process_safe(args) -> Tuple[Optional[dict], Optional[dict]]:
    case, settings, cases_dir = args
    try:
        return process_case(case, settings, cases_dir), None
    except OutputError:  # the output cannot be written: stop, never blame the case
        raise
    except DataError as e:
        return None, {"id": case.id, "source": str(case.image), "reason": _one_line(e)}
    except Exception as e:  # a reader bug must not take down the other cases
        reason = _one_line(f"{case.image}: unexpected error ({type(e).__name__}: {e})")
        return None, {"id": case.id, "source": str(case.image), "reason": reason}


def assign_splits(ids: List[str], test_fraction: float, val_fraction: float, seed: int) -> Dict[str, str]:
    """Seeded case-level split. At least one test/val case whenever the fraction is > 0 and cases allow it."""
    ids = sorted(ids)
    n = len(ids)
    rng = np.random.default_rng(seed)
    perm = [ids[i] for i in rng.permutation(n)]

    def count(f: float) -> int:
        return 0 if f <= 0 else max(1, int(round(f * n)))

    n_test, n_val = count(test_fraction), count(val_fraction)
    if n - n_test - n_val < 1:
        raise MedkdError(f"{n} good case(s) are too few for test {test_fraction} / val {val_fraction} fractions")
    out = {}
    for i, cid in enumerate(perm):
        out[cid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def preprocess(
    source: Path,
    out: Path,
    settings: Optional[PreprocessSettings] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int, str], None]] = None,
    log: Optional[Callable[[str], None]] = None,
    allow_outside: bool = False,
) -> PreprocessResult:
    """Prepare ``source`` into ``out``. Good cases are always written; bad ones are listed under ``skipped``.
    ``allow_outside`` accepts ``dataset.json`` entries outside ``source`` (:func:`medkd.data.sources.discover`).

    With ``settings.workers > 1`` cases run in processes started by a fork server (torch's OpenMP pool makes
    plain fork deadlock); a script that calls this needs the usual ``if __name__ == "__main__":`` guard.

    Raises:
        MedkdError: OUT exists without ``overwrite``, OUT inside/around SOURCE, no case found, a case id cannot name
            a file, a ``dataset.json`` entry outside SOURCE (without ``allow_outside``), or every case was bad.
    """
    settings = settings or PreprocessSettings()
    settings.validate()
    source, out = Path(source), Path(out)
    for note in clean_stale_temps(out.parent, stem=out.name):  # left by a killed preprocess (first: may restore OUT)
        if log:
            log(note)
    if out.exists() and not overwrite:
        raise MedkdError(f"{out}: already exists (use --overwrite to replace it)")
    src_r, out_r = source.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise MedkdError(f"{out}: output must not be inside SOURCE (the source is never modified)")
    if out_r in src_r.parents:
        raise MedkdError(f"{out}: output must not contain SOURCE (replacing it would delete the source)")
    t0 = time.time()
    cases = discover(source, allow_outside)
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise MedkdError(f"{source}: duplicate case ids {dup[:5]}")

    tmp = None
    try:
        tmp = temp_dir_beside(out)
        (tmp / "cases").mkdir()
    except OSError as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"{out}: cannot create the output folder ({e.strerror or e})") from None
    try:
        jobs = [(c, settings, tmp / "cases") for c in cases]
        results: List[Tuple[Optional[dict], Optional[dict]]] = []
        if settings.workers > 1:
            # Not plain fork: a process that already ran torch ops (OpenMP pool) deadlocks its forked children.
            # A fork server that has only imported torch (never run an op) forks workers safely and cheaply.
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload(["torch", "medkd.data.preprocess"])
            n_proc = min(settings.workers, len(jobs))
            try:
                with ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx, initializer=_worker_init) as ex:
                    for i, r in enumerate(ex.map(_process_safe, jobs)):
                        results.append(r)
                        if progress:
                            progress(i + 1, len(jobs), cases[i].id)
            except BrokenProcessPool:
                raise MedkdError(
                    f"{source}: a worker process died (out of memory?); try fewer --workers "
                    f"(a script calling preprocess(workers>1) needs an `if __name__ == \"__main__\":` guard)"
                ) from None
        else:
            for i, job in enumerate(jobs):
                results.append(_process_safe(job))
                if progress:
                    progress(i + 1, len(jobs), cases[i].id)
        good = [r for r, _ in results if r is not None]
        bad = [b for _, b in results if b is not None]
        if not good:
            raise PreprocessFailed(f"{source}: no usable case ({len(bad)} bad); first: {bad[0]['reason']}", bad)
        try:
            splits = assign_splits([g["id"] for g in good], settings.test_fraction, settings.val_fraction,
                                   settings.seed)
        except MedkdError as e:
            raise PreprocessFailed(f"{source}: {e} ({len(bad)} bad case(s) listed above)" if bad else
                                   f"{source}: {e}", bad) from None
        for g in good:
            g["split"] = splits[g["id"]]
        s = asdict(settings)
        s["window"] = list(settings.window)
        manifest = {
            "schema": SCHEMA,
            "medkd_version": medkd.__version__,
            "source": str(source.resolve()),
            "settings": s,
            "cases": sorted(good, key=lambda g: g["id"]),
            "skipped": [{"source": b["source"], "reason": b["reason"]} for b in bad],
        }
        _write_manifest(tmp / "manifest.json", manifest, out)
        replace_dir(tmp, out)
    except OutputError as e:  # name the output as the user knows it, not the hidden temp folder
        raise OutputError(str(e).replace(str(tmp), str(out))) from None
    except OSError as e:
        where = str(e.filename).replace(str(tmp), str(out)) if e.filename else str(out)
        raise OutputError(f"{where}: cannot write ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PreprocessResult(out, manifest, bad, time.time() - t0)


def _nonfinite(doc, where: str = "") -> Optional[str]:
    """Where the first NaN/inf number sits in a JSON-like document (``cases[2].spacing[0]``), else ``None``."""
    if isinstance(doc, float) and not math.isfinite(doc):
        return f"{where} ({doc})"
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, (list, tuple)) else ()
    for k, v in items:
        found = _nonfinite(v, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k}]")
        if found:
            return found
    return None


def _write_manifest(path: Path, manifest: dict, out: Path) -> None:
    """Write strict JSON (:func:`medkd.rundir.write_json`); a NaN/inf value is one error naming where it is."""
    bad = _nonfinite(manifest)
    if bad:
        raise MedkdError(f"{out / 'manifest.json'}: not written, non-finite value at {bad.lstrip('.')} "
                         f"(manifest.json is strict JSON)")
    write_json(path, manifest, indent=1)


def split_summary(manifest: dict) -> List[dict]:
    """Rows per split: cases, slices, foreground fraction, empty labels."""
    rows = []
    for split in ("train", "val", "test"):
        cs = [c for c in manifest["cases"] if c["split"] == split]
        slices = sum(c["prepared_shape"][0] for c in cs)
        vox = sum(int(np.prod(c["prepared_shape"])) for c in cs)
        fg = sum(c["fg_voxels"] for c in cs)
        rows.append(
            {
                "split": split,
                "cases": len(cs),
                "slices": slices,
                "fg_slices": sum(c["fg_slices"] for c in cs),
                "fg_fraction": fg / vox if vox else 0.0,
                "empty_labels": sum(1 for c in cs if c["empty_label"]),
            }
        )
    return rows
