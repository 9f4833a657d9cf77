"""``medkd train-teacher DATA -o RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    AugmentOpt, BatchSizeOpt, ConfigOpt, DeviceOpt, EpochsOpt, InChannelsOpt, JsonOpt, LrOpt, OverwriteOpt,
    PresetOpt, QuietOpt, ResumeOpt, SeedOpt, WeightDecayOpt, handle_errors, log_console, print_json,
    usage_checks
)
from medkd.config import TeacherConfig, build_config


@handle_errors
def command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder (from medkd preprocess).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    arch: Annotated[Optional[str], typer.Option(help="unet | transunet. [default: unet]")] = None,
    width: Annotated[Optional[int], typer.Option(help="Base channel width (64 = the study's T1). [default: 16]")] = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    weight_decay: WeightDecayOpt = None,
    optimizer: Annotated[Optional[str], typer.Option(help="adamw | adam | sgd. [default: adamw]")] = None,
    schedule: Annotated[Optional[str], typer.Option(help="cosine | plateau | none. [default: cosine]")] = None,
    recon_weight: Annotated[Optional[float], typer.Option(help="Weight of the reconstruction MSE. [default: 0.2]")] = None,
    in_channels: InChannelsOpt = None,
    augment: AugmentOpt = None,
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Train the multi-task teacher (segmentation + image reconstruction) on all training cases."""
    from medkd.train.teacher import train_teacher

    usage_checks(arch=arch, device=device, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                 weight_decay=weight_decay, recon_weight=recon_weight, optimizer=optimizer, schedule=schedule,
                 in_channels=in_channels, seed=seed)
    cfg = build_config(TeacherConfig, config, dict(
        arch=arch, width=width, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        optimizer=optimizer, schedule=schedule, recon_weight=recon_weight, in_channels=in_channels,
        augment=augment, device=device, seed=seed), preset=preset)
    summary = train_teacher(data, out, cfg, resume=resume, overwrite=overwrite, console=log_console(quiet))
    if json_out:
        print_json(summary)
    elif not quiet:
        log_console().print(
            f"teacher {summary['arch']} ({summary['params']:,} params): best val Dice {summary['best_val_dice']:.4f} "
            f"at epoch {summary['best_epoch']}, {summary['seconds']:.0f} s -> {out}", highlight=False, soft_wrap=True)
