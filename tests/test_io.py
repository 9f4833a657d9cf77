"""Readers (NIfTI, DICOM series) and canonical reorientation, on small phantom files."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medkd.data.io import from_canonical, read_dicom_series, read_nifti, read_volume, to_canonical, Volume
from medkd.data.phantom import nifti_bytes, write_msd_dataset
from medkd.errors import DataError


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("io") / "msd"
    write_msd_dataset(root, n_cases=2, seed=1, size=32, n_slices=8, dicom_case=True)
    return root


def _nifti(path: Path):
    img = nib.load(str(path))
    return np.asarray(img.dataobj), img.affine


def test_dicom_series_matches_nifti(raw):
    nii = read_nifti(raw / "imagesTr" / "spleen_000.nii.gz")
    dcm = read_dicom_series(raw / "dicom" / "spleen_000")
    assert dcm.array.shape == nii.array.shape
    np.testing.assert_allclose(dcm.affine, nii.affine, atol=1e-3)
    np.testing.assert_array_equal(dcm.array, nii.array.astype(np.float32))
    assert dcm.modality == "CT"
    assert dcm.spacing == pytest.approx(nii.spacing, abs=1e-4)


def test_dicom_order_comes_from_positions_not_file_names(raw, tmp_path):
    src = raw / "dicom" / "spleen_000"
    files = sorted(src.iterdir())
    dst = tmp_path / "shuffled"
    dst.mkdir()
    rng = np.random.default_rng(0)
    for new_i, f in zip(rng.permutation(len(files)), files):
        shutil.copy(f, dst / f"X{new_i:04d}.dcm")
    (dst / "DICOMDIR").write_bytes(b"not a slice")  # ignored by name
    a, b = read_dicom_series(src), read_dicom_series(dst)
    np.testing.assert_array_equal(a.array, b.array)
    np.testing.assert_allclose(a.affine, b.affine)


def _dicom_copy(raw: Path, dst: Path) -> Path:
    shutil.copytree(raw / "dicom" / "spleen_000", dst)
    return dst


def test_dicom_mixed_series(raw, tmp_path):
    import pydicom

    d = _dicom_copy(raw, tmp_path / "mixed")
    ds = pydicom.dcmread(str(d / "IM0002.dcm"))
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.save_as(str(d / "IM0002.dcm"))
    with pytest.raises(DataError, match=r"mixed.*series|series.*mixed") as e:
        read_dicom_series(d)
    assert str(d) in str(e.value)


def test_dicom_missing_middle_slice(raw, tmp_path):
    d = _dicom_copy(raw, tmp_path / "gap")
    (d / "IM0004.dcm").unlink()
    with pytest.raises(DataError, match="slice spacing") as e:
        read_dicom_series(d)
    assert str(d) in str(e.value)


def test_dicom_truncated_file(raw, tmp_path):
    d = _dicom_copy(raw, tmp_path / "trunc")
    b = (d / "IM0003.dcm").read_bytes()
    (d / "IM0003.dcm").write_bytes(b[: len(b) - 300])
    with pytest.raises(DataError, match="truncated") as e:
        read_dicom_series(d)
    assert "IM0003.dcm" in str(e.value)


def test_dicom_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no DICOM"):
        read_volume(tmp_path / "empty")


def test_nifti_errors(raw, tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_volume(tmp_path / "nope.nii.gz")
    b = (raw / "imagesTr" / "spleen_000.nii.gz").read_bytes()
    (tmp_path / "t.nii.gz").write_bytes(b[: len(b) // 2])
    with pytest.raises(DataError, match="truncated") as e:
        read_nifti(tmp_path / "t.nii.gz")
    assert "t.nii.gz" in str(e.value)
    (tmp_path / "junk.nii.gz").write_bytes(b"hello")
    with pytest.raises(DataError, match="cannot read NIfTI"):
        read_nifti(tmp_path / "junk.nii.gz")
    img, aff = _nifti(raw / "imagesTr" / "spleen_000.nii.gz")
    (tmp_path / "4d.nii.gz").write_bytes(nifti_bytes(np.stack([img, img], -1), aff))
    with pytest.raises(DataError, match=r"3D.*\(32, 32, \d+, 2\)"):
        read_nifti(tmp_path / "4d.nii.gz")
    # a trailing singleton axis is fine
    (tmp_path / "4d1.nii.gz").write_bytes(nifti_bytes(img[..., None], aff))
    assert read_nifti(tmp_path / "4d1.nii.gz").array.shape == img.shape


def _reoriented_copies(arr: np.ndarray, aff: np.ndarray):
    """Same world geometry, different voxel order: flipped axis 0, flipped axis 2, permuted axes."""
    out = {}
    n0 = arr.shape[0]
    flip0 = np.eye(4)
    flip0[0, 0], flip0[0, 3] = -1, n0 - 1
    out["flip0"] = (arr[::-1].copy(), aff @ flip0)
    n2 = arr.shape[2]
    flip2 = np.eye(4)
    flip2[2, 2], flip2[2, 3] = -1, n2 - 1
    out["flip2"] = (arr[:, :, ::-1].copy(), aff @ flip2)
    for perm in [(1, 0, 2), (2, 0, 1)]:
        p = np.transpose(arr, perm).copy()
        a = aff.copy()
        a[:, :3] = aff[:, list(perm)]
        out[f"perm{''.join(map(str, perm))}"] = (p, a)
    return out


def test_canonical_is_orientation_invariant(raw):
    arr, aff = _nifti(raw / "imagesTr" / "spleen_001.nii.gz")
    ref, _ = to_canonical(Volume(arr, aff))
    for name, (a2, aff2) in _reoriented_copies(arr, aff).items():
        # the copy really describes the same world: voxel (3, 5, 2) of the copy holds the original's value there
        ijk2 = np.array([3, 5, 2, 1.0])
        ijk = np.rint(np.linalg.solve(aff, aff2 @ ijk2)).astype(int)
        assert a2[3, 5, 2] == arr[ijk[0], ijk[1], ijk[2]], name
        assert not (a2.shape == arr.shape and np.array_equal(a2, arr)), name
        c, _ = to_canonical(Volume(a2, aff2))
        np.testing.assert_array_equal(c.array, ref.array, err_msg=name)
        np.testing.assert_allclose(c.affine, ref.affine, atol=1e-6, err_msg=name)
        back = from_canonical(c.array, aff2, a2.shape)
        np.testing.assert_array_equal(back, a2, err_msg=name)
    # canonical = RAS: positive diagonal
    assert np.all(np.diag(ref.affine)[:3] > 0)
