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
from medkd.data.phantom import DEFAULT_SPACING

import test_teachers as teachers  # builders of teacher files (ONNX with/without a sidecar)
import test_teacher_probs as tp  # the --teacher-probs builders
import test_trust as trust  # the trust-boundary builders (tests/ is on sys.path, like conftest)
import monai_bundle  # real MONAI bundles, broken in one way each

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


def preprocess_bad_case(make: Callable[[Path], None]) -> Callable[[Env], List[str]]:
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


def resume_teacher(*extra: str, other_data: bool = False) -> Callable[[Env], List[str]]:
    """``train-teacher --resume`` on a copy of the finished tiny teacher run, with its own config file."""

    def build(env: Env) -> List[str]:
        run = env.tmp / "teacher"
        shutil.copytree(env.teacher, run)
        data = env.data
        if other_data:  # the same cases prepared again with other settings: another fingerprint
            data = env.tmp / "data2"
            shutil.copytree(env.data, data)
            manifest = data / "manifest.json"
            manifest.write_text(manifest.read_text().replace('"seed": 0', '"seed": 1', 1))
        return ["train-teacher", str(data), "-o", str(run), "--resume", "--epochs", "2",
                "--config", str(env.teacher / "config.yaml"), *extra]

    return build


def resplit_data(env: Env) -> Path:
    """The tiny dataset with its splits reshuffled (as another --seed would): a training case becomes a test case."""
    import json

    data = env.tmp / "resplit"
    shutil.copytree(env.data, data)
    doc = json.loads((data / "manifest.json").read_text())
    train = next(c for c in doc["cases"] if c["split"] == "train")
    test = next(c for c in doc["cases"] if c["split"] == "test")
    train["split"], test["split"] = "test", "train"
    (data / "manifest.json").write_text(json.dumps(doc, indent=1))
    return data


def teacher_copy(env: Env) -> Path:
    """evaluate writes into the run folder (eval-<split>.json, postprocessing.json): never into the shared run."""
    run = env.tmp / "teacher"
    shutil.copytree(env.teacher, run)
    return run


def evaluate_on(data: Callable[[Env], Path], *extra: str, run: Callable[[Env], Path] = teacher_copy):
    def build(env: Env) -> List[str]:
        return ["evaluate", str(run(env)), "--data", str(data(env)), "--resolution", "prepared", *extra]

    return build


def teacher_without(name: str, truncate: bool = False) -> Callable[[Env], Path]:
    """A copy of the tiny teacher run whose ``name`` checkpoint is deleted (or cut to half its size)."""

    def make(env: Env) -> Path:
        run = env.tmp / "teacher"
        shutil.copytree(env.teacher, run)
        if truncate:
            data = (run / name).read_bytes()
            (run / name).write_bytes(data[: len(data) // 2])
        else:
            (run / name).unlink()
        return run

    return make


def distill_with(*extra) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        return ["distill", str(env.data), "-o", str(env.tmp / "student"), *[str(e) for e in extra]]

    return build


def teacher_with(*extra) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        return ["train-teacher", str(env.data), "-o", str(env.tmp / "teacher"), *[str(e) for e in extra]]

    return build


def preprocess_bad_label(make_label: Callable[[np.ndarray, np.ndarray], tuple]) -> Callable[[Env], List[str]]:
    """A good image (sample case 1) whose label is ``make_label(label_array, affine) -> (array, affine)``."""

    def build(env: Env) -> List[str]:
        src = source_with(env, "bad", lambda p: shutil.copy(SAMPLE / "imagesTr" / "spleen_001.nii.gz",
                                                             str(p) + ".nii.gz"), label=False)
        lab = nib.load(str(SAMPLE / "labelsTr" / "spleen_001.nii.gz"))
        arr, aff = make_label(np.asarray(lab.dataobj), lab.affine.copy())
        nib.save(nib.Nifti1Image(arr, aff), str(src / "bad_label.nii.gz"))
        return ["preprocess", str(src), "-o", str(env.tmp / "out"), *PREP]

    return build


def shifted(arr: np.ndarray, aff: np.ndarray) -> tuple:
    aff[:3, 3] += 7.0
    return arr, aff


def with_value(v: int):
    def make(arr: np.ndarray, aff: np.ndarray) -> tuple:
        arr = arr.copy()
        arr[0, 0, 0] = v
        return arr, aff

    return make


def dicom_missing_slice(folder: Path) -> None:
    shutil.copytree(SAMPLE / "dicom" / "spleen_000", folder)
    files = sorted(folder.iterdir())
    files[len(files) // 2].unlink()


def msd_with_dataset_json(text: str) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        src = env.tmp / "msd"
        shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns("dicom", "*.md"))
        (src / "dataset.json").write_text(text)
        return ["preprocess", str(src), "-o", str(env.tmp / "out"), *PREP]

    return build


# ---------------------------------------------------------------- builders: trust boundaries, integrity


def data_with(damage: Callable[[Path, dict], None]) -> Callable[[Env], Path]:
    """A copy of the tiny dataset whose first test case's arrays are changed by ``damage(cases_dir, case)``."""

    def make(env: Env) -> Path:
        import json

        data = env.tmp / "damaged"
        shutil.copytree(env.data, data)
        case = next(c for c in json.loads((data / "manifest.json").read_text())["cases"] if c["split"] == "test")
        damage(data / "cases", case)
        return data

    return make


def label_of_size(size: int) -> Callable[[Path, dict], None]:
    def damage(cases: Path, case: dict) -> None:
        np.save(cases / f"{case['id']}_lbl.npy", np.zeros((case["prepared_shape"][0], size, size), np.uint8))

    return damage


def truncated_image(cases: Path, case: dict) -> None:
    path = cases / f"{case['id']}_img.npy"
    path.write_bytes(path.read_bytes()[:-1000])


def train_case_into_test(env: Env) -> Path:
    """The tiny dataset prepared again as if with another split: one training case of the run joins the test split
    (which then holds it and the run's own test case)."""
    import json

    data = env.tmp / "resplit2"
    shutil.copytree(env.data, data)
    doc = json.loads((data / "manifest.json").read_text())
    next(c for c in doc["cases"] if c["split"] == "train")["split"] = "test"
    (data / "manifest.json").write_text(json.dumps(doc, indent=1))
    return data


def exported_teacher(env: Env) -> Path:
    """The tiny teacher exported to ONNX once per session (from a copy: export writes postprocessing.json)."""
    from medkd.export import export_run

    out = env.teacher.parent / "integrity-export" / "teacher.onnx"
    if not out.is_file():
        run = out.parent / "teacher"
        shutil.copytree(env.teacher, run, ignore=shutil.ignore_patterns("cache"))
        export_run(run, out, data=env.data)
    return out


def onnx_with_wrong_output(kind: str) -> Callable[[Env], Path]:
    """The exported teacher with one node appended to its graph: the output becomes ``(B, 3, H, W)`` (``channels``)
    or ``(B, 1, H/2, W/2)`` (``size``); its medkd metadata is kept."""

    def make(env: Env) -> Path:
        import onnx
        from onnx import helper

        m = onnx.load(str(exported_teacher(env)))
        name = m.graph.output[0].name
        raw = name + "_raw"
        for node in m.graph.node:
            node.output[:] = [raw if o == name else o for o in node.output]
        if kind == "channels":
            m.graph.node.append(helper.make_node("Concat", [raw, raw, raw], [name], axis=1))
        else:
            m.graph.node.append(helper.make_node("MaxPool", [raw], [name], kernel_shape=[2, 2], strides=[2, 2]))
        m.graph.output[0].type.tensor_type.ClearField("shape")
        path = env.tmp / "wrong.onnx"
        onnx.save(m, str(path))
        return path

    return make


# ---------------------------------------------------------------- builders: trust boundaries (tracebacks, bounds)


def laughs(key: str, levels: int = 9) -> bytes:
    """A YAML mapping whose ``key`` is a "billion laughs" list: 10 aliases of 10 aliases ... (10**levels values
    once expanded, a few hundred bytes on disk)."""
    items = ["&a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    items += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return f"{key}: [{', '.join(items)}]\n".encode()


def onnx_model(in_channels: int, **meta) -> Callable[[Env], Path]:
    """A real ONNX graph (a 1x1 convolution taking ``in_channels``) carrying medkd metadata: a valid recipe for
    the tiny dataset, with the keys in ``meta`` replaced by the raw strings given."""

    def make(env: Env) -> Path:
        pytest.importorskip("onnxruntime")
        import warnings

        import onnx
        import torch

        from medkd.exported import PREFIX, encode_metadata as _encode

        path = env.tmp / "m.onnx"
        net = torch.nn.Conv2d(in_channels, 1, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation notes
            torch.onnx.export(net, (torch.zeros(1, in_channels, 32, 32),), str(path), input_names=["image"],
                              output_names=["logits"], dynamic_axes={"image": {0: "b", 2: "h", 3: "w"}}, dynamo=False)
        props = _encode({"input_channels": in_channels, "prepared_size": 32, "threshold": 0.5,
                         "intensity": {"CT": {"rule": "ct_window", "low": -160.0, "high": 240.0}}})
        props.update({PREFIX + k: v for k, v in meta.items()})
        proto = onnx.load(str(path))
        for k, v in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = k, v
        onnx.save(proto, str(path))
        return path

    return make


def predict_with(model: Callable[[Env], Path]) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        return ["predict", str(model(env)), str(SAMPLE / "imagesTr" / "spleen_001.nii.gz"), "-o", str(env.tmp / "pred")]

    return build


def evaluate_with_onnx(model: Callable[[Env], Path]) -> Callable[[Env], List[str]]:
    def build(env: Env) -> List[str]:
        return [*evaluate_on(lambda e: e.data)(env), "--onnx", str(model(env))]

    return build


CACHE_DISTILL = ["--scales", "dec", "--kd-images", "labelled", "--student-width", "4", "--epochs", "1", "--batch-size",
                 "4", "--device", "cpu", "--teacher-outputs", "disk"]


def distill_on_damaged_cache(damage: Callable[[Path], None], filled: bool) -> Callable[[Env], List[str]]:
    """A distill run fills a disk cache on a copy of the teacher; one item's data array (or, with ``filled``, its
    ``.filled.npy`` row marks) is then damaged by ``damage(path)``; the command is the same distill again."""

    def build(env: Env) -> List[str]:
        teacher = env.tmp / "teacher"
        shutil.copytree(env.teacher, teacher, ignore=shutil.ignore_patterns("cache"))
        argv = ["distill", str(env.data), "--teacher", str(teacher), *CACHE_DISTILL]
        first = run_cli([*argv, "-o", env.tmp / "first"])
        assert first.exit_code == 0, first.stderr
        item = sorted(p for p in (teacher / "cache").glob("*/*.npy") if p.name.endswith(".filled.npy") == filled)[0]
        damage(item)
        return [*argv, "-o", str(env.tmp / "second")]

    return build


def cut_in_half(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    path.write_bytes(b"\x00garbage\xff" * 9)


def ablation_with_eval(edit: Callable[[dict], object]) -> Callable[[Env], List[str]]:
    """A one-run ablation (the no-KD baseline, one seed, one epoch) whose eval-test.json is then replaced by
    ``edit(doc)``; the command is the same ablation again."""

    def build(env: Env) -> List[str]:
        import json

        grid = env.tmp / "grid.yaml"
        grid.write_text("- {scales: none, pmd: false}\n")
        argv = ["ablate", str(env.data), "--teacher", str(env.teacher), "-o", str(env.tmp / "abl"), "--grid", str(grid),
                "--seeds", "0", "--epochs", "1", "--student-width", "4", "--batch-size", "4", "--device", "cpu"]
        first = run_cli(argv)
        assert first.exit_code == 0, first.stderr
        ev = env.tmp / "abl" / "runs" / "baseline" / "seed0" / "eval-test.json"
        ev.write_text(json.dumps(edit(json.loads(ev.read_text()))))
        return argv

    return build


def without_metrics(doc: dict) -> dict:
    return {k: v for k, v in doc.items() if k not in ("dice", "iou", "recall", "precision", "hd95")}


def data_without_split(env: Env) -> Path:
    """The tiny dataset whose manifest lists a case without its 'split'."""
    import json

    data = env.tmp / "nosplit"
    shutil.copytree(env.data, data)
    doc = json.loads((data / "manifest.json").read_text())
    del doc["cases"][0]["split"]
    (data / "manifest.json").write_text(json.dumps(doc, indent=1))
    return data


def nifti_bad_geometry(field: str) -> Callable[[Path], None]:
    """A small image whose header gives a NaN voxel spacing (``pixdim``) or a NaN in its sform matrix."""

    def make(path: Path) -> None:
        img = nib.Nifti1Image(np.zeros((8, 8, 4), np.float32), np.diag([2.9, 2.9, 5.0, 1.0]))
        if field == "pixdim":
            img.header.set_sform(None, code=0)
            img.header.set_qform(None, code=0)
            img.header["pixdim"][1] = np.nan
            img = nib.Nifti1Image(np.asarray(img.dataobj), None, img.header)
        else:
            aff = img.affine.copy()
            aff[0, 3] = np.nan
            img = nib.Nifti1Image(np.asarray(img.dataobj), aff)
        nib.save(img, str(path) + ".nii.gz")

    return make


def dicom_nan_position(folder: Path) -> None:
    import pydicom

    shutil.copytree(SAMPLE / "dicom" / "spleen_000", folder)
    f = sorted(folder.iterdir())[3]
    ds = pydicom.dcmread(str(f))
    ds.ImagePositionPatient = ["nan", 0, 0]
    ds.save_as(str(f))


def predict_on_model(make: Callable[[Env], Path]) -> Callable[[Env], List[str]]:
    return lambda e: ["predict", make(e), SAMPLE / "imagesTr" / "spleen_001.nii.gz", "-o", e.tmp / "pred"]


def ablate_with(grid: bytes) -> Callable[[Env], List[str]]:
    return with_file("grid.yaml", grid, lambda e, p: ["ablate", e.data, "--teacher", e.teacher, "-o", e.tmp / "abl",
                                                     "--grid", p])


def export_with(*extra) -> Callable[[Env], List[str]]:
    return lambda e: ["export", e.teacher, "-o", e.tmp / "m.onnx", *extra]


# ---------------------------------------------------------------- the corpus

CASES: List[Case] = [
    # DICOM: what is wrong, not just "truncated or corrupt"
    Case("dicom-rtplan", preprocess_bad_case(dicom_folder_with("rtplan.dcm")), 1,
         r"^bad case: .*IM0000\.dcm: not an image: a radiotherapy plan \(Modality RTPLAN"),
    Case("dicom-seg", preprocess_bad_case(dicom_folder_with("liver_1frame.dcm")), 1,
         r"^bad case: .*: not an image: a segmentation"),
    Case("dicom-truncated", preprocess_bad_case(dicom_folder_with("MR_truncated.dcm")), 1,
         r"^bad case: .*IM0000\.dcm: cannot decode DICOM pixel data, file is truncated or corrupt"),
    Case("dicom-zero-bytes", preprocess_bad_case(bytes_file(b"")), 1, r"^bad case: .*IM0000\.dcm: empty file"),
    Case("dicom-not-dicom", preprocess_bad_case(bytes_file(b"not a DICOM file\n" * 20)), 1,
         r"^bad case: .*IM0000\.dcm: not a DICOM file"),
    Case("dicom-multiframe", preprocess_bad_case(dicom_folder_with("SC_rgb_rle_2frame.dcm")), 1,
         r"^bad case: .*expected one 2D slice per file"),
    # NIfTI
    Case("nifti-zero-slices", preprocess_bad_case(nifti_file((128, 128, 0))), 1,
         r"^bad case: .*bad\.nii\.gz: empty volume, shape \(128, 128, 0\) has no voxels"),
    Case("nifti-2d", preprocess_bad_case(nifti_file((128, 128))), 1, r"^bad case: .*expected a 3D volume"),
    Case("nifti-truncated", preprocess_bad_case(
        lambda p: Path(str(p) + ".nii.gz").write_bytes((SAMPLE / "imagesTr" / "spleen_002.nii.gz").read_bytes()[:5000])),
         1, r"^bad case: .*bad\.nii\.gz: cannot read NIfTI, file is truncated or corrupt"),
    Case("nifti-zero-bytes", preprocess_bad_case(lambda p: Path(str(p) + ".nii.gz").write_bytes(b"")), 1,
         r"^bad case: .*bad\.nii\.gz: cannot read NIfTI"),
    Case("nifti-4d", preprocess_bad_case(nifti_file((8, 8, 4, 2))), 1,
         r"^bad case: .*bad\.nii\.gz: expected a 3D volume, got shape \(8, 8, 4, 2\) \(4D\)"),
    Case("nifti-nan-voxels", preprocess_bad_case(
        lambda p: nib.save(nib.Nifti1Image(np.full((8, 8, 4), np.nan, np.float32), np.eye(4)), str(p) + ".nii.gz")),
         1, r"^bad case: .*bad\.nii\.gz: image has 256 NaN/inf voxel\(s\)"),
    Case("nifti-label-missing", lambda e: ["preprocess", str(source_with(e, "bad", nifti_file((8, 8, 4)), label=False)),
                                           "-o", str(e.tmp / "out"), *PREP], 1,
         r"^bad case: .*bad\.nii\.gz: missing label \(expected bad_label\.nii\.gz beside it\)"),
    Case("label-shape-mismatch", preprocess_bad_label(lambda a, f: (a[:, :, :-1], f)), 1,
         r"^bad case: .*bad_label\.nii\.gz: label shape \(.*\) != image shape"),
    Case("label-affine-mismatch", preprocess_bad_label(shifted), 1,
         r"^bad case: .*bad_label\.nii\.gz: label affine differs from the image's \(max difference 7"),
    Case("label-value-outside", preprocess_bad_label(with_value(7)), 1,
         r"^bad case: .*bad_label\.nii\.gz: label values \[7\] outside allowed \[0, 1\]"),
    Case("dicom-missing-slice", preprocess_bad_case(dicom_missing_slice), 1,
         r"^bad case: .*bad: inconsistent slice spacing \(.* mm between slices; a slice may be missing\)"),
    Case("dataset-json-malformed", msd_with_dataset_json("{ not json"), 1,
         r"^error: .*dataset\.json: not a valid MSD dataset\.json \(JSONDecodeError"),
    Case("dataset-json-no-training", msd_with_dataset_json('{"labels": {"0": "bg", "1": "spleen"}}'), 1,
         r"^error: .*dataset\.json: not a valid MSD dataset\.json \(KeyError"),
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
         + re.escape("x".join(f"{v:g}" for v in DEFAULT_SPACING)) + " mm"),  # the phantom's spacing
    Case("predict-implausible-spacing", predict_on(sample_variant("huge", lambda a: a, zooms=(40.0, 40.0, 40.0))), 0,
         r"^warning: .*huge\.nii\.gz: implausible voxel spacing 40x40x40 mm"),
    # resume
    Case("resume-other-width", resume_teacher("--width", "8"), 1,
         r"^error: .*teacher\.partial/last\.pt: cannot resume, the partial run differs: width=4 there, 8 now"),
    Case("resume-other-arch", resume_teacher("--arch", "transunet"), 1,
         r"^error: .*cannot resume, the partial run differs: arch='unet' there, 'transunet' now"),
    Case("resume-other-data", resume_teacher(other_data=True), 1,
         r"^error: .*cannot resume, the partial run differs: data .*/data \(fingerprint [0-9a-f]+\) there, "
         r".*/data2 \(fingerprint [0-9a-f]+\) now"),
    # evaluate
    Case("evaluate-own-training-cases", evaluate_on(resplit_data), 1,
         r"^error: .*teacher: 1 of the 1 test case\(s\) of .*resplit were training cases of this run \(.*\); "
         r"was the data prepared again with another split seed\? \(--force"),
    Case("evaluate-own-training-cases-forced", evaluate_on(resplit_data, "--force"), 0,
         r"^warning: LEAKAGE: .*teacher: 1 of the 1 test case\(s\)"),
    Case("evaluate-no-best-pt", evaluate_on(lambda e: e.data, run=teacher_without("best.pt")), 0,
         r"^warning: .*teacher: no best\.pt, evaluated last\.pt \(epoch 1\) instead"),
    Case("evaluate-truncated-best-pt", evaluate_on(lambda e: e.data, run=teacher_without("best.pt", truncate=True)), 1,
         r"^error: .*teacher/best\.pt: cannot load checkpoint, file is truncated or corrupt \(\d+ bytes, not a "
         r"complete torch archive"),
    # option values: usage errors on the command line (exit 2) ...
    *[Case(f"distill-fraction-{v}", distill_with("--scales", "none", "--no-pmd", "--fraction", v), 2,
           rf"^error: --fraction must be in \(0, 1\]( and finite)?, got {v}(\.0)?$") for v in ("0", "1.5", "nan", "-0.5")],
    Case("train-epochs-0", teacher_with("--epochs", "0"), 2, r"^error: --epochs must be >= 1, got 0$"),
    Case("train-batch-size-0", teacher_with("--batch-size", "0"), 2, r"^error: --batch-size must be >= 1, got 0$"),
    Case("train-lr-nan", teacher_with("--lr", "nan"), 2, r"^error: --lr must be > 0 and finite, got nan$"),
    Case("train-lr-inf", teacher_with("--lr", "inf"), 2, r"^error: --lr must be > 0 and finite, got inf$"),
    Case("train-lr-0", teacher_with("--lr", "0"), 2, r"^error: --lr must be > 0, got 0"),
    Case("train-width-0", teacher_with("--width", "0"), 2, r"^error: --width must be >= 1, got 0$"),
    Case("distill-temperature-0", distill_with("--temperature", "0"), 2, r"^error: --temperature must be > 0, got 0"),
    Case("distill-scales-empty", distill_with("--scales", ""), 2,
         r"^error: --scales is empty; give a comma list of enc, bottleneck, dec, or none$"),
    Case("distill-epochs-0", distill_with("--scales", "none", "--no-pmd", "--epochs", "0"), 2,
         r"^error: --epochs must be >= 1, got 0$"),
    Case("evaluate-split-nosuch", lambda e: ["evaluate", e.teacher, "--data", e.data, "--split", "nosuch"], 2,
         r"^error: unknown --split 'nosuch'; valid: train, val, test$"),
    Case("evaluate-batch-size-0", lambda e: ["evaluate", e.teacher, "--data", e.data, "--batch-size", "0"], 2,
         r"^error: --batch-size must be >= 1, got 0$"),
    Case("ablate-fraction-0", lambda e: ["ablate", e.data, "--teacher", e.teacher, "-o", e.tmp / "abl", "--preset",
                                         "quick", "--fraction", "0"], 2, r"^error: --fraction must be in \(0, 1\], got 0"),
    # ... and the same values in a --config file: exit 1 naming the file
    Case("config-fraction", with_file("cfg.yaml", b"scales: none\npmd: false\nfraction: 1.5\n", lambda e, p: [
        "distill", e.data, "-o", e.tmp / "s", "--config", p]), 1,
         r"^error: .*cfg\.yaml: fraction must be in \(0, 1\], got 1\.5$"),
    Case("config-epochs", with_file("cfg.yaml", b"epochs: 0\n", lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1, r"^error: .*cfg\.yaml: epochs must be >= 1, got 0$"),
    Case("config-lr-nan", with_file("cfg.yaml", b"lr: .nan\n", lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1,
         r"^error: .*cfg\.yaml: lr must be > 0 and finite, got nan$"),
    Case("config-lr-text", with_file("cfg.yaml", b"lr: fast\n", lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1,
         r"^error: .*cfg\.yaml: option 'lr' must be float, got 'fast'$"),
    Case("config-scales-empty", with_file("cfg.yaml", b"scales: ''\n", lambda e, p: [
        "distill", e.data, "-o", e.tmp / "s", "--teacher", e.teacher, "--config", p]), 1,
         r"^error: .*cfg\.yaml: scales is empty"),
    Case("config-loss-option-unknown", with_file("cfg.yaml", b"scales: dec\nloss_options: {pool: 2}\n", lambda e, p: [
        "distill", e.data, "-o", e.tmp / "s", "--teacher", e.teacher, "--config", p]), 1,
         r"^error: .*cfg\.yaml: loss_options: loss 'contrastive' takes no option\(s\) pool; valid: .*$"),
    Case("config-loss-option-value", with_file("cfg.yaml", b"scales: dec\nloss: mse\nloss_options: {pool: 0}\n",
                                               lambda e, p: ["distill", e.data, "-o", e.tmp / "s", "--teacher",
                                                             e.teacher, "--config", p]), 1,
         r"^error: .*cfg\.yaml: loss_options: mse pool must be an integer >= 1, got 0$"),
    Case("teacher-missing", distill_with("--teacher", "/nonexistent/teacher"), 1,
         r"^error: /nonexistent/teacher: teacher run folder does not exist$"),
    Case("dicom-jpeg-ls-series", preprocess_dicom_series_ok("MR_small_jpeg_ls_lossless.dcm"), 0, r""),
    Case("dicom-rle-series", preprocess_dicom_series_ok("MR_small_RLE.dcm"), 0, r""),
    # trust boundaries: checkpoints load weights-only; ids and dataset.json entries stay inside the named folders
    # (builders in test_trust.py, which has the fuller checks: payload never runs, nothing written outside)
    Case("trust-hostile-best-pt-distill", trust.hostile_argv("distill"), 1,
         r"^error: .*hostile/best\.pt: refused, not a weights-only checkpoint \(it needs posix\.system\): medkd "
         r"loads only tensors and plain values, since loading a pickled object can run code$"),
    Case("trust-hostile-best-pt-predict", trust.hostile_argv("predict", "exec"), 1,
         r"^error: .*hostile/best\.pt: refused, not a weights-only checkpoint \(it needs builtins\.exec\)"),
    Case("trust-manifest-id-traversal", trust.traversal_argv, 1,
         r"^error: .*data/manifest\.json: case id '\.\./\.\./evilcase' cannot name a file \(it holds a path "
         r"separator\)$"),
    Case("trust-dataset-json-absolute", trust.outside_argv("absolute"), 1,
         r"^error: .*msd/dataset\.json: training entry 0 image '/.*/outside/imagesTr/spleen_000\.nii\.gz' lies "
         r"outside .*msd \(refused; --allow-outside reads files anywhere\)$"),
    Case("trust-dataset-json-dotdot", trust.outside_argv("dotdot"), 1,
         r"^error: .*msd/dataset\.json: training entry 0 image '\./imagesTr/\.\./\.\./outside/imagesTr/"
         r"spleen_000\.nii\.gz' lies outside .*msd \(refused; --allow-outside"),
    Case("trust-dataset-json-outside-allowed", trust.outside_argv("dotdot", "--allow-outside"), 0, r""),
    Case("trust-dataset-json-id-dotdot", msd_with_dataset_json(
        '{"training": [{"image": "./imagesTr/...nii.gz", "label": "./labelsTr/...nii.gz"}]}'), 1,
         r"^error: .*dataset\.json: training entry 0: case id '\.\.' cannot name a file \(it holds '\.\.'\)$"),
    Case("trust-file-name-control-char", lambda e: ["preprocess", source_with(e, "bad\x07", lambda p: shutil.copy(
        SAMPLE / "imagesTr" / "spleen_001.nii.gz", str(p) + ".nii.gz")), "-o", e.tmp / "out", *PREP], 1,
         r"^error: .*/src: case id 'bad\\x07' cannot name a file \(it holds a control character\)$"),
    # trust boundaries: integrity of stored arrays and wrong results with exit 0
    Case("window-infinite", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--window=-inf,inf", *PREP], 2,
         r"^error: --window must be finite LOW,HIGH in HU \(e\.g\. -160,240\), got -inf,inf$"),
    Case("window-nan", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--window=nan,240", *PREP], 2,
         r"^error: --window must be finite LOW,HIGH in HU \(e\.g\. -160,240\), got nan,240$"),
    Case("window-overflow", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--window=-160,1e400", *PREP], 2,
         r"^error: --window must be finite LOW,HIGH in HU .*, got -160,inf$"),
    *[Case(f"evaluate-tolerance-{v}", evaluate_on(lambda e: e.data, "--tolerance", v), 2,
           rf"^error: --tolerance must be > 0 and finite, got {v}$") for v in ("nan", "inf")],
    Case("evaluate-tolerance-0", evaluate_on(lambda e: e.data, "--tolerance", "0"), 2,
         r"^error: --tolerance must be > 0, got 0"),
    Case("evaluate-forced-scores-the-whole-split", evaluate_on(train_case_into_test, "--force"), 0,
         r"^warning: LEAKAGE: .*teacher: 1 of the 2 test case\(s\) of .*resplit2 were training cases"),
    Case("prepared-label-other-shape", evaluate_on(data_with(label_of_size(16)), "--no-postprocessing"), 1,
         r"^error: .*damaged/cases/[^/]+_lbl\.npy: holds a \(\d+, 16, 16\) uint8 array, expected \(\d+, 32, 32\) "
         r"uint8$"),
    Case("prepared-image-truncated", evaluate_on(data_with(truncated_image), "--no-postprocessing"), 1,
         r"^error: .*damaged/cases/[^/]+_img\.npy: truncated: \d+ bytes, expected \d+ for its \(\d+, 32, 32\) "
         r"float32 array$"),
    Case("predict-onnx-wrong-output-channels", predict_with(onnx_with_wrong_output("channels")), 1,
         r"^error: .*wrong\.onnx: model output has shape \(2, 3, 32, 32\) for a \(2, 1, 32, 32\) input; expected "
         r"\(2, 1, 32, 32\) logits \(sigmoid\)"),
    Case("predict-onnx-wrong-output-size", predict_with(onnx_with_wrong_output("size")), 1,
         r"^error: .*wrong\.onnx: model output has shape \(2, 1, 16, 16\) for a \(2, 1, 32, 32\) input"),
    Case("evaluate-onnx-wrong-output", evaluate_with_onnx(onnx_with_wrong_output("size")), 1,
         r"^error: .*wrong\.onnx: model output has shape \(2, 1, 16, 16\) for a \(2, 1, 32, 32\) input"),
    Case("cache-item-truncated", distill_on_damaged_cache(cut_in_half, filled=False), 0,
         r"^note: .*/cache/[0-9a-f]+/[a-z.]+-[0-9a-f]+\.npy: truncated: \d+ bytes, expected \d+ .*; damaged "
         r"teacher-cache item discarded, its rows are computed again$"),
    Case("cache-filled-garbage", distill_on_damaged_cache(garbage, filled=True), 0,
         r"^note: .*\.filled\.npy: cannot load \(not a \.npy array file: .*; damaged teacher-cache item discarded"),
    Case("ablate-eval-without-metrics", ablation_with_eval(without_metrics), 0,
         r"^note: .*seed0/eval-test\.json: not an evaluate result \(no dice, iou, recall, precision, hd95\); "
         r"evaluating again$"),
    Case("ablate-eval-a-list", ablation_with_eval(lambda doc: [doc]), 0,
         r"^note: .*seed0/eval-test\.json: not an evaluate result \(a JSON list, expected an object\); evaluating "
         r"again$"),
    # trust boundaries: tracebacks turned into one line, option bounds, exit codes of out-of-range options
    Case("dataset-json-deep", msd_with_dataset_json("[" * 100_000 + "]" * 100_000), 1,
         r"^error: .*dataset\.json: not a valid MSD dataset\.json \(nested too deeply\)$"),
    *[Case(f"config-{k}-inf", with_file("cfg.yaml", f"{k}: .inf\n".encode(), lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1,
           rf"^error: .*cfg\.yaml: option '{k}' must be int, got inf$") for k in ("epochs", "width", "seed")],
    Case("config-epochs-not-integral", with_file("cfg.yaml", b"epochs: 2.5\n", lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1,
         r"^error: .*cfg\.yaml: option 'epochs' must be int, got 2\.5$"),  # not silently 2
    Case("config-weight-negative", with_file("cfg.yaml", b"weights: {seg: -1}\n", lambda e, p: [
        "distill", e.data, "-o", e.tmp / "s", "--teacher", e.teacher, "--config", p]), 1,
         r"^error: .*cfg\.yaml: weights seg must be >= 0, got -1$"),
    Case("grid-epochs-inf", ablate_with(b"- {scales: [dec], loss: mse, epochs: .inf}\n"), 1,
         r"^error: .*grid\.yaml: cell 1: option 'epochs' must be int, got inf$"),
    Case("grid-seeds-inf", ablate_with(b"seeds: [0, .inf]\ncells:\n- {scales: [dec], loss: mse}\n"), 1,
         r"^error: .*grid\.yaml: seeds must be an integer, got inf$"),
    Case("train-seed-huge", teacher_with("--seed", "99999999999999999999999"), 2,
         r"^error: --seed must be <= 2\*\*63 - 1 \(int64\), got 99999999999999999999999$"),
    Case("train-seed-negative", teacher_with("--seed", "-1"), 2, r"^error: --seed must be >= 0, got -1$"),
    Case("config-seed-negative", with_file("cfg.yaml", b"seed: -1\n", lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1, r"^error: .*cfg\.yaml: seed must be >= 0, got -1$"),
    Case("distill-subset-seed-huge", distill_with("--scales", "none", "--no-pmd", "--subset-seed", str(2**64)), 2,
         r"^error: --subset-seed must be <= 2\*\*63 - 1 \(int64\), got 18446744073709551616$"),
    Case("preprocess-seed-negative", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--seed", "-1"], 2,
         r"^error: --seed must be >= 0, got -1$"),
    Case("sample-data-seed-negative", lambda e: ["sample-data", e.tmp / "sd", "--seed", "-1"], 2,
         r"^error: --seed must be >= 0, got -1$"),
    Case("config-model-kwargs-unknown", with_file("cfg.yaml", b"model_kwargs: {foo: 1}\n", lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1,
         r"^error: .*cfg\.yaml: model_kwargs: unet takes no option\(s\) \['foo'\]; valid: none$"),
    Case("config-model-kwargs-value", with_file("cfg.yaml", b"arch: transunet\nmodel_kwargs: {heads: 0}\n",
                                                lambda e, p: ["train-teacher", e.data, "-o", e.tmp / "t", "--config", p]),
         1, r"^error: .*cfg\.yaml: model_kwargs: transunet refuses \{'heads': 0\} \(ZeroDivisionError"),
    Case("config-weights-billion-laughs", with_file("cfg.yaml", laughs("weights"), lambda e, p: [
        "distill", e.data, "-o", e.tmp / "s", "--teacher", e.teacher, "--config", p]), 1,
         r"^error: .*cfg\.yaml: YAML too large: more than 100,000 values once its aliases are expanded"),
    Case("config-epochs-billion-laughs", with_file("cfg.yaml", laughs("epochs"), lambda e, p: [
        "train-teacher", e.data, "-o", e.tmp / "t", "--config", p]), 1, r"^error: .*cfg\.yaml: YAML too large"),
    Case("grid-recursive-alias", ablate_with(b"- &c {scales: [dec], loss: mse, x: *c}\n"), 1,
         r"^error: .*grid\.yaml: YAML too large: .*an alias that contains itself"),
    Case("distill-batch-size-beyond-data", lambda e: ["distill", e.data, "-o", e.tmp / "s", "--teacher", teacher_copy(e),
                                                      "--batch-size", "1000000", "--epochs", "1", "--device", "cpu"], 0,
         r"^teacher outputs: \w+ \(auto: estimated"),  # the timing probe batch: the data's slices, not a million
    Case("onnx-metadata-size-text", predict_on_model(onnx_model(1, prepared_size="abc")), 1,
         r"^error: .*m\.onnx: invalid metadata: medkd\.prepared_size must be an integer, got 'abc'$"),
    Case("onnx-metadata-not-json", predict_on_model(onnx_model(1, intensity="{not json")), 1,
         r"^error: .*m\.onnx: invalid metadata: medkd\.intensity must be a JSON object, got '\{not json'$"),
    Case("onnx-graph-channels-differ-from-metadata", predict_on_model(onnx_model(3, input_channels="1")), 1,
         r"^error: .*m\.onnx: graph input takes 3 channel\(s\) but metadata medkd\.input_channels says 1$"),
    Case("evaluate-onnx-other-channels", lambda e: ["evaluate", teacher_copy(e), "--data", e.data, "--resolution",
                                                    "prepared", "--onnx", onnx_model(3)(e)], 1,
         r"^error: .*m\.onnx: the model takes 3 input channel\(s\) but .*teacher takes 1 \(is it the export"),
    Case("manifest-case-without-split", evaluate_on(data_without_split), 1,
         r"^error: .*nosplit/manifest\.json: invalid manifest \(case 0 \('[^']+'\) has no 'split'; expected one of "
         r"train, val, test\)$"),
    Case("export-opset", export_with("--opset", "3"), 2, r"^error: --opset must be >= 7, got 3$"),
    Case("export-format", export_with("--format", "tflite"), 2, r"^error: unknown --format 'tflite'; valid: onnx, torchscript$"),
    Case("train-in-channels-2", teacher_with("--in-channels", "2"), 2, r"^error: unknown --in-channels 2; valid: 1, 3$"),
    Case("distill-in-channels-2", distill_with("--scales", "none", "--no-pmd", "--in-channels", "2"), 2,
         r"^error: unknown --in-channels 2; valid: 1, 3$"),
    Case("preprocess-size-0", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--size", "0"], 2,
         r"^error: --size must be >= 8, got 0$"),
    Case("preprocess-window-reversed", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--window", "240,-160"], 2,
         r"^error: --window must be LOW,HIGH with HIGH > LOW"),
    Case("preprocess-test-fraction", lambda e: ["preprocess", SAMPLE, "-o", e.tmp / "out", "--test-fraction", "1.5"],
         2, r"^error: --test-fraction must be in \[0, 1\), got 1\.5$"),
    Case("sample-data-cases-0", lambda e: ["sample-data", e.tmp / "sd", "--cases", "0"], 2,
         r"^error: --cases must be >= 1, got 0$"),
    Case("nifti-nan-pixdim", preprocess_bad_case(nifti_bad_geometry("pixdim")), 1,
         r"^bad case: .*bad\.nii\.gz: non-finite voxel spacing \(pixdim nan, 2\.9, 5\)$"),
    Case("nifti-nan-affine", preprocess_bad_case(nifti_bad_geometry("sform")), 1,
         r"^bad case: .*bad\.nii\.gz: non-finite affine \(the header's sform/qform holds NaN or inf\)$"),
    Case("dicom-nan-position", preprocess_bad_case(dicom_nan_position), 1,
         r"^bad case: .*bad/IM0004\.dcm: non-finite ImagePositionPatient \[nan, 0, 0\]$"),
    # trust boundaries: ablate fair comparisons (budgets, references, fractions) and the teacher's subset
    Case("ablate-fractions-0", lambda e: ["ablate", e.data, "--teacher", e.teacher, "-o", e.tmp / "abl", "--preset",
                                          "quick", "--fractions", "0.5,0"], 2,
         r"^error: --fractions: fraction must be in \(0, 1\], got 0$"),
    Case("ablate-fractions-with-fraction", lambda e: ["ablate", e.data, "--teacher", e.teacher, "-o", e.tmp / "abl",
                                                      "--preset", "quick", "--fractions", "0.5", "--fraction", "0.5"],
         2, r"^error: give --fraction or --fractions, not both$"),
    Case("ablate-grid-unknown-reference", with_file("grid.yaml", b"references: [teacher, oracle]\ncells: [{}]\n",
                                                    lambda e, p: ["ablate", e.data, "--teacher", e.teacher, "-o",
                                                                  e.tmp / "abl", "--grid", p]), 1,
         r"^error: .*grid\.yaml: references: unknown reference\(s\) \['oracle'\]; valid: all_labels, teacher$"),
    Case("ablate-steps-per-epoch-0", lambda e: ["ablate", e.data, "--teacher", e.teacher, "-o", e.tmp / "abl",
                                                "--preset", "quick", "--steps-per-epoch", "0"], 2,
         r"^error: --steps-per-epoch must be >= 1, got 0$"),
    Case("teacher-fraction-0", lambda e: ["train-teacher", e.data, "-o", e.tmp / "t", "--fraction", "0"], 2,
         r"^error: --fraction must be in \(0, 1\], got 0(\.0)?$"),
    # distillation levers: bad values of their options (usage errors on the command line, exit 1 from a file)
    Case("distill-pmd-loss-unknown", distill_with("--pmd-loss", "mse"), 2, r"^error: unknown --pmd-loss 'mse'; valid: kl, cwd$"),
    Case("distill-ema-decay-one", distill_with("--scales", "none", "--no-pmd", "--ema-decay", "1"), 2,
         r"^error: --ema-decay must be in \[0, 1\), got 1\.0$"),
    Case("train-ema-decay-negative", teacher_with("--ema-decay", "-0.5"), 2,
         r"^error: --ema-decay must be in \[0, 1\), got -0\.5$"),
    Case("distill-kd-warmup-negative", distill_with("--kd-warmup-epochs", "-1"), 2,
         r"^error: --kd-warmup-epochs must be >= 0, got -1$"),
    Case("config-teacher-head-unknown", with_file("cfg.yaml", b"scales: [dec]\nloss_options: {teacher_head: shared}\n",
                                                  lambda e, p: ["distill", e.data, "-o", e.tmp / "s", "--teacher",
                                                                e.teacher, "--config", p]), 1,
         r"^error: .*cfg\.yaml: loss_options: contrastive teacher_head must be one of trainable, frozen, identity, "
         r"got 'shared'$"),
    # teacher kinds (CORE): model files as teachers and --teacher-taps (builders in test_teachers.py)
    Case("teacher-onnx-without-sidecar", teachers.onnx_argv(None), 1,
         r"^error: .*seg\.onnx: no input description: put a sidecar seg\.onnx\.json beside it"),
    Case("teacher-onnx-feature-scales", teachers.onnx_argv(teachers.SIDECAR, "--teacher-label", "1", "--scales", "dec"),
         1, r"^error: .*seg\.onnx: feature scales \(dec\) need a torch-module teacher"),
    Case("teacher-onnx-multiclass-without-label", teachers.onnx_argv(teachers.SIDECAR), 1,
         r"^error: .*seg\.onnx: a multi-class teacher \(3 softmax channels\): choose the student's foreground with "
         r"--teacher-label N; classes: 1, 2$"),
    Case("teacher-taps-not-pairs", distill_with("--teacher-taps", "enc"), 2,
         r"^error: --teacher-taps expects scale=module\.path pairs \(e\.g\. enc=encoder\.stages\.2\), got 'enc'$"),
    Case("teacher-taps-typo", lambda e: ["distill", e.data, "-o", e.tmp / "s", "--teacher", e.teacher, "--scales",
                                         "enc", "--teacher-taps", "enc=encodr.3", "--epochs", "1"], 1,
         r"^error: .*--teacher-taps enc=encodr\.3: no module at path 'encodr\.3' in UNet; did you mean encoder\.3"),
    # trust boundaries: --teacher-probs (issue 20, saved teacher probabilities)
    Case("probs-and-teacher", lambda e: tp.probs_cli("--teacher", e.teacher)(e), 1,
         r"^error: give either --teacher or --teacher-probs, not both$"),
    Case("probs-feature-scales", tp.probs_cli("--scales", "enc"), 1,
         r"^error: .*probs: feature scales \(enc\) need a torch-module teacher .* probs teachers give prediction "
         r"maps only"),
    Case("probs-augment", tp.probs_cli("--augment"), 1,
         r"^error: --augment flips the images, which saved --teacher-probs cannot follow \(use --no-augment\)$"),
    Case("probs-not-a-folder", lambda e: ["distill", e.data, "-o", e.tmp / "run", "--teacher-probs", e.tmp / "none"],
         1, r"^error: .*none: --teacher-probs must be a folder of per-case probability files"),
    Case("probs-missing-case", tp.probs_cli(spoil=tp.drop_case), 1,
         r"^error: .*probs: no probabilities for case '[\w-]+' \(expected [\w-]+\.npz or [\w-]+\.nii\.gz\)$"),
    Case("probs-other-shape", tp.probs_cli(spoil=tp.other_shape), 1,
         r"^error: .*probs/[\w-]+\.nii\.gz: case '[\w-]+': probability volume of shape \(46, 48, \d+\) does not "
         r"match the source image's \(48, 48, \d+\)"),
    Case("probs-three-classes", tp.probs_cli(spoil=tp.three_classes), 1,
         r"^error: .*\.nii\.gz: 3 classes \(channels 0-2; .*\): choose the student's foreground class with "
         r"--teacher-label N$"),
    # trust boundaries: MONAI bundle teachers (medkd/teachers/bundle.py; bundles made by monai.bundle, then broken)
    Case("bundle-no-network-def", lambda e: bundle_distill(e, "no-network-def"), 1,
         r"^error: .*configs/inference\.json: no network_def \(and no models/model\.ts\)"),
    Case("bundle-weights-other-net", lambda e: bundle_distill(e, "weights-other-net"), 1,
         r"^error: .*models/model\.pt: weights do not fit network_def UNet of inference\.json \(\d+ of another "
         r"shape; e\.g\. model\.0\.conv\.unit0\.conv\.weight \[16, 1, 3, 3\] vs \[8, 1, 3, 3\]\)$"),
    Case("bundle-multi-class", lambda e: bundle_distill(e, "multi-class"), 1,
         r"^error: .*bundle-multi-class \(MONAI bundle\): a multi-class teacher \(3 softmax channels\): choose the "
         r"student's foreground with --teacher-label N; classes: 1 spleen, 2 liver$"),
    Case("bundle-label-out-of-range", lambda e: bundle_distill(e, "multi-class", "--teacher-label", "3"), 1,
         r"^error: .*--teacher-label 3 is not a foreground class of its 3 softmax channel\(s\); classes: 1 spleen, "
         r"2 liver$"),
    Case("bundle-evaluate-multi-class", lambda e: ["evaluate", monai_bundle.broken("multi-class")(e.tmp), "--data",
                                                   e.data], 1, r"^error: .*classes: 1 spleen, 2 liver$"),
    Case("bundle-3d", lambda e: bundle_distill(e, "3d"), 1,
         r"^error: .*bundle-3d: a 3-D bundle; medkd runs bundles on 2-D slices: run it on each case in MONAI and give "
         r"its probability volumes with --teacher-probs$"),
    Case("bundle-expression", lambda e: bundle_distill(e, "expression"), 1,
         r"^error: .*inference\.json: network_def#channels: '\$\[8, 16, 32\]' is an expression \(Python code\); "
         r"medkd reads bundle configs as data and runs none of it$"),
    Case("bundle-foreign-target", lambda e: bundle_distill(e, "foreign-target"), 1,
         r"^error: .*inference\.json: network_def#_target_ 'os\.system' is not a network of monai\.networks or "
         r"torch\.nn"),
    Case("bundle-crop-foreground", lambda e: bundle_distill(e, "crop-foreground"), 1,
         r"^error: .*inference\.json: preprocessing#transforms#3 \(CropForegroundd\): a preprocessing transform "
         r"medkd cannot reproduce"),
    Case("bundle-pickle-code", lambda e: bundle_distill(e, "pickle-code"), 1,
         r"^error: .*models/model\.pt: refused, not a weights-only checkpoint \(.*system.*\): medkd loads only "
         r"tensors and plain values, since loading a pickled object can run code$"),
    # trust boundaries: ablate with external teachers (ABLATE-EXT): the teacher's options, once per ablation
    Case("ablate-teacher-fold-per-cell", ablate_with(b"- {scales: none, pmd: true, teacher_fold: '1'}\n"), 1,
         r"^error: .*grid\.yaml: cell 1: 'teacher_fold' cannot be set per cell: it chooses the one teacher of the "
         r"ablation \(use --teacher-fold, or the grid's options\)$"),
    Case("ablate-teacher-fold-of-a-medkd-run", lambda e: ["ablate", e.data, "--teacher", e.teacher, "-o",
                                                          e.tmp / "abl", "--preset", "quick", "--teacher-fold", "0"], 1,
         r"^error: .*: --teacher-fold does not apply to medkd teachers"),
    # trust boundaries: bundle targets resolved, not matched by name (issue 20 review; nothing is called:
    # tests/test_teacher_bundle.py::test_hostile_targets_are_never_called)
    Case("bundle-target-attribute-walk", lambda e: bundle_distill(e, "attribute-walk"), 1,
         r"^error: .*inference\.json: network_def#_target_ 'monai\.networks\.nets\.hovernet\.os\.mkdir' is not a "
         r"network of monai\.networks or torch\.nn \(it names the function \w+\.mkdir;"),
    Case("bundle-target-plain-function", lambda e: bundle_distill(e, "plain-function"), 1,
         r"^error: .*inference\.json: network_def#_target_ 'monai\.networks\.utils\.save_state' is not a network "
         r"of monai\.networks or torch\.nn \(it names the function monai\.networks\.utils\.save_state;"),
    Case("bundle-target-nested", lambda e: bundle_distill(e, "nested-target"), 1,
         r"^error: .*inference\.json: network_def#act#_target_ 'monai\.networks\.utils\.save_state' is not a "
         r"network of monai\.networks or torch\.nn"),
    Case("bundle-pretrained", lambda e: bundle_distill(e, "pretrained"), 1,
         r"^error: .*inference\.json: network_def#pretrained: True would make DenseNet121 fetch or read weights "
         r"outside the bundle; medkd loads models/model\.pt only: set pretrained to null or false$"),
    Case("bundle-pretrained-by-default", lambda e: bundle_distill(e, "pretrained-by-default"), 1,
         r"^error: .*inference\.json: network_def#pretrained: True would make EfficientNetBN fetch or read weights "
         r"outside the bundle \(its default\); medkd loads models/model\.pt only"),
    Case("bundle-teacher-fold", lambda e: bundle_distill(e, "multi-class", "--teacher-fold", "0"), 1,
         r"^error: .*bundle-multi-class: --teacher-fold does not apply to bundle teachers$"),
    Case("probs-teacher-checkpoint", tp.probs_cli("--teacher-checkpoint", "best.pt", "--teacher-taps", "enc=a.b"), 1,
         r"^error: .*probs: --teacher-checkpoint, --teacher-taps do not apply to probs teachers$"),
    # evaluate's teacher-row flags are DistillConfig's declarations, with their checks (usage errors)
    Case("evaluate-teacher-checkpoint-path", lambda e: ["evaluate", e.teacher, "--data", e.data,
                                                        "--teacher-checkpoint", "../checkpoint_final.pth"], 2,
         r"^error: --teacher-checkpoint must be a file name such as checkpoint_final\.pth \(no folder\), got "
         r"'\.\./checkpoint_final\.pth'$"),
    Case("evaluate-teacher-fold-word", lambda e: ["evaluate", e.teacher, "--data", e.data, "--teacher-fold", "best"],
         2, r"^error: --teacher-fold must be a fold number \(0, 1, \.\.\.\) or 'all', got 'best'$"),
    Case("evaluate-teacher-label-huge", lambda e: ["evaluate", e.teacher, "--data", e.data, "--teacher-label",
                                                   "100000"], 2, r"^error: --teacher-label must be <= \d+, got 100000$"),
]


def bundle_distill(env: Env, how: str, *extra: str) -> List[str]:
    """``distill --teacher BUNDLE`` (PMD only) from a bundle broken ``how`` (:func:`monai_bundle.broken`)."""
    return ["distill", env.data, "-o", env.tmp / "student", "--teacher", monai_bundle.broken(how)(env.tmp),
            "--scales", "none", "--pmd", "--epochs", "1", *extra]


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


def test_resume_refusal_leaves_no_copy(tmp_path, tiny_data, tiny_teacher):
    r = run_cli(resume_teacher("--width", "8")(Env(tmp_path, tiny_data, tiny_teacher)))
    run = tmp_path / "teacher"
    assert r.exit_code == 1
    assert not (tmp_path / "teacher.partial").exists()
    assert (run / "best.pt").is_file()


def test_nan_in_first_epoch_names_no_missing_file(tmp_path, tiny_data, monkeypatch):
    """A NaN before any epoch finished: the message must not point at a last.pt that does not exist."""
    from conftest import _quiet, tiny_teacher_config

    from medkd.errors import TrainingError
    from medkd.train.teacher import TeacherTask, train_teacher

    real_forward, calls = TeacherTask.forward, {"n": 0}

    def forward(self, x, y, index=None):
        terms = real_forward(self, x, y, index)
        calls["n"] += 1
        if calls["n"] >= 2:  # second step of epoch 1
            terms["dice"] = terms["dice"] * float("nan")
        return terms

    monkeypatch.setattr(TeacherTask, "forward", forward)
    with pytest.raises(TrainingError) as e:
        train_teacher(tiny_data, tmp_path / "run", tiny_teacher_config(epochs=2), console=_quiet())
    msg = str(e.value)
    assert "epoch 1" in msg and "no epoch had finished" in msg and "last.pt" not in msg


def test_forced_leakage_is_in_json_and_table(tmp_path, tiny_data, tiny_teacher):
    import json

    env = Env(tmp_path, tiny_data, tiny_teacher)
    r = run_cli(evaluate_on(resplit_data, "--force", "--json")(env))
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    assert len(doc["train_overlap"]) == 1 and doc["warnings"][0].startswith("LEAKAGE")
    assert "⚠ LEAKAGE" in r.stderr  # the table (on stderr with --json): the row and the caption


def test_forced_evaluation_scores_every_case_of_the_split(tmp_path, tiny_data, tiny_teacher):
    """--force on a split that holds one training case of the run and one other: both are scored (was: only the
    training case), and the JSON names the training case."""
    import json

    env = Env(tmp_path, tiny_data, tiny_teacher)
    r = run_cli(evaluate_on(train_case_into_test, "--force", "--json")(env))
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    test = [c["id"] for c in json.loads((tmp_path / "resplit2" / "manifest.json").read_text())["cases"]
            if c["split"] == "test"]
    assert doc["n_cases"] == len(doc["per_case"]) == len(test) == 2
    assert sorted(c["id"] for c in doc["per_case"]) == sorted(test)
    trained = doc["train_overlap"]
    assert len(trained) == 1 and trained[0] in test and doc["warnings"][0].startswith("LEAKAGE")


def _snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", [c for c in CASES if c.code != 0 and c.id.startswith((
    "window-", "evaluate-tolerance-", "prepared-", "predict-onnx-wrong", "evaluate-onnx-wrong"))], ids=str)
def test_integrity_refusals_write_nothing(case: Case, env: Env):
    """Refused before any work: every file that was there is unchanged and nothing was added (no mask, no
    eval-<split>.json, no dataset)."""
    argv = case.build(env)
    before = _snapshot(env.tmp, env.data, env.teacher)
    r = run_cli(argv)
    assert r.exit_code == case.code, r.stderr
    assert _snapshot(env.tmp, env.data, env.teacher) == before


def test_ablation_evaluates_a_malformed_eval_again(tmp_path, tiny_data, tiny_teacher):
    """An eval-test.json without metrics used to drop its seed from the row silently; it is evaluated again."""
    import json

    argv = ablation_with_eval(without_metrics)(Env(tmp_path, tiny_data, tiny_teacher))
    r = run_cli([*argv, "--json"])
    assert r.exit_code == 0, r.stderr
    row = json.loads(r.stdout)["rows"][0]
    assert row["seeds"] == [0] and row["dice_mean"] is not None
    ev = json.loads((tmp_path / "abl" / "runs" / "baseline" / "seed0" / "eval-test.json").read_text())
    assert ev["dice"] == row["dice_mean"]


# ---------------------------------------------------------------- output write failures
#
# A file-size limit (RLIMIT_FSIZE, in a child process with SIGXFSZ ignored) makes every write past the limit fail
# with EFBIG, as a full disk does with ENOSPC: the command must stop with one line naming the OUTPUT file and the OS
# reason, exit 1, blame no input, keep the previous output and leave no temp folder behind. One child process runs
# every command in turn (torch is imported once), with its own limit around each command.

LIMITED = """
import contextlib, io, json, resource, signal, sys, traceback
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
from medkd.cli import app
spec = json.load(open(sys.argv[1]))
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
results = {}
for name, s in spec.items():
    err, out = io.StringIO(), io.StringIO()
    resource.setrlimit(resource.RLIMIT_FSIZE, (s["limit"], hard))
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = app(args=s["argv"], standalone_mode=False) or 0
            except SystemExit as e:
                code = e.code
            except BaseException:
                code, _ = "uncaught", err.write(traceback.format_exc())
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results[name] = {"code": code, "stderr": err.getvalue(), "stdout": out.getvalue()}
json.dump(results, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def write_failures(tmp_path_factory, tiny_data, tiny_teacher):
    """Each scenario's folder, command line and file-size limit, and what the command did under the limit."""
    import json
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("efbig")
    spec = {}
    # preprocess, with --skip-bad: a write failure is not a bad case, so it cannot be skipped into success
    d = root / "preprocess"
    (d / "src").mkdir(parents=True)
    for name in ("spleen_001", "spleen_002"):
        shutil.copy(SAMPLE / "imagesTr" / f"{name}.nii.gz", d / "src" / f"{name}.nii.gz")
        shutil.copy(SAMPLE / "labelsTr" / f"{name}.nii.gz", d / "src" / f"{name}_label.nii.gz")
    shutil.copytree(tiny_data, d / "data")  # the previous dataset, which must survive
    spec["preprocess"] = (["preprocess", d / "src", "-o", d / "data", "--overwrite", "--skip-bad", "--size", "64",
                           "--test-fraction", "0", "--val-fraction", "0"], 100_000)
    spec["train"] = (["train-teacher", tiny_data, "-o", root / "train" / "run", "--width", "4", "--epochs", "1",
                      "--batch-size", "4", "--device", "cpu"], 30_000)
    spec["distill"] = (["distill", tiny_data, "-o", root / "distill" / "student", "--scales", "none", "--no-pmd",
                        "--epochs", "1", "--batch-size", "4", "--device", "cpu"], 2_000)
    shutil.copytree(tiny_teacher, root / "evaluate" / "teacher")
    spec["evaluate"] = (["evaluate", root / "evaluate" / "teacher", "--data", tiny_data, "--resolution", "prepared",
                         "--device", "cpu"], 1_000)
    spec["predict"] = (["predict", tiny_teacher, SAMPLE / "imagesTr" / "spleen_001.nii.gz",
                        SAMPLE / "imagesTr" / "spleen_002.nii.gz", "-o", root / "predict" / "pred", "--device", "cpu"],
                       300)
    # export: the error names the model file asked for, not the hidden temp file it is written to first
    shutil.copytree(tiny_teacher, root / "export-run")  # export writes postprocessing.json into the run
    for name, model in (("export", "m.onnx"), ("export-ts", "m.pt")):
        spec[name] = (["export", root / "export-run", "-o", root / name / model, "--data", tiny_data,
                       "--format", "onnx" if model.endswith(".onnx") else "torchscript"], 100_000)
    for name in spec:
        (root / name).mkdir(exist_ok=True)
    doc = {k: {"argv": [str(a) for a in argv], "limit": limit} for k, (argv, limit) in spec.items()}
    (root / "spec.json").write_text(json.dumps(doc))
    before = (d / "data" / "manifest.json").read_bytes()
    proc = subprocess.run([sys.executable, "-c", LIMITED, str(root / "spec.json"), str(root / "results.json")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return root, json.loads((root / "results.json").read_text()), before


def assert_write_failure(r: dict, path_regex: str) -> None:
    err = r["stderr"]
    assert r["code"] == 1, err
    assert "Traceback" not in err + r["stdout"], err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert re.search(rf"^error: {path_regex}: cannot write \(File too large\)$", errors[0]), errors[0]
    assert "bad case" not in err and "unexpected error" not in err, err


def leftovers(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_preprocess_file_too_large(write_failures):
    root, results, before = write_failures
    d = root / "preprocess"
    assert_write_failure(results["preprocess"], re.escape(str(d / "data" / "cases")) + r"/spleen_00[12]_img\.npy")
    assert (d / "data" / "manifest.json").read_bytes() == before
    assert leftovers(d) == []


def test_train_teacher_file_too_large(write_failures):
    root, results, _ = write_failures
    d = root / "train"
    assert_write_failure(results["train"], re.escape(str(d / "run")) + r"\.partial/(best|last)\.pt")
    assert sorted(p.name for p in d.iterdir()) == []  # nothing to resume: no RUN.partial, no temp, no lock


def test_distill_file_too_large(write_failures):
    root, results, _ = write_failures
    d = root / "distill"
    assert_write_failure(results["distill"], re.escape(str(d / "student")) + r"\.partial/[a-z_]+\.(pt|yaml|jsonl|json|png)")
    assert sorted(p.name for p in d.iterdir()) == []


def test_evaluate_file_too_large(write_failures):
    root, results, _ = write_failures
    run = root / "evaluate" / "teacher"
    assert_write_failure(results["evaluate"], re.escape(str(run)) + r"/[a-z_-]+\.json")
    assert leftovers(run) == []


def test_predict_file_too_large(write_failures):
    root, results, _ = write_failures
    out = root / "predict" / "pred"
    assert_write_failure(results["predict"], re.escape(str(out)) + r"/spleen_001_seg\.nii\.gz")
    assert not out.exists() or leftovers(out) == []


@pytest.mark.parametrize("name,model", [("export", "m.onnx"), ("export-ts", "m.pt")])
def test_export_file_too_large(write_failures, name, model):
    pytest.importorskip("onnxruntime")
    root, results, _ = write_failures
    d = root / name
    assert_write_failure(results[name], re.escape(str(d / model)))
    assert sorted(p.name for p in d.iterdir()) == []  # no model, no sidecar, no temp file


@pytest.mark.skipif(hasattr(__import__("os"), "geteuid") and __import__("os").geteuid() == 0,
                    reason="root ignores directory permissions")
def test_read_only_output_folder(tmp_path, tiny_teacher):
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o555)
    try:
        r = run_cli(["predict", tiny_teacher, SAMPLE / "imagesTr" / "spleen_001.nii.gz", "-o", ro])
        assert r.exit_code == 1
        assert re.search(r"^error: .*ro/spleen_001_seg\.nii\.gz: cannot write \(Permission denied\)", r.stderr, re.M)
    finally:
        os.chmod(ro, 0o755)


# ---------------------------------------------------------------- what killed runs leave behind


def killed_temp(dest: Path) -> Path:
    """A process that creates ``dest``'s temp folder with the real helper and is killed with SIGKILL."""
    import signal
    import subprocess
    import sys

    code = ("import sys, time; from pathlib import Path; from medkd.rundir import temp_dir_beside\n"
            "t = temp_dir_beside(Path(sys.argv[1])); (t / 'cases').mkdir(); (t / 'cases' / 'x.npy').write_bytes(b'0' * 4096)\n"
            "print(t, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(dest)], stdout=subprocess.PIPE, text=True)
    tmp = Path(proc.stdout.readline().strip())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir()
    return tmp


def test_stale_preprocess_temp_is_removed_and_named(tmp_path):
    src = source_with(Env(tmp_path, tmp_path, tmp_path), "other", nifti_file((8, 8, 4)), label=False)
    (src / "other.nii.gz").unlink()
    out = tmp_path / "data"
    stale = killed_temp(out)
    r = run_cli(["preprocess", src, "-o", out, *PREP])
    assert r.exit_code == 0, r.stderr
    assert not stale.exists()
    assert re.search(rf"^note: {re.escape(str(stale))}: removed \(0\.0 MB left by process \d+, which no longer runs\)",
                     r.stderr, re.M), r.stderr


def test_folder_set_aside_by_killed_replace_is_restored(tmp_path, tiny_data):
    """Killed between replace_dir's two renames: the previous dataset sits in .data.old-PID-...; it is put back."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "data"
    aside = tmp_path / f".data.old-{pid}-abc123"
    shutil.copytree(tiny_data, aside)
    src = source_with(Env(tmp_path, tmp_path, tmp_path), "x", nifti_file((8, 8, 4)), label=False)
    r = run_cli(["preprocess", src, "-o", out, *PREP])
    assert r.exit_code == 1  # the restored dataset is not overwritten without --overwrite
    assert (out / "manifest.json").is_file() and not aside.exists()
    assert re.search(rf"^note: {re.escape(str(out))}: restored from \.data\.old-{pid}-abc123", r.stderr, re.M), r.stderr
    assert re.search(r"^error: .*data: already exists", r.stderr, re.M), r.stderr


def test_running_process_temp_is_left_alone(tmp_path):
    import os

    from medkd.rundir import clean_stale_temps

    mine_elsewhere = tmp_path / f".data.tmp-{os.getppid()}-abc123"  # the parent (pytest's launcher) is alive
    mine_elsewhere.mkdir()
    notes = clean_stale_temps(tmp_path, stem="data")
    assert mine_elsewhere.is_dir() and "still running; left alone" in notes[0]


def test_other_hosts_temp_is_left_alone(tmp_path):
    """On a shared file system a pid of another host cannot be checked here: its temp is named, not removed."""
    import subprocess
    import sys

    from medkd.rundir import _host_tag, clean_stale_temps

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    other = "000000" if _host_tag() != "000000" else "ffffff"
    theirs, mine = tmp_path / f".data.tmp-{dead}-abc123@{other}", tmp_path / f".data.tmp-{dead}-abc124@{_host_tag()}"
    theirs.mkdir()
    mine.mkdir()
    notes = clean_stale_temps(tmp_path, stem="data")
    assert theirs.is_dir() and not mine.exists()
    assert any("on another host; left alone" in n for n in notes) and any("removed" in n for n in notes)
