"""Two real processes filling one cold teacher-output cache at once get exactly what a serial fill gets.

Regression for the corruption in issue 11: the second writer's ``open_memmap(mode="w+")`` truncated the arrays
the first had already marked filled, leaving all-zero rows that every later run trained on. Each worker here
slows its teacher down per batch so that the two fills overlap for sure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from medkd.data.prepared import PreparedData, SliceDataset

def fill_fraction(data_dir, teacher_run, root, seed, delay, go=None) -> str:
    """Fill the disk cache at ``root`` for the seeded 50 % training subset, as ``medkd distill`` does (all scales,
    contrastive + PMD items); the teacher sleeps ``delay`` s per batch."""
    from medkd.config import DistillConfig, build_config
    from medkd.distill.cache import TeacherCache
    from medkd.distill.distiller import DistillTerms
    from medkd.distill.targets import targets_of
    from medkd.models import build_model
    from medkd.checkpoint import load_model_from_run

    cfg = build_config(DistillConfig, overrides=dict(student_width=4, batch_size=1, device="cpu", seed=int(seed),
                                                      teacher=str(teacher_run), scales=["enc", "bottleneck", "dec"],
                                                      loss="contrastive", pmd=True))
    data = PreparedData(data_dir)
    teacher, _ = load_model_from_run(Path(teacher_run), "best")
    task = DistillTerms(build_model("s1", in_channels=1, num_classes=1, width=4), teacher, cfg, data.size).teacher_view()
    cache = TeacherCache(Path(root), Path(teacher_run) / "best.pt", data, 1, data.case_ids("train"), task.specs())
    ds = SliceDataset(data, "train", fraction=0.5, seed=int(seed))
    compute = targets_of(task, ds, cfg.in_channels, torch.device("cpu"))
    pos = {k: i for i, k in enumerate(ds.index)}

    def slow(keys):
        time.sleep(float(delay))
        return compute([pos[k] for k in keys])

    while go is not None and not Path(go).exists():
        time.sleep(0.01)
    cache.fill(cache.missing(ds.index), slow, batch_size=2)
    return cache.key


def _start(args, env):
    code = "import sys, torch; torch.set_num_threads(1); from test_cache_concurrency import fill_fraction; " \
           "print(fill_fraction(*sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _arrays(root: Path, key: str):
    """``{item: (filled rows, array)}`` of a cache folder."""
    d = root / key
    return {p.name[: -len(".filled.npy")].rsplit("-", 1)[0]: (np.load(p), np.load(str(p)[: -len(".filled.npy")] + ".npy"))
            for p in sorted(d.glob("*.filled.npy"))}


def test_two_processes_fill_one_cold_cache_like_a_serial_fill(tiny_data, tiny_teacher, tmp_path):
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here), os.environ.get("PYTHONPATH", "")])}
    go = tmp_path / "go"
    conc, serial = tmp_path / "concurrent", tmp_path / "serial"
    procs = [_start([tiny_data, tiny_teacher, conc, seed, 0.05, go], env) for seed in (0, 1)]
    time.sleep(0.5)
    go.touch()  # both start filling at the same moment
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    keys = {o[0].strip() for o in outs}
    assert len(keys) == 1
    key = keys.pop()
    for seed in (0, 1):  # the same two fills, one after the other
        assert fill_fraction(tiny_data, tiny_teacher, serial, seed, 0.0) == key

    data = PreparedData(tiny_data)
    train = sorted(data.case_ids("train"))
    rows = [(c, z) for c in train for z in range(int(data.case(c)["prepared_shape"][0]))]
    wanted = {k for s in (0, 1) for k in SliceDataset(data, "train", fraction=0.5, seed=s).index}
    want_rows = np.array(sorted(rows.index(k) for k in wanted))
    conc_items, serial_items = _arrays(conc, key), _arrays(serial, key)
    assert set(conc_items) == set(serial_items) == {
        "enc.gap", "enc.proto", "bottleneck.gap", "bottleneck.proto", "dec.gap", "dec.proto", "logits"}
    for name, (filled, a) in conc_items.items():
        assert filled[want_rows].all() and np.array_equal(filled, serial_items[name][0]), name
        got = a[want_rows].astype(np.float32)
        assert (np.abs(got).reshape(len(want_rows), -1).max(axis=1) > 0).all(), f"{name}: all-zero rows"
        np.testing.assert_allclose(got, serial_items[name][1][want_rows].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert not list((conc / key).glob(".*.npy"))  # no temp files left behind
