"""The disk store of a per-case teacher's outputs (:mod:`medkd.distill.case_store`).

A per-case teacher (a 3-D nnU-Net) computes its probabilities case by case, at great cost; the store keeps them so
that later runs on the same teacher compute nothing. The teacher here is a registered test kind whose probabilities
are a smoothed copy of each case's prepared label and which counts its ``case_probs`` calls. Everything else is the
real CLI, the real store and the real training.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app
from medkd.data.prepared import PreparedData

MARKER = "counting.marker"


@pytest.fixture
def counting(tiny_data, tmp_path):
    """``(data copy, teacher folder, calls)``: a per-case teacher kind registered for the test; ``calls`` lists
    every case id its ``case_probs`` was asked for. The prepared data is a copy: the store lives inside it."""
    from medkd.teachers import KINDS, register_kind
    from medkd.teachers.base import LoadedTeacher, external_cache_root, hash_files

    data_dir = tmp_path / "data"
    shutil.copytree(tiny_data, data_dir)
    folder = tmp_path / "counting-teacher"
    folder.mkdir()
    (folder / MARKER).write_text("v1\n")
    calls = []

    def load(path, request, data):
        def case_probs(cid):
            calls.append(cid)
            return (0.15 + 0.7 * np.asarray(data.label(cid), dtype=np.float32)).astype(np.float32)

        files = hash_files(path, [Path(path) / MARKER])
        details = {"per_case": "test"}
        return LoadedTeacher(kind="counting", source=path, module=None, in_channels=1, files=files, details=details,
                             taps_ok=False, default_taps=None, cache_key_file=None,
                             cache_root=external_cache_root(Path(data.root), "counting", files, details),
                             case_probs=case_probs)

    register_kind("counting", lambda p: (Path(p) / MARKER).is_file(), load, expects="a test folder")
    try:
        yield data_dir, folder, calls
    finally:
        KINDS.pop("counting", None)


def distill(data: Path, teacher: Path, run: Path, *extra: str):
    argv = ["distill", str(data), "-o", str(run), "--teacher", str(teacher), "--epochs", "1", "--batch-size", "8",
            "--device", "cpu", "--seed", "0", "--student-width", "4", "--scales", "none", "--pmd",
            "--kd-images", "labelled", *extra]
    r = CliRunner().invoke(app, argv)
    assert r.exit_code == 0, r.output
    return r, json.loads((run / "summary.json").read_text())


def training(run: Path):
    """What training produced: the history without its clock times."""
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if "time" not in k and "second" not in k} for row in rows]


def test_store_computes_each_case_once_and_trains_like_memory(counting, tmp_path):
    data_dir, teacher, calls = counting
    r, first = distill(data_dir, teacher, tmp_path / "a")
    out = first["teacher_outputs"]
    train = sorted(first["labelled_case_ids"])  # the cases the run reads (--kd-images labelled)
    assert len(train) >= 2 and sorted(calls) == train  # every case the run reads computed exactly once
    assert out["mode"] == "disk" and out["requested"] == "auto", out
    assert "compute is the cost, reads are cheap" in out["reason"]
    root = Path(out["cache_root"])
    assert root.parent == Path(data_dir) / "teacher-cache" / root.parent.name and root.parent.name.startswith("counting-")
    assert sorted(p.stem for p in root.glob("*.npy")) == train
    assert out["cache_bytes"] == sum(p.stat().st_size - 128 for p in root.glob("*.npy"))  # fp16 data, 128-byte header
    assert out["cache_key"] and root.name == f"cases-{out['cache_key']}"

    # a second run on the same teacher computes nothing and trains like the first
    r, second = distill(data_dir, teacher, tmp_path / "b", "--teacher-outputs", "disk")
    assert sorted(calls) == train and second["teacher_outputs"]["mode"] == "disk"
    assert f"0 of {len(train)} case(s) computed now" in second["teacher_outputs"]["reason"]
    # memory: today's behaviour (every case computed in the run, no store) and the very same training
    r, mem = distill(data_dir, teacher, tmp_path / "m", "--teacher-outputs", "memory")
    assert len(calls) == 2 * len(train) and mem["teacher_outputs"]["mode"] == "memory"
    assert training(tmp_path / "a") == training(tmp_path / "b") == training(tmp_path / "m")
    assert first["best_val_dice"] == second["best_val_dice"] == mem["best_val_dice"]
    # live does not apply to a per-case teacher: said in one reason, served from the store
    r, live = distill(data_dir, teacher, tmp_path / "l", "--teacher-outputs", "live")
    assert live["teacher_outputs"]["mode"] == "disk" and "live does not apply" in live["teacher_outputs"]["reason"]
    assert len(calls) == 2 * len(train) and training(tmp_path / "l") == training(tmp_path / "a")

    # a truncated store file is never read: a note names it, that case alone is computed again
    victim = root / f"{train[0]}.npy"
    victim.write_bytes(victim.read_bytes()[:-10])
    r, again = distill(data_dir, teacher, tmp_path / "t")
    notes = [line for line in r.stderr.splitlines() if line.startswith("note:") and victim.name in line]
    assert notes and "truncated" in notes[0], r.stderr
    assert calls[2 * len(train):] == [train[0]] and again["teacher_outputs"]["mode"] == "disk"
    assert training(tmp_path / "t") == training(tmp_path / "a")


def test_store_over_the_budget_falls_back_to_memory(counting, tmp_path):
    data_dir, teacher, calls = counting
    r, s = distill(data_dir, teacher, tmp_path / "a", "--cache-budget", "0")
    out = s["teacher_outputs"]
    assert out["mode"] == "memory" and out["cache_budget_bytes"] == 0, out
    assert "teacher store would need" in out["reason"] and "> budget 0.00 MB: memory instead" in out["reason"]
    # never started (the data copy may hold other tests' teacher caches: the shared dataset is a session fixture)
    assert not list((Path(data_dir) / "teacher-cache").glob("counting-*"))
    assert sorted(calls) == sorted(s["labelled_case_ids"])


def test_two_fills_at_once_compute_each_case_once(tiny_data, tmp_path):
    """Two processes (ablation shards) filling one store: the lock makes the second find the first's cases done;
    every file is whole and holds the probabilities' fp16 logits."""
    import threading
    import time

    import torch

    from medkd.distill.case_store import CaseStore
    from medkd.distill.targets import prob_logits

    data = PreparedData(tiny_data)
    cids = sorted(data.case_ids("train"))
    calls, notes = [], []

    def case_probs(cid):
        calls.append(cid)
        time.sleep(0.05)
        return (0.15 + 0.7 * np.asarray(data.label(cid), dtype=np.float32)).astype(np.float32)

    stores = [CaseStore(tmp_path / "root", data, log=notes.append) for _ in range(2)]
    threads = [threading.Thread(target=s.fill, args=(cids, case_probs)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(calls) == cids and sum(s.computed for s in stores) == len(cids)
    for cid in cids:
        want = prob_logits(torch.from_numpy(case_probs(cid))).numpy()
        np.testing.assert_array_equal(np.asarray(stores[0].open(cid)), want)
    assert not stores[0].missing(cids) and not any("damaged" in n for n in notes)


def test_ablation_seeds_share_the_store(counting, tmp_path):
    """``medkd ablate`` on a per-case teacher: the plan leaves the runs to the store, so across seeds no train case
    is computed twice (the teacher reference row scores the test cases from its probabilities)."""
    import collections

    import yaml

    data_dir, teacher, calls = counting
    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump([{"scales": "none", "pmd": True, "kd_images": "labelled"}]))
    out = tmp_path / "abl"
    r = CliRunner().invoke(app, ["ablate", str(data_dir), "--teacher", str(teacher), "-o", str(out), "--grid",
                                 str(grid), "--seeds", "0,1", "--student-width", "4", "--epochs", "1",
                                 "--batch-size", "4", "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.stderr
    assert "per-case teacher: its outputs are computed once per case into the teacher store" in r.stderr
    train = set(PreparedData(data_dir).case_ids("train"))
    counts = collections.Counter(c for c in calls if c in train)
    assert counts and set(counts.values()) == {1}, counts
    summaries = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/seed*/summary.json"))]
    kd = [s for s in summaries if s["teacher_outputs"]]
    assert len(kd) == 2 and {s["teacher_outputs"]["mode"] for s in kd} == {"disk"}
    assert len({s["teacher_outputs"]["cache_root"] for s in kd}) == 1
