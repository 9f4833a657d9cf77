"""The bad-input corpus: every case ends with a one-line reason, the documented exit code and no traceback.

Exit codes (design contract): 0 success; 1 the work failed or the input was bad (one line naming the file or
case and the reason); 2 usage error. Each case builds its input at test time from ``sample_data/`` files, the
shipped pydicom test files and the session's one tiny prepared dataset and tiny teacher run (``conftest.py``),
runs one command through Typer's ``CliRunner`` and checks:

* the exit code;
* no ``Traceback`` anywhere in the output;
* every ``error:`` line is a single line, and one line of stderr matches the expected reason.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
PREP = ["--size", "16", "--test-fraction", "0", "--val-fraction", "0"]


@dataclass
class Env:
    """What a case may build on: a fresh temp folder, the tiny prepared dataset and the tiny teacher run."""

    tmp: Path
    data: Path
    teacher: Path


@dataclass
class Case:
    id: str
    build: Callable[[Env], List[str]]  # -> command line
    code: int
    reason: str  # regex one stderr line must match

    def __str__(self) -> str:
        return self.id


# ---------------------------------------------------------------- builders


def pydicom_file(name: str) -> Path:
    import pydicom

    path = Path(pydicom.data.__file__).parent / "test_files" / name
    if not path.is_file():
        pytest.skip(f"{name} is not shipped with this pydicom version")
    return path


def source_with(env: Env, case_id: str, make_image: Callable[[Path], None], label: bool = True) -> Path:
    """A folder-of-cases SOURCE: one good sample_data case plus ``case_id`` built by ``make_image(path)``."""
    src = env.tmp / "src"
    src.mkdir()
    shutil.copy(SAMPLE / "imagesTr" / "spleen_001.nii.gz", src / "good.nii.gz")
    shutil.copy(SAMPLE / "labelsTr" / "spleen_001.nii.gz", src / "good_label.nii.gz")
    make_image(src / case_id)
    if label:
        shutil.copy(SAMPLE / "labelsTr" / "spleen_001.nii.gz", src / f"{case_id}_label.nii.gz")
    return src


def dicom_folder_with(name: str, copies: int = 1) -> Callable[[Path], None]:
    """A series folder holding ``copies`` copies of a shipped pydicom file (distinct positions)."""

    def make(folder: Path) -> None:
        import pydicom

        folder.mkdir()
        src = pydicom_file(name)
        for k in range(copies):
            dst = folder / f"IM{k:04d}.dcm"
            shutil.copy(src, dst)
            if copies > 1:
                ds = pydicom.dcmread(str(dst))
                ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
                ds.InstanceNumber = k + 1
                ds.save_as(str(dst))

    return make


def bytes_file(data: bytes) -> Callable[[Path], None]:
    def make(folder: Path) -> None:
        folder.mkdir()
        (folder / "IM0000.dcm").write_bytes(data)

    return make


def preprocess_bad_dicom(make: Callable[[Path], None]) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        src = source_with(env, "bad", make)
        return ["preprocess", str(src), "-o", str(env.tmp / "out"), *PREP]

    return build


def preprocess_dicom_series_ok(name: str) -> Callable[[Env], List[str]]:
    """A 3-slice series from one shipped compressed file, with a matching (empty) label: preprocesses fine."""

    def build(env: Env) -> List[str]:
        from medkd.data.io import read_dicom_series

        src = env.tmp / "src"
        src.mkdir()
        dicom_folder_with(name, copies=3)(src / "series")
        vol = read_dicom_series(src / "series")
        nib.save(nib.Nifti1Image(np.zeros(vol.array.shape, np.uint8), vol.affine), str(src / "series_label.nii.gz"))
        return ["preprocess", str(src), "-o", str(env.tmp / "out"), *PREP]

    return build


def nifti_file(shape, dtype=np.float32) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        nib.save(nib.Nifti1Image(np.zeros(shape, dtype), np.diag([2.9, 2.9, 5.0, 1.0])), str(path) + ".nii.gz")

    return make


def preprocess_bad_nifti(make: Callable[[Path], None]) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        src = source_with(env, "bad", make)
        return ["preprocess", str(src), "-o", str(env.tmp / "out"), *PREP]

    return build


def preprocess_too_few(env: Env) -> List[str]:
    """One good case and two bad ones, with fractions that need three good cases."""
    src = source_with(env, "empty", nifti_file((128, 128, 0)))
    (src / "junk.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    shutil.copy(SAMPLE / "labelsTr" / "spleen_001.nii.gz", src / "junk_label.nii.gz")
    return ["preprocess", str(src), "-o", str(env.tmp / "out"), "--size", "16"]


NOT_UTF8 = b"epochs: 1\nlr: \xff\xfe0.1\n"


def with_file(name: str, data: bytes, argv: Callable[[Env, Path], List[str]]) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        path = env.tmp / name
        path.write_bytes(data)
        return argv(env, path)

    return build


def predict_on(make: Callable[[Path], Path], *extra: str) -> Callable[[Env], List[str]]:
    """``medkd predict TEACHER INPUT -o OUT``; ``make(tmp)`` returns INPUT."""

    def build(env: Env) -> List[str]:
        return ["predict", str(env.teacher), str(make(env.tmp)), "-o", str(env.tmp / "pred"), *extra]

    return build


def sample_variant(name: str, fn: Callable[[np.ndarray], np.ndarray], zooms=None) -> Callable[[Path], Path]:
    """A sample_data image changed by ``fn`` (and optionally given other voxel sizes)."""

    def make(tmp: Path) -> Path:
        img = nib.load(str(SAMPLE / "imagesTr" / "spleen_003.nii.gz"))
        affine = img.affine.copy()
        if zooms is not None:
            affine[:3, :3] = np.diag(zooms)
        path = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(fn(np.asarray(img.dataobj)).astype(np.float32), affine), str(path))
        return path

    return make


def label_as_image(tmp: Path) -> Path:
    path = tmp / "spleen_003.nii.gz"
    shutil.copy(SAMPLE / "labelsTr" / "spleen_003.nii.gz", path)
    return path


# ---------------------------------------------------------------- the corpus

CASES: List[Case] = [
    # DICOM: what is wrong, not just "truncated or corrupt"
    Case("dicom-rtplan", preprocess_bad_dicom(dicom_folder_with("rtplan.dcm")), 1,
         r"^bad case: .*IM0000\.dcm: not an image: a radiotherapy plan \(Modality RTPLAN"),
    Case("dicom-seg", preprocess_bad_dicom(dicom_folder_with("liver_1frame.dcm")), 1,
         r"^bad case: .*: not an image: a segmentation"),
    Case("dicom-truncated", preprocess_bad_dicom(dicom_folder_with("MR_truncated.dcm")), 1,
         r"^bad case: .*IM0000\.dcm: cannot decode DICOM pixel data, file is truncated or corrupt"),
    Case("dicom-zero-bytes", preprocess_bad_dicom(bytes_file(b"")), 1, r"^bad case: .*IM0000\.dcm: empty file"),
    Case("dicom-not-dicom", preprocess_bad_dicom(bytes_file(b"not a DICOM file\n" * 20)), 1,
         r"^bad case: .*IM0000\.dcm: not a DICOM file"),
    Case("dicom-multiframe", preprocess_bad_dicom(dicom_folder_with("SC_rgb_rle_2frame.dcm")), 1,
         r"^bad case: .*expected one 2D slice per file"),
    # NIfTI
    Case("nifti-zero-slices", preprocess_bad_nifti(nifti_file((128, 128, 0))), 1,
         r"^bad case: .*bad\.nii\.gz: empty volume, shape \(128, 128, 0\) has no voxels"),
    Case("nifti-2d", preprocess_bad_nifti(nifti_file((128, 128))), 1, r"^bad case: .*expected a 3D volume"),
    Case("nifti-truncated", preprocess_bad_nifti(
        lambda p: Path(str(p) + ".nii.gz").write_bytes((SAMPLE / "imagesTr" / "spleen_002.nii.gz").read_bytes()[:5000])),
         1, r"^bad case: .*bad\.nii\.gz: cannot read NIfTI, file is truncated or corrupt"),
    # preprocess stops: the reasons of the bad cases come first
    Case("preprocess-too-few-good-shows-why", preprocess_too_few, 1,
         r"^bad case: .*empty\.nii\.gz: empty volume"),
    Case("preprocess-too-few-good-error", preprocess_too_few, 1,
         r"^error: .*1 good case\(s\) are too few .*\(2 bad case\(s\) listed above\)"),
    # option files that are not UTF-8 text
    Case("config-not-utf8-train", with_file("cfg.yaml", NOT_UTF8, lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "run", "--config", p]), 1,
         r"^error: .*cfg\.yaml: not a UTF-8 text file \(byte 0xff at offset 14\)"),
    Case("config-not-utf8-distill", with_file("cfg.yaml", NOT_UTF8, lambda e, p: [
        "distill", e.data, "-o", e.tmp / "run", "--scales", "none", "--no-pmd", "--config", p]), 1,
         r"^error: .*cfg\.yaml: not a UTF-8 text file"),
    Case("grid-not-utf8", with_file("grid.yaml", b"- {scales: [enc], loss: mse}\n- \xff\n", lambda e, p: [
        "ablate", e.data, "--teacher", e.teacher, "-o", e.tmp / "abl", "--grid", p]), 1,
         r"^error: .*grid\.yaml: not a UTF-8 text file"),
    # predict: suspicious inputs are segmented with one warning line each
    Case("predict-label-map", predict_on(label_as_image), 0,
         r"^warning: .*spleen_003\.nii\.gz: looks like a label map, not an image \(only 2 distinct integer value"),
    Case("predict-mr-on-ct-model", predict_on(sample_variant("mr", lambda a: (a + 1024.0) * 0.5)), 0,
         r"^warning: .*mr\.nii\.gz: MR input \(detected: no voxel below -500 HU\) but the model was trained on CT"),
    Case("predict-odd-spacing", predict_on(sample_variant("tiny_voxels", lambda a: a, zooms=(0.3, 0.3, 0.5))), 0,
         r"^warning: .*tiny_voxels\.nii\.gz: voxel spacing 0\.3x0\.3x0\.5 mm is far from the training data's "
         r"2\.9x2\.9x5 mm"),
    Case("predict-implausible-spacing", predict_on(sample_variant("huge", lambda a: a, zooms=(40.0, 40.0, 40.0))), 0,
         r"^warning: .*huge\.nii\.gz: implausible voxel spacing 40x40x40 mm"),
    Case("dicom-jpeg-ls-series", preprocess_dicom_series_ok("MR_small_jpeg_ls_lossless.dcm"), 0, r""),
    Case("dicom-rle-series", preprocess_dicom_series_ok("MR_small_RLE.dcm"), 0, r""),
]


@pytest.fixture
def env(tmp_path, tiny_data, tiny_teacher) -> Env:
    return Env(tmp_path, tiny_data, tiny_teacher)


def run_cli(argv: List[str]):
    return CliRunner().invoke(app, [str(a) for a in argv])


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input(case: Case, env: Env):
    argv = case.build(env)
    r = run_cli(argv)
    out, err = r.stdout, r.stderr
    assert "Traceback" not in out + err, out + err
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"uncaught {type(r.exception).__name__}: {r.exception}")
    assert r.exit_code == case.code, f"exit {r.exit_code}, expected {case.code}\n{err}"
    lines = err.splitlines()
    if case.reason:
        assert any(re.search(case.reason, line) for line in lines), f"no line matches {case.reason!r}:\n{err}"
    if case.code != 0:
        assert any(line.startswith(("error:", "bad case:")) for line in lines), err


def test_grid_cell_equal_to_baseline_is_explained(tmp_path, tiny_teacher):
    """A cell with no teacher is the baseline row itself: a note says so, and the caption has no 'n = 0'."""
    import medkd.ablate as ab
    from medkd.report.ablate_table import caption

    grid = tmp_path / "grid.yaml"
    grid.write_text("- {scales: none, pmd: false}\n")
    plan = ab.build_plan(ab.load_grid_doc(grid, None), tiny_teacher, [0], {"epochs": 1}, None)
    assert [c.is_baseline for c in plan.cells] == [True]
    assert any("cell 1 uses no teacher, so it is the no-KD baseline row" in n for n in plan.notes)
    assert any("no distillation cell" in n for n in plan.notes)
    text = caption({"seeds": [0], "rows": [{"is_baseline": True}],
                    "test": {"n_cases": 0, "note": "no distillation row in the grid"}})
    assert "n = 0" not in text and "no distillation row" in text


def test_predict_folder_of_nifti_subfolders(tmp_path, tiny_teacher):
    """Case folders holding one NIfTI each, and an imagesTs/ of several, are NIfTI cases (not DICOM series)."""
    src = tmp_path / "inputs"
    for case, name in (("p1", "spleen_001"), ("p2", "spleen_002")):
        (src / case).mkdir(parents=True)
        shutil.copy(SAMPLE / "imagesTr" / f"{name}.nii.gz", src / case / "ct.nii.gz")
    (src / "imagesTs").mkdir()
    (src / "labelsTs").mkdir()
    for name in ("spleen_003", "spleen_004"):
        shutil.copy(SAMPLE / "imagesTr" / f"{name}.nii.gz", src / "imagesTs" / f"{name}.nii.gz")
        shutil.copy(SAMPLE / "labelsTr" / f"{name}.nii.gz", src / "labelsTs" / f"{name}.nii.gz")
    r = run_cli(["predict", tiny_teacher, src, "-o", tmp_path / "pred"])
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "p1_seg.nii.gz", "p2_seg.nii.gz", "spleen_003_seg.nii.gz", "spleen_004_seg.nii.gz"]


def test_predict_warnings_in_json(tmp_path, tiny_teacher):
    r = run_cli(["predict", tiny_teacher, label_as_image(tmp_path), "-o", tmp_path / "pred", "--json"])
    assert r.exit_code == 0, r.stderr
    import json

    doc = json.loads(r.stdout)
    assert any("looks like a label map" in w for w in doc["written"][0]["warnings"])


def test_predict_normal_input_has_no_warning(tmp_path, tiny_teacher):
    r = run_cli(["predict", tiny_teacher, SAMPLE / "imagesTr" / "spleen_005.nii.gz", "-o", tmp_path / "pred"])
    assert r.exit_code == 0 and "warning:" not in r.stderr, r.stderr
