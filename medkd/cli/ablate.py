"""``medkd ablate DATA --teacher TEACHER_RUN -o DIR [--grid GRID.yaml | --preset quick|study]``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    BatchSizeOpt, ConfigOpt, DeviceOpt, InChannelsOpt, JsonOpt, LrOpt, QuietOpt, SeedOpt, SubsetSeedOpt, fail,
    handle_errors, log_console, print_json, stdout_console, usage_checks
)
from medkd.errors import MedkdError
from medkd.report.tables import print_table


@handle_errors
def command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder (from medkd preprocess).")],
    teacher: Annotated[Path, typer.Option(help="Teacher run folder (its teacher-output cache is shared by every run).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Ablation folder: runs/<setting>/seed<k>/ and results.*")],
    grid: Annotated[Optional[Path], typer.Option(help="YAML list of cells, each a mapping of distill options, e.g. "
                                                   "- {scales: \\[enc, dec], loss: contrastive, pmd: true}.",
                                              dir_okay=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="quick (minutes on the sample data) | study (the reference "
                                                       "study's scales x PMD x loss grid).")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma list of seeds for every row. \\[default: the grid's, else 0,1,2]")] = None,
    student: Annotated[Optional[str], typer.Option(help="s1 | s2, for every cell that does not set it. \\[default: s1]")] = None,
    student_width: Annotated[Optional[int], typer.Option(help="Student base width (s1: 16, s2: 32).")] = None,
    fraction: Annotated[Optional[float], typer.Option(help="Seeded fraction of the training cases. \\[default: 0.5]")] = None,
    subset_seed: SubsetSeedOpt = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs per run. \\[default: the grid's, else 12]")] = None,
    batch_size: BatchSizeOpt = None,
    lr: LrOpt = None,
    in_channels: InChannelsOpt = None,
    correction: Annotated[str, typer.Option(help="Multiple-comparison adjustment of the p-values over all non-baseline "
                                                 "rows: holm (family-wise error) | bh (false discovery rate) | none; "
                                                 "a row is significant when its adjusted p < 0.05.")] = "holm",
    config: ConfigOpt = None,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retrain finished runs that are stale (config differs, or data/teacher "
                                                                "newer than the run) instead of stopping with an error.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: train only the I-th of N deterministic slices of the runs "
                                                      "(SLURM arrays, one process per GPU); the last shard to finish "
                                                      "writes the results.")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Train nothing: write results.* from the finished "
                                                                    "runs (evaluating those not evaluated yet).")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Distill over a grid of settings x seeds plus the no-KD baseline; table of mean ± std, gains and p-values.

    Resumable: rerun the same command to skip finished runs and finish the rest.
    """
    from medkd.ablate import CORRECTIONS, GRID_PRESETS, ablate, parse_seeds
    from medkd.report.ablate_table import ablate_table

    if grid is not None and preset is not None:
        raise fail("give either --grid or --preset, not both", 2)
    if grid is None and preset is None:
        raise fail("give --grid GRID.yaml or --preset quick|study", 2)
    if preset is not None and preset not in GRID_PRESETS:
        raise fail(f"unknown --preset {preset!r}; valid: {', '.join(GRID_PRESETS)}", 2)
    if correction not in CORRECTIONS:
        raise fail(f"unknown --correction {correction!r}; valid: {', '.join(CORRECTIONS)}", 2)
    if seeds is not None and seed is not None:
        raise fail("give --seeds or --seed, not both", 2)
    usage_checks(student=student, device=device, fraction=fraction, epochs=epochs, batch_size=batch_size,
                 lr=lr, in_channels=in_channels, subset_seed=subset_seed, student_width=student_width)
    from medkd.ablate import parse_shard

    if shard is not None and report_only:
        raise fail("give --shard or --report-only, not both", 2)
    try:
        shard_ij = parse_shard(shard)
    except MedkdError as e:
        raise fail(str(e), 2)
    seed_list = None
    try:
        if seeds is not None:
            seed_list = parse_seeds(seeds)
        elif seed is not None:
            seed_list = parse_seeds([seed], "--seed")
    except MedkdError as e:
        raise fail(str(e), 2)
    results = ablate(
        data, teacher, out, grid=grid, preset=preset, seeds=seed_list, config=config, correction=correction,
        overwrite=overwrite, shard=shard_ij, report_only=report_only,
        base_overrides=dict(student=student, student_width=student_width, fraction=fraction, subset_seed=subset_seed,
                            epochs=epochs, batch_size=batch_size, lr=lr, in_channels=in_channels, device=device),
        console=log_console(quiet),
    )
    if results is None:  # a shard whose part is done while other shards still run
        if json_out:
            print_json({"shard": shard, "results": None})
        return
    if json_out:
        print_json(results)  # stdout holds only the JSON; the table goes to stderr (as `medkd evaluate --json`)
        if not quiet:
            print_table(log_console(), ablate_table(results))
    elif not quiet:
        print_table(stdout_console, ablate_table(results))
