"""Write ``tests/data/a13dbb9-teacher/{best,last}.pt``: checkpoints as the previous release (a13dbb9) wrote them.

Run with that release's code first on the path (see tests/data/README.md); the same tiny data as tests/conftest.py
(6 phantom cases of 48x48x12 prepared at 32x32), a width-1 U-Net teacher (the smallest
that loads like any other: ~110 KB best.pt, ~310 KB last.pt) trained for 1 epoch on CPU.
"""

import shutil
import sys
import tempfile
from pathlib import Path

from rich.console import Console

from medkd.config import TeacherConfig, build_config
from medkd.data.phantom import write_msd_dataset
from medkd.data.preprocess import PreprocessSettings, preprocess
from medkd.train.teacher import train_teacher

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent / "a13dbb9-teacher")
with tempfile.TemporaryDirectory() as tmp:
    raw, data, run = Path(tmp) / "msd", Path(tmp) / "data", Path(tmp) / "teacher"
    write_msd_dataset(raw, n_cases=6, seed=3, size=48, n_slices=12, dicom_case=True)
    preprocess(raw, data, PreprocessSettings(size=32, test_fraction=0.2, val_fraction=0.2, seed=0))
    cfg = build_config(TeacherConfig, overrides=dict(arch="unet", width=1, epochs=1, batch_size=4, lr=3e-3,
                                                      device="cpu", seed=0))
    train_teacher(data, run, cfg, console=Console(stderr=True, quiet=True))
    out.mkdir(parents=True, exist_ok=True)
    for name in ("best.pt", "last.pt"):
        shutil.copyfile(run / name, out / name)
print(out)
