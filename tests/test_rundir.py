"""The run-folder module: file names of the contract, the one atomic-write and the one folder-replace helper."""

from __future__ import annotations

import json
import os

import pytest

from medkd import rundir
from medkd.errors import MedkdError


def test_contract_names(tmp_path):
    run = tmp_path / "RUN"
    assert rundir.eval_json(run, "val") == run / "eval-val.json"
    assert rundir.partial_dir(run) == tmp_path / "RUN.partial"
    assert rundir.checkpoint_path(run, "last") == run / "last.pt"
    with pytest.raises(MedkdError, match="no best.pt"):
        rundir.run_checkpoint(run)


def test_atomic_write_keeps_extension_and_leaves_nothing_on_error(tmp_path):
    seen = []
    for name in ("a.nii.gz", "b.npy", "c.png", "summary.json"):
        with rundir.atomic_path(tmp_path / name) as tmp:
            seen.append(tmp.name)
            tmp.write_bytes(b"x")
    assert [n.startswith(".") for n in seen] == [True] * 4

    assert seen[0].endswith(".nii.gz") and seen[1].endswith(".npy") and seen[2].endswith(".png")
    rundir.write_json(tmp_path / "summary.json", {"a": 1})
    with pytest.raises(RuntimeError):
        with rundir.atomic_path(tmp_path / "summary.json") as tmp:
            tmp.write_text("{half")
            raise RuntimeError("boom")
    assert json.loads((tmp_path / "summary.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.npy", "c.png", "summary.json"]
    with pytest.raises(ValueError):  # NaN is not JSON
        rundir.write_json(tmp_path / "summary.json", {"a": float("nan")})
    with pytest.raises(MedkdError, match=r"nowhere/x.json: cannot write"):
        rundir.write_json(tmp_path / "nowhere" / "x.json", {})


def test_replace_dir_restores_the_old_folder_when_the_move_fails(tmp_path, monkeypatch):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    new = rundir.temp_dir_beside(dest)
    (new / "new.txt").write_text("new")
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # the move of the new folder into place
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError):
        rundir.replace_dir(new, dest)
    monkeypatch.setattr(os, "replace", real)
    assert (dest / "old.txt").read_text() == "old" and new.is_dir()
    rundir.replace_dir(new, dest)
    assert [p.name for p in dest.iterdir()] == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old/.tmp folder left


def test_case_file_takes_the_first_suffix_and_stays_in_the_folder(tmp_path):
    """One lookup of ``<case><suffix>`` for --teacher-probs and mask folders: suffixes in order, confined."""
    (tmp_path / "a.nii.gz").write_bytes(b"")
    (tmp_path / "a.npz").write_bytes(b"")
    assert rundir.case_file(tmp_path, "a", (".npz", ".nii.gz")) == tmp_path / "a.npz"
    assert rundir.case_file(tmp_path, "a", (".nii", ".nii.gz")) == tmp_path / "a.nii.gz"
    assert rundir.case_file(tmp_path, "b", (".npz",)) is None
    with pytest.raises(MedkdError, match="would lead outside the folder"):
        rundir.case_file(tmp_path, "../a", (".npz",))
