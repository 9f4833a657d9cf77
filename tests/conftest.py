"""Shared fixtures: one tiny synthetic dataset, prepared once per session, and tiny trained runs.

Everything is real (NIfTI files through nibabel, real training), only small: 6 cases of 48x48x12 voxels
prepared at 32x32, models of width 4, one or two epochs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)  # 2-core CI machines stall with more threads under load


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory) -> Path:
    from medkd.data.phantom import write_msd_dataset

    root = tmp_path_factory.mktemp("raw") / "msd"
    write_msd_dataset(root, n_cases=6, seed=3, size=48, n_slices=12, dicom_case=True)
    return root


@pytest.fixture(scope="session")
def tiny_data(tiny_raw, tmp_path_factory) -> Path:
    from medkd.data.preprocess import PreprocessSettings, preprocess

    out = tmp_path_factory.mktemp("prep") / "data"
    preprocess(tiny_raw, out, PreprocessSettings(size=32, test_fraction=0.2, val_fraction=0.2, seed=0))
    return out


def tiny_teacher_config(**kw):
    from medkd.config import TeacherConfig, build_config

    base = dict(arch="unet", width=4, epochs=1, batch_size=4, lr=3e-3, device="cpu", seed=0)
    base.update(kw)
    return build_config(TeacherConfig, overrides=base)


@pytest.fixture(scope="session")
def tiny_teacher(tiny_data, tmp_path_factory) -> Path:
    """A 1-epoch width-4 U-Net teacher run folder."""
    from medkd.train.teacher import train_teacher

    run = tmp_path_factory.mktemp("runs") / "teacher"
    train_teacher(tiny_data, run, tiny_teacher_config(), console=_quiet())
    return run


def cli(args):
    """``medkd ARGS`` through Typer's runner (stdout and stderr apart); paths and numbers given as they are."""
    from typer.testing import CliRunner

    from medkd.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def one_error(r) -> str:
    """The run's only ``error:`` line (log lines may come before it), after checking there is no traceback."""
    assert "Traceback" not in r.stdout + r.stderr and (r.exception is None or isinstance(r.exception, SystemExit))
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def run_copy(run: Path, parent: Path) -> Path:
    """A copy of a shared run folder (a session fixture) under ``parent``, for a command that writes into its run
    (``export`` and ``evaluate`` save ``postprocessing.json``; ``evaluate`` its ``eval-<split>.json``): tests that
    read the shared run later (``predict`` applies the saved rule) must see it untouched."""
    import shutil

    dst = Path(parent) / Path(run).name
    shutil.copytree(run, dst)
    return dst


def _quiet():
    from rich.console import Console

    return Console(stderr=True, quiet=True)


def interrupt_at_validation(monkeypatch, n: int = 2):
    """Make training raise KeyboardInterrupt (a Ctrl-C) at its ``n``-th validation; returns the undo function."""
    import medkd.train.loop as loop

    real, calls = loop.validate, {"n": 0}

    def validate_then_interrupt(*a, **kw):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(loop, "validate", validate_then_interrupt)
    return lambda: monkeypatch.setattr(loop, "validate", real)
