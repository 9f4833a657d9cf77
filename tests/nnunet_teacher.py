"""Build a REAL nnU-Net v2 trained model folder from an MSD-style dataset, with nnU-Net's own tools.

The steps an nnU-Net user runs, with the nnU-Net environment variables (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) pointing into ``OUT``:

1. ``nnUNetv2_convert_MSD_dataset`` on a staged copy of the source (links to its files; MSD's naming
   ``TaskNN_Name`` and an empty ``imagesTs/``, as nnU-Net's converter expects);
2. ``nnUNetv2_plan_and_preprocess -c CONFIGURATION``;
3. one epoch of nnU-Net's ``nnUNetTrainer`` through its Python API (``run_training.get_trainer_from_args``,
   ``run_training()``, ``perform_actual_validation``): what ``nnUNetv2_train DATASET 2d 0 -tr nnUNetTrainer_1epoch
   -device cpu`` does (250 iterations), or fewer iterations for the test suite's fixture. Not the command itself:
   it finds the ``nnUNetTrainer_1epoch`` class by importing every trainer module, timm and torchvision with them,
   and PyPI's torchvision does not load beside a CPU build of torch.

The default source is a thick-slice phantom (:func:`thick_slice_phantom`), so that nnU-Net's 2d configuration
slices axially as medkd does. The result is ``OUT/nnUNet_results/Dataset009_Spleen/nnUNetTrainer__nnUNetPlans__2d/``
with ``plans.json``, ``dataset.json`` and ``fold_0/checkpoint_final.pth``.

The test suite imports :func:`build` (``tests/`` is on ``sys.path``, like ``conftest``); by hand::

    nice -n 15 python tests/nnunet_teacher.py OUT [--source MSD_DIR] [--cases 20] [--iterations 250]

Measured on 2 shared cores (``nice -n 15``, ``OMP_NUM_THREADS=1``, load 5-8 from other work): 20 phantom cases of
48x48x~12, 250 iterations (batch 13) and nnU-Net's validation: 170 s wall, 121 s CPU (the epoch alone ~70 s);
the suite's fixture (6 cases, 30 iterations, no validation): 22-49 s wall, ~36 s CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

DATASET_ID = 9  # MSD Task09 (spleen), as nnU-Net's MSD converter names it: Dataset009_Spleen
TRAINER = "nnUNetTrainer"


def nnunet_env(out: Path, augmentation_workers: int = 0) -> Dict[str, str]:
    """The environment of an nnU-Net command working in ``out``: its three folders, one thread, no compile.

    ``augmentation_workers`` 0 runs the trainer's data augmentation in its own process (no background workers);
    the planner needs it positive (it sets torch's thread count from it).
    """
    env = dict(os.environ)
    env.update(nnUNet_raw=str(out / "nnUNet_raw"), nnUNet_preprocessed=str(out / "nnUNet_preprocessed"),
               nnUNet_results=str(out / "nnUNet_results"), nnUNet_n_proc_DA=str(augmentation_workers),
               OMP_NUM_THREADS="1", nnUNet_compile="false")
    return env


def _command(name: str) -> str:
    """The nnU-Net console script installed beside this Python (the venv's ``bin/``)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.is_file() else shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: install nnunetv2 (pip install 'medkd[nnunet]')")
    return found


def _run(out: Path, *args: str) -> None:
    subprocess.run([_command(args[0]), *args[1:]], env=nnunet_env(out, 1), check=True)


@contextlib.contextmanager
def nnunet_environment(out: Path) -> Iterator[None]:
    """This process's environment as :func:`nnunet_env` says, restored afterwards (nnunetv2's Python API reads it)."""
    env = nnunet_env(out)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stage_msd(source: Path, stage: Path, cases: Optional[int] = None, keep: Optional[Sequence[str]] = None) -> Path:
    """A ``Task09_Spleen`` folder that nnU-Net's MSD converter accepts, linking to ``source``'s files.

    Args:
        source: MSD-style folder (``dataset.json``, ``imagesTr/``, ``labelsTr/``), e.g. medkd's ``sample_data``.
        stage: where to put the staged folder.
        cases: keep only the first ``cases`` training cases (all when None).
        keep: keep only the cases of these ids (image file names without ``.nii.gz``; all when None).
    """
    meta = json.loads((source / "dataset.json").read_text())
    training = meta["training"][:cases] if cases else meta["training"]
    if keep is not None:
        training = [t for t in training if Path(t["image"]).name.split(".nii")[0] in set(keep)]
    task = stage / f"Task{DATASET_ID:02d}_Spleen"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (task / sub).mkdir(parents=True, exist_ok=True)
    for pair in training:
        for key in ("image", "label"):
            rel = Path(pair[key])
            (task / rel).symlink_to((source / rel).resolve())
    meta.update(training=training, numTraining=len(training), test=[], numTest=0)
    (task / "dataset.json").write_text(json.dumps(meta, indent=2))
    return task


def train(out: Path, configuration: str = "2d", fold: int = 0, iterations: int = 250, validate: bool = True) -> None:
    """One epoch of nnU-Net's own ``nnUNetTrainer`` (through its Python API) with ``iterations`` iterations.

    What ``nnUNetv2_train DATASET CONFIGURATION FOLD -tr nnUNetTrainer_1epoch -device cpu`` does (250 iterations),
    with the base trainer class: nnunetv2 finds any other trainer class by importing every trainer module, which
    imports torchvision (through timm), and PyPI's torchvision does not load beside a CPU build of torch.
    """
    import importlib
    import random

    import numpy as np
    import torch

    with nnunet_environment(out):
        import nnunetv2.paths
        from nnunetv2.run import run_training

        importlib.reload(nnunetv2.paths)  # older nnunetv2 releases read the environment once, on import
        importlib.reload(run_training)  # ... and this module copied nnUNet_preprocessed then
        random.seed(0)  # nnU-Net does not seed its training; the suite wants the same teacher every run
        np.random.seed(0)
        torch.manual_seed(0)
        trainer = run_training.get_trainer_from_args(str(DATASET_ID), configuration, fold, TRAINER,
                                                     device=torch.device("cpu"))
        trainer.num_epochs = 1
        trainer.num_iterations_per_epoch = iterations
        trainer.num_val_iterations_per_epoch = max(1, iterations // 5)
        trainer.run_training()
        if validate:  # nnUNetv2_train's last step: predict the fold's held-out cases into fold_K/validation/
            trainer.perform_actual_validation(False)


def thick_slice_phantom(out: Path, cases: int = 8, size: int = 48, slices: int = 12, seed: int = 5) -> Path:
    """An MSD-style phantom dataset (``medkd.data.phantom``) with 8 mm slices and 5.8 mm pixels.

    nnU-Net's planner slices a ``2d`` configuration across the axis of the largest spacing (its plans'
    ``transpose_forward``): with thick slices that is the axial axis, as on clinical CT, and as medkd's prepared
    slices. (medkd's ``sample_data`` has 5 mm slices under 5.8 mm pixels, so nnU-Net would slice it sagittally.)
    """
    from medkd.data.phantom import write_msd_dataset

    return write_msd_dataset(Path(out), n_cases=cases, seed=seed, size=size, n_slices=slices, dicom_case=False,
                             spacing=(5.8, 5.8, 8.0))


def fit_cases(prepared: Path) -> List[str]:
    """The train and val case ids of a medkd prepared dataset: what an nnU-Net teacher may learn from, so that
    medkd's test split stays unseen by the teacher as by the students."""
    manifest = json.loads((Path(prepared) / "manifest.json").read_text())
    return [c["id"] for c in manifest["cases"] if c["split"] in ("train", "val")]


def build(source: Optional[Path], out: Path, configuration: str = "2d", fold: int = 0, cases: Optional[int] = None,
          iterations: int = 250, validate: bool = True, keep: Optional[Sequence[str]] = None) -> Path:
    """Make an nnU-Net v2 trained model folder from ``source``; returns its path.

    Args:
        source: MSD-style dataset folder (None: :func:`thick_slice_phantom` of ``cases`` cases, default 8).
        out: empty or missing folder for nnU-Net's raw/preprocessed/results folders.
        configuration: nnU-Net configuration (``2d``, ``3d_fullres``).
        fold: the fold to train.
        cases: use only the first ``cases`` training cases (nnU-Net's 5-fold split needs at least 5).
        iterations: training iterations of the one epoch (nnUNetTrainer_1epoch: 250).
        validate: end with nnU-Net's validation of the fold (not needed for the model folder).
        keep: train only on the cases of these ids (e.g. :func:`fit_cases` of a prepared dataset).

    Returns:
        ``out/nnUNet_results/Dataset009_Spleen/nnUNetTrainer__nnUNetPlans__<configuration>``.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if source is None:
        source, cases = thick_slice_phantom(out / "phantom", cases or 8), None
    task = stage_msd(Path(source), out / "msd", cases, keep)
    _run(out, "nnUNetv2_convert_MSD_dataset", "-i", str(task), "-np", "1")
    _run(out, "nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", configuration, "-np", "1",
         "-npfp", "1", "--verify_dataset_integrity")
    train(out, configuration, fold, iterations, validate)
    return out / "nnUNet_results" / f"Dataset{DATASET_ID:03d}_Spleen" / f"{TRAINER}__nnUNetPlans__{configuration}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--source", type=Path, default=None, help="MSD-style dataset (default: a thick-slice phantom)")
    parser.add_argument("--configuration", default="2d")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--cases", type=int, default=None)
    parser.add_argument("--iterations", type=int, default=250)
    parser.add_argument("--fit-cases-of", type=Path, default=None, metavar="PREPARED",
                        help="train only on the train+val cases of this medkd prepared dataset (its test split unseen)")
    args = parser.parse_args()
    start = time.perf_counter()
    keep = fit_cases(args.fit_cases_of) if args.fit_cases_of else None
    folder = build(args.source, args.out, args.configuration, args.fold, args.cases, args.iterations, keep=keep)
    print(f"{folder}  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
