"""Shared set-up for the benchmarks: the sample data prepared once into a temp folder, a quiet console."""

from __future__ import annotations

import os
import platform
import tempfile
from pathlib import Path

import torch
from rich.console import Console

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(os.environ.get("MEDKD_BENCH_DIR", Path(tempfile.gettempdir()) / "medkd-bench"))


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


def machine() -> str:
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads{gpu}")


def prepared_sample(size: int = 128) -> Path:
    """``sample_data/`` prepared at ``size`` px (cached across benchmark runs)."""
    from medkd.data.preprocess import PreprocessSettings, preprocess

    out = WORK / f"data{size}"
    if not (out / "manifest.json").is_file():
        preprocess(ROOT / "sample_data", out, PreprocessSettings(size=size), overwrite=True)
    return out
