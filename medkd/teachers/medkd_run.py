"""The ``medkd`` teacher kind: a run folder written by ``medkd train-teacher`` (its ``best.pt``).

The model is medkd's own: it takes the prepared slices as they are, knows its tap points (``model.taps``) and is
checked against the data (trained slice size) and the request (input channels). Its disk cache lives in
``TEACHER_RUN/cache``, keyed by the checkpoint's bytes (as before teachers had kinds: caches are reused).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from medkd.checkpoint import load_model_from_run, trained_size
from medkd.errors import MedkdError
from medkd.rundir import BEST, CONFIG, LAST, SUMMARY, require_run_dir, run_checkpoint
from medkd.teachers import register_kind
from medkd.teachers.base import LoadedTeacher, TeacherRequest, hash_files, reject_options

KIND = "medkd"
EXPECTS = f"a run folder of medkd train-teacher ({BEST}, {SUMMARY}, ...)"


def detect(path: Path) -> bool:
    """A folder with a file of the run-folder contract (a checkpoint or the run's record): :func:`load` then says
    precisely what is wrong with it."""
    path = Path(path)
    return path.is_dir() and any((path / f).is_file() for f in (BEST, LAST, SUMMARY, CONFIG))


def load(path: Path, request: TeacherRequest, data: Any) -> LoadedTeacher:
    """Load a teacher run's best checkpoint and check it fits the data and the request.

    Raises:
        MedkdError: not a teacher run, trained on another slice size, other input channels, or a checkpoint that
            does not load (weights-only, :func:`medkd.checkpoint.load_checkpoint`).
    """
    run = require_run_dir(Path(path), "teacher run folder")
    reject_options(run, KIND, request, ("fold", "checkpoint"))
    model, ckpt = load_model_from_run(run, "best")
    if ckpt.get("kind") != "teacher":
        raise MedkdError(f"{run}: not a teacher run (kind={ckpt.get('kind')!r})")
    size = trained_size(ckpt)
    if size is not None and size != data.size:
        raise MedkdError(f"{run}: teacher was trained on {size}px slices, {data.root} has {data.size}px")
    if model.in_channels != request.in_channels:
        raise MedkdError(
            f"{run}: teacher takes {model.in_channels} input channel(s), distill config has "
            f"in_channels={request.in_channels} (set --in-channels {model.in_channels})")
    if request.label not in (None, 1):
        raise MedkdError(f"{run}: --teacher-label {request.label}: a medkd teacher has one foreground class "
                         f"(label 1)")
    checkpoint = run_checkpoint(run, "best")
    for p in model.parameters():  # frozen from the start (the Distiller keeps it so)
        p.requires_grad_(False)
    return LoadedTeacher(
        kind=KIND, source=run, module=model, in_channels=model.in_channels, files=hash_files(run, [checkpoint]),
        details={"checkpoint": checkpoint.name, "arch": ckpt["model_config"].get("name"), "epoch": ckpt.get("epoch")},
        taps_ok=True, default_taps=dict(model.taps), cache_key_file=checkpoint, cache_root=run / "cache")


register_kind(KIND, detect, load, EXPECTS)
