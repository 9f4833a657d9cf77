"""Option values: the valid names, the defaults and one validator per option (MONAI's ``look_up_option`` habit).

Every check of an option value lives here and is used twice: by the configs' ``validate()`` (a bad value in a
YAML file or from Python is a :class:`~medkd.errors.MedkdError`, exit 1) and by the command-line pre-checks in
:func:`medkd.cli.common.usage_checks` (the same check on a flag is a usage error, exit 2). A validator takes the
value and ``what`` (how the option is named in the message: ``"student"`` in a config, ``"--student"`` on the
command line), raises :class:`OptionError` with one line that names the option and the valid values, and returns
the value in its canonical form (e.g. scales parsed and put in ``SCALES`` order).

Range checks (numbers) follow the same shape: :func:`check_range` (real numbers) and :func:`check_int` (integers,
at most :data:`INT64_MAX` unless a smaller sane maximum is given) with ``what`` naming the option. Messages show a
value with :func:`short_repr`, never its full ``repr`` (a config value can be a huge alias-expanded structure).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import reprlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

from medkd.errors import MedkdError
from medkd.registry import LOSSES, MODELS, model_names, model_options

#: The device default, written once: CUDA when available, else CPU.
DEFAULT_DEVICE = "auto"
DEVICES = (DEFAULT_DEVICE, "cpu", "cuda")  # also "cuda:N"
SPLITS = ("train", "val", "test")
#: Distillation tap points, in network order (the canonical order of ``scales``).
SCALES = ("enc", "bottleneck", "dec")
#: Weighted loss terms of a distillation run: the supervised term, one per scale, prediction-map distillation,
#: pseudo-labels.
WEIGHT_NAMES = ("seg", *SCALES, "pmd", "pl")
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("cosine", "plateau", "none")
IN_CHANNELS = (1, 3)
#: Train images the teacher supervises: the student's labelled fraction only, or all train cases.
KD_IMAGES = ("labelled", "all")
#: Forms of the prediction-map term (medkd.distill.losses.pmd): per-pixel temperature KL, channel-wise distillation.
PMD_LOSSES = ("kl", "cwd")
#: Where a distillation's teacher targets come from (medkd.distill.teacher_outputs).
TEACHER_OUTPUTS = ("auto", "live", "disk", "memory")
#: The largest integer torch accepts everywhere (int64): the default upper bound of integer options.
INT64_MAX = 2**63 - 1
#: Seeds: ``0 <= seed <= MAX_SEED`` (numpy's generators take no negative seed; torch takes int64).
MAX_SEED = INT64_MAX
#: Sane maxima: a U-Net of base width 1024 has ~11 G parameters (the study's T1 is width 64, 43 M).
MAX_WIDTH = 1024
#: Prepared in-plane size (``preprocess --size``): CT/MR matrices are 512 or less; 2048^2 float32 is 16 MB a slice.
MAX_SIZE = 2048
#: Largest class number of a multi-class teacher (``--teacher-label``).
MAX_CLASS = 1023


class OptionError(MedkdError):
    """An option value is not valid (the CLI makes it exit 2; elsewhere it is an ordinary ``MedkdError``).

    ``option`` is the option's name as the validator was given it (``build_config`` uses it to name the
    ``--config`` file a bad value came from).
    """

    def __init__(self, message: str, option: Optional[str] = None):
        super().__init__(message)
        self.option = option


def short_repr(value: Any, n: int = 60) -> str:
    """``repr(value)`` on one line, at most ``n`` characters (``...`` where cut).

    Cheap for any value: nested and long containers are abbreviated while the repr is built (``reprlib``), so a
    huge structure (e.g. an alias-expanded YAML list) is never rendered in full.
    """
    r = reprlib.Repr()
    r.maxstring = r.maxlong = r.maxother = n
    return short_text(r.repr(value), n)


def short_text(text: str, n: int = 120) -> str:
    """``text`` on one line (whitespace runs collapsed), at most ``n`` characters (``...`` where cut)."""
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass(frozen=True)
class OptionSpec:
    """Everything medkd knows about one option, declared once on its config field (:func:`option`).

    The command line (flag, help with its default, usage check), the config check, the ``--resume`` check and
    an ablation's run identity are all derived from it.

    Attributes:
        help: one sentence for ``--help`` (the default is appended from the field).
        check: validator ``(value, what) -> canonical value`` (raises :class:`OptionError`); ``None`` values of
            optional fields are not checked.
        parse: command-line text -> value, when the flag is text but the option is not (``scales``, ``weights``).
        flag: the flag(s), e.g. ``"--pmd/--no-pmd"``; default ``--<name with dashes>``.
        cli_type: the flag's type when it differs from the field's (``str`` for parsed options).
        default_text: how the default reads in ``--help`` when the value alone says too little.
        choices: valid values for ``--help`` (a callable, so registries are read when help is built).
        identity: part of what a run learns: compared on ``--resume`` and by an ablation's restart, and named in
            its rows. Where the run executes (device, workers) and where teacher targets come from are not.
        resume: part of the identity, but ``--resume`` may change it (more ``epochs`` extend a run).
        cli: offered as a flag (mappings such as ``taps`` are set in a ``--config`` file).
    """

    help: str
    check: Optional[Callable[..., Any]] = None
    parse: Optional[Callable[..., Any]] = None
    flag: Optional[str] = None
    cli_type: Any = None
    default_text: Optional[str] = None
    choices: Optional[Callable[[], Sequence[Any]]] = None
    identity: bool = True
    resume: bool = False
    cli: bool = True


def option(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **spec: Any) -> Any:
    """A config dataclass field declared with its :class:`OptionSpec` (``dataclasses.field`` metadata)."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"medkd": OptionSpec(**spec)})


def redefault(cls: Any, name: str, default: Any) -> Any:
    """The option ``name`` declared on ``cls``, for a subclass whose default differs (``medkd distill`` trains
    more epochs than a teacher): the same :class:`OptionSpec` (help, checks, identity), another default."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=f.metadata)


def spec_of(f: "dataclasses.Field[Any]") -> Optional[OptionSpec]:
    """The :class:`OptionSpec` of a config field (``None`` for a field declared without one)."""
    return f.metadata.get("medkd")


def option_specs(cls: Any) -> Dict[str, OptionSpec]:
    """``{field name: spec}`` of a config class (or instance), in declaration order."""
    return {f.name: s for f in dataclasses.fields(cls) if (s := spec_of(f)) is not None}


def check_fields(cfg: Any) -> None:
    """Run every field's declared check on ``cfg``, storing the canonical value it returns.

    Raises:
        OptionError: the first bad value, named by its field.
    """
    for name, spec in option_specs(cfg).items():
        value = getattr(cfg, name)
        if spec.check is not None and value is not None:
            setattr(cfg, name, spec.check(value, name))


def check_choice(value: Any, valid: Sequence[Any], what: str) -> Any:
    """``value`` if it is one of ``valid``.

    Raises:
        OptionError: ``unknown <what> 'x'; valid: a, b``.
    """
    try:
        ok = value in valid
    except TypeError:  # an unhashable value (a list from YAML) against a set of names
        ok = False
    if not ok:
        raise OptionError(f"unknown {what} {short_repr(value)}; valid: {', '.join(map(str, valid))}", what)
    return value


def check_range(value: Any, what: str, lo: Optional[float] = None, hi: Optional[float] = None,
                lo_open: bool = False, hi_open: bool = False) -> Any:
    """``value`` if it is a finite number with ``lo <= value <= hi`` (``<`` for an open end; ``None`` = unbounded).

    Raises:
        OptionError: ``<what> must be in (0, 1], got 2``, or ``must be >= 1`` / ``must be > 0`` for one bound;
            NaN and infinity fail every range.
    """
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise OptionError(f"{what} must be a number, got {short_repr(value)}", what) from None
    ok = math.isfinite(v)
    if lo is not None:
        ok = ok and (v > lo if lo_open else v >= lo)
    if hi is not None:
        ok = ok and (v < hi if hi_open else v <= hi)
    if not ok:
        if lo is not None and hi is not None:
            bounds = f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            bounds = f"{'>' if lo_open else '>='} {lo:g}"
        else:
            bounds = f"{'<' if hi_open else '<='} {hi:g}"
        raise OptionError(f"{what} must be {bounds}{'' if math.isfinite(v) else ' and finite'}, got "
                          f"{short_repr(value)}", what)
    return value


def check_int(value: Any, what: str, lo: Optional[int] = None, hi: Optional[int] = INT64_MAX) -> int:
    """``value`` as an ``int`` if it is an integer (an integral float counts) with ``lo <= value <= hi``.

    ``hi`` defaults to :data:`INT64_MAX`: torch stores these values as int64 (``manual_seed``, sizes), and a bigger
    one would overflow deep inside a run instead of being named here.

    Raises:
        OptionError: ``<what> must be an integer, got 'x'``, ``<what> must be >= 1, got 0``,
            ``<what> must be <= 1024, got 5000`` (infinity and NaN are not integers).
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise OptionError(f"{what} must be an integer, got {short_repr(value)}", what)
    value = int(value)
    if lo is not None and value < lo:
        raise OptionError(f"{what} must be >= {lo}, got {short_repr(value)}", what)
    if hi is not None and value > hi:
        bound = "2**63 - 1 (int64)" if hi == INT64_MAX else str(hi)
        raise OptionError(f"{what} must be <= {bound}, got {short_repr(value)}", what)
    return value


# Numeric options, each checked in one place (configs' validate() and the command line's usage_checks).
def check_epochs(value: Any, what: str = "epochs") -> int:
    return check_int(value, what, lo=1)


def check_batch_size(value: Any, what: str = "batch_size") -> int:
    """Slices per step, >= 1. One larger than the training set means one batch of the whole set per step (what the
    loader gives); nothing allocates more than the data (:func:`medkd.distill.targets.batch_slices`)."""
    return check_int(value, what, lo=1)


def check_seed(value: Any, what: str = "seed") -> int:
    """A random seed: ``0 <= seed <= MAX_SEED`` (what both numpy and torch accept)."""
    return check_int(value, what, lo=0, hi=MAX_SEED)


def check_count(value: Any, what: str) -> int:
    """A non-negative integer (workers, steps between diagnostics, ...)."""
    return check_int(value, what, lo=0)


def check_in_channels(value: Any, what: str = "in_channels") -> int:
    return check_choice(value, IN_CHANNELS, what)


def check_optimizer(value: Any, what: str = "optimizer") -> str:
    return check_choice(value, OPTIMIZERS, what)


def check_schedule(value: Any, what: str = "schedule") -> str:
    return check_choice(value, SCHEDULES, what)


def check_steps_per_epoch(value: Any, what: str = "steps_per_epoch") -> Any:
    """Optimizer steps in one epoch (a training budget): an integer >= 1 within int64 (the sampler holds
    ``steps x batch`` indices, so a huge value is refused by the batch's own bound long before)."""
    return check_int(value, what, lo=1)


def check_cache_budget(value: Any, what: str = "cache_budget") -> Any:
    """GB the teacher-output disk cache may add (0 = never start one)."""
    return check_range(value, what, lo=0)


def check_lr(value: Any, what: str = "lr") -> Any:
    return check_range(value, what, lo=0, lo_open=True)


def check_weight_decay(value: Any, what: str = "weight_decay") -> Any:
    return check_range(value, what, lo=0)


def check_ema_decay(value: Any, what: str = "ema_decay") -> Any:
    """Decay of the weights' moving average: ``0 <= d < 1`` (0 = off; 1 would never move)."""
    return check_range(value, what, lo=0, hi=1, hi_open=True)


def check_temperature(value: Any, what: str = "temperature") -> Any:
    return check_range(value, what, lo=0, lo_open=True)


def check_fraction(value: Any, what: str = "fraction") -> Any:
    """The seeded share of the training cases a student sees: ``0 < f <= 1``."""
    return check_range(value, what, lo=0, hi=1, lo_open=True)


def check_width(value: Any, what: str = "width") -> int:
    """A model's base channel width: ``1 <= width <= MAX_WIDTH``."""
    return check_int(value, what, lo=1, hi=MAX_WIDTH)


def check_size(value: Any, what: str = "--size", lo: int = 8) -> int:
    """An in-plane matrix size in voxels: ``lo <= size <= MAX_SIZE``."""
    return check_int(value, what, lo=lo, hi=MAX_SIZE)


def check_split_fraction(value: Any, what: str = "test_fraction") -> Any:
    """The share of cases a preprocess split takes: ``0 <= f < 1``."""
    return check_range(value, what, lo=0, hi=1, hi_open=True)


def check_workers(value: Any, what: str = "workers") -> int:
    return check_int(value, what, lo=1)


def check_recon_weight(value: Any, what: str = "recon_weight") -> Any:
    return check_range(value, what, lo=0)


def check_tolerance(value: Any, what: str = "tolerance") -> Any:
    """Surface-Dice tolerance in mm (``evaluate --tolerance``): NaN would score 0 and inf 1 whatever the masks."""
    return check_range(value, what, lo=0, lo_open=True)


def students() -> List[str]:
    """Registered student model names."""
    return model_names("student")


def teachers() -> List[str]:
    """Registered teacher model names."""
    return model_names("teacher")


def check_student(name: Any, what: str = "student") -> str:
    return check_choice(name, students(), what)


def check_teacher(name: Any, what: str = "teacher arch") -> str:
    return check_choice(name, teachers(), what)


def check_loss(name: Any, what: str = "loss") -> str:
    return check_choice(name, LOSSES.names(), what)


def check_loss_options(names: Sequence[str], options: Any, what: str = "loss_options") -> Any:
    """``options`` (passed to every feature loss's constructor) must be accepted by each loss in ``names``: checked by
    building each loss once through the registry (:meth:`~medkd.distill.losses.FeatureLoss.from_options`; a small
    channel count, heads are tiny), so unknown options and bad values (e.g. ``pool: 0``) are named here instead of
    failing in the middle of set-up."""
    for name in dict.fromkeys(names):
        try:
            LOSSES.get(name).from_options(4, **dict(options or {}))
        except (TypeError, ValueError) as e:
            raise OptionError(f"{what}: {e}", what) from None
    return options


def check_model_kwargs(arch: str, kwargs: Any, what: str = "model_kwargs", width: Optional[int] = None,
                       in_channels: int = 1) -> dict:
    """``kwargs`` (passed to the model's constructor) must be a mapping of options the model ``arch`` takes: the
    names are checked against the options its registered factory declares (``factory.options``, from the
    constructor's signature; listed in the message); the values by building the model once through the registry,
    with the run's ``width`` and ``in_channels``, on the ``meta`` device (no memory, no weights).

    Raises:
        OptionError: not a mapping, an option the model does not take, or a value its constructor refuses.
    """
    if not isinstance(kwargs, dict):
        raise OptionError(f"{what} must be a mapping of model options, got {short_repr(kwargs)}", what)
    if not kwargs:
        return kwargs
    import torch

    factory = MODELS.get(arch)
    valid = model_options(arch)
    bad = [k for k in kwargs if k not in valid]
    if bad:
        raise OptionError(f"{what}: {arch} takes no option(s) {short_repr(bad)}; valid: "
                          f"{', '.join(valid) or 'none'}", what)
    try:
        with torch.device("meta"):
            factory(in_channels=in_channels, num_classes=1, width=width, **kwargs)
    except (TypeError, ValueError, ArithmeticError, AssertionError, RuntimeError) as e:
        raise OptionError(f"{what}: {arch} refuses {short_repr(kwargs)} ({type(e).__name__}: "
                          f"{short_text(str(e), 100)})", what) from None
    return kwargs


def parse_scales(value: Any, what: str = "scales") -> List[str]:
    """``"enc,dec"`` / ``["dec", "enc"]`` / ``"none"`` / ``[]`` / ``None`` -> checked scales in ``SCALES`` order.

    Raises:
        OptionError: unknown scale (listing the valid ones), ``none`` combined with scales.
    """
    if value is None:
        return []
    if isinstance(value, str) and not value.strip():  # `--scales ''` must not silently mean none
        raise OptionError(f"{what} is empty; give a comma list of {', '.join(SCALES)}, or none", what)
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(s).strip() for s in items if str(s).strip()]
    if items in (["none"], []):
        return []
    if "none" in items:
        raise OptionError(f"{what}: 'none' cannot be combined with other scales", what)
    bad = [s for s in items if s not in SCALES]
    if bad:
        raise OptionError(f"unknown {what} {bad}; valid: {', '.join(SCALES)} or none", what)
    return [s for s in SCALES if s in items]


def check_scale_names(names: Iterable[Any], what: str) -> None:
    """Keys of per-scale mappings (``scale_losses``, ``taps``) must be scales."""
    bad = [k for k in names if k not in SCALES]
    if bad:
        raise OptionError(f"{what} keys must be scales ({', '.join(SCALES)}), got {bad}")


def check_scale_losses(value: Any, what: str = "scale_losses") -> Any:
    """A mapping scale -> registered feature loss (per-scale override of ``loss``)."""
    if not isinstance(value, dict):
        raise OptionError(f"{what} must be a mapping of scales to loss names, got {value!r}", what)
    check_scale_names(value, what)
    for name in value.values():
        check_loss(name, what)
    return value


def check_teacher_label(value: Any, what: str = "teacher_label") -> int:
    """The class of a multi-class teacher that is the student's foreground: an integer >= 0."""
    return check_int(value, what, lo=0, hi=MAX_CLASS)


def check_teacher_fold(value: Any, what: str = "teacher_fold") -> str:
    """An nnU-Net fold: ``0``, ``1``, ... or ``all`` (as text)."""
    text = str(value).strip()
    if isinstance(value, bool) or not (text == "all" or text.isdigit()):
        raise OptionError(f"{what} must be a fold number (0, 1, ...) or 'all', got {short_repr(value)}", what)
    return text


def check_teacher_checkpoint(value: Any, what: str = "teacher_checkpoint") -> str:
    """A checkpoint file name inside the teacher's fold folder (no path: files are never read outside it)."""
    if not isinstance(value, str) or not value.strip() or "/" in value or "\\" in value or value in (".", ".."):
        raise OptionError(f"{what} must be a file name such as checkpoint_final.pth (no folder), got "
                          f"{short_repr(value)}", what)
    return value


def parse_teacher_taps(value: Any, what: str = "teacher_taps") -> Dict[str, str]:
    """``"enc=encoder.stages.2,dec=decoder.stages.3"`` (or a mapping) -> ``{scale: module path}``.

    The paths are checked against the teacher's modules when it is loaded (with suggestions on a typo); here only
    the form: scale names, non-empty dotted paths.

    Raises:
        OptionError: not ``scale=path`` pairs, an unknown scale, an empty path, a scale given twice.
    """
    if isinstance(value, str):
        pairs = {}
        for part in value.split(","):
            if not part.strip():
                continue
            if "=" not in part:
                raise OptionError(f"{what} expects scale=module.path pairs (e.g. enc=encoder.stages.2), got "
                                  f"{short_repr(part)}", what)
            k, v = (t.strip() for t in part.split("=", 1))
            if k in pairs:
                raise OptionError(f"{what}: scale {k!r} given twice", what)
            pairs[k] = v
        value = pairs
    if not isinstance(value, dict):
        raise OptionError(f"{what} must be a mapping of scales to module paths, got {short_repr(value)}", what)
    check_scale_names(value, what)
    bad = [k for k, v in value.items() if not isinstance(v, str) or not v.strip() or any(
        not part for part in v.strip().split("."))]
    if bad:
        raise OptionError(f"{what}: module path of {', '.join(map(str, bad))} must be a dotted name such as "
                          f"encoder.stages.2, got {short_repr([value[k] for k in bad])}", what)
    return {k: value[k].strip() for k in SCALES if k in value}


def check_kd_images(value: Any, what: str = "kd_images") -> str:
    return check_choice(value, KD_IMAGES, what)


def check_pmd_loss(value: Any, what: str = "pmd_loss") -> str:
    return check_choice(value, PMD_LOSSES, what)


def check_device(name: Any, what: str = "device") -> str:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` (whether CUDA is present is checked when it is resolved)."""
    if isinstance(name, str) and name.startswith("cuda:") and name[5:].isdigit():
        return name
    return check_choice(name, DEVICES, f"{what}")


def check_teacher_outputs(name: Any, what: str = "teacher_outputs") -> str:
    return check_choice(name, TEACHER_OUTPUTS, what)


def check_split(name: Any, what: str = "split") -> str:
    return check_choice(name, SPLITS, what)


def check_weights(weights: Any, what: str = "weights") -> dict:
    """A mapping of term name -> weight >= 0."""
    if not isinstance(weights, dict):
        raise OptionError(f"{what} must be a mapping of term names to numbers, got {short_repr(weights)}", what)
    bad = [k for k in weights if k not in WEIGHT_NAMES]
    if bad:
        raise OptionError(f"unknown {what} name(s) {short_repr(bad)}; valid: {', '.join(WEIGHT_NAMES)}", what)
    for k, v in weights.items():
        try:
            check_range(v, f"{what} {k}", lo=0)
        except OptionError as e:  # attributed to the option (build_config names the --config file that set it)
            raise OptionError(str(e), what) from None
    return weights


def parse_weights(value: Optional[str], what: str = "--weights") -> Optional[dict]:
    """``"seg=0.4,enc=0.1"`` -> ``{"seg": 0.4, "enc": 0.1}`` (merged over the other layers by ``build_config``)."""
    if value is None:
        return None
    out: dict = {}
    for part in value.split(","):
        if not part.strip():
            continue
        if "=" not in part:
            raise OptionError(f"{what} expects name=value pairs, got {short_repr(part)}")
        k, v = part.split("=", 1)
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise OptionError(f"{what}: {k.strip()} must be a number, got {short_repr(v)}") from None
    return check_weights(out, what)
