"""Teachers of every kind, behind one interface (:class:`~medkd.teachers.base.LoadedTeacher`).

``--teacher PATH`` is recognised from the path by the registered kinds, in registration order (the first whose
``detect`` accepts it wins), and loaded by that kind's ``load``. A kind is one module that calls
:func:`register_kind` when imported; :data:`KIND_MODULES` lists them and this package imports each (a kind whose
module is not in this checkout is skipped), so nothing depends on import side effects elsewhere.

Example:
    >>> teacher = open_teacher(Path("runs/teacher"), TeacherRequest(in_channels=1), PreparedData("data"), console)
    teacher: medkd runs/teacher (in_channels 1, checkpoint best.pt)
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from rich.console import Console
from rich.markup import escape

from medkd.errors import MedkdError
from medkd.rundir import require_run_dir
from medkd.teachers.base import LoadedTeacher, TeacherRequest

Detect = Callable[[Path], bool]
Load = Callable[[Path, TeacherRequest, Any], LoadedTeacher]


@dataclass(frozen=True)
class TeacherKind:
    """A registered teacher kind: ``detect(path) -> bool``, ``load(path, request, data) -> LoadedTeacher`` and one
    phrase saying what it expects (listed when no kind recognises a path)."""

    name: str
    detect: Detect
    load: Load
    expects: str


#: The registered kinds, in detection order.
KINDS: Dict[str, TeacherKind] = {}

#: Modules that register a kind, in detection order (a medkd run first: its folder is the most specific).
KIND_MODULES = ("medkd_run", "nnunet", "bundle", "files", "probs")


def register_kind(name: str, detect: Detect, load: Load, expects: str = "") -> None:
    """Register a teacher kind (a second registration of ``name`` replaces the first, in place)."""
    KINDS[name] = TeacherKind(name, detect, load, expects or name)


def detect_kind(path: Path) -> str:
    """The kind of the teacher at ``path``: the first registered kind whose ``detect`` accepts it.

    Raises:
        MedkdError: ``path`` does not exist (a folder: ``teacher run folder does not exist``, naming an unfinished
            ``RUN.partial``), or no kind recognises it (one line listing what each kind expects).
    """
    path = Path(path)
    if not path.exists():
        if path.suffix:  # a model file
            raise MedkdError(f"{path}: teacher file not found")
        require_run_dir(path, "teacher run folder")  # names an unfinished RUN.partial
    for kind in KINDS.values():
        if kind.detect(path):
            return kind.name
    wants = "; ".join(f"{k.name}: {k.expects}" for k in KINDS.values())
    raise MedkdError(f"{path}: not a teacher medkd can read (expected {wants})")


def open_teacher(path: Path, request: TeacherRequest, data: Any, console: Optional[Console] = None,
                 kind: Optional[str] = None) -> LoadedTeacher:
    """Detect the kind of ``path`` (or take ``kind``, e.g. ``probs`` for ``--teacher-probs``), load it for ``data``
    (a :class:`~medkd.data.prepared.PreparedData`) and say in one line what was found
    (``teacher: <kind> <path> (...)``).

    Raises:
        MedkdError: unknown kind, or the kind's own one-line reason the teacher does not fit the data or request.
    """
    kind = kind or detect_kind(Path(path))
    teacher = KINDS[kind].load(Path(path), request, data)
    if console is not None:
        console.print(f"teacher: {escape(teacher.describe())}", highlight=False, soft_wrap=True)
    return teacher


def _import_kinds() -> None:
    for name in KIND_MODULES:
        try:
            importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":  # a missing dependency inside a kind's module is a real error
                raise


_import_kinds()

__all__ = ["KINDS", "KIND_MODULES", "LoadedTeacher", "TeacherKind", "TeacherRequest", "detect_kind",
           "open_teacher", "register_kind"]
