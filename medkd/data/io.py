"""Reading volumes: NIfTI (nibabel) and DICOM series (pydicom), and canonical reorientation.

All readers return arrays in voxel order ``(i, j, k)`` with a RAS+ ``affine`` (the NIfTI convention).
DICOM geometry is LPS; it is converted with ``diag(-1, -1, 1, 1)``.
Canonical orientation is RAS (``nibabel.as_closest_canonical``'s rule); axial slices are ``vol[:, :, k]``.
"""

from __future__ import annotations

import gzip
import warnings
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


def read_nifti(path: Path, channels: bool = False) -> Volume:
    """Read a NIfTI file. A 4D volume with a trailing singleton axis is squeezed; other shapes are rejected.

    Args:
        path: The ``.nii``/``.nii.gz`` file.
        channels: Also accept a 4D ``(X, Y, Z, K)`` stack of K channels on one voxel grid (e.g. a teacher's
            per-class probabilities); ``array`` then keeps the channel axis last.

    Raises:
        DataError: unreadable/truncated file or not a 3D volume (or, with ``channels``, a 4D stack).
    """
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        img = nib.load(str(path))
        if 0 in tuple(img.shape):  # nibabel hands a 0-voxel image back as shape (0,)
            raise DataError(f"{path}: empty volume, shape {tuple(int(v) for v in img.shape)} has no voxels")
        arr = np.asarray(img.dataobj)
    except DataError:
        raise
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        why = f"{type(e).__name__}: {_short(e)}"
        raise DataError(f"{path}: cannot read NIfTI, file is truncated or corrupt ({why})") from None
    except Exception as e:  # nibabel raises many kinds (ImageFileError, HeaderDataError, OSError, ...)
        raise DataError(f"{path}: cannot read NIfTI ({type(e).__name__}: {_short(e)})") from None
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim != 3 and not (channels and arr.ndim == 4):
        what = "a 3D volume or a 4D (X, Y, Z, K) stack" if channels else "a 3D volume"
        raise DataError(f"{path}: expected {what}, got shape {tuple(arr.shape)} ({arr.ndim}D)")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: unsupported voxel type {arr.dtype} (expected integers or floats)")
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.all(np.isfinite(affine)):
        raise DataError(f"{path}: {_nifti_geometry_fault(img)}")
    return Volume(arr, affine, None, str(path))


def _nifti_geometry_fault(img) -> str:
    """What makes a NIfTI image's affine non-finite, by header field: ``pixdim`` (voxel spacing) or the
    sform/qform matrix."""
    try:
        zooms = [float(z) for z in img.header.get_zooms()[:3]]
    except Exception:  # a header without zooms: only the affine can be named
        zooms = []
    if zooms and not all(np.isfinite(zooms)):
        return f"non-finite voxel spacing (pixdim {', '.join(f'{z:g}' for z in zooms)})"
    return "non-finite affine (the header's sform/qform holds NaN or inf)"


def read_dicom_series(folder: Path) -> Volume:
    """Read one DICOM series from a folder (one file per slice).

    Slices are sorted by their position along the slice normal; RescaleSlope/Intercept are applied.

    Raises:
        DataError: no readable DICOM files, several series in the folder, inconsistent
            orientation, pixel size or slice spacing.
    """
    folder = Path(folder)
    files = sorted(
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.name.upper() != "DICOMDIR"
    )
    dsets, pixels = [], []
    for f in files:
        ds, px = read_dicom_slice(f)
        dsets.append(ds)
        pixels.append(px)
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
    for name, v in (("ImageOrientationPatient", iop), ("PixelSpacing", ps)):
        if not np.all(np.isfinite(v)):
            raise DataError(f"{_dicom_file(dsets[0], folder)}: non-finite {name} {_values(v)}")
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
    bad = np.flatnonzero(~np.all(np.isfinite(pos), axis=1))
    if bad.size:
        raise DataError(f"{_dicom_file(dsets[bad[0]], folder)}: non-finite ImagePositionPatient {_values(pos[bad[0]])}")
    proj = pos @ normal
    order = np.argsort(proj)
    dsets = [dsets[i] for i in order]
    pixels = [pixels[i] for i in order]
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
    for d, a in zip(dsets, pixels):
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


def _dicom_file(ds, folder: Path) -> str:
    """The file a DICOM dataset was read from (the series folder when pydicom does not say)."""
    return str(getattr(ds, "filename", "") or folder)


def _values(v) -> str:
    return "[" + ", ".join(f"{float(x):g}" for x in v) + "]"


# Modalities whose objects are not images of the patient (plans, structures, doses, reports, segmentations, ...).
NON_IMAGE_MODALITIES = {
    "RTPLAN": "a radiotherapy plan", "RTSTRUCT": "a radiotherapy structure set", "RTDOSE": "a radiotherapy dose grid",
    "RTRECORD": "a radiotherapy treatment record", "SEG": "a segmentation (a label map, not an image)",
    "SR": "a structured report", "PR": "a presentation state", "KO": "a key-object selection", "REG": "a registration",
    "ECG": "a waveform", "DOC": "an encapsulated document",
}


def _dicom_ts_name(ds) -> str:
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"{ts.name} ({ts})" if ts is not None else "unknown transfer syntax"


def read_dicom_slice(path: Path):
    """Read one DICOM file holding one grayscale 2D image; decode its pixels (compressed ones included).

    Compressed transfer syntaxes (JPEG lossless, JPEG-LS, JPEG 2000, RLE) are decoded by pydicom's pixel
    decoders with the pylibjpeg plugins (a medkd dependency). A file without the DICOM file-meta header
    (no ``DICM`` preamble, common in old archives) is read with ``force=True``; its transfer syntax is then
    taken from the encoding pydicom detected. Colour images (RGB/YBR, e.g. secondary captures) are reduced
    to luminance (ITU-R BT.601: 0.299 R + 0.587 G + 0.114 B).

    Returns:
        ``(dataset, pixels)``: ``pixels`` float32 ``(rows, cols)`` before RescaleSlope/Intercept.

    Raises:
        DataError: one line naming the file and what is wrong: not a DICOM file, not an image (modality /
            SOP class, no pixel data), an encoding no installed decoder supports (naming the transfer
            syntax), truncated or corrupt pixel data, several frames per file.
    """
    import pydicom
    from pydicom import uid as dicom_uid
    from pydicom.errors import InvalidDicomError

    path = Path(path)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file (0 bytes), not a DICOM image")
    with warnings.catch_warnings(record=True) as caught:  # pydicom warns (and reads on) at a premature end of file
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(str(path))
        except InvalidDicomError:
            ds = None
        except Exception as e:
            raise DataError(f"{path}: cannot read DICOM, file is truncated or corrupt "
                            f"({type(e).__name__}: {_short(e)})") from None
        if ds is None:  # no file-meta header / DICM prefix: old archives write bare datasets
            try:
                ds = pydicom.dcmread(str(path), force=True)
            except Exception as e:
                raise DataError(f"{path}: not a DICOM file ({type(e).__name__}: {_short(e)})") from None
            if "SOPClassUID" not in ds and "PixelData" not in ds and "Modality" not in ds:
                raise DataError(f"{path}: not a DICOM file (no DICOM header and no image attributes)")
    eof = [w for w in caught if "end of file" in str(w.message).lower()]
    if eof or len(ds) == 0:
        why = _short(Exception(eof[0].message)) if eof else "no data elements"
        raise DataError(f"{path}: cannot read DICOM, file is truncated or corrupt ({why})")
    meta = ds.file_meta if hasattr(ds, "file_meta") else None
    if meta is None or "TransferSyntaxUID" not in meta:
        implicit, little = getattr(ds, "original_encoding", (True, True))
        ts = (dicom_uid.ImplicitVRLittleEndian if implicit else
              dicom_uid.ExplicitVRLittleEndian if little else dicom_uid.ExplicitVRBigEndian)
        if meta is None:
            ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ts
    modality = str(ds.get("Modality", "") or "").upper()
    sop = ds.get("SOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop else "unknown SOP class"
    if modality in NON_IMAGE_MODALITIES:
        raise DataError(f"{path}: not an image: {NON_IMAGE_MODALITIES[modality]} (Modality {modality}, {sop_name})")
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DataError(f"{path}: not an image: no pixel data ({sop_name}, Modality {modality or 'not set'})")
    ts = ds.file_meta.TransferSyntaxUID
    if ts.is_compressed:
        from pydicom.pixels.decoders.base import get_decoder

        try:
            decoder = get_decoder(ts)
        except NotImplementedError:
            raise DataError(f"{path}: unsupported encoding {_dicom_ts_name(ds)}: no pixel decoder exists for it "
                            f"(convert the series to an uncompressed or JPEG/JPEG-LS/JPEG 2000/RLE syntax)") from None
        if not decoder.is_available:
            raise DataError(f"{path}: unsupported encoding {_dicom_ts_name(ds)}: no decoder plugin installed "
                            f"(pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle)")
    try:
        px = ds.pixel_array
    except AttributeError as e:  # pydicom: "Missing required element: (0028,0100) 'Bits Allocated'"
        raise DataError(f"{path}: not a valid image, DICOM attributes missing ({_short(e)})") from None
    except Exception as e:
        what = f"{_dicom_ts_name(ds)} pixel data" if ts.is_compressed else "pixel data"
        raise DataError(f"{path}: cannot decode DICOM {what}, file is truncated or corrupt "
                        f"({type(e).__name__}: {_short(e)})") from None
    colour = px.ndim == 3 and int(ds.get("SamplesPerPixel", 1) or 1) == 3 and px.shape[-1] == 3
    if colour:
        px = px.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if px.ndim != 2:
        raise DataError(f"{path}: expected one 2D slice per file, got pixel data of shape {tuple(px.shape)} "
                        f"({int(ds.get('NumberOfFrames', 1) or 1)} frame(s))")
    return ds, px.astype(np.float32)


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
