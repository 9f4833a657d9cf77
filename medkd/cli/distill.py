"""``medkd distill DATA -o RUN``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    AugmentOpt, BatchSizeOpt, ConfigOpt, DeviceOpt, EpochsOpt, InChannelsOpt, JsonOpt, LrOpt, OverwriteOpt,
    PresetOpt, QuietOpt, ResumeOpt, SeedOpt, SubsetSeedOpt, WeightDecayOpt, handle_errors, log_console, print_json, usage_checks
)
from medkd.config import DistillConfig, build_config


@handle_errors
def command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder (from medkd preprocess).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder to create.")],
    teacher: Annotated[Optional[Path], typer.Option(help="Teacher run folder (not needed with --scales none --no-pmd).")] = None,
    student: Annotated[Optional[str], typer.Option(help="s1 | s2. [default: s1]")] = None,
    student_width: Annotated[Optional[int], typer.Option(help="Student base width (s1: 16, s2: 32).")] = None,
    scales: Annotated[Optional[str], typer.Option(help="Comma list of enc,bottleneck,dec or 'none'. [default: none (PMD only)]")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Feature loss from the registry (contrastive, mse, cosine, attention, cwd). [default: contrastive]")] = None,
    pmd: Annotated[Optional[bool], typer.Option("--pmd/--no-pmd", help="Prediction-map distillation (temperature KL). [default: on]")] = None,
    temperature: Annotated[Optional[float], typer.Option(help="PMD temperature. [default: 4]")] = None,
    fraction: Annotated[Optional[float], typer.Option(help="Seeded case-level fraction of the training cases. [default: 0.5]")] = None,
    subset_seed: SubsetSeedOpt = None,
    weights: Annotated[Optional[str], typer.Option(help="Term weights over the defaults seg=1,enc=0.1,bottleneck=0.2,dec=0.1,pmd=1 (the study's: seg=0.4,pmd=0.2).")] = None,
    epochs: EpochsOpt = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    weight_decay: WeightDecayOpt = None,
    in_channels: InChannelsOpt = None,
    augment: AugmentOpt = None,
    teacher_outputs: Annotated[Optional[str], typer.Option(
        help="Where the teacher's targets come from: auto (measure and pick the cheapest that fits), live (run the "
             "teacher every batch), disk (TEACHER_RUN/cache, shared by later runs), memory. [default: auto]")] = None,
    cache_budget: Annotated[Optional[float], typer.Option(
        help="GB the disk cache may add; a bigger cache is never started. [default: 20% of the free space on its disk]")] = None,
    kd_images: Annotated[Optional[str], typer.Option(
        "--kd-images",
        help="Train images the teacher supervises: 'labelled' (the student's --fraction only, the reference study) or "
             "'all' (also the other train cases, without their labels: KD terms only). [default: all]")] = None,
    grad_share_every: Annotated[Optional[int], typer.Option(
        min=0, help="Every N-th step, log each term's share of the gradient norm (gshare_<term> in history.jsonl; "
                    "one extra backward per term). 0 = off. [default: 0]")] = None,
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

    checked = usage_checks(scales=scales, loss=loss, student=student, weights=weights, device=device,
                           kd_images=kd_images, temperature=temperature, fraction=fraction, epochs=epochs,
                           batch_size=batch_size, lr=lr, weight_decay=weight_decay,
                           teacher_outputs=teacher_outputs, cache_budget=cache_budget, in_channels=in_channels,
                           seed=seed, subset_seed=subset_seed, student_width=student_width,
                           grad_share_every=grad_share_every)
    cfg = build_config(DistillConfig, config, dict(
        teacher=str(teacher) if teacher else None, student=student, student_width=student_width,
        scales=checked["scales"], loss=loss, pmd=pmd, temperature=temperature, fraction=fraction,
        subset_seed=subset_seed, weights=checked["weights"], epochs=epochs, batch_size=batch_size, lr=lr,
        weight_decay=weight_decay, in_channels=in_channels, augment=augment, teacher_outputs=teacher_outputs,
        cache_budget=cache_budget, kd_images=kd_images, grad_share_every=grad_share_every, device=device, seed=seed),
        preset=preset)
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
