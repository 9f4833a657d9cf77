"""Compressed and headerless DICOM, built at test time from files shipped inside the pydicom package.

Only ``pydicom.data``'s own test files are used (nothing is downloaded): each series is three copies of one
scanner file with distinct ImagePositionPatient / InstanceNumber / SOPInstanceUID. The reference is the same
image stored uncompressed (``MR_small.dcm``), so the decoded voxels are compared exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

from medkd.data.io import read_dicom_series, read_dicom_slice  # noqa: E402
from medkd.errors import DataError  # noqa: E402

TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"
STEP_MM = 2.5


def shipped(name: str) -> Path:
    path = TEST_FILES / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom version")
    return path


def make_series(src: Path, dst: Path, n: int = 3, add_geometry: bool = False, headerless: bool = False) -> Path:
    """``n`` copies of one DICOM file as a series along the slice normal, ``STEP_MM`` apart."""
    dst.mkdir(parents=True)
    series_uid = pydicom.uid.generate_uid()
    for k in range(n):
        ds = pydicom.dcmread(str(src))
        if add_geometry:  # secondary captures carry no patient geometry
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            ds.PixelSpacing = [0.5, 0.5]
            ds.ImagePositionPatient = [0.0, 0.0, 0.0]
        iop = np.array([float(v) for v in ds.ImageOrientationPatient])
        normal = np.cross(iop[:3], iop[3:])
        ds.ImagePositionPatient = [float(v) for v in np.array([float(v) for v in ds.ImagePositionPatient])
                                   + normal * STEP_MM * k]
        ds.InstanceNumber = k + 1
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.SeriesInstanceUID = series_uid
        path = dst / f"IM{k:04d}.dcm"
        if headerless:  # a bare dataset: no 128-byte preamble, no DICM prefix, no file-meta group
            plain = pydicom.Dataset()
            plain.update(ds)
            pydicom.dcmwrite(str(path), plain, implicit_vr=True, little_endian=True, enforce_file_format=False)
        else:
            ds.save_as(str(path))
    return dst


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uncompressed MR_small.dcm series (64x64, MR)."""
    return read_dicom_series(make_series(shipped("MR_small.dcm"), tmp_path_factory.mktemp("ref") / "plain"))


@pytest.mark.parametrize("name", [
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless (pylibjpeg-libjpeg)
    "MR_small_RLE.dcm",  # RLE lossless (pylibjpeg-rle / pydicom)
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless (pylibjpeg-openjpeg)
])
def test_compressed_lossless_series_equal_uncompressed(name, reference, tmp_path):
    vol = read_dicom_series(make_series(shipped(name), tmp_path / "series"))
    assert vol.array.shape == (64, 64, 3)
    assert vol.modality == "MR"
    np.testing.assert_array_equal(vol.array, reference.array)
    np.testing.assert_allclose(vol.affine, reference.affine)
    assert vol.spacing[2] == pytest.approx(STEP_MM)


def test_jpeg_lossless_process14_series_is_read(tmp_path):
    """The only JPEG-lossless (Process 14, SV1) image pydicom ships is an RGB secondary capture: it is decoded
    and reduced to luminance; the decoded values equal pydicom's own decoding of the file."""
    src = shipped("SC_rgb_jpeg_gdcm.dcm")
    ds = pydicom.dcmread(str(src))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1
    vol = read_dicom_series(make_series(src, tmp_path / "series", add_geometry=True))
    rgb = ds.pixel_array.astype(np.float32)
    lum = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    assert vol.array.shape == (100, 100, 3)
    for k in range(3):
        np.testing.assert_allclose(vol.array[:, :, k], lum.T, rtol=1e-6)
    assert vol.spacing == pytest.approx((0.5, 0.5, STEP_MM))


def test_headerless_series_read_with_force(reference, tmp_path):
    d = make_series(shipped("MR_small.dcm"), tmp_path / "bare", headerless=True)
    assert (d / "IM0000.dcm").read_bytes()[128:132] != b"DICM"
    vol = read_dicom_series(d)
    np.testing.assert_array_equal(vol.array, reference.array)


@pytest.mark.parametrize("name, reason", [
    ("rtplan.dcm", r"not an image: a radiotherapy plan \(Modality RTPLAN, RT Plan Storage\)"),
    ("rtdose_1frame.dcm", r"not an image: a radiotherapy dose grid"),
    ("liver_1frame.dcm", r"not an image: a segmentation"),
    ("MR_truncated.dcm", r"truncated or corrupt"),
    ("no_meta.dcm", r"not a DICOM file"),
    ("meta_missing_tsyntax.dcm", r"not a valid image, DICOM attributes missing .*Bits Allocated"),
    ("SC_rgb_rle_2frame.dcm", r"expected one 2D slice per file.*2 frame"),
])
def test_shipped_bad_files_say_what_is_wrong(name, reason):
    src = shipped(name)
    with pytest.raises(DataError, match=reason) as e:
        read_dicom_slice(src)
    assert str(src) in str(e.value) and "\n" not in str(e.value)


def test_truncated_jpeg_ls_is_corrupt_not_unsupported(tmp_path):
    data = shipped("MR_small_jpeg_ls_lossless.dcm").read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(data[: len(data) - 1500])
    with pytest.raises(DataError, match="truncated or corrupt"):
        read_dicom_slice(bad)


def test_unsupported_transfer_syntax_is_named(tmp_path):
    ds = pydicom.dcmread(str(shipped("MR_small.dcm")))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML
    ds.PixelData = pydicom.encaps.encapsulate([ds.PixelData])
    path = tmp_path / "video.dcm"
    ds.save_as(str(path))
    with pytest.raises(DataError, match=r"unsupported encoding MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\)"):
        read_dicom_slice(path)
