"""Trust boundaries: files are data, never code.

* Checkpoints load weights-only: a ``best.pt`` whose pickle would call ``os.system`` or ``exec`` is refused with one
  line before anything in it runs; checkpoints written by the previous release (``tests/data/a13dbb9-teacher/``,
  numpy RNG state included) still load; new checkpoints need no allow-list at all.
* Case ids and ``dataset.json`` entries cannot lead outside the folders the user named.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.errors import DataError, MedkdError
from medkd.rundir import check_case_id, confined
from medkd.checkpoint import load_checkpoint

OLD_RUN = Path(__file__).parent / "data" / "a13dbb9-teacher"
SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


def run_cli(argv):
    return CliRunner().invoke(app, [str(a) for a in argv])


def one_error_line(r) -> str:
    """The run's only ``error:`` line, after checking there is no traceback and no uncaught exception."""
    text = r.stdout + r.stderr
    assert "Traceback" not in text, text
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, r.stderr
    return errors[0]


# ------------------------------------------------------------------------------------------ checkpoints


class RunsShell:
    """Pickles as ``os.system(command)``: what a hostile checkpoint would carry."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class RunsPython:
    """Pickles as ``exec(code)``."""

    def __init__(self, code: str):
        self.code = code

    def __reduce__(self):
        return builtins.exec, (self.code,)


PAYLOADS = {
    "os.system": (lambda p: RunsShell(f"touch {p}"), r"posix\.system|nt\.system"),
    "exec": (lambda p: RunsPython(f"open({str(p)!r}, 'w').close()"), r"builtins\.exec"),
}


def hostile_run(tmp: Path, teacher: Path, payload: str):
    """A copy of the tiny teacher run whose ``best.pt`` (real weights, real config) also holds ``payload``'s
    object; returns ``(run, the file the payload would create)``."""
    run = tmp / "hostile"
    shutil.copytree(teacher, run)
    marker = tmp / "PAYLOAD"
    ckpt = torch.load(run / "best.pt", weights_only=True)
    ckpt["history_note"] = PAYLOADS[payload][0](marker)
    (run / "best.pt").unlink()
    torch.save(ckpt, run / "best.pt")
    return run, marker


def hostile_commands(tmp: Path, data: Path, run: Path):
    return {
        "predict": ["predict", run, SAMPLE / "imagesTr" / "spleen_005.nii.gz", "-o", tmp / "pred"],
        "distill": ["distill", data, "-o", tmp / "student", "--teacher", run, "--epochs", "1"],
        "evaluate": ["evaluate", run, "--data", data, "--resolution", "prepared"],
    }


def hostile_argv(command: str, payload: str = "os.system"):
    """``env -> argv``: ``command`` on a hostile copy of the tiny teacher (also used by test_bad_inputs' CASES)."""

    def build(env) -> list:
        run, _ = hostile_run(env.tmp, env.teacher, payload)
        return hostile_commands(env.tmp, env.data, run)[command]

    return build


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
@pytest.mark.parametrize("command", ["predict", "distill", "evaluate"])
def test_hostile_checkpoint_is_refused_without_running(command, payload, tmp_path, tiny_data, tiny_teacher):
    r = run_cli(hostile_argv(command, payload)(SimpleNamespace(tmp=tmp_path, data=tiny_data, teacher=tiny_teacher)))
    assert not (tmp_path / "PAYLOAD").exists(), "the checkpoint's payload ran"
    line = one_error_line(r)
    assert r.exit_code == 1, r.stderr
    assert re.search(rf"hostile/best\.pt: refused, not a weights-only checkpoint \(it needs ({PAYLOADS[payload][1]})\)",
                     line), line
    assert not (tmp_path / "student").exists() and not (tmp_path / "pred").exists()


def test_refusal_names_at_most_three_globals(tmp_path):
    path = tmp_path / "many.pt"
    torch.save({"model": {}, "model_config": {}, "x": [RunsShell("true"), RunsPython("pass"),
                                                          Path("x"), Exception("y")]}, path)
    with pytest.raises(MedkdError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "\n" not in msg and re.search(r"\(it needs [\w.]+, [\w.]+, [\w.]+ \(\+1 more\)\)", msg), msg


def test_new_checkpoints_need_no_allow_list(tiny_teacher):
    """What medkd writes now is tensors and plain values: nothing beyond torch's own weights-only set."""
    for name in ("best.pt", "last.pt"):
        assert torch.serialization.get_unsafe_globals_in_checkpoint(tiny_teacher / name) == [], name
    rng = load_checkpoint(tiny_teacher / "last.pt")["rng"]
    assert isinstance(rng["numpy"][1], list) and len(rng["numpy"][1]) == 624


def test_old_release_checkpoints_are_the_legacy_format():
    """The committed checkpoints are what a13dbb9 wrote (numpy's RNG state as an ndarray): the allow-list is needed."""
    assert torch.serialization.get_unsafe_globals_in_checkpoint(OLD_RUN / "best.pt") == []
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(OLD_RUN / "last.pt")) >= {"numpy.ndarray"}


def test_old_release_checkpoint_evaluates_and_predicts(tmp_path, tiny_data):
    run = tmp_path / "old"
    shutil.copytree(OLD_RUN, run)
    r = run_cli(["evaluate", run, "--data", tiny_data, "--resolution", "prepared", "--json"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_cases"] >= 1
    r = run_cli(["predict", run, SAMPLE / "imagesTr" / "spleen_005.nii.gz", "-o", tmp_path / "pred"])
    assert r.exit_code == 0, r.stderr
    assert (tmp_path / "pred" / "spleen_005_seg.nii.gz").is_file()


def test_old_release_last_pt_restores_like_resume():
    """Everything ``--resume`` restores from an old ``last.pt``: weights, optimizer, schedule and RNG states."""
    import random

    from medkd.config import TeacherConfig, build_config
    from medkd.models import build_model
    from medkd.train.optim import make_optimizer, make_scheduler
    from medkd.train.seeding import rng_state, set_rng_state

    ck = load_checkpoint(OLD_RUN / "last.pt")
    cfg = build_config(TeacherConfig, overrides={k: v for k, v in ck["config"].items() if k not in ("kind", "data")})
    model = build_model(**ck["model_config"])
    model.load_state_dict(ck["model"])
    opt = make_optimizer(model.parameters(), cfg)
    opt.load_state_dict(ck["optimizer"])
    make_scheduler(opt, cfg).load_state_dict(ck["scheduler"])
    saved = rng_state()
    try:
        set_rng_state(ck["rng"])
        assert np.array_equal(np.random.get_state()[1], ck["rng"]["numpy"][1])
        assert random.getstate() == ck["rng"]["python"]
    finally:
        set_rng_state(saved)


# ------------------------------------------------------------------------------------------ paths


@pytest.mark.parametrize("cid", ["", "../../evilcase", "a/b", "a\\b", "..", "x..y", "tab\there", "nul\0", 7])
def test_check_case_id_refuses(cid):
    with pytest.raises(DataError, match=r"^where: case id .* cannot name a file \("):
        check_case_id(cid, "where")


@pytest.mark.parametrize("cid", ["spleen_001", "case 7", "Ünïcode-1", ".hidden", "a.b"])
def test_check_case_id_accepts(cid):
    assert check_case_id(cid, "where") == cid


def test_confined(tmp_path):
    assert confined(tmp_path, "a.png") == tmp_path / "a.png"
    for name in ("../a.png", "..", ".", "", "/etc/passwd", "sub/../../a"):
        with pytest.raises(MedkdError, match="would lead outside the folder"):
            confined(tmp_path, name)
    (tmp_path / "link.png").symlink_to(tmp_path.parent / "elsewhere.png")
    with pytest.raises(MedkdError, match="would lead outside the folder"):
        confined(tmp_path, "link.png")


def traversal_data(tmp: Path, data: Path, cid: str = "../../evilcase") -> Path:
    """A copy of the tiny dataset whose test case is renamed ``cid``, with its arrays placed where the unchecked
    id leads (``DATA/cases/../../``), so that only the id check stands between evaluate and the files outside."""
    out = tmp / "work" / "data"
    shutil.copytree(data, out)
    doc = json.loads((out / "manifest.json").read_text())
    case = next(c for c in doc["cases"] if c["split"] == "test")
    for kind in ("img", "lbl"):
        shutil.copy(out / "cases" / f"{case['id']}_{kind}.npy", (out / "cases" / f"{cid}_{kind}.npy"))
    case["id"] = cid
    (out / "manifest.json").write_text(json.dumps(doc))
    return out


def traversal_argv(env) -> list:
    """``evaluate --overlays`` of the tiny teacher on :func:`traversal_data` (also used by test_bad_inputs)."""
    data = traversal_data(env.tmp, env.data)
    run = env.tmp / "teacher"
    shutil.copytree(env.teacher, run)
    return ["evaluate", run, "--data", data, "--resolution", "prepared", "--overlays", env.tmp / "work" / "deep" / "ov"]


def test_manifest_id_traversal_writes_nothing_outside(tmp_path, tiny_data, tiny_teacher):
    argv = traversal_argv(SimpleNamespace(tmp=tmp_path, data=tiny_data, teacher=tiny_teacher))
    before = set(tmp_path.rglob("*"))
    r = run_cli(argv)
    assert not list(tmp_path.rglob("evilcase.png")) and set(tmp_path.rglob("*")) == before, "something was written"
    line = one_error_line(r)
    assert r.exit_code == 1
    assert re.search(r"data/manifest\.json: case id '\.\./\.\./evilcase' cannot name a file \(it holds a path "
                     r"separator\)$", line), line


def msd_source(tmp: Path, prefix: str) -> Path:
    """The shipped sample MSD folder copied, the files of its first training entry moved to ``tmp/outside/`` and
    the entry pointing at them as ``<prefix>/imagesTr/<name>`` and ``<prefix>/labelsTr/<name>``."""
    src = tmp / "msd"
    shutil.copytree(SAMPLE, src, ignore=shutil.ignore_patterns("dicom", "*.md"))
    doc = json.loads((src / "dataset.json").read_text())
    doc["training"] = doc["training"][:3]  # three cases are enough
    first = doc["training"][0]
    for key, folder in (("image", "imagesTr"), ("label", "labelsTr")):
        name = Path(first[key]).name
        (tmp / "outside" / folder).mkdir(parents=True)
        shutil.move(src / first[key], tmp / "outside" / folder / name)
        first[key] = f"{prefix}/{folder}/{name}"
    (src / "dataset.json").write_text(json.dumps(doc))
    return src


def outside_argv(how: str, *extra: str):
    """``env -> argv``: preprocess an MSD folder whose first entry lies outside it, ``how`` = ``absolute`` or
    ``dotdot`` (``./imagesTr/../../outside/...``) (also used by test_bad_inputs)."""

    def build(env) -> list:
        src = msd_source(env.tmp, str(env.tmp / "outside") if how == "absolute" else "./imagesTr/../../outside")
        return ["preprocess", src, "-o", env.tmp / "out", "--size", "16", "--test-fraction", "0", "--val-fraction",
                "0", *extra]

    return build


@pytest.mark.parametrize("how", ["absolute", "dotdot"])
def test_dataset_json_entry_outside_source(how, tmp_path):
    argv = outside_argv(how)(SimpleNamespace(tmp=tmp_path))
    r = run_cli(argv)
    line = one_error_line(r)
    assert r.exit_code == 1 and not (tmp_path / "out").exists()
    assert re.search(r"msd/dataset\.json: training entry 0 image '.*outside/imagesTr/spleen_000\.nii\.gz' lies "
                     r"outside .*msd \(refused; --allow-outside reads files anywhere\)$", line), line
    r = run_cli([*argv, "--allow-outside"])
    assert r.exit_code == 0, r.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    sources = {c["id"]: c["source"] for c in manifest["cases"]}
    assert Path(sources["spleen_000"]).resolve() == (tmp_path / "outside" / "imagesTr" / "spleen_000.nii.gz").resolve()
