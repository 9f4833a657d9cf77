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

from medkd.data.prepared import PreparedData, SliceDataset

def fill_fraction(data_dir, teacher_run, root, seed, delay, go=None) -> str:
    """Fill the cache at ``root`` for the seeded 50 % training subset; the teacher sleeps ``delay`` s per batch."""
    import torch

    from medkd.config import SCALES
    from medkd.distill.cache import TeacherCache
    from medkd.distill.distiller import tap_paths
    from medkd.distill.hooks import FeatureExtractor
    from medkd.infer import seg_logits
    from medkd.rundir import load_model_from_run

    data = PreparedData(data_dir)
    model, _ = load_model_from_run(Path(teacher_run), "best")
    model.eval()
    taps = tap_paths(model, SCALES)
    cache = TeacherCache(Path(root), Path(teacher_run) / "best.pt", data, taps, 1, data.case_ids("train"))
    ds = SliceDataset(data, "train", fraction=0.5, seed=int(seed))
    while go is not None and not Path(go).exists():
        time.sleep(0.01)
    with FeatureExtractor(model, taps) as fx, torch.no_grad():
        def run_teacher(x):
            time.sleep(float(delay))
            logits = seg_logits(model(x))
            return {**fx.pop(), "logits": logits}

        cache.fill(ds.index, run_teacher, torch.device("cpu"), batch_size=2)
    return cache.key


def _start(args, env):
    code = "import sys, torch; torch.set_num_threads(1); from test_cache_concurrency import fill_fraction; " \
           "print(fill_fraction(*sys.argv[1:]))"
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _arrays(root: Path, key: str):
    d = root / key
    return np.load(d / "filled.npy"), {p.stem: np.load(p) for p in sorted(d.glob("*.npy")) if p.stem != "filled"}


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
    filled_c, arr_c = _arrays(conc, key)
    filled_s, arr_s = _arrays(serial, key)
    assert filled_c[want_rows].all() and np.array_equal(filled_c, filled_s)
    assert set(arr_c) == set(arr_s) == {"enc", "bottleneck", "dec", "logits"}
    for name, a in arr_c.items():
        got = a[want_rows].astype(np.float32)
        assert (np.abs(got).reshape(len(want_rows), -1).max(axis=1) > 0).all(), f"{name}: all-zero rows"
        np.testing.assert_allclose(got, arr_s[name][want_rows].astype(np.float32), rtol=1e-3, atol=1e-3)
    assert not list((conc / key).glob(".*.npy"))  # no temp files left behind
