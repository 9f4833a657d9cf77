"""DDP under ``torchrun`` on CPU (gloo, 2 processes): real torchrun subprocesses on a tiny dataset.

* a tiny teacher (1 epoch, then ``--resume`` to 2) and a tiny distill finish with one run folder each and
  ``world_size: 2`` in ``summary.json``; the checkpoints load in a single process;
* with the same global batch, the first steps' loss terms of the 2-process run equal the single-process run's
  (synchronised BatchNorm, Dice over the global batch, the same sample order);
* the sample order: the ranks' batches of a step together are exactly the single process's batch.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("ddp_worker.py")
FIRST_STEPS = 3


@pytest.fixture(scope="module")
def even_data(tmp_path_factory) -> Path:
    """40 training slices (divides over 2 processes and batches of 4), 2 validation cases (one per process)."""
    from medkd.data.phantom import write_msd_dataset
    from medkd.data.preprocess import PreprocessSettings, preprocess

    root = tmp_path_factory.mktemp("ddp_data")
    write_msd_dataset(root / "raw", n_cases=6, seed=5, size=40, n_slices=10)
    preprocess(root / "raw", root / "data", PreprocessSettings(size=32, test_fraction=0.17, val_fraction=0.34, seed=0))
    m = json.loads((root / "data" / "manifest.json").read_text())
    assert sum(c["n_slices"] for c in m["cases"] if c["split"] == "train") == 40
    assert sum(c["split"] == "val" for c in m["cases"]) == 2
    return root / "data"


def _run(cmd, out: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parent.parent)}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


@pytest.fixture(scope="module")
def runs(even_data, tiny_teacher, tmp_path_factory):
    """The worker run by one process and by ``torchrun --nproc-per-node 2`` (each with its own teacher copy, so the
    2-process run fills a cold teacher cache from both ranks)."""
    root = tmp_path_factory.mktemp("ddp_runs")
    out = {}
    for name, launcher in (("single", [sys.executable]),
                           ("ddp", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                    "--nproc-per-node", "2"])):
        teacher = root / f"teacher-{name}"
        shutil.copytree(tiny_teacher, teacher, ignore=shutil.ignore_patterns("cache"))
        _run([*launcher, str(WORKER), str(even_data), str(teacher), str(root / name)], root / name)
        out[name] = root / name
    return out


def _steps(folder: Path, kind: str):
    ranks = sorted(folder.glob("steps-*.json"))
    return [json.loads(p.read_text())[kind] for p in ranks]


def test_one_run_folder_each_with_world_size_2(runs):
    from medkd.checkpoint import load_model_from_run

    ddp = runs["ddp"]
    assert sorted(p.name for p in ddp.iterdir()) == ["steps-0.json", "steps-1.json", "student", "teacher"]
    for run, epochs in (("teacher", 2), ("student", 1)):
        summary = json.loads((ddp / run / "summary.json").read_text())
        assert summary["world_size"] == 2 and summary["epochs_done"] == epochs
        assert len((ddp / run / "history.jsonl").read_text().splitlines()) == epochs
        model, _ = load_model_from_run(ddp / run)  # an unwrapped checkpoint: one process loads it
        assert not any(k.startswith("module.") for k in model.state_dict())
    assert json.loads((runs["single"] / "teacher" / "summary.json").read_text())["world_size"] == 1


@pytest.mark.parametrize("kind", ["teacher", "student"])
def test_first_steps_match_single_process(runs, kind):
    single, = _steps(runs["single"], kind)
    r0, r1 = _steps(runs["ddp"], kind)
    assert len(r0) == len(r1) == len(single)  # the same number of steps (20 teacher, 10 student)
    for step in range(FIRST_STEPS):
        a, b, s = r0[step], r1[step], single[step]
        assert a["n"] + b["n"] == s["n"] == 4
        for term in s:
            if term == "n":
                continue
            # each rank's term is its local mean (Dice: the global batch's); the batch's value is their weighted mean
            merged = (a[term] * a["n"] + b[term] * b["n"]) / s["n"]
            assert merged == pytest.approx(s[term], rel=2e-5, abs=1e-6), (kind, step, term)
    if kind == "teacher":
        assert r0[0]["dice"] == r1[0]["dice"]  # the Dice term is computed over the global batch on both ranks


def test_ranks_split_each_global_batch(tiny_data):
    from medkd.config import TeacherConfig
    from medkd.data.prepared import PreparedData, SliceDataset
    from medkd.distributed import DistEnv
    from medkd.train.batches import epoch_loader

    ds = SliceDataset(PreparedData(tiny_data), "train")
    cfg = TeacherConfig(batch_size=4, seed=3)
    one = [b[2].tolist() for b in epoch_loader(ds, cfg, 2)[0]]
    ranks = [[b[2].tolist() for b in epoch_loader(ds, cfg, 2, env=DistEnv(r, 2, r))[0]] for r in (0, 1)]
    assert all(len(b) == 2 for r in ranks for b in r[:-1])
    n_even = len(ds) - len(ds) % 2  # DistributedSampler pads an odd count with a repeated slice
    glob = [sorted(a + b) for a, b in zip(*ranks)]
    assert [sorted(b) for b in one][: n_even // 4] == glob[: n_even // 4]
    with pytest.raises(Exception, match="does not divide over 3 processes"):
        epoch_loader(ds, cfg, 0, env=DistEnv(0, 3, 0))


def test_ranks_split_each_global_batch_of_a_budget(tiny_data):
    """With --steps-per-epoch every rank takes exactly that many local batches, and together they are the
    single-process global batches (no padding: the budget is whole global batches)."""
    from medkd.config import TeacherConfig
    from medkd.data.prepared import PreparedData, SliceDataset
    from medkd.distributed import DistEnv
    from medkd.train.batches import epoch_loader

    ds = SliceDataset(PreparedData(tiny_data), "train")
    cfg = TeacherConfig(batch_size=4, seed=3, steps_per_epoch=len(ds) // 4 + 3)  # more than one pass
    one = [b[2].tolist() for b in epoch_loader(ds, cfg, 2)[0]]
    ranks = [[b[2].tolist() for b in epoch_loader(ds, cfg, 2, env=DistEnv(r, 2, r))[0]] for r in (0, 1)]
    assert len(one) == cfg.steps_per_epoch and all(len(b) == 4 for b in one)
    assert all(len(r) == cfg.steps_per_epoch and all(len(b) == 2 for b in r) for r in ranks)
    assert [sorted(b) for b in one] == [sorted(a + b) for a, b in zip(*ranks)]
