"""Teacher outputs: the cost model (pure, fed GPU- and CPU-like costs), what the caches store, mode equivalence,
the budget from the command line."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _quiet
from medkd.config import DistillConfig, build_config
from medkd.data.prepared import PreparedData, SliceDataset
from medkd.distill.cache import TeacherCache
from medkd.distill.distiller import DistillTerms
from medkd.distill.targets import TeacherView, fill_memory, slice_batch, targets_of
from medkd.distill.teacher_outputs import Costs, Workload, choose_mode, estimate
from medkd.models import build_model
from medkd.checkpoint import load_checkpoint, load_model_from_run
from conftest import cli as _cli


def dcfg(teacher, **kw) -> DistillConfig:
    base = dict(student="s1", student_width=4, epochs=1, batch_size=4, lr=3e-3, device="cpu", seed=0,
                teacher=str(teacher))
    base.update(kw)
    return build_config(DistillConfig, overrides=base)


def terms(teacher_run, cfg, size=32) -> DistillTerms:
    torch.manual_seed(0)
    student = build_model("s1", in_channels=1, num_classes=1, width=4)
    return DistillTerms(student, load_model_from_run(teacher_run)[0], cfg, size)


def view(teacher_run, cfg, size=32) -> TeacherView:
    return terms(teacher_run, cfg, size).teacher_view()


def work(**kw) -> Workload:
    base = dict(epochs=200, batches_per_epoch=22, fill_batches=22, disk_missing_batches=44, disk_new_bytes=10**9,
                budget_bytes=10**11, memory_bytes=10**8, memory_limit_bytes=10**10)
    base.update(kw)
    return Workload(**base)


# ----------------------------------------------------------------------------------------------- cost model


def test_gpu_like_costs_never_pick_the_disk_cache():
    """The issue's H100 figures: teacher ~0.03 s/batch live, disk cache ~0.23 s/batch to read -> never disk."""
    gpu = Costs(teacher_s=0.032, disk_read_s=0.23, disk_write_s=0.05, memory_read_s=0.002)
    mode, reason, est = choose_mode(gpu, work())
    assert mode == "memory" and est["memory"] < est["live"] < est["disk"]
    assert "memory" in reason and "live" in reason
    # no room in memory: live, never the slower disk cache, however large the budget
    mode, _, est = choose_mode(gpu, work(memory_limit_bytes=10))
    assert mode == "live" and est["memory"] is None
    # an ablation of 30 runs reusing one warm disk cache still reads slower than the teacher computes
    mode, _, _ = choose_mode(gpu, work(runs=30, disk_missing_batches=0, memory_limit_bytes=10))
    assert mode == "live"


def test_cpu_like_costs_pick_a_cache_and_share_it_across_runs():
    cpu = Costs(teacher_s=4.0, disk_read_s=0.01, disk_write_s=0.02, memory_read_s=0.005)
    assert choose_mode(cpu, work())[0] == "memory"  # one run: no disk writes, cheaper reads
    # 30 runs: the memory mode recomputes the teacher per run, the disk cache once for all
    mode, _, est = choose_mode(cpu, work(runs=30))
    assert mode == "disk" and est["disk"] < est["memory"] < est["live"]
    # the budget rules the disk out whatever it would save
    mode, reason, est = choose_mode(cpu, work(runs=30, budget_bytes=10**6))
    assert mode == "memory" and est["disk"] is None and "1.00 GB > budget 1.00 MB" in reason and "30 runs x 200 epochs" in reason


def test_choice_is_the_cheapest_that_fits_over_a_grid():
    vals = (0.001, 0.03, 0.3, 3.0)
    for t, d, m, runs, budget, limit in itertools.product(vals, vals, vals, (1, 10), (0, 10**12), (0, 10**12)):
        costs = Costs(teacher_s=t, disk_read_s=d, disk_write_s=d, memory_read_s=m)
        w = work(runs=runs, budget_bytes=budget, memory_limit_bytes=limit)
        mode, _, est = choose_mode(costs, w)
        feasible = {k: v for k, v in est.items() if v is not None}
        assert est[mode] == min(feasible.values()) and est[mode] <= est["live"]
        if budget == 0:
            assert mode != "disk"
        if limit == 0:
            assert mode != "memory"
        if d >= t:  # reading a batch costs at least what computing it does: the disk cache cannot pay
            assert mode != "disk"
    # unmeasured storages are not candidates
    assert estimate(Costs(teacher_s=1.0), work()) == {"live": 4400.0, "memory": None, "disk": None}


# --------------------------------------------------------------------------------------------- what is stored


def test_items_hold_only_what_the_losses_read(tiny_teacher):
    specs = {}
    for loss in ("contrastive", "mse", "attention"):
        specs[loss] = view(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss=loss)).specs()
    t_shape = terms(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss="mse")).t_shapes["dec"]  # (C, h, w)
    c, h, w = t_shape
    assert {k: v[1] for k, v in specs["contrastive"].items()} == {"dec.gap": (c,), "dec.proto": (2, c), "logits": (1, 32, 32)}
    assert {k: v[1] for k, v in specs["mse"].items()} == {"dec.map": (c, h, w), "logits": (1, 32, 32)}
    assert {k: v[1] for k, v in specs["attention"].items()} == {"dec.attention": (h * w,), "logits": (1, 32, 32)}
    # the same logits item for all; what a loss stores is part of the item's identity
    assert len({s["logits"] for s in specs.values()}) == 1
    assert "view=contrastive-pooled(gap,region)" in specs["contrastive"]["dec.gap"][0]
    no_region = view(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss_options={"region": False})).specs()
    assert set(no_region) == {"dec.gap", "logits"} and no_region["dec.gap"][0] != specs["contrastive"]["dec.gap"][0]
    pooled = view(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss="mse", loss_options={"pool": 4})).specs()
    assert pooled["dec.map"][1] == (c, -(-h // 4), -(-w // 4)) and "view=map-pool4" in pooled["dec.map"][0]
    # only the scales the run distils; no logits without PMD
    assert set(view(tiny_teacher, dcfg(tiny_teacher, scales=["enc"], loss="mse", pmd=False,
                                        kd_images="labelled")).specs()) == {"enc.map"}


def test_contrastive_teacher_head_choices_share_one_cached_view(tiny_teacher):
    """The teacher head comes after the view: a trained, frozen or absent head reads the same cache items."""
    specs = {m: view(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss_options={"teacher_head": m})).specs()
             for m in ("trainable", "frozen", "identity")}
    assert specs["frozen"] == specs["trainable"] == specs["identity"]


def test_disk_and_memory_serve_exactly_the_live_targets(tiny_data, tiny_teacher, tmp_path):
    data = PreparedData(tiny_data)
    cfg = dcfg(tiny_teacher)
    task = view(tiny_teacher, cfg)
    ds = SliceDataset(data, "train", fraction=0.5, seed=0)
    specs = task.specs()
    cache = TeacherCache(tmp_path / "cache", tiny_teacher / "best.pt", data, 1, data.case_ids("train"), specs)
    compute = targets_of(task, ds, 1, torch.device("cpu"))
    pos = {k: i for i, k in enumerate(ds.index)}
    assert cache.fill(ds.index, lambda keys: compute([pos[k] for k in keys]), batch_size=3) == len(ds)
    assert not cache.missing(ds.index) and cache.fill(ds.index, None) == 0
    held = fill_memory(task, ds, cfg, torch.device("cpu"), specs, torch.device("cpu"), False)
    ids = [1, 4, 7, 2]
    live = compute(ids)
    disk = cache.get([ds.index[i] for i in ids], torch.device("cpu"))
    assert set(live) == set(disk) == set(held) == set(specs)
    for k in specs:
        assert live[k].dtype == disk[k].dtype == held[k].dtype == torch.float16
        assert torch.equal(live[k], disk[k]) and torch.equal(live[k], held[k][ids]), k
    assert cache.planned_bytes() == sum(
        len(cache.rows) * int(np.prod(s)) * 2 for _, s in specs.values()) and cache.new_bytes() == 0
    # reopened from disk: nothing missing; another checkpoint (or changed bytes): another key
    again = TeacherCache(tmp_path / "cache", tiny_teacher / "best.pt", data, 1, data.case_ids("train"), specs)
    assert again.key == cache.key and not again.missing(ds.index)
    changed = tmp_path / "best.pt"
    shutil.copy(tiny_teacher / "best.pt", changed)
    with open(changed, "ab") as f:
        f.write(b"\0")
    assert TeacherCache(tmp_path / "cache", changed, data, 1, data.case_ids("train"), specs).key != cache.key
    # another view at the same tap is a new item beside the shared ones
    mse = view(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss="mse")).specs()
    other = TeacherCache(tmp_path / "cache", tiny_teacher / "best.pt", data, 1, data.case_ids("train"), mse)
    assert other.missing(ds.index) == ds.index and 0 < other.new_bytes() < other.planned_bytes()


# ---------------------------------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def teacher(tiny_teacher, tmp_path_factory):
    dst = tmp_path_factory.mktemp("to_teacher") / "teacher"
    shutil.copytree(tiny_teacher, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def test_every_mode_trains_the_same_student(tiny_data, teacher, tmp_path):
    from medkd.distill.run import distill

    summaries, weights = {}, {}
    for mode in ("live", "disk", "memory", "auto"):
        run = tmp_path / mode
        summaries[mode] = distill(tiny_data, run, dcfg(teacher, teacher_outputs=mode), console=_quiet())
        weights[mode] = load_checkpoint(run / "last.pt")["model"]
        assert json.loads((run / "summary.json").read_text())["teacher_outputs"] == summaries[mode]["teacher_outputs"]
    rec = {m: s["teacher_outputs"] for m, s in summaries.items()}
    assert [rec[m]["mode"] for m in ("live", "disk", "memory")] == ["live", "disk", "memory"]
    assert rec["live"]["cache_bytes"] == 0 and rec["disk"]["cache_bytes"] > 0 and rec["memory"]["cache_bytes"] > 0
    assert rec["disk"]["cache_key"] == summaries["disk"]["teacher_cache"] and (teacher / "cache" / rec["disk"]["cache_key"]).is_dir()
    auto = rec["auto"]
    assert auto["requested"] == "auto" and auto["mode"] in ("live", "disk", "memory") and auto["reason"].startswith("auto:")
    assert auto["costs"]["teacher_s"] > 0 and auto["costs"]["memory_read_s"] is not None
    assert auto["costs"]["disk_read_s"] is not None  # the disk cache fits the default budget, so it was measured
    assert set(auto["estimates"]) == {"live", "disk", "memory"}
    for m in ("disk", "memory", "auto"):
        assert summaries[m]["best_val_dice"] == summaries["live"]["best_val_dice"], m
        for k, v in weights["live"].items():
            assert torch.equal(v, weights[m][k]), (m, k)
    assert not list((teacher / "cache").glob("*/.probe-*"))  # the disk probe is cleaned up


def test_cli_budget_rules_out_the_disk_cache(tiny_data, teacher, tmp_path):
    t = tmp_path / "t"
    shutil.copytree(teacher, t, ignore=shutil.ignore_patterns("cache"))
    common = ["--teacher", t, "--student-width", 4, "--epochs", 1, "--batch-size", 4, "--device", "cpu", "--json"]
    r = _cli(["distill", tiny_data, "-o", tmp_path / "a", *common, "--cache-budget", 0])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["teacher_outputs"]
    assert rec["mode"] in ("live", "memory") and "> budget 0.00 MB" in rec["reason"] and rec["cache_budget_bytes"] == 0
    assert rec["costs"]["disk_read_s"] is None  # not even a probe file is written
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["teacher_outputs"] == rec
    assert not (t / "cache").exists() or not [p for p in (t / "cache").rglob("*") if p.is_file()]
    r = _cli(["distill", tiny_data, "-o", tmp_path / "b", *common, "--cache-budget", 0, "--teacher-outputs", "disk"])
    assert r.exit_code == 0, r.output
    rec = json.loads(r.stdout)["teacher_outputs"]
    assert rec["mode"] == "memory" and rec["reason"].startswith("disk requested, but the cache would need")
    r = _cli(["distill", tiny_data, "-o", tmp_path / "c", *common, "--teacher-outputs", "gpu"])
    assert r.exit_code == 2 and "auto, live, disk, memory" in r.stderr
    r = _cli(["distill", tiny_data, "-o", tmp_path / "d", *common, "--cache-budget", -1])
    assert r.exit_code == 2 and "--cache-budget must be >= 0" in r.stderr


def test_probe_never_builds_a_batch_larger_than_the_data(tmp_path):
    """A --batch-size above the training set is one batch of the whole set (what the loader gives): auto's timing
    probe and its storage probes allocate that many slices, never the batch size (1e9 slices here)."""
    from types import SimpleNamespace

    import medkd.distill.teacher_outputs as to_mod

    train_set = [(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), i) for i in range(40)]
    cfg = SimpleNamespace(batch_size=10**9, in_channels=1)
    seen = []
    task = SimpleNamespace(targets=lambda x, y: seen.append(x.shape[0]))  # a TeacherView stand-in
    costs = to_mod.measure_costs(task, train_set, cfg, torch.device("cpu"), {"logits": ("logits", (1, 8, 8))},
                                 tmp_path, torch.device("cpu"))
    assert max(seen) == 40 and costs.disk_read_s is not None and costs.memory_read_s is not None
    assert to_mod.batch_slices(10**9, 40) == 40 and to_mod.batch_slices(8, 40) == 8


def test_teacher_timing_costs_one_batch_beside_a_slow_teacher(monkeypatch):
    """auto's teacher timing: a slow teacher (>= SLOW_BATCH_S per batch) is timed on one full batch after a
    two-slice warm-up, not n + 1 batches (the study teacher on CPU: ~10 s each); a fast one on n after a warm-up."""
    from types import SimpleNamespace

    import medkd.distill.teacher_outputs as to_mod

    train_set = [(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8), i) for i in range(40)]
    cfg = SimpleNamespace(batch_size=4, in_channels=1)
    clock = [0.0]
    monkeypatch.setattr(to_mod.time, "perf_counter", lambda: clock[0])

    def task_with(seconds_per_slice):
        calls = []

        def targets(x, y):
            calls.append(x.shape[0])
            clock[0] += seconds_per_slice * x.shape[0]
        return SimpleNamespace(targets=targets), calls

    slow, calls = task_with(0.5)  # 2 s per batch of 4
    assert to_mod._teacher_seconds(slow, train_set, cfg, torch.device("cpu"), n=2) == pytest.approx(2.0)
    assert calls == [2, 4]
    fast, calls = task_with(0.01)
    assert to_mod._teacher_seconds(fast, train_set, cfg, torch.device("cpu"), n=2) == pytest.approx(0.04)
    assert calls == [2, 4, 4, 4]


# ---------------------------------------------------------------------------------------------------- same bits


def test_teacher_targets_do_not_depend_on_the_batch(tiny_data, tiny_teacher):
    """A slice's targets are the same bits alone, in a training batch, in another order or in a fill's chunk (CPU
    convolutions round differently at batch 1 than at 19: the teacher always runs on TEACHER_BATCH slices)."""
    task = view(tiny_teacher, dcfg(tiny_teacher, scales=["enc", "bottleneck", "dec"], pmd=True))
    ds = SliceDataset(PreparedData(tiny_data), "train")
    n = 19
    x, y = slice_batch(ds, list(range(n)), 1, torch.device("cpu"))
    whole = task.targets(x, y)
    assert set(whole) == set(task.specs()) and all(v.shape[0] == n for v in whole.values())
    for i in range(n):
        alone = task.targets(x[i : i + 1], y[i : i + 1])
        for k, v in alone.items():
            assert torch.equal(v, whole[k][i : i + 1]), (k, i)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    shuffled = task.targets(x[perm], y[perm])
    for k, v in shuffled.items():
        assert torch.equal(v, whole[k][perm]), k


@pytest.fixture(scope="module")
def wide_teacher(tiny_data, tmp_path_factory):
    """A width-16 teacher: wide enough that CPU convolutions round differently at batch 8 (live) and 16 (the fill's
    chunk when the batch size is 8)."""
    from conftest import tiny_teacher_config
    from medkd.train.teacher import train_teacher

    run = tmp_path_factory.mktemp("wide") / "teacher"
    train_teacher(tiny_data, run, tiny_teacher_config(width=16), console=_quiet())
    return run


def test_live_and_memory_runs_are_identical(tiny_data, wide_teacher, tmp_path):
    """Issue 22: live and memory targets differed in fp16 rounding (losses ~1e-8 apart) and the runs ended at
    different val Dice. Now every metric, every history line (but its seconds) and every weight is the same."""
    from medkd.distill.run import distill

    runs = {}
    for mode in ("live", "memory"):
        run = tmp_path / mode
        cfg = dcfg(wide_teacher, teacher_outputs=mode, batch_size=8, epochs=2, scales=["dec"], pmd=True)
        runs[mode] = distill(tiny_data, run, cfg, console=_quiet())
        runs[mode]["history"] = [{k: v for k, v in json.loads(line).items() if k != "seconds"}
                                 for line in (run / "history.jsonl").read_text().splitlines()]
        runs[mode]["weights"] = load_checkpoint(run / "last.pt")["model"]
    live, memory = runs["live"], runs["memory"]
    assert live["teacher_outputs"]["mode"] == "live" and memory["teacher_outputs"]["mode"] == "memory"
    assert live["history"] == memory["history"]
    for key in ("best_val_dice", "best_epoch", "epochs_done"):
        assert live[key] == memory[key], key
    for k, v in live["weights"].items():
        assert torch.equal(v, memory["weights"][k]), k


# ---------------------------------------------------------------------------------------------- augmentation


def test_augmented_run_reads_the_teacher_on_the_augmented_batch(tiny_data, teacher, tmp_path, monkeypatch):
    """With --augment the targets are the teacher's outputs on the very images the student is trained on (the
    flipped, intensity-jittered batch), never a memory or disk cache of the un-augmented slices, whatever mode was
    asked for."""
    import medkd.distill.targets as targets_mod
    import medkd.train.loop as loop
    from medkd.distill.run import distill
    from medkd.infer import seg_logits

    batches, served = [], []
    real_augment, real_get = loop.augment_batch, targets_mod.LiveTargets.get

    def augment(x, y, gen):
        xa, ya = real_augment(x, y, gen)
        batches.append((x.clone(), xa.clone()))
        return xa, ya

    def get(self, x, y, index):
        out = real_get(self, x, y, index)
        served.append((x.clone(), out["logits"].float()))
        return out

    monkeypatch.setattr(loop, "augment_batch", augment)
    monkeypatch.setattr(targets_mod.LiveTargets, "get", get)
    summary = distill(tiny_data, tmp_path / "aug", dcfg(teacher, augment=True, teacher_outputs="memory", epochs=1),
                      console=_quiet())
    assert summary["teacher_outputs"]["mode"] == "live" and "augmentation" in summary["teacher_outputs"]["reason"]
    assert len(served) == len(batches) > 0
    net = load_model_from_run(teacher)[0]
    for (raw, augmented), (seen, logits) in zip(batches, served):
        assert torch.equal(seen, augmented) and not torch.equal(seen, raw)
        with torch.no_grad():
            on_augmented, on_raw = seg_logits(net(augmented)), seg_logits(net(raw))
        torch.testing.assert_close(logits, on_augmented, atol=2e-2, rtol=1e-2)  # fp16-stored targets
        assert float((logits - on_raw).abs().max()) > 0.5  # not the un-augmented slices' targets
