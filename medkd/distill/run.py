"""``medkd distill``: train a student, with or without a teacher (the no-KD baseline uses the same path)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

from rich.console import Console

from medkd.config import DistillConfig
from medkd.data.prepared import PreparedData
from medkd.distill.distiller import DistillTerms, Distiller
from medkd.distill.inputs import load_teacher, student_train_set
from medkd.distill.teacher_outputs import setup_case_targets, setup_teacher_outputs
from medkd.errors import MedkdError
from medkd.infer import resolve_device
from medkd.models import build_model
from medkd.train.entry import claims_run
from medkd.train.loop import fit
from medkd.train.seeding import seed_everything


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
    """Train a student on a seeded ``cfg.fraction`` of the training cases (see :func:`~medkd.distill.inputs.student_train_set`). Returns
    the run summary.

    With ``cfg.scales == []`` and ``cfg.pmd == False`` no teacher is loaded (plain supervised baseline).
    Where the teacher's targets come from (live, disk cache, memory) is ``cfg.teacher_outputs``
    (:mod:`medkd.distill.teacher_outputs` sets it up, the Distiller reads it); the cache lives in ``cache_dir``
    (default: the teacher's, :attr:`~medkd.teachers.base.LoadedTeacher.cache_root`: ``TEACHER_RUN/cache`` for a
    medkd run, ``DATA/teacher-cache/<kind>-<sha12>`` for an external teacher). The teacher may be of any kind
    :mod:`medkd.teachers` reads; ``summary.json`` records it under ``teacher_source``.
    """
    console = console or Console(stderr=True, quiet=True)
    data = PreparedData(data_dir)
    train_set = student_train_set(data, cfg)
    seed_everything(cfg.seed)
    student = build_model(cfg.student, in_channels=cfg.in_channels, num_classes=1, width=cfg.student_width)
    if data.size < student.min_size:
        raise MedkdError(f"{data_dir}: slices of {data.size}px are smaller than {cfg.student}'s minimum {student.min_size}")
    loaded, teacher, targets, outputs = None, None, None, None
    if cfg.uses_teacher:
        loaded = load_teacher(cfg, data, console)
        teacher = loaded.module
    device = resolve_device(cfg.device)
    per_case = loaded is not None and loaded.case_probs is not None  # per-case probabilities: no module to run
    terms = DistillTerms(student, teacher, cfg, data.size, per_case=per_case)
    if per_case:
        store = (Path(cache_dir) if cache_dir else loaded.cache_root) if loaded.cache_root else None
        targets, outputs = setup_case_targets(loaded.case_probs, loaded.source, cfg, train_set, console,
                                              cache_root=store)  # saved probabilities: no store
    elif teacher is not None:
        targets, outputs = setup_teacher_outputs(terms.teacher_view(), cfg, data, train_set,
                                                 Path(cache_dir) if cache_dir else loaded.cache_root,
                                                 loaded.cache_key_file, device, console, note=outputs_note)
    task = Distiller(student, cfg, terms, targets)
    eff = cfg.effective()
    summary_extra = {
        "student": cfg.student, "scales": eff["scales"], "loss": eff.get("loss"), "pmd": eff["pmd"],
        "fraction": cfg.fraction, "subset_seed": eff.get("subset_seed"),
        "teacher": str(Path(cfg.teacher_path).resolve()) if cfg.uses_teacher else None,
        "teacher_source": loaded.record() if loaded is not None else None,
        "weights": eff["weights"], "temperature": eff.get("temperature"), "pmd_loss": eff.get("pmd_loss"),
        "pseudo_label": cfg.uses_pseudo_labels,
        "teacher_outputs": outputs,
        "teacher_cache": outputs["cache_key"] if outputs else None,
        "kd_images": "all" if cfg.kd_on_unlabelled else "labelled",
        "labelled_cases": len(train_set.labelled_ids), "labelled_case_ids": sorted(train_set.labelled_ids),
    }
    return fit(task, cfg, data, train_set, run, kind="student", summary_extra=summary_extra, resume=resume,
               overwrite=overwrite, console=console, device=device)
