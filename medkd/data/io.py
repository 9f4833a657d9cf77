"""Reading volumes: NIfTI (nibabel) and DICOM series (pydicom), and canonical reorientation.

All readers return arrays in voxel order ``(i, j, k)`` with a RAS+ ``affine`` (the NIfTI convention).
DICOM geometry is LPS; it is converted with ``diag(-1, -1, 1, 1)``.
Canonical orientation is RAS (``nibabel.as_closest_canonical``'s rule); axial slices are ``vol[:, :, k]``.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from medkd.errors import DataError

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Relative tolerance on slice spacing inside one DICOM series (1 %).
DICOM_SPACING_RTOL = 0.01


@dataclass
class Volume:
    """A 3D volume with geometry.

    Attributes:
        array: voxel values, shape ``(X, Y, Z)``.
        affine: 4x4 voxel-to-world (RAS+, mm).
        modality: "CT", "MR", ... or None when the file does not say.
        source: the file or folder it came from.
    """

    array: np.ndarray
    affine: np.ndarray
    modality: Optional[str] = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))  # type: ignore[return-value]


def is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(name: str) -> str:
    for suf in NIFTI_SUFFIXES:
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return name


def read_nifti(path: Path) -> Volume:
    """Read a NIfTI file. A 4D volume with a trailing singleton axis is squeezed; other shapes are rejected.

    Raises:
        DataError: unreadable/truncated file or not a 3D volume.
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        arr = np.asarray(img.dataobj)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        why = f"{type(e).__name__}: {_short(e)}"
        raise DataError(f"{path}: cannot read NIfTI, file is truncated or corrupt ({why})") from None
    except Exception as e:  # nibabel raises many kinds (ImageFileError, HeaderDataError, OSError, ...)
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {_short(e)})") from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 3D volume, got shape {tuple(arr.shape)} ({arr.ndim}D)")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported voxel type {arr.dtype} (expected integers or floats)")
    return Volume(arr, np.asarray(img.affine, dtype=np.float64), None, str(path))


def read_dicom_series(folder: Path) -> Volume:
    """Read one DICOM series from a folder (one file per slice).

    Slices are sorted by their position along the slice normal; RescaleSlope/Intercept are applied.

    Raises:
        DataError: no readable DICOM files, several series in the folder, inconsistent
            orientation, pixel size or slice spacing.
    """
    import pydicom

    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
    dsets = []
    for f in files:
        try:
            ds = pydicom.dcmread(str(f))
            px = ds.pixel_array  # force decoding now so truncation is caught here
        except Exception as e:
            why = f"{type(e).__name__}: {_short(e)}"
            raise DataError(f"{f}: cannot read DICOM, file is truncated or corrupt ({why})") from None
        if px.ndim != 2:
            raise DataError(f"{f}: expected one 2D slice per file, got pixel data of shape {tuple(px.shape)}")
        dsets.append(ds)
    if not dsets:
        raise DataError(f"{folder}: no DICOM files in the folder")
    uids = {str(getattr(d, "SeriesInstanceUID", "")) for d in dsets}
    if len(uids) > 1:
        raise DataError(
            f"{folder}: {len(uids)} different DICOM series mixed in one folder (SeriesInstanceUID differs); "
            f"put each series in its own folder"
        )
    try:
        iop = np.array([float(v) for v in dsets[0].ImageOrientationPatient])
        ps = [float(v) for v in dsets[0].PixelSpacing]
        for d in dsets:
            d.ImageOrientationPatient, d.PixelSpacing  # noqa: B018
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(f"{folder}: DICOM geometry missing or invalid ({_short(e)})") from None
    for d in dsets:
        if not np.allclose([float(v) for v in d.ImageOrientationPatient], iop, atol=1e-4):
            raise DataError(f"{folder}: inconsistent ImageOrientationPatient within the series")
        if not np.allclose([float(v) for v in d.PixelSpacing], ps, atol=1e-4):
            raise DataError(f"{folder}: inconsistent PixelSpacing within the series")
        if (int(d.Rows), int(d.Columns)) != (int(dsets[0].Rows), int(dsets[0].Columns)):
            raise DataError(f"{folder}: inconsistent image size within the series")
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    try:
        pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dsets])
    except (AttributeError, TypeError, ValueError) as e:
        raise DataError(f"{folder}: DICOM ImagePositionPatient missing or invalid ({_short(e)})") from None
    proj = pos @ normal
    order = np.argsort(proj)
    dsets = [dsets[i] for i in order]
    pos, proj = pos[order], proj[order]
    if len(dsets) > 1:
        steps = np.diff(proj)
        if np.any(steps <= 1e-6):
            raise DataError(f"{folder}: duplicate slice positions")
        step = float(np.median(steps))
        if np.max(np.abs(steps - step)) > DICOM_SPACING_RTOL * step:
            raise DataError(
                f"{folder}: inconsistent slice spacing ({steps.min():.3f}-{steps.max():.3f} mm between slices; "
                f"a slice may be missing)"
            )
        step_vec = (pos[-1] - pos[0]) / (len(dsets) - 1)
    else:
        step = float(getattr(dsets[0], "SliceThickness", 1.0) or 1.0)
        step_vec = normal * step
    slices = []
    for d in dsets:
        a = d.pixel_array.astype(np.float32)
        slope = float(getattr(d, "RescaleSlope", 1.0) or 1.0)
        inter = float(getattr(d, "RescaleIntercept", 0.0) or 0.0)
        slices.append(a * slope + inter)
    # pixel_array is (rows, cols) = (j, i); voxel order (i, j, k).
    arr = np.stack([s.T for s in slices], axis=-1)
    lps = np.eye(4)
    lps[:3, 0] = row_dir * ps[1]  # column index i moves along the row direction by column spacing
    lps[:3, 1] = col_dir * ps[0]  # row index j moves along the column direction by row spacing
    lps[:3, 2] = step_vec
    lps[:3, 3] = pos[0]
    modality = str(getattr(dsets[0], "Modality", "") or "") or None
    return Volume(arr, LPS_TO_RAS @ lps, modality, str(folder), {"n_files": len(dsets)})


def read_volume(path: Path) -> Volume:
    """Read a NIfTI file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        return read_dicom_series(path)
    return read_nifti(path)


def to_canonical(vol: Volume) -> Tuple[Volume, np.ndarray]:
    """Reorient to RAS (closest canonical). Returns the new volume and the orientation transform applied."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(vol.affine)
    target = nio.axcodes2ornt("RAS")
    xform = nio.ornt_transform(ornt, target)
    arr = nio.apply_orientation(vol.array, xform)
    affine = vol.affine @ nio.inv_ornt_aff(xform, vol.array.shape)
    return Volume(np.ascontiguousarray(arr), affine, vol.modality, vol.source, vol.meta), xform


def from_canonical(arr: np.ndarray, original_affine: np.ndarray, original_shape) -> np.ndarray:
    """Undo :func:`to_canonical` for an array in canonical orientation (used by ``predict``)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(original_affine)
    target = nio.axcodes2ornt("RAS")
    back = nio.ornt_transform(target, ornt)
    out = nio.apply_orientation(arr, back)
    if tuple(out.shape) != tuple(original_shape):
        raise DataError(f"orientation round-trip gave shape {out.shape}, expected {tuple(original_shape)}")
    return out


def _short(e: Exception, n: int = 120) -> str:
    s = " ".join(str(e).split())
    return s if len(s) <= n else s[: n - 3] + "..."
