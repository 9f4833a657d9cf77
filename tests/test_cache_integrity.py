"""A damaged teacher-output cache item is never trained on: it is named in a note, discarded and computed again.

Regression for issue 22: a truncated item was zero-extended by ``np.load(mmap_mode="r+")`` and read as targets
(87 of 175 teacher rows all zero), by that run and every later one.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from medkd.cli import app
from medkd.config import DistillConfig, build_config
from medkd.data.prepared import PreparedData, SliceDataset
from medkd.distill.cache import TeacherCache
from medkd.distill.distiller import DistillTerms
from medkd.distill.targets import targets_of
from medkd.models import build_model
from medkd.checkpoint import load_model_from_run


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tmp_path_factory) -> Path:
    dst = tmp_path_factory.mktemp("integrity") / "teacher"
    shutil.copytree(tiny_teacher, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def _cache(data, teacher, root, log=None):
    cfg = build_config(DistillConfig, overrides=dict(student_width=4, batch_size=4, device="cpu", seed=0,
                                                      teacher=str(teacher), scales=["dec"], loss="contrastive"))
    torch.manual_seed(0)
    task = DistillTerms(build_model("s1", in_channels=1, num_classes=1, width=4), load_model_from_run(teacher)[0], cfg,
                        data.size).teacher_view()
    ds = SliceDataset(data, "train")
    compute = targets_of(task, ds, cfg.in_channels, torch.device("cpu"))
    pos = {k: i for i, k in enumerate(ds.index)}
    cache = TeacherCache(root, teacher / "best.pt", data, 1, data.case_ids("train"), task.specs(), log=log)
    return cache, ds, (lambda keys: compute([pos[k] for k in keys]))


def _files(cache):
    return {p.name: p.read_bytes() for p in sorted(cache.dir.iterdir()) if p.suffix == ".npy"}


@pytest.fixture(scope="module")
def fresh(tiny_data, teacher, tmp_path_factory):
    """The bytes of a cache filled from scratch (the reference every rebuilt item must equal)."""
    data = PreparedData(tiny_data)
    cache, ds, compute = _cache(data, teacher, tmp_path_factory.mktemp("fresh") / "cache")
    cache.fill(ds.index, compute, batch_size=6)
    return _files(cache)


def _damage_truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _damage_garbage(path: Path) -> None:
    path.write_bytes(b"garbage " * 16)


def _damage_shape(path: Path) -> None:
    a = np.load(path)
    np.save(path, a[:, None])  # a valid .npy of another shape


@pytest.mark.parametrize("which", ["data", "filled"])
@pytest.mark.parametrize("damage, reason", [(_damage_truncate, "truncated: "), (_damage_garbage, "cannot load"),
                                            (_damage_shape, "array, expected")])
def test_damaged_item_is_noted_never_read_and_rebuilt(tiny_data, teacher, tmp_path, fresh, which, damage, reason):
    data = PreparedData(tiny_data)
    root = tmp_path / "cache"
    cache, ds, compute = _cache(data, teacher, root)
    cache.fill(ds.index, compute, batch_size=6)
    name = "dec.proto"
    path = cache._path(name, ".npy" if which == "data" else ".filled.npy")
    damage(path)
    damaged = path.read_bytes()
    notes = []
    again, _, _ = _cache(data, teacher, root, log=notes.append)
    assert len(notes) == 1 and notes == again.notes
    assert re.match(rf"^{re.escape(str(path))}: .*{reason}.*; damaged teacher-cache item discarded, its rows are "
                    r"computed again$", notes[0]), notes[0]
    assert again.missing(ds.index) == ds.index and name not in again.arrays  # never read
    assert not again.filled[name].any() and all(again.filled[n].all() for n in again.items if n != name)
    assert path.read_bytes() == damaged  # nothing is written without the lock (the file is not extended)
    assert again.new_bytes() > 0
    # the fill rebuilds it: full size, the same bytes as a cache filled from scratch
    assert again.fill(ds.index, compute, batch_size=6) == len(ds)
    assert _files(again) == fresh
    meta = json.loads(again._path(name, ".json").read_text())
    assert meta["rows"] == len(again.rows)
    assert not TeacherCache(root, teacher / "best.pt", data, 1, data.case_ids("train"), again.items).notes


def test_a_dead_fills_damaged_unpublished_array_is_recreated(tiny_data, teacher, tmp_path, fresh):
    """An item's array without its row marks (a fill killed before publishing) is reused only when sound."""
    data = PreparedData(tiny_data)
    root = tmp_path / "cache"
    cache, ds, compute = _cache(data, teacher, root)
    cache.fill(ds.index, compute, batch_size=6)
    name = "logits"
    cache._path(name, ".filled.npy").unlink()
    _damage_truncate(cache._path(name))
    notes = []
    again, _, _ = _cache(data, teacher, root, log=notes.append)
    assert notes == [] and again.missing(ds.index) == ds.index  # unpublished: nothing to say yet
    again.fill(ds.index, compute, batch_size=6)
    assert len(notes) == 1 and "truncated" in notes[0] and _files(again) == fresh


def test_distill_rebuilds_a_truncated_cache_item(tiny_data, teacher, tmp_path):
    """A real run's cache item cut short: the next run says so, recomputes it and trains as on a fresh cache."""
    args = ["distill", tiny_data, "--teacher", teacher, "--scales", "dec", "--student-width", "4", "--epochs", "1",
            "--batch-size", "4", "--device", "cpu", "--teacher-outputs", "disk", "--kd-images", "labelled"]
    runner = CliRunner()
    first = runner.invoke(app, [str(a) for a in [*args, "-o", tmp_path / "first"]])
    assert first.exit_code == 0, first.stderr
    key = json.loads((tmp_path / "first" / "summary.json").read_text())["teacher_outputs"]["cache_key"]
    items = sorted(p for p in (teacher / "cache" / key).glob("*.npy") if not p.name.endswith(".filled.npy"))
    assert items
    fresh = {p: p.read_bytes() for p in items}
    victim = items[0]
    victim.write_bytes(fresh[victim][: len(fresh[victim]) // 2])
    second = runner.invoke(app, [str(a) for a in [*args, "-o", tmp_path / "second"]])
    assert second.exit_code == 0, second.stderr
    assert re.search(rf"^note: {re.escape(str(victim))}: truncated: \d+ bytes, expected {len(fresh[victim])} .*"
                     r"damaged teacher-cache item discarded", second.stderr, re.M), second.stderr
    assert {p: p.read_bytes() for p in items} == fresh  # rebuilt to full size, identical to the fresh item
    s1, s2 = (json.loads((tmp_path / r / "summary.json").read_text()) for r in ("first", "second"))
    assert s2["best_val_dice"] == s1["best_val_dice"]
    h1, h2 = ([{k: v for k, v in json.loads(line).items() if k != "seconds"}
               for line in (tmp_path / r / "history.jsonl").read_text().splitlines()] for r in ("first", "second"))
    assert h1 == h2
