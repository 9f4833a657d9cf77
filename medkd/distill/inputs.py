"""What a distillation reads besides its config: the teacher (any kind, :mod:`medkd.teachers`; checked against
the data, the config and the feature scales) and the student's training slices. Shared by a single run
(:mod:`medkd.distill.run`) and an ablation's teacher-output plan (:mod:`medkd.ablate.plan_outputs`)."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

from rich.console import Console

from medkd.config import DistillConfig
from medkd.data.prepared import PreparedData, SliceDataset, select_fraction
from medkd.distill.distiller import tap_paths, teacher_tap_overrides
from medkd.distill.hooks import resolve_module
from medkd.errors import MedkdError
from medkd.teachers import LoadedTeacher, TeacherRequest, open_teacher


def load_teacher(cfg: DistillConfig, data: PreparedData, console: Optional[Console] = None,
                 teacher: Optional[Path] = None) -> LoadedTeacher:
    """Open the config's teacher (``teacher`` overrides ``cfg.teacher``; ``cfg.teacher_probs``: saved per-case
    probabilities, :mod:`medkd.teachers.probs`) for ``data`` and check that the run's feature scales can be tapped
    on it (:func:`teacher_tap_paths`).

    Raises:
        MedkdError: the teacher's kind cannot be read or does not fit (its one-line reason), or a feature scale has
            no tap on it.
    """
    probs = teacher is None and not cfg.teacher and cfg.teacher_probs
    loaded = open_teacher(Path(teacher or cfg.teacher_path), TeacherRequest.from_config(cfg), data, console,
                          kind="probs" if probs else None)
    teacher_tap_paths(loaded, cfg)
    return loaded


def teacher_tap_paths(loaded: LoadedTeacher, cfg: DistillConfig) -> Dict[str, str]:
    """Scale -> module path on ``loaded.module`` for each of the run's feature scales: ``--teacher-taps`` (paths in
    the teacher's own network), else the kind's own taps (a medkd teacher's), overridden by the config's
    ``taps.teacher`` (paths on the module as loaded).

    Raises:
        MedkdError: a feature scale on a teacher without tappable modules (ONNX, TorchScript, saved
            probabilities), a scale without a path, or a path that names no module (with the nearest valid ones).
    """
    scales = cfg.effective()["scales"]
    if not scales:
        return {}
    if loaded.module is None or not loaded.taps_ok:
        raise MedkdError(f"{loaded.source}: feature scales ({','.join(scales)}) need a torch-module teacher whose "
                         f"modules can be hooked; {loaded.kind} teachers give prediction maps only (use --scales "
                         f"none; PMD, CWD and pseudo-labels work)")
    prefix = getattr(loaded.module, "tap_prefix", "")
    net = loaded.module.get_submodule(prefix.rstrip(".")) if prefix else loaded.module
    for s, path in (cfg.teacher_taps or {}).items():
        try:
            resolve_module(net, path)
        except ValueError as e:
            raise MedkdError(f"{loaded.source}: --teacher-taps {s}={path}: {e}") from None
    try:
        return tap_paths(loaded.module, scales, teacher_tap_overrides(loaded.module, cfg))
    except MedkdError as e:
        raise MedkdError(f"{loaded.source}: {loaded.kind} teacher: {e}") from None


def student_train_set(data: PreparedData, cfg: DistillConfig) -> SliceDataset:
    """The student's training slices: its seeded labelled ``fraction`` of the train cases (drawn with
    ``cfg.subset_seed``, else the run's seed), plus (``kd_images="all"`` with a teacher) the other train cases
    without their labels, seen only by the distillation terms."""
    if not cfg.kd_on_unlabelled:
        return SliceDataset(data, "train", fraction=cfg.fraction, seed=cfg.subset_draw_seed)
    ids = data.require_split("train")
    return SliceDataset(data, case_ids=ids, labelled_ids=select_fraction(ids, cfg.fraction, cfg.subset_draw_seed))
