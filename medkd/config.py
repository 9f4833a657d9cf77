"""Typed configuration: dataclass defaults < preset < ``--config`` YAML < command-line flags.

A YAML file lists only what differs from the defaults. The resolved config is written to ``RUN/config.yaml``
and is enough to rerun (``medkd train-teacher DATA -o RUN2 --config RUN/config.yaml``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Type, TypeVar

import yaml

from medkd.errors import MedkdError

SCALES = ("enc", "bottleneck", "dec")
STUDY_WEIGHTS = {"seg": 0.4, "enc": 0.1, "bottleneck": 0.2, "dec": 0.1, "pmd": 0.2}


@dataclass
class TrainConfig:
    """Options shared by teacher and student training."""

    epochs: int = 12
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | adam | sgd
    schedule: str = "cosine"  # cosine | plateau | none
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    augment: bool = False  # random flips + intensity jitter (seeded per epoch)
    amp: bool = True  # CUDA only: bf16 when supported, else fp16 with a grad scaler
    num_workers: int = 0  # DataLoader workers (CUDA runs: set >0; pinned memory is automatic on CUDA)
    in_channels: int = 1  # 3 reproduces the reference study (slice repeated over channels)

    def validate(self) -> None:
        _check(self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.optimizer in ("adamw", "adam", "sgd"), f"optimizer must be adamw|adam|sgd, got {self.optimizer!r}")
        _check(self.schedule in ("cosine", "plateau", "none"), f"schedule must be cosine|plateau|none, got {self.schedule!r}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be auto|cpu|cuda, got {self.device!r}")
        _check(self.in_channels in (1, 3), f"in_channels must be 1 or 3, got {self.in_channels}")


@dataclass
class TeacherConfig(TrainConfig):
    """``medkd train-teacher`` options."""

    arch: str = "unet"
    width: int = 16
    recon_weight: float = 0.2
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. transunet depth/heads

    def validate(self) -> None:
        super().validate()
        from medkd.models import MODELS, is_teacher

        _check(self.arch in MODELS and is_teacher(self.arch),
               f"unknown teacher arch {self.arch!r}; valid: {', '.join(n for n in MODELS.names() if is_teacher(n))}")
        _check(self.width >= 1, f"width must be >= 1, got {self.width}")
        _check(self.recon_weight >= 0, f"recon_weight must be >= 0, got {self.recon_weight}")


@dataclass
class DistillConfig(TrainConfig):
    """``medkd distill`` options. ``scales=[]`` and ``pmd=False`` is plain supervised student training."""

    student: str = "s1"
    student_width: Optional[int] = None
    teacher: Optional[str] = None
    scales: List[str] = field(default_factory=lambda: list(SCALES))
    loss: str = "contrastive"
    scale_losses: Dict[str, str] = field(default_factory=dict)  # per-scale override, e.g. {enc: mse}
    loss_options: Dict[str, Any] = field(default_factory=dict)  # passed to every feature loss's constructor
    pmd: bool = True
    temperature: float = 4.0
    fraction: float = 0.5
    weights: Dict[str, float] = field(default_factory=lambda: dict(STUDY_WEIGHTS))
    taps: Dict[str, Dict[str, str]] = field(default_factory=dict)  # {"student"|"teacher": {scale: module path}}
    cache: bool = True  # teacher-output cache (only used without augmentation)

    def validate(self) -> None:
        super().validate()
        from medkd.distill.losses import LOSSES
        from medkd.models import MODELS, is_teacher

        students = [n for n in MODELS.names() if not is_teacher(n)]
        _check(self.student in students, f"unknown student {self.student!r}; valid: {', '.join(students)}")
        bad = [s for s in self.scales if s not in SCALES]
        _check(not bad, f"unknown scale(s) {bad}; valid: {', '.join(SCALES)} or none")
        for name in [self.loss, *self.scale_losses.values()]:
            _check(name in LOSSES, f"unknown loss {name!r}; valid: {', '.join(LOSSES.names())}")
        bad = [k for k in self.scale_losses if k not in SCALES]
        _check(not bad, f"scale_losses keys must be scales, got {bad}")
        _check(0 < self.fraction <= 1, f"fraction must be in (0, 1], got {self.fraction}")
        _check(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        bad = [k for k in self.weights if k not in ("seg", "pmd", *SCALES)]
        _check(not bad, f"unknown weight name(s) {bad}; valid: seg, enc, bottleneck, dec, pmd")
        _check(all(v >= 0 for v in self.weights.values()), "weights must be >= 0")
        if self.scales or self.pmd:
            _check(bool(self.teacher), "distillation needs --teacher TEACHER_RUN (or use --scales none --no-pmd)")

    @property
    def uses_teacher(self) -> bool:
        return bool(self.scales) or self.pmd

    def weight(self, name: str) -> float:
        return float(self.weights.get(name, STUDY_WEIGHTS.get(name, 0.0)))


PRESETS: Dict[str, Dict[str, Any]] = {
    # The reference study (arXiv 2406.03173): AdamW 1e-4, wd 0.05, batch 8, 200 epochs, width 64,
    # 3 input channels; prepare the data with `medkd preprocess --size 256`.
    "study": {
        "epochs": 200, "batch_size": 8, "lr": 1e-4, "weight_decay": 0.05, "optimizer": "adamw",
        "schedule": "cosine", "in_channels": 3, "width": 64,
    },
}

C = TypeVar("C", bound=TrainConfig)

# Keys a run's ``config.yaml`` records beside the options (what was trained, on which data); ignored by --config.
RUN_METADATA = ("kind", "data")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise MedkdError(msg)


def field_names(cls: Type[Any]) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


def read_yaml(path: Path) -> Dict[str, Any]:
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise MedkdError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise MedkdError(f"{path}: invalid YAML ({' '.join(str(e).split())[:150]})") from None
    if not isinstance(doc, dict):
        raise MedkdError(f"{path}: expected a mapping of options at the top level")
    return doc


def build_config(
    cls: Type[C],
    yaml_path: Optional[Path] = None,
    overrides: Optional[Dict[str, Any]] = None,
    preset: Optional[str] = None,
) -> C:
    """Merge defaults < preset < YAML < overrides (``None`` values in overrides are ignored) and validate.

    Raises:
        MedkdError: unknown key (named, with the valid ones), bad value, unknown preset.
    """
    names = field_names(cls)
    merged: Dict[str, Any] = {}
    if preset:
        if preset not in PRESETS:
            raise MedkdError(f"unknown preset {preset!r}; valid: {', '.join(PRESETS)}")
        merged.update({k: v for k, v in PRESETS[preset].items() if k in names})
    if yaml_path is not None:
        doc = read_yaml(yaml_path)
        for k in RUN_METADATA:  # a run's config.yaml is re-usable as --config
            doc.pop(k, None)
        unknown = [k for k in doc if k not in names]
        if unknown:
            raise MedkdError(f"{yaml_path}: unknown option(s) {unknown}; valid: {', '.join(names)}")
        merged.update(doc)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in names:
            raise MedkdError(f"unknown option {k!r}; valid: {', '.join(names)}")
        merged[k] = v
    try:
        cfg = cls(**merged)
    except TypeError as e:
        raise MedkdError(f"invalid options: {e}") from None
    _coerce_types(cfg)
    cfg.validate()
    return cfg


def _coerce_types(cfg: Any) -> None:
    """Coerce YAML scalars (e.g. ``lr: 1e-4`` read as a string by YAML 1.1) to the declared types."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if t in ("int",) and not isinstance(v, bool):
                setattr(cfg, f.name, int(v))
            elif t in ("float",):
                setattr(cfg, f.name, float(v))
            elif t in ("bool",) and isinstance(v, str):
                setattr(cfg, f.name, v.lower() in ("1", "true", "yes", "on"))
        except (TypeError, ValueError):
            raise MedkdError(f"option {f.name!r} must be {t}, got {v!r}") from None
    if hasattr(cfg, "scales") and isinstance(cfg.scales, str):
        cfg.scales = parse_scales(cfg.scales)


def parse_scales(value: Any) -> List[str]:
    """``"enc,dec"`` / ``["enc","dec"]`` / ``"none"`` -> list of scales."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(s).strip() for s in items if str(s).strip()]
    if items in (["none"], []):
        return []
    if "none" in items:
        raise MedkdError("--scales none cannot be combined with other scales")
    return items


def parse_weights(value: Optional[str]) -> Optional[Dict[str, float]]:
    """``"seg=0.4,enc=0.1"`` -> dict (merged over the study weights by the caller)."""
    if value is None:
        return None
    out: Dict[str, float] = {}
    for part in value.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise MedkdError(f"--weights expects name=value pairs, got {part!r}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise MedkdError(f"--weights: {k.strip()} must be a number, got {v!r}") from None
    return out


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)

