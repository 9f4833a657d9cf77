"""Typed configuration: dataclass defaults < preset < ``--config`` YAML < command-line flags.

A YAML file lists only what differs from the defaults. The resolved config is written to ``RUN/config.yaml``
and is enough to rerun (``medkd train-teacher DATA -o RUN2 --config RUN/config.yaml``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import yaml

from medkd.errors import MedkdError
from medkd import options as opt
from medkd.options import DEFAULT_DEVICE, SCALES, parse_scales, parse_weights  # noqa: F401 (re-exported)

#: The reference study's loss weights.
STUDY_WEIGHTS = {"seg": 0.4, "enc": 0.1, "bottleneck": 0.2, "dec": 0.1, "pmd": 0.2}
#: medkd's default weights (chosen on the sample data's val split, see benchmarks/RESULTS.md "distillation gain"):
#: the supervised term at full weight (the study's 0.4 starved it) and PMD at 1. A config's ``weights`` are
#: merged over them.
DEFAULT_WEIGHTS = {**STUDY_WEIGHTS, "seg": 1.0, "pmd": 1.0}


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
    device: str = DEFAULT_DEVICE  # auto | cpu | cuda
    augment: bool = False  # random flips + intensity jitter (seeded per epoch)
    amp: bool = True  # CUDA only: bf16 when supported, else fp16 with a grad scaler
    num_workers: int = 0  # DataLoader workers (CUDA runs: set >0; pinned memory is automatic on CUDA)
    in_channels: int = 1  # 3 reproduces the reference study (slice repeated over channels)

    def validate(self) -> None:
        """Check every option with the validators of :mod:`medkd.options`.

        Raises:
            OptionError: the first bad value, named.
        """
        opt.check_epochs(self.epochs)
        opt.check_batch_size(self.batch_size)
        opt.check_lr(self.lr)
        opt.check_weight_decay(self.weight_decay)
        opt.check_optimizer(self.optimizer)
        opt.check_schedule(self.schedule)
        opt.check_seed(self.seed)
        opt.check_device(self.device)
        opt.check_count(self.num_workers, "num_workers")
        opt.check_in_channels(self.in_channels)

    def effective(self) -> Dict[str, Any]:
        """The options that decide what a run does, in canonical form (the whole config for teachers)."""
        return to_dict(self)


@dataclass
class TeacherConfig(TrainConfig):
    """``medkd train-teacher`` options."""

    arch: str = "unet"
    width: int = 16
    recon_weight: float = 0.2
    model_kwargs: Dict[str, Any] = field(default_factory=dict)  # e.g. transunet depth/heads

    def validate(self) -> None:
        super().validate()
        opt.check_teacher(self.arch)
        opt.check_width(self.width)
        opt.check_recon_weight(self.recon_weight)
        opt.check_model_kwargs(self.arch, self.model_kwargs, width=self.width, in_channels=self.in_channels)


@dataclass
class DistillConfig(TrainConfig):
    """``medkd distill`` options. ``scales=[]`` and ``pmd=False`` is plain supervised student training.

    The defaults are the recipe that did best on the sample data's val split (benchmarks/RESULTS.md,
    "distillation gain"): prediction-map distillation only (no feature scales), seg and PMD weight 1, and the
    teacher supervising every train image (``kd_images="all"``). ``--preset study`` (``medkd/presets/train-study.yaml``)
    restores the reference study's recipe: all scales, contrastive, PMD, its weights, labelled images only.
    """

    student: str = "s1"
    student_width: Optional[int] = None
    teacher: Optional[str] = None
    scales: List[str] = field(default_factory=list)
    loss: str = "contrastive"
    scale_losses: Dict[str, str] = field(default_factory=dict)  # per-scale override, e.g. {enc: mse}
    loss_options: Dict[str, Any] = field(default_factory=dict)  # passed to every feature loss's constructor
    pmd: bool = True
    temperature: float = 4.0
    fraction: float = 0.5
    # seed of the --fraction subset; None = the run's seed (the subset varies with the seed), an int holds the
    # subset fixed across seeds (an ablation then replicates training only, not the data draw)
    subset_seed: Optional[int] = None
    weights: Dict[str, float] = field(default_factory=lambda: dict(DEFAULT_WEIGHTS))
    taps: Dict[str, Dict[str, str]] = field(default_factory=dict)  # {"student"|"teacher": {scale: module path}}
    teacher_outputs: str = "auto"  # auto | live | disk | memory (medkd.distill.teacher_outputs)
    cache_budget: Optional[float] = None  # GB the disk cache may add; None = 20 % of the free space on its disk
    # which train images the teacher supervises: "labelled" = only the student's `fraction` (the reference study);
    # "all" = also the other train cases, whose labels the student never sees (KD terms only there)
    kd_images: str = "all"
    # diagnostic: every N-th training step, each loss term's gradient norm on the student (one extra backward per
    # term), logged as gshare_<term> in history.jsonl; 0 = off (the default: it costs ~5 % of a demo epoch at 64).
    # Does not change what is learnt.
    grad_share_every: int = 0

    def validate(self) -> None:
        super().validate()
        opt.check_student(self.student)
        if self.student_width is not None:
            opt.check_width(self.student_width, "student_width")
        self.scales = opt.parse_scales(self.scales)
        for name in [self.loss, *self.scale_losses.values()]:
            opt.check_loss(name)
        opt.check_scale_names(self.scale_losses, "scale_losses")
        if self.scales:  # the options reach the losses only when there are feature scales
            opt.check_loss_options([self.scale_losses.get(s, self.loss) for s in self.scales], self.loss_options)
        opt.check_fraction(self.fraction)
        if self.subset_seed is not None:
            opt.check_seed(self.subset_seed, "subset_seed")
        opt.check_temperature(self.temperature)
        opt.check_weights(self.weights)
        opt.check_kd_images(self.kd_images)
        if self.uses_teacher and not self.teacher:
            raise opt.OptionError("distillation needs --teacher TEACHER_RUN (or use --scales none --no-pmd)")
        opt.check_teacher_outputs(self.teacher_outputs)
        if self.cache_budget is not None:
            opt.check_cache_budget(self.cache_budget)
        opt.check_count(self.grad_share_every, "grad_share_every")

    @property
    def uses_teacher(self) -> bool:
        return bool(self.scales) or self.pmd

    @property
    def kd_on_unlabelled(self) -> bool:
        """The teacher also supervises the train cases outside the student's labelled ``fraction``."""
        return self.uses_teacher and self.kd_images == "all" and self.fraction < 1.0

    @property
    def subset_draw_seed(self) -> int:
        """The seed that draws the ``fraction`` subset of training cases: ``subset_seed``, else the run's seed."""
        return self.seed if self.subset_seed is None else int(self.subset_seed)

    def effective_weights(self) -> Dict[str, float]:
        """The weight of every term the run uses: ``seg``, each scale, ``pmd``, over :data:`DEFAULT_WEIGHTS`.

        Without a teacher the supervised loss is the only term and is not weighted (``{"seg": 1.0}``).
        """
        if not self.uses_teacher:
            return {"seg": 1.0}
        w = {**DEFAULT_WEIGHTS, **(self.weights or {})}
        used = ("seg", *opt.parse_scales(self.scales), *(["pmd"] if self.pmd else []))
        return {k: float(w[k]) for k in used}

    def effective(self) -> Dict[str, Any]:
        """This config in its canonical form: scales in :data:`SCALES` order, weights over the study defaults
        (only the terms used), and the options that cannot act dropped (the feature loss, ``scale_losses`` and
        ``loss_options`` without scales, the temperature without PMD, ``subset_seed`` with ``fraction`` 1, teacher
        and taps without a teacher).

        Two configs that train the same thing have equal ``effective()`` dicts.
        """
        out = to_dict(self)
        scales = opt.parse_scales(self.scales)
        out.update(scales=scales, pmd=bool(self.pmd), weights=self.effective_weights())
        if scales:
            out["scale_losses"] = {k: v for k, v in (self.scale_losses or {}).items() if k in scales}
        else:
            for k in ("loss", "scale_losses", "loss_options"):
                out.pop(k)
        if not self.pmd:
            out.pop("temperature")
        if self.fraction >= 1:
            out.pop("subset_seed")  # every training case is used: no subset to draw
        if not self.uses_teacher:
            out.pop("teacher")
            out.pop("taps")
            out.pop("kd_images")  # without a teacher the student sees its labelled fraction only
        return out

    @classmethod
    def from_record(cls, doc: Dict[str, Any]) -> "DistillConfig":
        """A config from a run's recorded ``config.yaml`` (run metadata and unknown keys ignored; not validated)."""
        names = field_names(cls)
        return cls(**{k: v for k, v in doc.items() if k in names})


#: Kinds of packaged presets ``medkd/presets/<kind>-<name>.yaml``: ``train`` files hold training options (the
#: ``--preset`` of train-teacher and distill), ``ablate`` files hold ablation grids (the ``--preset`` of ablate).
PRESET_KINDS = ("train", "ablate")


def preset_names(kind: str) -> List[str]:
    """Names of the packaged presets of ``kind`` (from the files themselves)."""
    from importlib.resources import files

    prefix = f"{kind}-"
    return sorted(p.name[len(prefix):-len(".yaml")] for p in files("medkd").joinpath("presets").iterdir()
                  if p.name.startswith(prefix) and p.name.endswith(".yaml"))


def preset_file(kind: str, name: str):
    """The packaged preset ``medkd/presets/<kind>-<name>.yaml`` (an ``importlib.resources`` Traversable).

    Raises:
        OptionError: unknown name (listing the valid ones).
    """
    from importlib.resources import files

    opt.check_choice(kind, PRESET_KINDS, "preset kind")
    opt.check_choice(name, preset_names(kind), "preset")
    return files("medkd").joinpath("presets", f"{kind}-{name}.yaml")


C = TypeVar("C", bound=TrainConfig)

# Keys a run's ``config.yaml`` records beside the options (what was trained, on which data); ignored by --config.
RUN_METADATA = ("kind", "data")


def field_names(cls: Type[Any]) -> List[str]:
    return [f.name for f in dataclasses.fields(cls)]


#: Most values a YAML file of options may hold, counted with every alias expanded (an ablation grid of a hundred
#: cells holds about a thousand). A "billion laughs" file (aliases of aliases) is refused before it is built.
MAX_YAML_NODES = 100_000


def load_yaml(path: Path) -> Any:
    """Parse a YAML file (any top-level type) with the safe loader.

    The document's node graph is composed first and its size with every alias expanded is counted (cheaply: each
    distinct node once); more than :data:`MAX_YAML_NODES`, or an alias that contains itself, is refused before
    any Python object is built.

    Raises:
        MedkdError: unreadable, not UTF-8 text, invalid YAML, too large or nested too deeply (one line naming
            the file).
    """
    path = Path(path)
    try:
        loader = yaml.SafeLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            n = expanded_size(node, MAX_YAML_NODES)
            if n > MAX_YAML_NODES:
                raise MedkdError(f"{path}: YAML too large: more than {MAX_YAML_NODES:,} values once its aliases "
                                 f"are expanded (or an alias that contains itself); refused unread")
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except OSError as e:
        raise MedkdError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise MedkdError(f"{path}: not a UTF-8 text file (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
                         f"expected YAML") from None
    except yaml.YAMLError as e:
        raise MedkdError(f"{path}: invalid YAML ({' '.join(str(e).split())[:150]})") from None
    except RecursionError:
        raise MedkdError(f"{path}: invalid YAML (nested too deeply)") from None


def expanded_size(root: "yaml.Node", limit: int) -> int:
    """Nodes of a composed YAML document with every alias expanded, i.e. what building it (and printing it) costs;
    counting stops above ``limit`` (returns ``limit + 1``), and an alias inside its own anchor counts as
    ``limit + 1``. Each distinct node is visited once (iteratively: deep documents cannot overflow the stack).
    """
    size: Dict[int, int] = {}
    open_: set = set()  # nodes entered and not finished: the current path from the root
    stack: List[tuple] = [(root, False)]
    while stack:
        node, done = stack.pop()
        kids = _yaml_children(node)
        if done:
            open_.discard(id(node))
            size[id(node)] = min(limit + 1, 1 + sum(size[id(k)] for k in kids))
            continue
        if id(node) in size:
            continue
        if id(node) in open_:
            return limit + 1  # recursive alias: infinitely large once expanded
        open_.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)]


def _yaml_children(node: "yaml.Node") -> List["yaml.Node"]:
    if isinstance(node, yaml.MappingNode):
        return [n for kv in node.value for n in kv]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def read_yaml(path: Path) -> Dict[str, Any]:
    """A YAML file of options: a mapping at the top level (an empty file is ``{}``)."""
    path = Path(path)
    doc = load_yaml(path) or {}
    if not isinstance(doc, dict):
        raise MedkdError(f"{path}: expected a mapping of options at the top level")
    return doc


def config_file(cls: Type[Any], path: Path) -> Dict[str, Any]:
    """The options of a ``--config`` YAML file (a run's ``config.yaml`` works: its run metadata is skipped).

    Raises:
        MedkdError: unreadable file, unknown option (named, with the valid ones).
    """
    doc = read_yaml(path)
    for k in RUN_METADATA:
        doc.pop(k, None)
    names = field_names(cls)
    unknown = [k for k in doc if k not in names]
    if unknown:
        raise MedkdError(f"{path}: unknown option(s) {unknown}; valid: {', '.join(names)}")
    return doc


Layer = Union[Path, Mapping[str, Any], None]


def merge_options(base: Dict[str, Any], layer: Mapping[str, Any]) -> Dict[str, Any]:
    """``layer`` over ``base``: ``None`` values are skipped and mapping options (``weights``, ``taps``, ...) are
    merged key by key, so a layer lists only what it changes."""
    out = dict(base)
    for k, v in layer.items():
        if v is None:
            continue
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            v = merge_options(dict(out[k]), v)
        out[k] = v
    return out


def build_config(
    cls: Type[C],
    yaml_path: Optional[Path] = None,
    overrides: Optional[Dict[str, Any]] = None,
    preset: Optional[str] = None,
    *,
    layers: Sequence[Layer] = (),
) -> C:
    """The one way to make a config: defaults < preset < ``layers`` < YAML < overrides, then validated.

    Every layer lists only what it changes: ``None`` values are ignored, mapping options (``weights`` over the
    study weights, ``scale_losses``, ``loss_options``, ``taps``, ``model_kwargs``) merge key by key.

    Args:
        cls: :class:`TeacherConfig` or :class:`DistillConfig`.
        yaml_path: a ``--config`` file (see :func:`config_file`).
        overrides: command-line values.
        preset: a packaged training preset (``medkd/presets/train-<name>.yaml``, see :func:`preset_file`).
        layers: further layers between the preset and the YAML file, in order; each a mapping of options or a
            path to a YAML file (``medkd ablate``: the grid's common options). Callers that need to layer
            something *over* the YAML file pass ``yaml_path=None`` and put the path in ``layers``.

    Raises:
        MedkdError: unknown key (named, with the valid ones), bad value (an :class:`~medkd.options.OptionError`),
            unknown preset.
    """
    names = field_names(cls)
    merged: Dict[str, Any] = to_dict(cls())
    if preset:
        path = preset_file("train", preset)
        doc = yaml.safe_load(path.read_text()) or {}
        merged = merge_options(merged, {k: v for k, v in doc.items() if k in names})  # width: teachers only
    for layer in [*layers, yaml_path, overrides]:
        if layer is None:
            continue
        if isinstance(layer, (str, Path)):
            layer = config_file(cls, Path(layer))
        unknown = [k for k in layer if k not in names]
        if unknown:
            raise MedkdError(f"unknown option(s) {unknown}; valid: {', '.join(names)}")
        merged = merge_options(merged, layer)
    try:
        cfg = cls(**merged)
    except TypeError as e:
        raise MedkdError(f"invalid options: {e}") from None
    try:
        _coerce_types(cfg)
        cfg.validate()
    except opt.OptionError as e:  # a bad value from a --config file: name the file (exit 1, not a usage error)
        files = [Path(f) for f in [*layers, yaml_path] if isinstance(f, (str, Path))]
        source = next((f for f in reversed(files) if e.option in config_file(cls, f)), None)
        if source is not None:
            raise opt.OptionError(f"{source}: {e}", e.option) from None
        raise
    return cfg


def _coerce_types(cfg: Any) -> None:
    """Coerce YAML scalars (e.g. ``lr: 1e-4`` read as a string by YAML 1.1) to the declared types."""
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "")
        try:
            if t in ("int",) and not isinstance(v, bool):
                if isinstance(v, float) and not v.is_integer():  # 2.5 epochs is a typo, not 2; inf/nan: no integer
                    raise ValueError(v)
                setattr(cfg, f.name, int(v))
            elif t in ("float",):
                setattr(cfg, f.name, float(v))
            elif t in ("bool",) and isinstance(v, str):
                setattr(cfg, f.name, v.lower() in ("1", "true", "yes", "on"))
        except (TypeError, ValueError, OverflowError):
            raise opt.OptionError(f"option {f.name!r} must be {t}, got {opt.short_repr(v)}", f.name) from None


def to_dict(cfg: Any) -> Dict[str, Any]:
    return dataclasses.asdict(cfg)

