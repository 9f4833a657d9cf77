"""Device paths: train / ``--augment`` / interrupt + ``--resume`` / distill (live teacher and cache) / evaluate.

Every test runs on CPU, and again on CUDA when a GPU is present (skipped otherwise). The CPU runs are the only
tests of ``--augment`` end to end; on CPU they also check bit-exact resume of an augmented run and that DataLoader
workers do not change the numbers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import _quiet, interrupt_at_validation, tiny_teacher_config
from medkd.errors import MedkdError
from medkd.rundir import partial_dir
from medkd.checkpoint import load_checkpoint

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def _student_cfg(teacher, device, **kw):
    from medkd.config import DistillConfig, build_config

    base = dict(teacher=str(teacher), student="s1", student_width=4, epochs=1, batch_size=4, device=device, seed=0,
                scales=["enc", "dec"], loss="mse", pmd=True)
    base.update(kw)
    return build_config(DistillConfig, overrides=base)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("device_runs")


@pytest.fixture(scope="module", params=DEVICES)
def augmented(request, tiny_data, runs):
    """A straight 2-epoch augmented teacher run on the device: (device, run, summary)."""
    from medkd.train.teacher import train_teacher

    device = request.param
    run = runs / f"aug-{device}"
    summary = train_teacher(tiny_data, run, tiny_teacher_config(epochs=2, augment=True, device=device),
                            console=_quiet())
    return device, run, summary


@pytest.mark.parametrize("device", DEVICES)
def test_augment_batch_stays_on_the_batch_device(device):
    from medkd.train.batches import augment_batch

    x = torch.rand(5, 1, 8, 8)
    y = (torch.rand(5, 1, 8, 8) > 0.5).float()
    xa, ya = augment_batch(x.to(device), y.to(device), torch.Generator().manual_seed(3))
    assert xa.device.type == device and ya.device.type == device
    xc, yc = augment_batch(x, y, torch.Generator().manual_seed(3))  # the same draws on every device
    torch.testing.assert_close(xa.cpu(), xc)
    assert torch.equal(ya.cpu(), yc)
    assert not torch.equal(xc, x)


@pytest.mark.parametrize("device", DEVICES)
def test_rng_state_restores_from_a_checkpoint_mapped_to_the_device(device):
    """``torch.load(map_location=device)`` moves the saved ByteTensors; restoring must still work."""
    from medkd.train.seeding import rng_state, set_rng_state

    torch.manual_seed(11)
    st = rng_state()
    expected = torch.rand(3)
    moved = {**st, "torch": st["torch"].to(device)}
    if "cuda" in st:
        moved["cuda"] = [s.to(device) for s in st["cuda"]]
    torch.rand(7)
    set_rng_state(moved)
    assert torch.equal(torch.rand(3), expected)


def test_augmented_teacher_trains(augmented):
    device, run, summary = augmented
    assert summary["epochs_done"] == 2 and summary["device"].startswith(device)
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) for r in hist)
    assert load_checkpoint(run / "last.pt")["config"]["augment"] is True


def test_augmented_teacher_interrupted_then_resumed(augmented, tiny_data, runs, monkeypatch):
    """Ctrl-C in epoch 2, then --resume on the same device; on CPU bit-exact equal to the straight run."""
    from medkd.train.teacher import train_teacher

    device, straight, summary = augmented
    run = runs / f"aug-resumed-{device}"
    undo = interrupt_at_validation(monkeypatch, 2)
    cfg = tiny_teacher_config(epochs=2, augment=True, device=device)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny_data, run, cfg, console=_quiet())
    undo()
    assert load_checkpoint(partial_dir(run) / "last.pt")["epoch"] == 1
    resumed = train_teacher(tiny_data, run, cfg, resume=True, console=_quiet())
    assert resumed["epochs_done"] == 2
    if device == "cpu":  # CUDA keeps cuDNN's non-deterministic kernels: only CPU is bit-exact
        a, b = load_checkpoint(run / "last.pt")["model"], load_checkpoint(straight / "last.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert resumed["best_val_dice"] == summary["best_val_dice"]


def test_workers_do_not_change_the_numbers(augmented, tiny_data, runs):
    from medkd.train.teacher import train_teacher

    device, straight, summary = augmented
    if device != "cpu":
        pytest.skip("bit-exact comparison on CPU only")
    run = runs / "aug-workers"
    s = train_teacher(tiny_data, run, tiny_teacher_config(epochs=2, augment=True, device="cpu", num_workers=2),
                      console=_quiet())
    assert s["best_val_dice"] == summary["best_val_dice"]
    assert (run / "history.jsonl").read_text().split('"seconds"')[0] == \
        (straight / "history.jsonl").read_text().split('"seconds"')[0]


@pytest.mark.parametrize("augment,outputs", [(True, "auto"), (False, "disk"), (False, "memory"), (False, "auto")],
                         ids=["augment-live-teacher", "disk-cache", "memory", "auto"])
def test_distill_then_evaluate_on_device(augmented, tiny_data, runs, augment, outputs):
    from medkd.distill.run import distill
    from medkd.evaluate import evaluate_run

    device, teacher, _ = augmented
    run = runs / f"student-{device}-{augment}-{outputs}"
    cache = runs / f"cache-{device}"
    s = distill(tiny_data, run, _student_cfg(teacher, device, augment=augment, teacher_outputs=outputs),
                console=_quiet(), cache_dir=cache)
    assert s["epochs_done"] == 1 and s["device"].startswith(device)
    rec = s["teacher_outputs"]
    if augment:  # augmentation runs the teacher live
        assert rec["mode"] == "live" and s["teacher_cache"] is None
    elif outputs != "auto":
        assert rec["mode"] == outputs and (s["teacher_cache"] is not None) == (outputs == "disk")
    else:
        assert rec["costs"]["teacher_s"] > 0 and rec["estimates"][rec["mode"]] == min(
            v for v in rec["estimates"].values() if v is not None)
    ev = evaluate_run(run, tiny_data, "test", device=device, save=False)
    assert ev["device"].startswith(device) and 0.0 <= ev["dice"] <= 1.0
    if device == "cpu":
        return
    # the same run's weights evaluated on CPU give the same masks up to float noise
    cpu = evaluate_run(run, tiny_data, "test", device="cpu", save=False)
    assert abs(cpu["dice"] - ev["dice"]) < 0.02


@needs_cuda
def test_cuda_resume_of_a_cpu_run_and_back(tiny_data, runs):
    """A run interrupted on one device resumes on the other (checkpoints hold CPU tensors and RNG states)."""
    from medkd.train.teacher import train_teacher

    run = runs / "cpu-then-cuda"
    train_teacher(tiny_data, run, tiny_teacher_config(epochs=1, device="cpu"), console=_quiet())
    s = train_teacher(tiny_data, run, tiny_teacher_config(epochs=2, device="cuda"), resume=True, console=_quiet())
    assert s["epochs_done"] == 2
    s = train_teacher(tiny_data, run, tiny_teacher_config(epochs=3, device="cpu"), resume=True, console=_quiet())
    assert s["epochs_done"] == 3


def test_cuda_requested_without_cuda_is_one_line_error(tiny_data, tmp_path):
    from medkd.train.teacher import train_teacher

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(MedkdError, match="no CUDA device"):
        train_teacher(tiny_data, tmp_path / "r", tiny_teacher_config(device="cuda"), console=_quiet())
