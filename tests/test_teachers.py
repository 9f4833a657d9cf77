"""Teacher kinds (medkd.teachers): the registry, the medkd-run kind, the bridge to external models, --teacher-taps,
and the TorchScript/ONNX file kinds end to end (real exports of the tiny teacher, real distillations)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional

import pytest
import torch
from rich.console import Console

from medkd.config import DistillConfig, build_config
from medkd.data.prepared import PreparedData
from medkd.errors import MedkdError
from medkd.teachers import KINDS, TeacherRequest, detect_kind, open_teacher
from medkd.teachers.bridge import (Intensity, choose_label, dataset_window, foreground_logit, intensity_bridge,
                                   size_for_spacing)
from medkd.rundir import file_sha256
from conftest import run_copy
from conftest import cli as _cli, one_error as _one_error


# ------------------------------------------------------------------------------------------------ registry, medkd
def test_kinds_are_registered_in_detection_order():
    names = list(KINDS)
    assert names[0] == "medkd" and {"torchscript", "onnx"} <= set(names)


def test_medkd_run_opens_as_before(tiny_teacher, tiny_data):
    lines = []
    console = Console(file=None, record=True, width=400)
    t = open_teacher(tiny_teacher, TeacherRequest(in_channels=1), PreparedData(tiny_data), console)
    lines = console.export_text().strip().splitlines()
    assert t.kind == "medkd" and t.module is not None and t.taps_ok and t.in_channels == 1
    assert t.default_taps == t.module.taps
    assert t.cache_key_file == tiny_teacher / "best.pt" and t.cache_root == tiny_teacher / "cache"  # caches reused
    assert t.files == {"best.pt": file_sha256(tiny_teacher / "best.pt")}
    rec = json.loads(json.dumps(t.record()))
    assert rec["kind"] == "medkd" and rec["files"] == t.files and "features" in rec["terms"] and "pmd" in rec["terms"]
    assert lines == [f"teacher: medkd {tiny_teacher} (in_channels 1, checkpoint best.pt, arch unet, epoch "
                     f"{t.details['epoch']})"]


def test_unknown_teacher_lists_what_each_kind_expects(tmp_path):
    (tmp_path / "junk").mkdir()
    with pytest.raises(MedkdError) as e:
        detect_kind(tmp_path / "junk")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{tmp_path / 'junk'}: not a teacher medkd can read")
    assert "medkd: a run folder" in msg and "onnx: an .onnx file" in msg and "torchscript: a TorchScript" in msg
    with pytest.raises(MedkdError, match=r"m\.onnx: teacher file not found$"):
        detect_kind(tmp_path / "m.onnx")


def test_medkd_teacher_refuses_what_it_has_no_use_for(tiny_teacher, tiny_data):
    with pytest.raises(MedkdError, match=r"--teacher-label 2: a medkd teacher has one foreground class"):
        open_teacher(tiny_teacher, TeacherRequest(in_channels=1, label=2), PreparedData(tiny_data))
    with pytest.raises(MedkdError, match=r"teacher: --teacher-fold, --teacher-checkpoint do not apply to medkd "
                                         r"teachers$"):
        open_teacher(tiny_teacher, TeacherRequest(fold="0", checkpoint="c.pth"), PreparedData(tiny_data))


# ------------------------------------------------------------------------------------------------------ bridge
def test_softmax_foreground_logit_is_log_odds():
    z = torch.randn(2, 4, 5, 5) * 5
    for n in (1, 2, 3):
        p = torch.softmax(z.double(), 1)[:, n : n + 1]
        want = torch.log(p) - torch.log1p(-p)
        got = foreground_logit(z.double(), "softmax", n)
        assert torch.allclose(got, want, atol=1e-9)
    two = torch.randn(3, 2, 4, 4)
    assert torch.allclose(foreground_logit(two, "softmax", 1), two[:, 1:] - two[:, :1], atol=1e-6)
    assert torch.equal(foreground_logit(two[:, :1], "sigmoid", 0), two[:, :1])
    huge = torch.tensor([[[[1e4]], [[-1e4]]]])
    assert torch.isfinite(foreground_logit(huge, "softmax", 1)).all()


def test_label_choice():
    assert choose_label("sigmoid", 1, None, None, "t") == 0
    assert choose_label("sigmoid", 1, 1, None, "t") == 0
    assert choose_label("softmax", 2, None, None, "t") == 1
    assert choose_label("softmax", 3, 2, None, "t") == 2
    with pytest.raises(MedkdError, match=r"^t: a multi-class teacher \(3 softmax channels\): choose the student's "
                                         r"foreground with --teacher-label N; classes: 1 liver, 2 tumour$"):
        choose_label("softmax", 3, None, {0: "background", 1: "liver", 2: "tumour"}, "t")
    with pytest.raises(MedkdError, match=r"--teacher-label 0 is not a foreground class of its 3 softmax"):
        choose_label("softmax", 3, 0, None, "t")


def test_intensity_bridge():
    x = torch.rand(2, 1, 8, 8)
    # medkd's own recipe on data prepared with the same window: the prepared values as they are
    assert intensity_bridge(Intensity("medkd", -160, 240), (-160.0, 240.0), "t")(x) is x
    # another window: back to HU, then the teacher's window (clipped)
    f = intensity_bridge(Intensity("window", -100, 100), (-160.0, 240.0), "t")
    hu = x * 400 - 160
    assert torch.allclose(f(x), (hu.clamp(-100, 100) + 100) / 200, atol=1e-6)
    g = intensity_bridge(Intensity("zscore", mean=50.0, std=20.0), (-160.0, 240.0), "t")
    assert torch.allclose(g(x), (hu - 50) / 20, atol=1e-4)
    # per-slice z-score does not need the source scale: works on per-case (MR) data too
    z = intensity_bridge(Intensity("zscore"), None, "t")(x)
    assert torch.allclose(z.mean(dim=(-2, -1)), torch.zeros(2, 1), atol=1e-5)
    with pytest.raises(MedkdError, match=r"^t: its intensity normalisation \(window\) needs the source intensities"):
        intensity_bridge(Intensity("window", -100, 100), None, "t")


def test_intensity_fields_are_checked():
    with pytest.raises(MedkdError, match=r"^s\.json: intensity normalise must be one of medkd, window, zscore, none, "
                                         r"got 'ct'$"):
        Intensity.from_doc({"normalise": "ct"}, "s.json")
    with pytest.raises(MedkdError, match=r"^s\.json: intensity window needs low and high$"):
        Intensity.from_doc({"normalise": "window", "low": 0}, "s.json")
    with pytest.raises(MedkdError, match=r"^s\.json: intensity std must be a finite number, got 'x'$"):
        Intensity.from_doc({"normalise": "zscore", "mean": 0, "std": "x"}, "s.json")
    with pytest.raises(MedkdError, match=r"^s\.json: intensity has unknown field\(s\) lo; valid"):
        Intensity.from_doc({"normalise": "window", "lo": 0}, "s.json")


def test_dataset_window_and_spacing(tiny_data):
    data = PreparedData(tiny_data)
    rules = [c["intensity"] for c in data.cases]
    if all(r["rule"] == "ct_window" for r in rules):
        assert dataset_window(data) == (rules[0]["low"], rules[0]["high"])
    else:
        assert dataset_window(data) is None
    assert size_for_spacing([1.0, 1.0], 32, [2.0, 2.0]) == 16
    assert size_for_spacing([1.0, 1.5], 32, [1.0, 1.0], multiple=8) == 48


# ----------------------------------------------------------------------------------------------- --teacher-taps
DISTILL = ["--student-width", "4", "--epochs", "1", "--batch-size", "4", "--device", "cpu",
           "--teacher-outputs", "live", "--kd-images", "labelled"]


def test_teacher_taps_form_is_a_usage_error(tiny_data, tiny_teacher, tmp_path):
    for taps, msg in [("enc", r"--teacher-taps expects scale=module\.path pairs"),
                      ("encx=a.b", r"--teacher-taps keys must be scales"),
                      ("enc=a..b", r"--teacher-taps: module path of enc must be a dotted name")]:
        r = _cli(["distill", tiny_data, "-o", tmp_path / "s", "--teacher", tiny_teacher, "--scales", "enc",
                  "--teacher-taps", taps, *DISTILL])
        assert r.exit_code == 2 and re.search(msg, _one_error(r)), r.stderr
    assert not (tmp_path / "s").exists()


def test_teacher_taps_typo_is_named_with_a_suggestion(tiny_data, tiny_teacher, tmp_path):
    r = _cli(["distill", tiny_data, "-o", tmp_path / "s", "--teacher", tiny_teacher, "--scales", "enc",
              "--teacher-taps", "enc=encodr.3", *DISTILL])
    line = _one_error(r)
    assert r.exit_code == 1 and "--teacher-taps enc=encodr.3: no module at path 'encodr.3'" in line
    assert "did you mean encoder.3" in line
    assert not (tmp_path / "s").exists()


def test_teacher_taps_override_a_medkd_teachers_own(tiny_data, tiny_teacher, tmp_path):
    r = _cli(["distill", tiny_data, "-o", tmp_path / "s", "--teacher", tiny_teacher, "--scales", "enc", "--loss",
              "mse", "--teacher-taps", "enc=encoder.2", "--json", *DISTILL])
    assert r.exit_code == 0, r.stderr
    doc = json.loads(r.stdout)
    cfg = (tmp_path / "s" / "config.yaml").read_text()
    assert "teacher_taps:\n  enc: encoder.2" in cfg
    src = doc["teacher_source"]
    assert src["kind"] == "medkd" and src["files"]["best.pt"] == file_sha256(tiny_teacher / "best.pt")
    assert "teacher: medkd" in r.stderr


def test_taps_of_an_external_torch_teacher_are_its_own_paths(tiny_data, tmp_path):
    """A torch network wrapped by the bridge (as nnU-Net's and a bundle's are) is tapped at paths of its own
    network: --teacher-taps is required for feature scales, checked with suggestions, and prefixed for the hooks."""
    from medkd.distill.distiller import DistillTerms
    from medkd.distill.inputs import teacher_tap_paths
    from medkd.models import build_model
    from medkd.teachers.base import LoadedTeacher
    from medkd.teachers.bridge import BridgedTeacher

    net = build_model("unet", in_channels=1, num_classes=1, width=4).eval()  # any torch network
    module = BridgedTeacher(net, 1, 32, lambda x: x, None, "sigmoid", 0)
    loaded = LoadedTeacher("external", tmp_path, module, 1, {}, {}, True, None, None, None)

    def cfg(**kw):
        return build_config(DistillConfig, overrides=dict(teacher=str(tmp_path), scales=["enc"], loss="mse", **kw))

    assert teacher_tap_paths(loaded, cfg(teacher_taps={"enc": "encoder.3"})) == {"enc": "net.encoder.3"}
    with pytest.raises(MedkdError, match=r"external teacher: BridgedTeacher has no known tap for enc: give "
                                         r"--teacher-taps enc=module\.path$"):
        teacher_tap_paths(loaded, cfg())
    with pytest.raises(MedkdError, match=r"--teacher-taps enc=encoder\.33: no module at path 'encoder\.33' in UNet; "
                                         r"did you mean encoder\.3"):
        teacher_tap_paths(loaded, cfg(teacher_taps={"enc": "encoder.33"}))
    student = build_model("s1", in_channels=1, num_classes=1, width=4)
    terms = DistillTerms(student, module, cfg(teacher_taps={"enc": "encoder.3"}), 32)
    assert terms.t_paths == {"enc": "net.encoder.3"}
    x = torch.rand(2, 1, 32, 32)
    got = terms.teacher_view().run(x)
    with torch.no_grad():
        assert torch.equal(got["logits"], net(x)[0]) and got["enc"].shape[0] == 2


# ------------------------------------------------------------------------------------------ TorchScript and ONNX
@pytest.fixture(scope="module")
def exports(tiny_teacher, tmp_path_factory):
    """The tiny teacher exported by ``medkd export`` as ONNX and as TorchScript (+ its metadata sidecar)."""
    out = tmp_path_factory.mktemp("exports")
    run = run_copy(tiny_teacher, out)  # export saves the run's postprocessing rule: never into the shared run
    for fmt, name in (("onnx", "t.onnx"), ("torchscript", "t.pt")):
        r = _cli(["export", run, "-o", out / name, "--format", fmt, "--device", "cpu", "--quiet"])
        assert r.exit_code == 0, r.stderr
    return {"onnx": out / "t.onnx", "torchscript": out / "t.pt"}


PMD_ONLY = ["--scales", "none", "--pmd", "--student-width", "4", "--epochs", "2", "--batch-size", "4", "--device",
            "cpu", "--seed", "3", "--teacher-outputs", "live", "--json"]


def _distill(data, out, teacher, *extra):
    r = _cli(["distill", data, "-o", out, "--teacher", teacher, *PMD_ONLY, *extra])
    assert r.exit_code == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_exported_teacher_answers_like_its_run(exports, tiny_teacher, tiny_data):
    """The bridged file's logits on prepared slices equal the run's (TorchScript: the same graph; ONNX Runtime:
    within the export's own tolerance, 1e-3)."""
    from medkd.data.prepared import SliceDataset
    from medkd.infer import seg_logits

    data = PreparedData(tiny_data)
    x = torch.stack([SliceDataset(data, "train")[i][0] for i in range(6)])
    run = open_teacher(tiny_teacher, TeacherRequest(), data)
    assert not any(p.requires_grad for p in run.module.parameters())  # frozen as loaded
    want = seg_logits(run.module(x))
    for kind, tol in (("torchscript", 1e-5), ("onnx", 1e-3)):
        t = open_teacher(exports[kind], TeacherRequest(), data)
        assert t.kind == kind and not t.taps_ok and t.details["description"]["from"] == "medkd export metadata"
        assert t.cache_root.parent == data.root / "teacher-cache" and t.cache_key_file == exports[kind]
        got = t.module(x)
        assert got.shape == want.shape == (6, 1, data.size, data.size)
        assert float((got - want).abs().max()) <= tol, kind


#: A PMD-only student distilled from the exported teacher vs from its run, same seed, 2 epochs: TorchScript runs
#: the same graph (identical targets, identical student); ONNX Runtime's logits differ by ~1e-6, which can flip an
#: fp16-rounded target, so the students may differ by that much: val Dice within 0.01, losses within 1 %.
DICE_TOL = 0.01


def test_pmd_student_from_exported_teacher_equals_student_from_run(exports, tiny_teacher, tiny_data, tmp_path):
    ref, _ = _distill(tiny_data, tmp_path / "run", tiny_teacher)
    for kind in ("torchscript", "onnx"):
        doc, err = _distill(tiny_data, tmp_path / kind, exports[kind])
        assert f"teacher: {kind} {exports[kind]}" in err
        src = doc["teacher_source"]
        assert src["kind"] == kind and src["terms"] == ["pmd", "cwd", "pseudo_label"]
        assert src["files"][exports[kind].name] == file_sha256(exports[kind])
        if kind == "torchscript":
            assert src["files"]["t.pt.json"] == file_sha256(exports[kind].with_name("t.pt.json"))
            assert doc["best_val_dice"] == ref["best_val_dice"]
        assert abs(doc["best_val_dice"] - ref["best_val_dice"]) <= DICE_TOL, kind
        h_ref = [json.loads(l) for l in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
        h = [json.loads(l) for l in (tmp_path / kind / "history.jsonl").read_text().splitlines()]
        for a, b in zip(h, h_ref):
            assert math.isclose(a["pmd"], b["pmd"], rel_tol=1e-2 if kind == "onnx" else 1e-6), (kind, a, b)


def test_file_teacher_disk_cache_lives_in_the_data_folder(exports, tiny_data, tmp_path):
    """An external teacher's disk cache is DATA/teacher-cache/<kind>-<sha12>/, never beside the user's model, and a
    second run reuses it."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)  # the session's dataset stays as it is
    teacher = tmp_path / "m.pt"
    teacher.write_bytes(exports["torchscript"].read_bytes())
    teacher.with_name("m.pt.json").write_bytes(exports["torchscript"].with_name("t.pt.json").read_bytes())
    common = ["--teacher-outputs", "disk", "--epochs", "1"]
    first, _ = _distill(data, tmp_path / "a", teacher, *common)
    assert first["teacher_outputs"]["mode"] == "disk"
    caches = list((data / "teacher-cache").glob("torchscript-*/*"))
    assert caches and sorted(p.name for p in tmp_path.iterdir()) == ["a", "data", "m.pt", "m.pt.json"]
    second, err = _distill(data, tmp_path / "b", teacher, *common)
    assert second["teacher_cache"] == first["teacher_cache"] and "computing" not in err


def _foreign_onnx(path: Path, channels: int = 2, classes: int = 3, batch: Optional[int] = None) -> Path:
    """An ONNX file not made by medkd: a 1x1 conv to ``classes`` softmax channels (no metadata); its batch
    dimension is free, or fixed at ``batch``."""
    import warnings

    net = torch.nn.Conv2d(channels, classes, 1)
    axes = {2: "h", 3: "w"} if batch is not None else {0: "b", 2: "h", 3: "w"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no onnxscript needed
        torch.onnx.export(net, torch.zeros(batch or 1, channels, 16, 16), str(path), input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": axes, "y": axes}, dynamo=False)
    return path


SIDECAR = "input_channels: 2\nintensity: {normalise: window, low: -100, high: 200}\nsize: 16\noutput: softmax\n"


def test_foreign_onnx_with_sidecar_and_label(tmp_path, tiny_data):
    m = _foreign_onnx(tmp_path / "seg.onnx")
    (tmp_path / "seg.onnx.yaml").write_text(SIDECAR + "classes: {1: liver, 2: tumour}\n")
    data = PreparedData(tiny_data)
    t = open_teacher(m, TeacherRequest(label=2), data)
    x = torch.rand(3, 1, data.size, data.size)
    z = t.module(x)
    assert z.shape == (3, 1, data.size, data.size) and torch.isfinite(z).all()
    assert t.details["input_size"] == 16 and t.details["foreground_channel"] == 2 and t.details["output_channels"] == 3
    assert set(t.files) == {"seg.onnx", "seg.onnx.yaml"}
    t1 = open_teacher(m, TeacherRequest(label=1), data)
    assert t1.cache_root != t.cache_root  # another label: other targets, another cache


@pytest.mark.parametrize("batch", [1, 2])
def test_foreign_onnx_with_a_fixed_batch_runs_in_chunks_of_it(tmp_path, tiny_data, batch):
    """A graph exported with a fixed batch (often 1) answers any batch: run in chunks of its size (the last one
    padded), equal to the same network exported with a free batch."""
    data = PreparedData(tiny_data)
    x = torch.rand(3, 1, data.size, data.size)
    out = {}
    for name, b in (("free", None), ("fixed", batch)):
        torch.manual_seed(0)
        (tmp_path / name).mkdir()
        m = _foreign_onnx(tmp_path / name / "seg.onnx", batch=b)
        (tmp_path / name / "seg.onnx.yaml").write_text(SIDECAR)
        out[name] = open_teacher(m, TeacherRequest(label=1), data).module(x)
    assert out["fixed"].shape == (3, 1, data.size, data.size)
    assert torch.allclose(out["fixed"], out["free"], atol=1e-5)


def test_one_torchscript_loader_for_every_reader(tmp_path, tiny_data):
    """A file that is not TorchScript reads the same one line wherever it is loaded: a ``--teacher`` file, a
    bundle's ``models/model.ts``, an exported model given to predict/evaluate."""
    from medkd.exported import TorchScriptModel, short_error
    from medkd.teachers.bundle import BundleSpec, build_network

    bad = tmp_path / "m.pt"
    bad.write_bytes(b"not a zip")
    (tmp_path / "m.pt.yaml").write_text(SIDECAR)
    pattern = r"m\.pt: cannot load TorchScript model \(\w+: .+\)$"
    with pytest.raises(MedkdError, match=pattern):
        open_teacher(bad, TeacherRequest(), PreparedData(tiny_data))
    spec = BundleSpec(root=tmp_path, config_file=None, network_def=None, weights=bad, in_channels=1, spatial_dims=2,
                      classes=["background", "spleen"], activation="softmax")
    with pytest.raises(MedkdError, match=pattern):
        build_network(spec)
    with pytest.raises(MedkdError, match=r"m\.pt"):
        TorchScriptModel(bad)
    assert short_error(KeyError()) == "KeyError"  # never an empty reason


def onnx_argv(sidecar, *extra):
    """``env -> argv``: distill from a foreign ONNX teacher (with ``sidecar`` text beside it unless ``None``); also
    used by test_bad_inputs' CASES."""

    def build(env) -> list:
        m = _foreign_onnx(env.tmp / "seg.onnx")
        if sidecar is not None:
            (env.tmp / "seg.onnx.yaml").write_text(sidecar)
        return ["distill", env.data, "-o", env.tmp / "s", "--teacher", m, "--student-width", "4", "--epochs", "1",
                "--device", "cpu", *extra]

    return build


def test_foreign_torchscript_with_spacing_sidecar(tmp_path, tiny_data):
    """A TorchScript file not made by medkd, described by a sidecar that gives its spacing: the slices are resized
    by the dataset's median prepared spacing to about that spacing (rounded up to size_multiple) and back."""
    from medkd.teachers.bridge import median_prepared_spacing

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated, still supported
        net = torch.jit.script(torch.nn.Conv2d(1, 1, 3, padding=1))
    m = tmp_path / "seg.ts"
    net.save(str(m))
    (tmp_path / "seg.json").write_text(json.dumps({"input_channels": 1, "intensity": {"normalise": "zscore"},
                                                   "spacing": [2.0, 2.0], "size_multiple": 8, "output": "sigmoid"}))
    data = PreparedData(tiny_data)
    t = open_teacher(m, TeacherRequest(in_channels=3), data)
    want = size_for_spacing(median_prepared_spacing(data), data.size, [2.0, 2.0], 8)
    assert t.kind == "torchscript" and t.details["input_size"] == want and want % 8 == 0
    assert set(t.files) == {"seg.ts", "seg.json"} and t.details["description"]["from"] == "seg.json"
    x = torch.rand(2, 3, data.size, data.size)  # a 3-channel student: the prepared slice repeated
    with torch.no_grad():
        assert t.module(x).shape == (2, 1, data.size, data.size)


BAD_FILES = [
    # (sidecar text or None, --teacher-label, extra args, exit code, error pattern)
    (None, None, [], 1, r"seg\.onnx: no input description: put a sidecar seg\.onnx\.json beside it"),
    (SIDECAR.replace("softmax", "softplus"), 1, [], 1, r"seg\.onnx\.yaml: output must be one of sigmoid, softmax, "
                                                       r"got 'softplus'$"),
    (SIDECAR.replace("low: -100", "low: 300"), 1, [], 1, r"seg\.onnx\.yaml: intensity needs high > low"),
    (SIDECAR + "colour: red\n", 1, [], 1, r"seg\.onnx\.yaml: unknown field\(s\) colour; valid: input_channels"),
    (SIDECAR.replace("input_channels: 2", "input_channels: 3"), 1, [], 1,
     r"seg\.onnx: graph input takes 2 channel\(s\) but its description \(seg\.onnx\.yaml\) says input_channels 3"),
    (SIDECAR + "classes: {1: liver, 2: tumour}\n", None, [], 1,
     r"seg\.onnx: a multi-class teacher \(3 softmax channels\): choose the student's foreground with "
     r"--teacher-label N; classes: 1 liver, 2 tumour$"),
    (SIDECAR, 7, [], 1, r"--teacher-label 7 is not a foreground class of its 3 softmax channel\(s\)"),
    (SIDECAR, 1, ["--scales", "enc"], 1, r"seg\.onnx: feature scales \(enc\) need a torch-module teacher whose "
                                         r"modules can be hooked; onnx teachers give prediction maps only"),
    (SIDECAR, -1, [], 2, r"--teacher-label must be >= 0, got -1$"),
    (SIDECAR, 1, ["--teacher-fold", "0"], 1, r"seg\.onnx: --teacher-fold does not apply to onnx teachers$"),
]


@pytest.mark.parametrize("sidecar,label,extra,code,pattern", BAD_FILES,
                         ids=["no-sidecar", "bad-output", "bad-window", "unknown-field", "channels", "no-label",
                              "label-range", "feature-scales", "label-negative", "fold"])
def test_bad_file_teacher_is_one_line(tmp_path, tiny_data, sidecar, label, extra, code, pattern):
    m = _foreign_onnx(tmp_path / "seg.onnx")
    if sidecar is not None:
        (tmp_path / "seg.onnx.yaml").write_text(sidecar)
    args = ["distill", tiny_data, "-o", tmp_path / "s", "--teacher", m, "--student-width", "4", "--epochs", "1",
            "--device", "cpu", *extra, *(["--teacher-label", label] if label is not None else [])]
    r = _cli(args)
    line = _one_error(r)
    assert r.exit_code == code and re.search(pattern, line), (r.exit_code, line)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
