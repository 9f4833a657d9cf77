"""``medkd predict``: masks in the input's own geometry (NIfTI, non-canonical NIfTI, DICOM), refusals, bad inputs."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app

runner = CliRunner()


def _flipped_copy(src: Path, dst: Path) -> Path:
    """The same image stored with voxel axis 0 reversed (a non-canonical, LAS-like orientation)."""
    img = nib.load(str(src))
    data = np.asarray(img.dataobj)[::-1].copy()
    n = data.shape[0]
    flip = np.eye(4)
    flip[0, 0], flip[0, 3] = -1.0, n - 1  # new voxel i' = n - 1 - i
    affine = img.affine @ flip
    out = nib.Nifti1Image(data, affine)
    out.header.set_qform(affine, code=1)
    out.header.set_sform(affine, code=1)
    nib.save(out, str(dst))
    return dst


@pytest.fixture(scope="module")
def predicted(tiny_teacher, tiny_raw, tmp_path_factory):
    """One predict run over a NIfTI case, its flipped copy and the DICOM series; returns (inputs, out, result)."""
    from medkd.predict import predict_paths

    work = tmp_path_factory.mktemp("predict")
    nifti = tiny_raw / "imagesTr" / "spleen_001.nii.gz"
    flipped = _flipped_copy(nifti, work / "spleen_001_flipped.nii.gz")
    dicom = tiny_raw / "dicom" / "spleen_000"
    out = work / "out"
    result = predict_paths(tiny_teacher, [nifti, flipped, dicom], out, probabilities=True, device="cpu")
    return {"nifti": nifti, "flipped": flipped, "dicom": dicom}, out, result


def test_outputs_keep_input_geometry(predicted):
    from medkd.data.io import read_volume

    inputs, out, result = predicted
    assert result.failed == []
    assert sorted(w["case"] for w in result.written) == ["spleen_000", "spleen_001", "spleen_001_flipped"]
    for case, src in (("spleen_001", inputs["nifti"]), ("spleen_001_flipped", inputs["flipped"]),
                      ("spleen_000", inputs["dicom"])):
        vol = read_volume(src)  # for DICOM: the RAS affine computed by the reader
        seg = nib.load(str(out / f"{case}_seg.nii.gz"))
        prob = nib.load(str(out / f"{case}_prob.nii.gz"))
        for img in (seg, prob):
            assert img.shape == vol.array.shape, case
            np.testing.assert_allclose(img.affine, vol.affine, atol=1e-4, err_msg=case)
        assert seg.get_data_dtype() == np.uint8 and prob.get_data_dtype() == np.float32
        m, p = np.asarray(seg.dataobj), np.asarray(prob.dataobj)
        assert set(np.unique(m)) <= {0, 1} and m.any()
        assert p.min() >= 0 and p.max() <= 1
        np.testing.assert_array_equal(m, (p > 0.5).astype(np.uint8))


def test_flipped_input_gives_flipped_mask(predicted):
    _, out, _ = predicted
    a = np.asarray(nib.load(str(out / "spleen_001_seg.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(out / "spleen_001_flipped_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(b, a[::-1])


def test_dicom_matches_its_nifti(predicted, tiny_teacher, tiny_raw, tmp_path):
    """The DICOM series is case 0 again: same voxels, same geometry -> the same mask as its NIfTI."""
    from medkd.predict import predict_paths

    _, out, _ = predicted
    res = predict_paths(tiny_teacher, [tiny_raw / "imagesTr" / "spleen_000.nii.gz"], tmp_path, device="cpu")
    assert res.failed == []
    a = np.asarray(nib.load(str(tmp_path / "spleen_000_seg.nii.gz")).dataobj)
    b = np.asarray(nib.load(str(out / "spleen_000_seg.nii.gz")).dataobj)
    np.testing.assert_array_equal(a, b)


def test_probabilities_agree_with_prepared_prediction(predicted, tiny_teacher, tiny_data):
    """Taking the written probabilities through the preprocess geometry (RAS, (Z,X,Y), resize) matches the
    prediction on the prepared slices: catches swapped/flipped axes that a round trip alone would hide."""
    import torch

    from medkd.data.io import read_nifti, to_canonical
    from medkd.data.prepared import PreparedData
    from medkd.data.recipe import resize_slices
    from medkd.infer import predict_volume
    from medkd.checkpoint import load_model_from_run

    _, out, _ = predicted
    data = PreparedData(tiny_data)
    model, _ = load_model_from_run(tiny_teacher)
    logits = predict_volume(model, data.image("spleen_001"), torch.device("cpu"))  # (Z, 1, S, S)
    ref = torch.sigmoid(torch.from_numpy(logits))[:, 0].numpy().ravel()
    can, _ = to_canonical(read_nifti(out / "spleen_001_prob.nii.gz"))
    back = resize_slices(np.moveaxis(can.array, 2, 0).astype(np.float32), data.size, is_label=False)  # (Z, S, S)

    def corr(a):
        return float(np.corrcoef(a.ravel(), ref)[0, 1])

    c = corr(back)
    assert c > 0.9, c
    for wrong in (back.transpose(0, 2, 1), back[:, ::-1], back[:, :, ::-1]):  # swapped or flipped in-plane axes
        assert corr(wrong) < c - 0.2


def test_cli_refuses_overwrite_and_reports_bad_inputs(tiny_teacher, tiny_raw, tmp_path):
    good = tiny_raw / "imagesTr" / "spleen_002.nii.gz"
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(good.read_bytes()[:300])  # truncated gzip stream
    out = tmp_path / "out"
    res = runner.invoke(app, ["predict", str(tiny_teacher), str(bad), str(good), "-o", str(out), "-q"])
    assert res.exit_code == 1
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "broken.nii.gz" in lines[0] and lines[0].startswith("error:"), res.stderr
    assert (out / "spleen_002_seg.nii.gz").is_file() and not (out / "broken_seg.nii.gz").exists()

    before = (out / "spleen_002_seg.nii.gz").stat().st_mtime_ns
    res = runner.invoke(app, ["predict", str(tiny_teacher), str(good), "-o", str(out), "-q"])
    assert res.exit_code == 1 and "already exists" in res.stderr and "--overwrite" in res.stderr
    assert (out / "spleen_002_seg.nii.gz").stat().st_mtime_ns == before

    res = runner.invoke(app, ["predict", str(tiny_teacher), str(good), "-o", str(out), "--overwrite", "--json"])
    assert res.exit_code == 0, res.stderr
    import json

    doc = json.loads(res.stdout)
    assert [w["case"] for w in doc["written"]] == ["spleen_002"] and doc["failed"] == []


def test_collect_inputs_folder_rules(tiny_raw, tmp_path):
    from medkd.predict import collect_inputs

    cases, failed = collect_inputs([tiny_raw / "dicom"])  # folder of cases: a series + its label beside it
    assert [(c.case, c.path.name) for c in cases] == [("spleen_000", "spleen_000")] and failed == []
    cases, failed = collect_inputs([tiny_raw / "imagesTr", tiny_raw / "imagesTr" / "spleen_000.nii.gz",
                                    tmp_path / "missing", tiny_raw / "dataset.json"])
    assert [c.case for c in cases] == [f"spleen_{i:03d}" for i in range(6)]
    reasons = " | ".join(f["reason"] for f in failed)
    assert "already used" in reasons and "not found" in reasons and "not a NIfTI" in reasons
