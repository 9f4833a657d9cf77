"""``medkd distill DATA -o RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    AugmentOpt, BatchSizeOpt, ConfigOpt, DeviceOpt, EpochsOpt, InChannelsOpt, JsonOpt, LrOpt, OverwriteOpt,
    PresetOpt, QuietOpt, ResumeOpt, SeedOpt, WeightDecayOpt, fail, handle_errors, log_console, print_json
)
from medkd.config import STUDY_WEIGHTS, DistillConfig, build_config, parse_scales, parse_weights, read_yaml
from medkd.errors import MedkdError


def _usage_checks(scales: Optional[str], loss: Optional[str], student: Optional[str]) -> Optional[list]:
    """Bad --scales/--loss/--student are usage errors: exit 2 listing the valid names."""
    from medkd.config import SCALES
    from medkd.distill.losses import LOSSES
    from medkd.models import MODELS, is_teacher

    try:
        parsed = parse_scales(scales) if scales is not None else None
    except MedkdError as e:
        raise fail(str(e), 2)
    if parsed:
        bad = [s for s in parsed if s not in SCALES]
        if bad:
            raise fail(f"unknown --scales {bad}; valid: {', '.join(SCALES)} or none", 2)
    if loss is not None and loss not in LOSSES:
        raise fail(f"unknown --loss {loss!r}; valid: {', '.join(LOSSES.names())}", 2)
    students = [n for n in MODELS.names() if not is_teacher(n)]
    if student is not None and student not in students:
        raise fail(f"unknown --student {student!r}; valid: {', '.join(students)}", 2)
    return parsed


@handle_errors
def command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder (from medkd preprocess).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    teacher: Annotated[Optional[Path], typer.Option(help="Teacher run folder (not needed with --scales none --no-pmd).")] = None,
    student: Annotated[Optional[str], typer.Option(help="s1 | s2. [default: s1]")] = None,
    student_width: Annotated[Optional[int], typer.Option(help="Student base width (s1: 16, s2: 32).")] = None,
    scales: Annotated[Optional[str], typer.Option(help="Comma list of enc,bottleneck,dec or 'none'. [default: enc,bottleneck,dec]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Feature loss from the registry (contrastive, mse, cosine, attention, cwd). [default: contrastive]")] = None,
    pmd: Annotated[Optional[bool], typer.Option("--pmd/--no-pmd", help="Prediction-map distillation (temperature KL). [default: on]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="PMD temperature. [default: 4]")] = None,
    fraction: Annotated[Optional[float], typer.Option(help="Seeded case-level fraction of the training cases. [default: 0.5]")] = None,
    weights: Annotated[Optional[str], typer.Option(help="Term weights, e.g. seg=0.4,enc=0.1,bottleneck=0.2,dec=0.1,pmd=0.2 (the study's, default).")] = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    weight_decay: WeightDecayOpt = None,
    in_channels: InChannelsOpt = None,
    augment: AugmentOpt = None,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Reuse cached teacher outputs. [default: on]")] = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train a student, distilling a frozen teacher at the chosen scales ([bold]--scales none --no-pmd[/] = no-KD baseline)."""
    from medkd.distill.run import distill

    parsed_scales = _usage_checks(scales, loss, student)
    w = parse_weights(weights)
    if w is not None:
        base = dict(STUDY_WEIGHTS)
        if config is not None:
            base.update(read_yaml(config).get("weights") or {})
        w = {**base, **w}
    cfg = build_config(DistillConfig, config, dict(
        teacher=str(teacher) if teacher else None, student=student, student_width=student_width,
        scales=parsed_scales, loss=loss, pmd=pmd, temperature=temperature, fraction=fraction, weights=w,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, in_channels=in_channels,
        augment=augment, cache=cache, device=device, seed=seed), preset=preset)
    summary = distill(data, out, cfg, resume=resume, overwrite=overwrite, console=log_console(quiet))
    if json_out:
        print_json(summary)
    elif not quiet:
        what = f"scales={','.join(cfg.scales) or 'none'} loss={cfg.loss if cfg.scales else '-'} pmd={'on' if cfg.pmd else 'off'}"
        log_console().print(
            f"student {summary['arch']} ({summary['params']:,} params, {what}, fraction {cfg.fraction}): best val Dice "
            f"{summary['best_val_dice']:.4f} at epoch {summary['best_epoch']}, {summary['seconds']:.0f} s -> {out}",
            highlight=False, soft_wrap=True)
