"""``medkd distill DATA -o RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    ConfigOpt, JsonOpt, OverwriteOpt, PresetOpt, QuietOpt, ResumeOpt, config_options, handle_errors, log_console,
    print_json
)
from medkd.config import DistillConfig, build_config


@handle_errors
@config_options(DistillConfig, "teacher", "teacher_label", "teacher_fold", "teacher_checkpoint", "teacher_taps",
                "teacher_probs",
                "student", "student_width", "scales", "loss", "pmd", "temperature",
                "pmd_loss", "fraction", "subset_seed", "weights", "epochs", "batch_size", "steps_per_epoch", "lr",
                "weight_decay", "in_channels", "augment", "ema_decay", "teacher_outputs", "cache_budget", "kd_images",
                "pseudo_label", "kd_warmup_epochs", "grad_share_every", "device", "seed")
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
    """Train a student, distilling a frozen teacher at the chosen scales ([bold]--scales none --no-pmd[/] = no-KD baseline)."""
    from medkd.distill.run import distill

    cfg = build_config(DistillConfig, config, opts, preset=preset)
    summary = distill(data, out, cfg, resume=resume, overwrite=overwrite, console=log_console(quiet))
    if json_out:
        print_json(summary)
    elif not quiet:
        eff = cfg.effective()
        what = (f"scales={','.join(eff['scales']) or 'none'} loss={eff.get('loss', '-')} pmd={'on' if cfg.pmd else 'off'} "
                f"kd-images={summary['kd_images']}")
        log_console().print(
            f"student {summary['arch']} ({summary['params']:,} params, {what}, fraction {cfg.fraction}): best val Dice "
            f"{summary['best_val_dice']:.4f} at epoch {summary['best_epoch']}, {summary['seconds']:.0f} s -> {out}",
            highlight=False, soft_wrap=True)
