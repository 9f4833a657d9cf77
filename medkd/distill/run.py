"""``medkd distill``: train a student, with or without a teacher (the no-KD baseline uses the same path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from rich.console import Console

from medkd.config import DistillConfig
from medkd.data.prepared import PreparedData, SliceDataset, select_fraction
from medkd.distill.distiller import Distiller
from medkd.distill.teacher_outputs import setup_teacher_outputs
from medkd.errors import MedkdError
from medkd.infer import resolve_device
from medkd.models import build_model
from medkd.rundir import load_model_from_run, require_run_dir, run_checkpoint, trained_size
from medkd.train.entry import claims_run
from medkd.train.loop import fit
from medkd.train.seeding import seed_everything


def load_teacher(teacher_run: Path, cfg: DistillConfig, data: PreparedData):
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


@claims_run  # before the teacher cache is filled: a second process to the same RUN fails at once
def distill(
    data_dir: Path,
    run: Path,
    cfg: DistillConfig,
    resume: bool = False,
    overwrite: bool = False,
    console: Optional[Console] = None,
    cache_dir: Optional[Path] = None,
    outputs_note: Optional[str] = None,
) -> Dict[str, Any]:
    """Train a student on a seeded ``cfg.fraction`` of the training cases (see :func:`student_train_set`). Returns
    the run summary.

    With ``cfg.scales == []`` and ``cfg.pmd == False`` no teacher is loaded (plain supervised baseline).
    Where the teacher's targets come from (live, disk cache, memory) is ``cfg.teacher_outputs``
    (:mod:`medkd.distill.teacher_outputs`); the cache lives in ``cache_dir`` (default ``TEACHER_RUN/cache``).
    """
    console = console or Console(stderr=True, quiet=True)
    data = PreparedData(data_dir)
    train_set = student_train_set(data, cfg)
    seed_everything(cfg.seed)
    student = build_model(cfg.student, in_channels=cfg.in_channels, num_classes=1, width=cfg.student_width)
    if data.size < student.min_size:
        raise MedkdError(f"{data_dir}: slices of {data.size}px are smaller than {cfg.student}'s minimum {student.min_size}")
    teacher = None
    task_outputs = None
    if cfg.uses_teacher:
        teacher, ckpt_path = load_teacher(Path(cfg.teacher), cfg, data)
    device = resolve_device(cfg.device)
    task = Distiller(student, teacher, cfg, data.size)
    if cfg.uses_teacher:
        task_outputs = setup_teacher_outputs(task, cfg, data, train_set,
                                             Path(cache_dir) if cache_dir else Path(cfg.teacher) / "cache",
                                             ckpt_path, device, console, note=outputs_note)
    eff = cfg.effective()
    summary_extra = {
        "student": cfg.student, "scales": eff["scales"], "loss": eff.get("loss"), "pmd": eff["pmd"],
        "fraction": cfg.fraction, "subset_seed": eff.get("subset_seed"),
        "teacher": str(Path(cfg.teacher).resolve()) if cfg.uses_teacher else None,
        "weights": eff["weights"], "temperature": eff.get("temperature"),
        "teacher_outputs": task_outputs,
        "teacher_cache": task_outputs["cache_key"] if task_outputs else None,
        "kd_images": "all" if cfg.kd_on_unlabelled else "labelled",
        "labelled_cases": len(train_set.labelled_ids), "labelled_case_ids": sorted(train_set.labelled_ids),
    }
    return fit(task, cfg, data, train_set, run, kind="student", summary_extra=summary_extra, resume=resume,
               overwrite=overwrite, console=console, device=device)
