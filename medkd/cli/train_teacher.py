"""``medkd train-teacher DATA -o RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    ConfigOpt, JsonOpt, OverwriteOpt, PresetOpt, QuietOpt, ResumeOpt, config_options, handle_errors, log_console,
    print_json
)
from medkd.config import TeacherConfig, build_config


@handle_errors
@config_options(TeacherConfig, "arch", "width", "fraction", "subset_seed", "epochs", "batch_size", "steps_per_epoch",
                "lr", "weight_decay", "optimizer", "schedule", "recon_weight", "in_channels", "augment", "ema_decay",
                "device", "seed")
def command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder (from medkd preprocess).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    preset: PresetOpt = None,
    config: ConfigOpt = None,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    *,
    opts: Optional[Dict[str, Any]] = None,
) -> None:
    """Train the multi-task teacher (segmentation + image reconstruction) on all training cases (or a seeded
    --fraction of them: the semi-supervised setting)."""
    from medkd.train.teacher import train_teacher

    cfg = build_config(TeacherConfig, config, opts, preset=preset)
    summary = train_teacher(data, out, cfg, resume=resume, overwrite=overwrite, console=log_console(quiet))
    if json_out:
        print_json(summary)
    elif not quiet:
        log_console().print(
            f"teacher {summary['arch']} ({summary['params']:,} params): best val Dice {summary['best_val_dice']:.4f} "
            f"at epoch {summary['best_epoch']}, {summary['seconds']:.0f} s -> {out}", highlight=False, soft_wrap=True)
