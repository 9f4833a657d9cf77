"""What every teacher kind gives a distillation (:class:`LoadedTeacher`) and what the user asked of it
(:class:`TeacherRequest`).

A teacher kind (a medkd run, a TorchScript/ONNX file, an nnU-Net v2 model folder, a MONAI bundle, saved
probabilities) is loaded into one :class:`LoadedTeacher`; the distillation reads only that: its ``module`` on
prepared slices (the teacher-output modes, the feature hooks) or its per-case probabilities (``case_probs``), where
its disk cache lives and what ``summary.json`` records about it (:meth:`LoadedTeacher.record`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import numpy as np
from torch import nn

from medkd.errors import MedkdError
from medkd.rundir import file_sha256

#: Distillation terms that read only the teacher's prediction map: possible from every kind.
PREDICTION_TERMS = ("pmd", "cwd", "pseudo_label")
#: Terms that read the teacher's features at module paths (``--scales``): a torch module with tappable submodules.
FEATURE_TERMS = ("features",)
#: Folder of an external teacher's disk caches inside the prepared dataset (never inside the user's model folder).
CACHE_FOLDER = "teacher-cache"


@dataclass
class TeacherRequest:
    """What the user asked of the teacher (from :class:`~medkd.config.DistillConfig`).

    Attributes:
        in_channels: Input channels the student (and so the prepared batches) take.
        label: ``--teacher-label N``: which class of a multi-class teacher is the student's foreground.
        fold: ``--teacher-fold`` (nnU-Net: ``0``..``4`` or ``all``).
        checkpoint: ``--teacher-checkpoint`` (nnU-Net: ``checkpoint_final.pth`` by default).
        taps: ``--teacher-taps``: scale -> module path in the teacher's own network.
        device: The run's ``--device`` (a kind that must pick a device to load on).
    """

    in_channels: int = 1
    label: Optional[int] = None
    fold: Optional[str] = None
    checkpoint: Optional[str] = None
    taps: Dict[str, str] = field(default_factory=dict)
    device: str = "auto"

    @classmethod
    def from_config(cls, cfg: Any) -> "TeacherRequest":
        """The request a distill config makes (options it predates read as their defaults)."""
        return cls(in_channels=int(cfg.in_channels), label=getattr(cfg, "teacher_label", None),
                   fold=getattr(cfg, "teacher_fold", None), checkpoint=getattr(cfg, "teacher_checkpoint", None),
                   taps=dict(getattr(cfg, "teacher_taps", None) or {}), device=str(cfg.device))


@dataclass
class LoadedTeacher:
    """A teacher ready for distillation, whatever its kind.

    Attributes:
        kind: ``medkd`` | ``torchscript`` | ``onnx`` | ``nnunet`` | ``bundle`` | ``probs``.
        source: What the user gave (``--teacher`` or ``--teacher-probs``).
        module: Runs on prepared slices: ``x (B, C, H, W)`` in the prepared dataset's intensity scale (medkd's
            normalisation, ``C = in_channels``) -> ``(B, 1, H, W)`` foreground logits at the prepared size (a medkd
            teacher returns ``(seg, recon)``; :func:`medkd.infer.seg_logits` takes the first). Has ``in_channels``
            and at least one parameter (its device); frozen. ``None`` for a teacher that only gives per-case
            probabilities (saved probabilities, a 3-D nnU-Net).
        in_channels: Input channels of ``module``.
        files: File (relative to ``source``; the file's name when ``source`` is the file) -> SHA-256, of every
            file the teacher's outputs depend on.
        details: Kind-specific facts for the record (fold, checkpoint, configuration, label, classes, sidecar ...).
        taps_ok: Feature terms are possible: ``module`` is a torch module whose submodules can be hooked.
        default_taps: Scale -> module path the kind knows (a medkd teacher's own), else ``None``.
        cache_key_file: The file whose bytes key the disk cache (a checkpoint); ``None``: no disk cache.
        cache_root: Where the disk cache lives: ``TEACHER_RUN/cache`` for a medkd run,
            ``DATA/teacher-cache/<kind>-<sha12>/`` for an external teacher (:func:`external_cache_root`).
        case_probs: Per-case foreground probability on the prepared grid, ``case id -> (Z, S, S)`` float32 in
            [0, 1], for teachers that work per case.
    """

    kind: str
    source: Path
    module: Optional[nn.Module]
    in_channels: int
    files: Dict[str, str]
    details: Dict[str, Any]
    taps_ok: bool
    default_taps: Optional[Dict[str, str]]
    cache_key_file: Optional[Path]
    cache_root: Optional[Path]
    case_probs: Optional[Callable[[str], np.ndarray]] = None

    def terms(self) -> List[str]:
        """The distillation terms this teacher can feed: prediction-map terms always, feature terms with taps."""
        return [*PREDICTION_TERMS, *(FEATURE_TERMS if self.taps_ok and self.module is not None else ())]

    def record(self) -> Dict[str, Any]:
        """What ``summary.json`` stores under ``teacher_source``: kind, source, files (SHA-256), details, terms."""
        return {"kind": self.kind, "source": str(Path(self.source).resolve()), "files": dict(self.files),
                "details": _jsonable(self.details), "terms": self.terms()}

    def describe(self) -> str:
        """One line for the log: ``medkd /path/run (in_channels 1, fold 0, ...)``."""
        facts = [f"in_channels {self.in_channels}"] + [f"{k} {v}" for k, v in self.details.items()
                                                        if isinstance(v, (str, int, float)) and k != "sidecar"]
        return f"{self.kind} {self.source} ({', '.join(facts)})"


def _jsonable(doc: Any) -> Any:
    """``doc`` with paths and other non-JSON values as text (a record is written as JSON)."""
    return json.loads(json.dumps(doc, default=str))


def hash_files(root: Path, paths: Iterable[Path]) -> Dict[str, str]:
    """``{name relative to root: SHA-256}`` of ``paths`` (``root`` a folder, or the file itself: its name)."""
    root = Path(root)
    out = {}
    for p in paths:
        p = Path(p)
        name = p.name if root == p or not root.is_dir() else str(p.relative_to(root))
        out[name] = file_sha256(p)
    return dict(sorted(out.items()))


def external_cache_root(data_root: Path, kind: str, files: Dict[str, str], details: Dict[str, Any]) -> Path:
    """``DATA/teacher-cache/<kind>-<sha12>/``: an external teacher's disk cache, inside the prepared dataset.

    ``sha12`` hashes every file the teacher's outputs depend on and its details (sidecar, label, fold ...), so a
    changed sidecar or another ``--teacher-label`` never reads targets cached for another setting. The cache's
    own key (:class:`medkd.distill.cache.TeacherCache`) adds the model file, the manifest and the format.
    """
    doc = json.dumps({"files": files, "details": _jsonable(details)}, sort_keys=True)
    return Path(data_root) / CACHE_FOLDER / f"{kind}-{hashlib.sha256(doc.encode()).hexdigest()[:12]}"


#: How each :class:`TeacherRequest` field is spelled on the command line (messages).
REQUEST_FLAGS = {"label": "--teacher-label", "fold": "--teacher-fold", "checkpoint": "--teacher-checkpoint",
                 "taps": "--teacher-taps"}


def reject_options(source: Path, kind: str, request: TeacherRequest, names) -> None:
    """A kind that has no use for some of the request's options refuses them instead of ignoring them.

    Raises:
        MedkdError: ``<source>: --teacher-fold does not apply to <kind> teachers``.
    """
    given = [REQUEST_FLAGS[n] for n in names if getattr(request, n) not in (None, {}, [])]
    if given:
        raise MedkdError(f"{source}: {', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply to {kind} "
                         f"teachers")
