"""``medkd ablate --shard I/N`` and ``--report-only``: deterministic slices, per-run claims, the last shard writes
the results; three real processes (two shards and a duplicate of shard 1) started together train every planned run
exactly once and give the same results rows as one unsharded ablation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import medkd.ablate as ab
from medkd.errors import MedkdError

TINY = dict(student="s1", student_width=4, epochs=1, batch_size=4, device="cpu")
GRID = [{"scales": ["dec"], "loss": "mse", "pmd": False}]
ARGS = ["--seeds", "0,1", "--student-width", "4", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]


def test_parse_shard_and_slices():
    assert ab.parse_shard(None) == (1, 1) and ab.parse_shard("2/3") == (2, 3)
    for bad in ("0/2", "3/2", "1-2", "a/b", "2"):
        with pytest.raises(MedkdError, match="--shard"):
            ab.parse_shard(bad)
    runs = list(range(10))
    parts = [ab.shard_runs(runs, i, 3) for i in (1, 2, 3)]
    assert sorted(sum(parts, [])) == runs and parts[0] == [0, 3, 6, 9]  # disjoint, complete, deterministic


@pytest.fixture(scope="module")
def setup(tiny_data, tiny_teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    teacher = root / "teacher"
    shutil.copytree(tiny_teacher, teacher, ignore=shutil.ignore_patterns("cache"))
    grid = root / "grid.yaml"
    grid.write_text(yaml.safe_dump(GRID))
    ref = ab.ablate(tiny_data, teacher, root / "unsharded", grid=grid, seeds=[0, 1], base_overrides=TINY)
    return root, teacher, grid, ref


def test_concurrent_shards_then_report_only(setup, tiny_data):
    root, teacher, grid, ref = setup
    out = root / "sharded"
    cmd = [sys.executable, "-m", "medkd", "ablate", str(tiny_data), "--teacher", str(teacher), "-o", str(out),
           "--grid", str(grid), *ARGS]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([*cmd, "--shard", s], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for s in ("1/2", "2/2", "1/2")]  # the third overlaps (a restarted shard 1)
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [o[1][-2000:] for o in outs]
    # every planned run trained exactly once over the three processes (one "[k/n] <row> seed <s>" line each)
    labels = [f"{r['name']} seed {s}" for r in ref["rows"] if r["reference"] != "teacher" for s in (0, 1)]
    started = [ln.split("] ", 1)[1].strip() for _, err in outs for ln in err.splitlines() if ln.startswith("[")]
    assert sorted(started) == sorted(labels), started
    from medkd.data.prepared import PreparedData

    plan = ab.build_plan(ab.load_grid_doc(grid), teacher, [0, 1], TINY, data=PreparedData(tiny_data))
    for _, _, run in plan.runs(out):
        assert (run / "summary.json").is_file() and not run.with_name(run.name + ".lock").exists()
    res = ab.ablate(tiny_data, teacher, out, grid=grid, seeds=[0, 1], base_overrides=TINY, report_only=True)
    keys = ("name", "seeds", "dice_mean", "dice_std", "iou_mean", "hd95_mean", "p_value", "p_adjusted")
    assert [{k: r.get(k) for k in keys} for r in res["rows"]] == [{k: r.get(k) for k in keys} for r in ref["rows"]]
    assert res["pending"] == [] and res["failed"] == []


def test_report_only_names_missing_runs_and_skips_claimed(setup, tiny_data):
    from medkd.claim import Claim

    root, teacher, grid, ref = setup
    out = root / "partial"
    shutil.copytree(root / "unsharded", out)
    shutil.rmtree(out / "runs" / "baseline" / "seed1")
    kd = next(p for p in (out / "runs").iterdir() if p.name != "baseline") / "seed0"
    (kd / "eval-test.json").unlink()
    with pytest.raises(MedkdError, match="1 planned run\\(s\\) are not finished .*baseline/seed1"):
        ab.ablate(tiny_data, teacher, out, grid=grid, seeds=[0, 1], base_overrides=TINY, report_only=True)
    doc = json.loads((out / "results.json").read_text())
    assert doc["pending"] == [str(out / "runs" / "baseline" / "seed1")]
    assert (kd / "eval-test.json").is_file()  # evaluated, not trained
    # a shard skips a run another live process holds, trains nothing twice, and leaves the results to the last
    with Claim(out / "runs" / "baseline" / "seed1"):
        import medkd.claim as cm

        # pretend the claim belongs to another live process (our parent) on this host
        lock = cm.lock_path(out / "runs" / "baseline" / "seed1")
        doc = json.loads(lock.read_text())
        cm._held.clear()
        lock.write_text(json.dumps({**doc, "pid": os.getppid(), "start": None}))
        assert ab.ablate(tiny_data, teacher, out, grid=grid, seeds=[0, 1], base_overrides=TINY,
                         shard=(1, 2)) is None
        lock.unlink()
    assert not (out / "runs" / "baseline" / "seed1").exists()
