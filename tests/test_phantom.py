"""The synthetic CT phantom, the shipped sample dataset and ``medkd sample-data``."""

from __future__ import annotations

import gzip
import json
import platform
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from medkd.cli import app
from medkd.data.phantom import (DEFAULT_CASES, DEFAULT_SLICES, DEFAULT_SPACING, best_threshold_dice, case_seed,
                                 generate_case, write_msd_dataset)

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def _files(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}


def _same_content(a: Path, b: Path) -> bool:
    """Byte-identical, or (``.gz``) identical once decompressed: another zlib build may deflate differently."""
    da, db = a.read_bytes(), b.read_bytes()
    if da == db:
        return True
    return a.suffix == ".gz" and gzip.decompress(da) == gzip.decompress(db)


@pytest.fixture(scope="module")
def default_dataset(tmp_path_factory) -> Path:
    """The dataset as the generator writes it with the defaults (what `sample_data/` must equal)."""
    out = tmp_path_factory.mktemp("phantom") / "sample_data"
    write_msd_dataset(out)
    return out


# ------------------------------------------------------------------------------------------------- generator
def test_generate_case_is_deterministic_and_typed():
    a = generate_case(123, size=64, n_slices=16)
    b = generate_case(123, size=64, n_slices=16)
    c = generate_case(124, size=64, n_slices=16)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    image, label, affine = a
    assert image.shape == label.shape == (64, 64, 16)
    assert image.dtype == np.int16 and label.dtype == np.uint8 and affine.dtype == np.float64
    assert set(np.unique(label)) <= {0, 1} and label.any()
    assert image.min() >= -1024 and image.max() <= 3071
    assert (image[0, 0, :] < -800).all()  # air in the corners
    np.testing.assert_allclose(np.diag(affine)[:3], [-DEFAULT_SPACING[0], -DEFAULT_SPACING[1], DEFAULT_SPACING[2]])
    assert affine.shape == (4, 4) and np.all(affine[3] == [0, 0, 0, 1]) and np.any(affine[:3, 3] != 0)


def test_case_seeds_are_distinct():
    seeds = [case_seed(0, i) for i in range(50)] + [case_seed(1, i) for i in range(50)]
    assert len(set(seeds)) == len(seeds)
    assert case_seed(0, 3) == case_seed(0, 3)


def test_best_threshold_dice_golden():
    img = np.array([0, 10, 20, 30, 40, 50, 60, 70], dtype=np.int16)
    lab = np.array([0, 0, 1, 1, 1, 0, 0, 0], dtype=np.uint8)
    assert best_threshold_dice(img, lab) == pytest.approx(1.0)  # [20, 40] is exact
    lab2 = np.array([1, 0, 1, 0, 0, 0, 0, 0], dtype=np.uint8)
    # best interval [0, 20]: TP 2, pred 3, |gt| 2 -> 0.8
    assert best_threshold_dice(img, lab2) == pytest.approx(0.8)


# ------------------------------------------------------------------------------------------------- files
def test_writes_are_byte_identical(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_msd_dataset(a, n_cases=2, seed=5, size=48, n_slices=12)
    write_msd_dataset(b, n_cases=2, seed=5, size=48, n_slices=12)
    fa, fb = _files(a), _files(b)
    assert fa.keys() == fb.keys() and len(fa) > 6
    for name in fa:
        assert fa[name].read_bytes() == fb[name].read_bytes(), name
    gz = fa["imagesTr/spleen_000.nii.gz"].read_bytes()
    assert gz[:2] == b"\x1f\x8b" and gz[4:8] == b"\x00\x00\x00\x00"  # gzip mtime 0


def test_shipped_sample_data_matches_generator(default_dataset):
    assert SAMPLE.is_dir(), "sample_data/ is missing: run `medkd sample-data sample_data --overwrite`"
    shipped, fresh = _files(SAMPLE), _files(default_dataset)
    assert shipped.keys() == fresh.keys()
    differ = [name for name in fresh if not _same_content(shipped[name], fresh[name])]
    if differ and platform.machine().lower() not in ("x86_64", "amd64"):
        # compiled float code (e.g. FMA contraction in scipy.ndimage) may round differently off x86-64
        pytest.skip(f"phantom differs on {platform.machine()} in {len(differ)} files; bit-identity is an x86-64 promise")
    assert not differ, f"sample_data/ differs from the generator in {differ[:5]}"


def test_dataset_json_and_nifti_headers(default_dataset):
    doc = json.loads((default_dataset / "dataset.json").read_text())
    assert doc["modality"] == {"0": "CT"} and doc["labels"] == {"0": "background", "1": "spleen"}
    assert doc["numTraining"] == len(doc["training"]) == DEFAULT_CASES and doc["numTest"] == 0 and doc["test"] == []
    assert doc["training"][3] == {"image": "./imagesTr/spleen_003.nii.gz", "label": "./labelsTr/spleen_003.nii.gz"}
    img = nib.load(default_dataset / "imagesTr" / "spleen_003.nii.gz")
    lab = nib.load(default_dataset / "labelsTr" / "spleen_003.nii.gz")
    assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
    assert int(img.header["qform_code"]) == 1 and int(img.header["sform_code"]) == 1
    np.testing.assert_allclose(img.header.get_zooms(), DEFAULT_SPACING, rtol=1e-6)
    np.testing.assert_allclose(img.affine, lab.affine)
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.shape == lab.shape and DEFAULT_SLICES - 4 <= img.shape[2] <= DEFAULT_SLICES + 4


def test_spleen_labels_are_plausible_and_not_intensity_separable(default_dataset):
    depths = set()
    for i in range(DEFAULT_CASES):
        img = np.asarray(nib.load(default_dataset / "imagesTr" / f"spleen_{i:03d}.nii.gz").dataobj)
        lab = np.asarray(nib.load(default_dataset / "labelsTr" / f"spleen_{i:03d}.nii.gz").dataobj)
        depths.add(img.shape[2])
        assert set(np.unique(lab)) == {0, 1}
        present = lab.any(axis=(0, 1))
        assert present.sum() >= 6
        assert not present[:3].any() and not present[-3:].any(), f"case {i}: spleen in the end slices"
        assert 0.002 < lab.mean() < 0.03
        # spleen on the patient's left (+i with this affine) and posterior (+j)
        ii, jj, _ = np.nonzero(lab)
        assert ii.mean() > img.shape[0] / 2 and jj.mean() > img.shape[1] / 2
        spleen_hu = img[lab > 0].mean()
        assert 20 < spleen_hu < 100
        d = best_threshold_dice(img, lab)
        assert d < 0.5, f"case {i}: spleen separable by HU thresholding (Dice {d:.2f})"
    assert len(depths) > 1  # slice counts vary per case


def test_spleen_and_liver_hu_ordering_varies():
    # Liver is the large soft-tissue organ on the patient's right (low i), upper slices; compare per-case means.
    signs = set()
    for s in range(8):
        img, lab, _ = generate_case(case_seed(0, s), size=128, n_slices=32)  # ROI below is in 128 px coordinates
        n = img.shape[2]
        liver_roi = img[20:50, 40:80, n - 6:]
        signs.add(bool(img[lab > 0].mean() > np.median(liver_roi)))
    assert signs == {True, False}


# ------------------------------------------------------------------------------------------------- DICOM
def test_dicom_case_matches_nifti(default_dataset):
    nii = nib.load(default_dataset / "imagesTr" / "spleen_000.nii.gz")
    vol = np.asarray(nii.dataobj)
    aff = nii.affine
    files = sorted((default_dataset / "dicom" / "spleen_000").glob("IM*.dcm"))
    assert len(files) == vol.shape[2]
    dss = [pydicom.dcmread(f) for f in files]
    assert [int(d.InstanceNumber) for d in dss] == list(range(1, len(files) + 1))
    assert {d.SeriesInstanceUID for d in dss} == {dss[0].SeriesInstanceUID}
    assert len({d.SOPInstanceUID for d in dss}) == len(dss)
    first = dss[0]
    assert first.Modality == "CT" and first.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"
    assert float(first.RescaleSlope) == 1 and float(first.RescaleIntercept) == -1024

    # geometry: LPS = RAS with x, y negated; first slice at the NIfTI origin, slices step by sz along the normal
    origin_lps = aff[:3, 3] * [-1, -1, 1]
    np.testing.assert_allclose([float(v) for v in first.ImagePositionPatient], origin_lps, atol=1e-3)
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row, col = iop[:3], iop[3:]
    normal = np.cross(row, col)
    np.testing.assert_allclose(row, aff[:3, 0] * [-1, -1, 1] / DEFAULT_SPACING[0], atol=1e-5)
    np.testing.assert_allclose(col, aff[:3, 1] * [-1, -1, 1] / DEFAULT_SPACING[0], atol=1e-5)
    pos = np.array([[float(v) for v in d.ImagePositionPatient] for d in dss])
    np.testing.assert_allclose(np.diff(pos @ normal), DEFAULT_SPACING[2], atol=1e-3)
    np.testing.assert_allclose([float(v) for v in first.PixelSpacing], [DEFAULT_SPACING[1], DEFAULT_SPACING[0]])

    # pixels: (rows, cols) = (y, x); rescaled values are the NIfTI HU values
    for k, d in enumerate(dss):
        hu = d.pixel_array.astype(np.int32) * int(float(d.RescaleSlope)) + int(float(d.RescaleIntercept))
        np.testing.assert_array_equal(hu, vol[:, :, k].T.astype(np.int32))

    # the label beside the series (folder-of-cases pairing rule) is case 0's label
    lab_dcm = nib.load(default_dataset / "dicom" / "spleen_000_label.nii.gz")
    lab_msd = nib.load(default_dataset / "labelsTr" / "spleen_000.nii.gz")
    np.testing.assert_array_equal(np.asarray(lab_dcm.dataobj), np.asarray(lab_msd.dataobj))
    np.testing.assert_allclose(lab_dcm.affine, aff)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_sample_data(tmp_path):
    runner = CliRunner()
    out = tmp_path / "sd"
    args = ["sample-data", str(out), "--cases", "2", "--size", "32", "--slices", "12", "--seed", "7"]
    r = runner.invoke(app, args + ["--no-dicom"])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "dataset.json").read_text())
    assert doc["numTraining"] == 2 and not (out / "dicom").exists()
    assert "wrote 2 cases" in r.output

    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "already exists" in r.output
    assert not (out / "dicom").exists()  # untouched

    r = runner.invoke(app, args + ["--overwrite", "--quiet"])
    assert r.exit_code == 0, r.output
    assert (out / "dicom" / "spleen_000" / "IM0001.dcm").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]  # no temp folders left behind

    r = runner.invoke(app, ["sample-data", str(tmp_path / "x"), "--cases", "0"])
    assert r.exit_code == 2  # a usage error
