"""What a distillation reads besides its config: the teacher run (loaded and checked against the data and the
config) and the student's training slices. Shared by a single run (:mod:`medkd.distill.run`) and an ablation's
teacher-output plan (:mod:`medkd.ablate.plan_outputs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

from torch import nn

from medkd.config import DistillConfig
from medkd.data.prepared import PreparedData, SliceDataset, select_fraction
from medkd.errors import MedkdError
from medkd.rundir import require_run_dir, run_checkpoint
from medkd.checkpoint import load_model_from_run, trained_size


def load_teacher(teacher_run: Path, cfg: DistillConfig, data: PreparedData) -> Tuple[nn.Module, Path]:
    """Load a teacher run's best checkpoint and check it fits the data. Returns (model, checkpoint path)."""
    teacher_run = require_run_dir(teacher_run, "teacher run folder")
    model, ckpt = load_model_from_run(teacher_run, "best")
    if ckpt.get("kind") != "teacher":
        raise MedkdError(f"{teacher_run}: not a teacher run (kind={ckpt.get('kind')!r})")
    size = trained_size(ckpt)
    if size is not None and size != data.size:
        raise MedkdError(f"{teacher_run}: teacher was trained on {size}px slices, {data.root} has {data.size}px")
    if model.in_channels != cfg.in_channels:
        raise MedkdError(
            f"{teacher_run}: teacher takes {model.in_channels} input channel(s), distill config has "
            f"in_channels={cfg.in_channels} (set --in-channels {model.in_channels})")
    return model, run_checkpoint(teacher_run, "best")


def student_train_set(data: PreparedData, cfg: DistillConfig) -> SliceDataset:
    """The student's training slices: its seeded labelled ``fraction`` of the train cases (drawn with
    ``cfg.subset_seed``, else the run's seed), plus (``kd_images="all"`` with a teacher) the other train cases
    without their labels, seen only by the distillation terms."""
    if not cfg.kd_on_unlabelled:
        return SliceDataset(data, "train", fraction=cfg.fraction, seed=cfg.subset_draw_seed)
    ids = data.require_split("train")
    return SliceDataset(data, case_ids=ids, labelled_ids=select_fraction(ids, cfg.fraction, cfg.subset_draw_seed))
