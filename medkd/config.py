"""Typed configuration: dataclass defaults < preset < ``--config`` YAML < command-line flags.

A YAML file lists only what differs from the defaults. The resolved config is written to ``RUN/config.yaml``
and is enough to rerun (``medkd train-teacher DATA -o RUN2 --config RUN/config.yaml``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Type, TypeVar, Union

import yaml

from medkd.errors import MedkdError
from medkd.yamlfile import read_yaml
from medkd import options as opt
from medkd.options import DEFAULT_DEVICE, SCALES, parse_scales, parse_weights  # noqa: F401 (re-exported)

#: The reference study's loss weights.
STUDY_WEIGHTS = {"seg": 0.4, "enc": 0.1, "bottleneck": 0.2, "dec": 0.1, "pmd": 0.2}
#: medkd's default weights (chosen on the sample data's val split, see benchmarks/RESULTS.md "distillation gain"):
#: the supervised term at full weight (the study's 0.4 starved it) and PMD at 1. A config's ``weights`` are
#: merged over them. ``pl`` weighs the pseudo-label term (``pseudo_label``), which the study did not have.
DEFAULT_WEIGHTS = {**STUDY_WEIGHTS, "seg": 1.0, "pmd": 1.0, "pl": 1.0}

#: ``medkd distill``'s default epochs: with the default recipe at ``--fraction 0.5`` on the sample data (106
#: optimizer steps per epoch) 2 544 steps, past the budget at which the student alone stopped improving on val
#: (benchmarks/RESULTS.md, "equal optimizer steps"), so a gain is a better end point, not a faster start.
DISTILL_EPOCHS = 24


@dataclass
class TrainConfig:
    """Options shared by teacher and student training. Each field is declared once with :func:`~medkd.options.option`
    (help, check, identity); the command line, the checks and the run identity are derived from the declarations."""

    epochs: int = opt.option(12, help="Epochs.", check=opt.check_epochs, resume=True)
    batch_size: int = opt.option(8, help="Batch size.", check=opt.check_batch_size)
    steps_per_epoch: Optional[int] = opt.option(None, help="Optimizer steps per epoch (a training budget): seeded "
                                                "permutations of the training images back to back, full passes "
                                                "then a partial one.", check=opt.check_steps_per_epoch,
                                                default_text="one pass over the training images")
    lr: float = opt.option(2e-3, help="Learning rate.", check=opt.check_lr)
    weight_decay: float = opt.option(1e-4, help="Weight decay.", check=opt.check_weight_decay)
    optimizer: str = opt.option("adamw", help="Optimizer.", check=opt.check_optimizer,
                                choices=lambda: opt.OPTIMIZERS)
    schedule: str = opt.option("cosine", help="Learning-rate schedule.", check=opt.check_schedule,
                               choices=lambda: opt.SCHEDULES)
    seed: int = opt.option(0, help="Random seed.", check=opt.check_seed)
    device: str = opt.option(DEFAULT_DEVICE, help="auto = CUDA when available.", check=opt.check_device,
                             choices=lambda: (*opt.DEVICES, "cuda:N"), identity=False)
    augment: bool = opt.option(False, help="Random flips + intensity jitter, seeded per epoch (distill: the teacher "
                                           "then runs live).", flag="--augment/--no-augment")
    amp: bool = opt.option(True, help="CUDA only: mixed precision (bf16 when supported, else fp16 with a grad "
                                      "scaler).", flag="--amp/--no-amp", resume=True)
    num_workers: int = opt.option(0, help="DataLoader worker processes (CUDA runs: set > 0; pinned memory is "
                                          "automatic on CUDA).", check=opt.check_count, identity=False)
    in_channels: int = opt.option(1, help="Input channels: 3 as in the reference study (the slice repeated); a "
                                          "student must match its teacher.", check=opt.check_in_channels,
                                  choices=lambda: opt.IN_CHANNELS)
    ema_decay: float = opt.option(0.0, help="Validate and keep (best.pt) an exponential moving average of the "
                                            "model's weights, updated after every optimizer step with this decay "
                                            "(e.g. 0.99; BatchNorm statistics copied). 0 = off.",
                                  check=opt.check_ema_decay)

    def validate(self) -> None:
        """Check every option with its declared check (:func:`medkd.options.check_fields`).

        Raises:
            OptionError: the first bad value, named.
        """
        opt.check_fields(self)

    def effective(self) -> Dict[str, Any]:
        """The options that decide what a run does, in canonical form."""
        return to_dict(self)

    @classmethod
    def from_record(cls: Type[C], doc: Mapping[str, Any]) -> C:
        """A config from a run's recorded config document (``config.yaml``, a checkpoint's ``config``): run
        metadata and unknown keys ignored, options it predates at their defaults; not validated."""
        names = field_names(cls)
        return cls(**{k: v for k, v in doc.items() if k in names})

    @property
    def subset_draw_seed(self) -> int:
        """The seed that draws a ``fraction`` subset of training cases (configs that have one): ``subset_seed``,
        else the run's seed."""
        subset_seed = getattr(self, "subset_seed", None)
        return self.seed if subset_seed is None else int(subset_seed)


@dataclass
class TeacherConfig(TrainConfig):
    """``medkd train-teacher`` options."""

    arch: str = opt.option("unet", help="Teacher architecture.", check=opt.check_teacher, choices=opt.teachers)
    width: int = opt.option(16, help="Base channel width (64 = the reference study's T1).", check=opt.check_width)
    recon_weight: float = opt.option(0.2, help="Weight of the reconstruction MSE.", check=opt.check_recon_weight)
    model_kwargs: Dict[str, Any] = opt.option(default_factory=dict, help="Model-specific options (e.g. transunet "
                                                                         "depth, heads).", cli=False)
    fraction: float = opt.option(1.0, help="Seeded case-level fraction of the training cases the teacher trains on: "
                                           "1 = all of them (the reference study's setting: the teacher has seen the "
                                           "labels of the students' 'unlabelled' cases); below 1 = the "
                                           "semi-supervised setting, the same subset a student with this --fraction "
                                           "and --subset-seed is given labels of.", check=opt.check_fraction)
    subset_seed: Optional[int] = opt.option(None, help="Seed of the --fraction subset of training cases (the "
                                                       "students' --subset-seed trains the teacher on their labelled "
                                                       "cases).", check=opt.check_seed,
                                            default_text="the run's --seed")

    def effective(self) -> Dict[str, Any]:
        """This config in canonical form: ``subset_seed`` dropped with ``fraction`` 1 (no subset to draw)."""
        out = to_dict(self)
        if self.fraction >= 1:
            out.pop("subset_seed")
        return out

    def validate(self) -> None:
        """The declared checks, then the model options against the architecture they are given to."""
        super().validate()
        opt.check_model_kwargs(self.arch, self.model_kwargs, width=self.width, in_channels=self.in_channels)


@dataclass
class DistillConfig(TrainConfig):
    """``medkd distill`` options. ``scales=[]``, ``pmd=False`` (and no ``pseudo_label``) is plain supervised student
    training.

    The defaults are the recipe chosen on the sample data's val split at equal optimizer steps
    (benchmarks/RESULTS.md, "distillation levers at the baseline's plateau budget"): prediction-map distillation
    (no feature scales), seg and PMD weight 1, the teacher supervising every train image (``kd_images="all"``) and
    its hard mask as the pseudo-label of the images without a label (``pseudo_label``, weight 1), for
    :data:`DISTILL_EPOCHS` epochs. ``--preset study`` (``medkd/presets/train-study.yaml``)
    restores the reference study's recipe: all scales, contrastive, PMD, its weights, labelled images only.
    """

    epochs: int = opt.redefault(TrainConfig, "epochs", DISTILL_EPOCHS)
    student: str = opt.option("s1", help="Student architecture.", check=opt.check_student, choices=opt.students)
    student_width: Optional[int] = opt.option(None, help="Student base width.", check=opt.check_width,
                                              default_text="the student's own: s1 16, s2 32")
    teacher: Optional[str] = opt.option(None, help="The teacher: a medkd run folder, an nnU-Net v2 model folder, a "
                                        "MONAI bundle folder, or a TorchScript/ONNX file with its input description "
                                        "(a medkd export, or a MODEL.json/.yaml sidecar); the kind is detected. Not "
                                        "needed for the student alone (--scales none --no-pmd).",
                                        cli_type=Path, default_text="none")
    # teacher kinds (medkd.teachers): what to take of an external teacher
    teacher_label: Optional[int] = opt.option(None, help="Class of a multi-class teacher that is the student's "
                                              "foreground (listed when missing).", check=opt.check_teacher_label,
                                              default_text="the only foreground class")
    teacher_fold: Optional[str] = opt.option(None, help="nnU-Net teacher: fold folder to load (0, 1, ... or all).",
                                             check=opt.check_teacher_fold, cli_type=str,
                                             default_text="the only trained fold")
    teacher_checkpoint: Optional[str] = opt.option(None, help="nnU-Net teacher: checkpoint file in the fold folder.",
                                                   check=opt.check_teacher_checkpoint,
                                                   default_text="checkpoint_final.pth")
    teacher_taps: Dict[str, str] = opt.option(default_factory=dict, help="Module paths of the teacher's tap points "
                                              "for feature scales, scale=module.path,... (e.g. nnU-Net: "
                                              "enc=encoder.stages.2,dec=decoder.stages.3); needed for --scales "
                                              "with an external torch teacher, overrides a medkd teacher's own.",
                                              check=opt.parse_teacher_taps, parse=opt.parse_teacher_taps,
                                              cli_type=str, default_text="a medkd teacher's own; external: none")
    # a teacher given as data (medkd.teachers.probs): its saved per-case probabilities instead of a model
    teacher_probs: Optional[str] = opt.option(None, help="Instead of --teacher: a folder of the teacher's saved "
                                              "per-case foreground probabilities in each source image's geometry, "
                                              "<case>.npz (nnU-Net --save_probabilities) or <case>.nii.gz (3-D, "
                                              "or 4-D with --teacher-label). Prediction-map terms only (PMD, CWD, "
                                              "pseudo-labels).", cli_type=Path, default_text="none")
    scales: List[str] = opt.option(default_factory=list, help="Feature scales to distil: a comma list of "
                                   "enc, bottleneck, dec, or none.", check=opt.parse_scales, parse=opt.parse_scales,
                                   cli_type=str, default_text="none (PMD only)")
    loss: str = opt.option("contrastive", help="Feature loss at the scales.", check=opt.check_loss,
                           choices=opt.LOSSES.names)
    scale_losses: Dict[str, str] = opt.option(default_factory=dict, help="Per-scale feature loss, e.g. {enc: mse}.",
                                              check=opt.check_scale_losses, cli=False)
    loss_options: Dict[str, Any] = opt.option(default_factory=dict, help="Options of every feature loss's "
                                              "constructor, e.g. {pool: 4}.", cli=False)
    pmd: bool = opt.option(True, help="Prediction-map distillation (the term 'pmd', see --pmd-loss).",
                           flag="--pmd/--no-pmd")
    temperature: float = opt.option(4.0, help="PMD temperature.", check=opt.check_temperature)
    pmd_loss: str = opt.option("kl", help="PMD form: kl (per-pixel temperature KL) or cwd (channel-wise "
                               "distillation, Shu et al. 2021: per logit channel, KL of the softmax over the slice's "
                               "positions; one logit z is read as the channels z, -z).", check=opt.check_pmd_loss,
                               choices=lambda: opt.PMD_LOSSES)
    fraction: float = opt.option(0.5, help="Seeded case-level fraction of the training cases the student is "
                                           "given labels of.", check=opt.check_fraction)
    subset_seed: Optional[int] = opt.option(None, help="Seed of the --fraction subset of training cases, to hold it "
                                                       "fixed across seeds.", check=opt.check_seed,
                                            default_text="the run's --seed, so the subset varies with the seed")
    weights: Dict[str, float] = opt.option(default_factory=lambda: dict(DEFAULT_WEIGHTS), help="Term weights "
                                           "name=value,... merged over the defaults (the study's: seg=0.4,pmd=0.2).",
                                           check=opt.check_weights, parse=opt.parse_weights, cli_type=str)
    taps: Dict[str, Dict[str, str]] = opt.option(default_factory=dict, help="Module paths of the tap points, "
                                                 "{student|teacher: {scale: path}}.", cli=False)
    teacher_outputs: str = opt.option("auto", help="Where the teacher's targets come from: auto (measure and pick "
                                      "the cheapest that fits), live (run the teacher every batch), disk "
                                      "(TEACHER_RUN/cache, shared by later runs), memory.",
                                      check=opt.check_teacher_outputs, choices=lambda: opt.TEACHER_OUTPUTS,
                                      identity=False)
    cache_budget: Optional[float] = opt.option(None, help="GB the disk cache may add; a bigger cache is never "
                                               "started.", check=opt.check_cache_budget, identity=False,
                                               default_text="20% of the free space on its disk")
    kd_images: str = opt.option("all", help="Train images the teacher supervises: 'labelled' (the student's "
                                "--fraction only, the reference study) or 'all' (also the other train cases, without "
                                "their labels: KD terms only).", check=opt.check_kd_images,
                                flag="--kd-images")
    pseudo_label: Optional[bool] = opt.option(None, help="Pseudo-label term 'pl' (weight weights.pl): the teacher's "
                                              "mask (p > 0.5) as the target of the supervised loss (Dice + BCE) on "
                                              "the train images without a label; acts with --kd-images all and "
                                              "--fraction < 1.", flag="--pseudo-label/--no-pseudo-label",
                                              default_text="on with PMD or a feature scale (the recipe chosen on "
                                                           "val), off for the student alone")
    kd_warmup_epochs: int = opt.option(0, help="Ramp every KD term's weight (all but seg) up over the first N "
                                       "epochs: epoch k (from 1) uses min(k/N, 1) of it. 0 = off.",
                                       check=opt.check_count)
    grad_share_every: int = opt.option(0, help="Every N-th step, log each term's share of the gradient norm "
                                       "(gshare_<term> in history.jsonl; one extra backward per term). 0 = off.",
                                       check=opt.check_count, identity=False)

    def validate(self) -> None:
        """The declared checks, then what ties options together (losses and their options, a teacher when a term
        needs one).

        Raises:
            OptionError: the first bad value, named.
        """
        super().validate()
        if self.scales:  # the options reach the losses only when there are feature scales
            opt.check_loss_options([self.scale_losses.get(s, self.loss) for s in self.scales], self.loss_options)
        if self.teacher and self.teacher_probs:
            raise opt.OptionError("give either --teacher or --teacher-probs, not both", "--teacher-probs")
        if self.uses_teacher and not self.teacher_path:
            off = "--scales none --no-pmd" + (" --no-pseudo-label" if self.uses_pseudo_labels else "")
            raise opt.OptionError(f"distillation needs --teacher TEACHER_RUN or --teacher-probs DIR (or use {off})")
        if self.uses_teacher and self.teacher_probs and self.augment:
            raise opt.OptionError("--augment flips the images, which saved --teacher-probs cannot follow "
                                  "(use --no-augment)", "--augment")

    @property
    def teacher_path(self) -> Optional[str]:
        """What the teacher was given as: ``--teacher`` (a model) or ``--teacher-probs`` (saved outputs)."""
        return self.teacher or self.teacher_probs

    @property
    def uses_teacher(self) -> bool:
        return bool(self.scales) or self.pmd or self.uses_pseudo_labels

    @property
    def uses_pseudo_labels(self) -> bool:
        """The pseudo-label term acts: asked for (``pseudo_label`` unset: on when another teacher term is, so
        ``--scales none --no-pmd`` stays the student alone), and some train images have no label for the student
        (``kd_images="all"``, ``fraction < 1``); the labelled ones are supervised by their label already."""
        asked = (bool(self.scales) or self.pmd) if self.pseudo_label is None else bool(self.pseudo_label)
        return asked and self.kd_images == "all" and self.fraction < 1.0

    @property
    def kd_on_unlabelled(self) -> bool:
        """The teacher also supervises the train cases outside the student's labelled ``fraction``."""
        return self.uses_teacher and self.kd_images == "all" and self.fraction < 1.0

    def effective_weights(self) -> Dict[str, float]:
        """The weight of every term the run uses: ``seg``, each scale, ``pmd``, ``pl``, over :data:`DEFAULT_WEIGHTS`.

        Without a teacher the supervised loss is the only term and is not weighted (``{"seg": 1.0}``).
        """
        if not self.uses_teacher:
            return {"seg": 1.0}
        w = {**DEFAULT_WEIGHTS, **(self.weights or {})}
        used = ("seg", *opt.parse_scales(self.scales), *(["pmd"] if self.pmd else []),
                *(["pl"] if self.uses_pseudo_labels else []))
        return {k: float(w[k]) for k in used}

    def effective(self) -> Dict[str, Any]:
        """This config in its canonical form: scales in :data:`SCALES` order, weights over the study defaults
        (only the terms used), and the options that cannot act dropped (the feature loss, ``scale_losses`` and
        ``loss_options`` without scales, the temperature and ``pmd_loss`` without PMD, ``pseudo_label`` without
        images to pseudo-label, ``subset_seed`` with ``fraction`` 1, ``teacher_taps`` without scales, teacher, its
        options, taps and ``kd_warmup_epochs`` without a teacher).

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
            out.pop("pmd_loss")
        if self.uses_pseudo_labels:
            out["pseudo_label"] = True  # asked for, or on by default: the same run
        else:
            out.pop("pseudo_label")
        if self.fraction >= 1:
            out.pop("subset_seed")  # every training case is used: no subset to draw
        if not scales:
            out.pop("teacher_taps")  # taps act only at feature scales
        if not self.uses_teacher:
            for k in ("teacher_label", "teacher_fold", "teacher_checkpoint", "teacher_taps", "teacher_probs"):
                out.pop(k, None)
            out.pop("teacher")
            out.pop("taps")
            out.pop("kd_warmup_epochs")
            out.pop("kd_images")  # without a teacher the student sees its labelled fraction only
        return out


def identity_names(cls: Type[Any]) -> List[str]:
    """The options that decide what a run of ``cls`` learns (declared ``identity``): the one definition used by
    ``--resume``, an ablation's row names and its restart."""
    return [n for n, s in opt.option_specs(cls).items() if s.identity]


def run_identity(cfg: "TrainConfig") -> Dict[str, Any]:
    """``cfg``'s identity: its :meth:`~TrainConfig.effective` form restricted to :func:`identity_names`."""
    names = set(identity_names(type(cfg)))
    return {k: v for k, v in cfg.effective().items() if k in names}


def resume_differences(cls: Type[Any], old: Mapping[str, Any], new: Mapping[str, Any]) -> List[str]:
    """What a resumed run may not change, as ``"width=4 there, 8 now"`` items: the run's ``kind`` and its
    :func:`run_identity` without the options declared ``resume``, both from the recorded config documents (an option
    the old run predates counts at its default, as that run trained with it)."""
    mine, theirs = run_identity(cls.from_record(old)), run_identity(cls.from_record(new))
    keys = [n for n, s in opt.option_specs(cls).items() if s.identity and not s.resume]
    diffs = [f"kind={old['kind']!r} there, {new['kind']!r} now"] if old.get("kind", new.get("kind")) != new.get("kind") \
        else []
    return diffs + [f"{k}={mine.get(k)!r} there, {theirs.get(k)!r} now" for k in keys if mine.get(k) != theirs.get(k)]


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

