"""``--teacher-probs DIR``: per-case probability volumes as a teacher.

References are independent of the code under test: the prepared labels written by ``medkd preprocess``, numpy
flips/transposes written out by hand, and files saved through nibabel / ``np.savez`` as a user's pipeline (or
``nnUNetv2_predict --save_probabilities``) would save them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medkd.data.prepared import PreparedData, SliceDataset
from medkd.data.recipe import prepared_slices
from medkd.distill.targets import PROB_EPS, ProbTargets, prob_logits
from medkd.errors import MedkdError
from medkd.teachers.probs import prepared_probs


def one_hot_label(case: dict):
    """The case's label file as read by nibabel: ``(X, Y, Z)`` ints and the source affine."""
    img = nib.load(case["label_source"])
    return np.asarray(img.dataobj), img.affine


def write_probs(data: Path, out: Path, fmt: str = "nii", ids=None) -> Path:
    """Probabilities equal to each case's one-hot label, in the source image's geometry: a float32 NIfTI of the
    foreground (``nii``), a 4-D (X, Y, Z, 2) NIfTI (``nii4``), or nnU-Net's ``.npz`` with ``probabilities``
    ``(2, Z, Y, X)`` (``npz``)."""
    out.mkdir(parents=True, exist_ok=True)
    for c in json.loads((Path(data) / "manifest.json").read_text())["cases"]:
        if ids is not None and c["id"] not in ids:
            continue
        lab, affine = one_hot_label(c)
        fg = (lab > 0).astype(np.float32)
        if fmt == "nii":
            nib.save(nib.Nifti1Image(fg, affine), str(out / f"{c['id']}.nii.gz"))
        elif fmt == "nii4":
            nib.save(nib.Nifti1Image(np.stack([1 - fg, fg], axis=-1), affine), str(out / f"{c['id']}.nii.gz"))
        else:  # nnU-Net: SimpleITK axis order, (X, Y, Z) reversed, class axis first
            np.savez_compressed(out / f"{c['id']}.npz", probabilities=np.stack([1 - fg, fg]).transpose(0, 3, 2, 1))
    return out


@pytest.fixture(scope="module")
def data48(tiny_raw, tmp_path_factory) -> Path:
    """The tiny sample prepared at its own in-plane size (48 px): no resize, so labels and probabilities land on
    exactly the same pixels."""
    from medkd.data.preprocess import PreprocessSettings, preprocess

    out = tmp_path_factory.mktemp("prep48") / "data"
    preprocess(tiny_raw, out, PreprocessSettings(size=48, test_fraction=0.2, val_fraction=0.2, seed=0))
    return out


def test_prepared_slices_reorients_like_a_hand_flip():
    # an LPS-like grid (x and y run right-to-left, posterior-to-anterior): RAS flips both, then axial rows
    arr = np.arange(5 * 5 * 4, dtype=np.float32).reshape(5, 5, 4)
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])
    want = np.moveaxis(arr[::-1, ::-1, :], 2, 0)  # (Z, X, Y)
    for is_label in (True, False):
        np.testing.assert_array_equal(prepared_slices(arr, affine, 5, is_label), want)


@pytest.mark.parametrize("fmt", ["nii", "nii4", "npz"])
def test_one_hot_probabilities_serve_the_labels_targets(data48, tmp_path, fmt):
    d = PreparedData(data48)
    probs = write_probs(data48, tmp_path / fmt, fmt)
    train = SliceDataset(d, "train")
    t = ProbTargets.from_cases(lambda cid: prepared_probs(probs, d, cid, None), train)
    labels = torch.stack([m for _, m, _ in (train[i] for i in range(len(train)))])  # (N, 1, H, W)
    index = torch.arange(len(train))
    logits = t.get(torch.zeros(len(train), 1, 48, 48), labels, index)["logits"]
    assert logits.dtype == torch.float16 and logits.shape == labels.shape
    # pseudo-label targets (logit > 0) are the label, PMD targets the clamped logits of 0/1
    assert torch.equal((logits > 0).float(), labels) and labels.sum() > 0
    z = float(np.log((1 - PROB_EPS) / PROB_EPS))
    assert torch.equal(logits, torch.where(labels > 0, torch.tensor(z), torch.tensor(-z)).half())


def test_resized_one_hot_probabilities_agree_with_the_nearest_resized_label(tiny_data, tmp_path):
    # 48 -> 32 px: the label is resized nearest, probabilities bilinear; p > 0.5 differs only along borders
    d = PreparedData(tiny_data)
    probs = write_probs(tiny_data, tmp_path / "p")
    for cid in d.case_ids("train"):
        p = prepared_probs(probs, d, cid, None)
        lab = np.asarray(d.label(cid)) > 0
        assert p.shape == lab.shape and p.dtype == np.float32 and 0 <= p.min() and p.max() <= 1
        assert np.mean((p > 0.5) == lab) > 0.98
        assert abs(float((p > 0.5).sum()) - float(lab.sum())) <= 0.1 * lab.sum() + 2


def test_npz_is_read_before_the_mask_nnunet_writes_beside_it(tiny_data, tmp_path):
    d = PreparedData(tiny_data)
    cid = d.case_ids("train")[0]
    probs = write_probs(tiny_data, tmp_path / "p", "npz", ids={cid})
    lab, affine = one_hot_label(d.case(cid))
    nib.save(nib.Nifti1Image((lab > 0).astype(np.uint8) * 0, affine), str(probs / f"{cid}.nii.gz"))  # an empty mask
    p = prepared_probs(probs, d, cid, None)
    lab = np.asarray(d.label(cid)) > 0
    assert lab.any() and (p > 0.5).any() and np.mean((p > 0.5) == lab) > 0.98


def test_teacher_label_picks_a_class_of_a_multiclass_stack(tiny_data, tmp_path):
    d = PreparedData(tiny_data)
    cid = d.case_ids("train")[0]
    lab, affine = one_hot_label(d.case(cid))
    fg = (lab > 0).astype(np.float32)
    stack = np.stack([1 - fg, np.zeros_like(fg), fg])  # class 2 is the organ
    out = tmp_path / "p"
    out.mkdir()
    np.savez(out / f"{cid}.npz", probabilities=stack.transpose(0, 3, 2, 1))
    with pytest.raises(MedkdError, match=r"3 classes \(channels 0-2.*--teacher-label N"):
        prepared_probs(out, d, cid, None)
    np.testing.assert_array_equal(prepared_probs(out, d, cid, 2), prepared_slices(fg, affine, d.size, False))
    assert prepared_probs(out, d, cid, 1).max() == 0
    with pytest.raises(MedkdError, match=r"--teacher-label 3 is not a class of this volume \(classes 0-2\)"):
        prepared_probs(out, d, cid, 3)


def _bad_files(lab, affine):
    fg = (lab > 0).astype(np.float32)
    shifted = affine.copy()
    shifted[0, 3] += 5.0
    return {
        "shape": (lambda p: nib.save(nib.Nifti1Image(fg[:-2], affine), str(p / "{}.nii.gz")),
                  r"probability volume of shape \(46, 48, \d+\) does not match the source image's \(48, 48, \d+\)"),
        "grid": (lambda p: nib.save(nib.Nifti1Image(fg, shifted), str(p / "{}.nii.gz")),
                 r"affine differs from the source image's"),
        "logits": (lambda p: nib.save(nib.Nifti1Image(fg * 8 - 4, affine), str(p / "{}.nii.gz")),
                   r"values in \[-4, 4\], not probabilities"),
        "nan": (lambda p: nib.save(nib.Nifti1Image(np.where(fg > 0, np.nan, 0).astype(np.float32), affine),
                                   str(p / "{}.nii.gz")), r"NaN/inf value"),
        "npz-key": (lambda p: np.savez(p / "{}.npz", softmax=fg), r"no 'probabilities' array \(has softmax"),
        "npz-shape": (lambda p: np.savez(p / "{}.npz", probabilities=np.stack([1 - fg, fg])),
                      r"probabilities of shape \(2, 48, 48, \d+\) do not match the source image"),
        "missing": (lambda p: None, r"no probabilities for case '\w+' \(expected \w+\.npz or \w+\.nii\.gz\)"),
    }


def _npz_bytes_cut(p: Path, fg) -> None:
    np.savez(p, probabilities=np.stack([1 - fg, fg]).transpose(0, 3, 2, 1))
    data = Path(p).read_bytes()
    Path(p).write_bytes(data[: len(data) // 2])  # a download cut short


def _npz_truncated_member(p: Path, fg) -> None:
    """A well-formed zip whose ``probabilities.npy`` holds fewer bytes than its header declares."""
    import io
    import zipfile

    buf = io.BytesIO()
    np.save(buf, np.stack([1 - fg, fg]).transpose(0, 3, 2, 1))
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("probabilities.npy", buf.getvalue()[:-100])


def _bad_npz(lab, affine):
    fg = (lab > 0).astype(np.float32)
    Z, Y, X = fg.shape[2], fg.shape[1], fg.shape[0]
    return {
        "npz-object": (lambda p: np.savez(p / "{}.npz", probabilities=np.empty((2, Z, Y, X), dtype=object)),
                       r"unsupported value type object"),
        "npz-cut": (lambda p: _npz_bytes_cut(p / "{}.npz", fg), r"cannot read probabilities \(BadZipFile"),
        "npz-truncated": (lambda p: _npz_truncated_member(p / "{}.npz", fg),
                          r"probabilities are truncated \(channel 1 has \d+ of \d+ bytes\)"),
    }


def test_npz_reads_one_channel_and_a_fortran_ordered_array_alike(tiny_data, tmp_path):
    d = PreparedData(tiny_data)
    cid = d.case_ids("train")[0]
    lab, affine = one_hot_label(d.case(cid))
    fg = (lab > 0).astype(np.float32)
    stack = np.stack([1 - fg, 0.25 * fg, 0.75 * fg]).transpose(0, 3, 2, 1)  # (K, Z, Y, X)
    (tmp_path / "c").mkdir()
    (tmp_path / "f").mkdir()
    np.savez_compressed(tmp_path / "c" / f"{cid}.npz", probabilities=stack.astype(np.float16))
    np.savez(tmp_path / "f" / f"{cid}.npz", probabilities=np.asfortranarray(stack))
    for k, scale in ((1, 0.25), (2, 0.75)):
        want = prepared_slices(scale * fg, affine, d.size, False)
        np.testing.assert_allclose(prepared_probs(tmp_path / "c", d, cid, k), want, atol=1e-3)
        np.testing.assert_array_equal(prepared_probs(tmp_path / "f", d, cid, k), want)


@pytest.mark.parametrize("bad", ["shape", "grid", "logits", "nan", "npz-key", "npz-shape", "missing", "npz-object",
                                 "npz-cut", "npz-truncated"])
def test_a_bad_probability_file_is_one_line_naming_the_case(tiny_data, tmp_path, bad):
    d = PreparedData(tiny_data)
    cid = d.case_ids("train")[0]
    write, pattern = {**_bad_files(*one_hot_label(d.case(cid))), **_bad_npz(*one_hot_label(d.case(cid)))}[bad]
    out = tmp_path / "p"
    out.mkdir()

    write(_Fmt(out, cid))
    with pytest.raises(MedkdError) as e:
        prepared_probs(out, d, cid, None)
    msg = str(e.value)
    assert "\n" not in msg and cid in msg and str(out) in msg
    assert re.search(pattern, msg), msg


class _Fmt:
    """``p / "{}.nii.gz"`` -> the case's file in ``p``."""

    def __init__(self, root: Path, cid: str):
        self.root, self.cid = root, cid

    def __truediv__(self, name: str) -> str:
        return str(self.root / name.format(self.cid))


def test_prob_logits_are_clamped_and_fp16():
    p = torch.tensor([0.0, 0.5, 1.0, 0.9])
    z = prob_logits(p)
    want = torch.tensor([np.log(PROB_EPS / (1 - PROB_EPS)), 0.0, np.log((1 - PROB_EPS) / PROB_EPS),
                         np.log(0.9 / 0.1)])
    assert z.dtype == torch.float16
    torch.testing.assert_close(z.float(), want.float(), atol=1e-2, rtol=1e-3)


# ---------------------------------------------------------------------------------------------------- end to end
def distill_cli(data: Path, run: Path, *extra: str):
    from typer.testing import CliRunner

    from medkd.cli import app

    argv = ["distill", str(data), "-o", str(run), "--epochs", "1", "--batch-size", "8", "--device", "cpu",
            "--seed", "0", "--student-width", "4", "--teacher-outputs", "auto", *extra]
    return CliRunner().invoke(app, argv)


def test_distill_cli_with_teacher_probs_pmd_and_pseudo_labels(tiny_data, tmp_path):
    from medkd.rundir import file_sha256

    probs = write_probs(tiny_data, tmp_path / "probs")
    run = tmp_path / "run"
    r = distill_cli(tiny_data, run, "--teacher-probs", str(probs), "--scales", "none", "--pmd", "--pseudo-label",
                    "--fraction", "0.5", "--kd-images", "all")
    assert r.exit_code == 0, r.output
    assert "teacher: probs" in r.stderr
    s = json.loads((run / "summary.json").read_text())
    src = s["teacher_source"]
    assert src["kind"] == "probs" and src["source"] == str(probs.resolve())
    train = PreparedData(tiny_data).case_ids("train")
    assert src["files"] == {f"{c}.nii.gz": file_sha256(probs / f"{c}.nii.gz") for c in train}
    assert "features" not in src["terms"]
    assert s["teacher_outputs"]["mode"] == "memory" and s["pmd"] and s["pseudo_label"]
    assert s["teacher"] == str(probs.resolve())
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert {"pmd", "pl"} <= set(history[0]) and np.isfinite(history[0]["pmd"]) and np.isfinite(history[0]["pl"])


# ---------------------------------------------------------------------------------------------------- bad inputs
# builders for tests/test_bad_inputs.py's corpus (block "trust boundaries: --teacher-probs")
def probs_cli(*extra: str, spoil=None):
    """A command line distilling the tiny dataset from its one-hot probabilities, after ``spoil(dir, first train
    case, its label, affine)`` changed them."""

    def build(env) -> list:
        d = write_probs(env.data, env.tmp / "probs")
        if spoil is not None:
            data = PreparedData(env.data)
            cid = data.case_ids("train")[0]
            spoil(d, cid, *one_hot_label(data.case(cid)))
        return ["distill", env.data, "-o", env.tmp / "run", "--teacher-probs", d, "--epochs", "1", "--device", "cpu",
                *extra]

    return build


def drop_case(d: Path, cid: str, lab, affine) -> None:
    (d / f"{cid}.nii.gz").unlink()


def other_shape(d: Path, cid: str, lab, affine) -> None:
    nib.save(nib.Nifti1Image((lab[:-2] > 0).astype(np.float32), affine), str(d / f"{cid}.nii.gz"))


def three_classes(d: Path, cid: str, lab, affine) -> None:
    fg = (lab > 0).astype(np.float32)
    nib.save(nib.Nifti1Image(np.stack([1 - fg, fg, 0 * fg], axis=-1), affine), str(d / f"{cid}.nii.gz"))


def test_ablate_cli_with_teacher_probs(tiny_data, tmp_path):
    """An ablation whose rows distil saved probabilities: no teacher-output plan (each run reads them into
    memory), equal-budget baselines as usual, no teacher reference row (no model to evaluate)."""
    import yaml
    from typer.testing import CliRunner

    from medkd.cli import app

    probs = write_probs(tiny_data, tmp_path / "probs")
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"scales": "none", "pmd": True, "pseudo_label": False},
                                    {"scales": "none", "pmd": True, "pseudo_label": True}]))
    out = tmp_path / "abl"
    r = CliRunner().invoke(app, ["ablate", str(tiny_data), "--teacher-probs", str(probs), "-o", str(out), "--grid",
                                 str(grid), "--seeds", "0", "--student-width", "4", "--epochs", "1", "--batch-size",
                                 "8", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["teacher"] is None and res["teacher_probs"] == str(probs.resolve()) and res["teacher_outputs"] is None
    names = [row["name"] for row in res["rows"]]
    assert names[0] == "baseline" and len(names) == 3 and not any(row.get("reference") for row in res["rows"])
    assert all(np.isfinite(row["dice_mean"]) for row in res["rows"])
    runs = sorted(out.glob("runs/*/seed0/summary.json"))
    kd = [json.loads(p.read_text()) for p in runs]
    kd = [s for s in kd if s["teacher"]]
    assert len(kd) == 2 and all(s["teacher_source"]["kind"] == "probs" and s["teacher_outputs"]["mode"] == "memory"
                                for s in kd)
    both = CliRunner().invoke(app, ["ablate", str(tiny_data), "--teacher-probs", str(probs), "--teacher", str(probs),
                                    "-o", str(tmp_path / "x"), "--grid", str(grid)])
    assert both.exit_code == 2 and "give either --teacher or --teacher-probs, not both" in both.stderr
