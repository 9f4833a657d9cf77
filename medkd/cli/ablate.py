"""``medkd ablate DATA --teacher TEACHER|--teacher-probs DIR -o DIR [--grid GRID.yaml | --preset quick|study]``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    ConfigOpt, JsonOpt, QuietOpt, config_options, fail, handle_errors, log_console, print_json, stdout_console
)
from medkd.config import DistillConfig
from medkd.errors import MedkdError
from medkd.report.tables import print_table


@handle_errors
@config_options(DistillConfig, "student", "student_width", "fraction", "subset_seed", "epochs", "batch_size",
                "steps_per_epoch", "lr", "in_channels", "device", "teacher_label", "teacher_fold",
                "teacher_checkpoint", "teacher_taps",
                defaults={"student": "the grid's, else s1", "epochs": f"the grid's, else distill's {DistillConfig().epochs}",
                          "steps_per_epoch": "one pass over each row's training images; baselines get their row's"})
def command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset folder (from medkd preprocess).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Ablation folder: runs/<setting>/seed<k>/ and results.*")],
    teacher: Annotated[Optional[Path], typer.Option(help="The teacher of every row and of the teacher reference "
                                                         "row: a medkd run folder, an nnU-Net v2 model folder, a MONAI "
                                                         "bundle folder or a TorchScript/ONNX file (as for medkd "
                                                         "distill). Give --teacher or --teacher-probs. \\[default: none]")] = None,
    teacher_probs: Annotated[Optional[Path], typer.Option(help="Instead of --teacher: a folder of the teacher's saved "
                                                               "per-case probabilities (see medkd distill "
                                                               "--teacher-probs); no teacher reference row. \\[default: none]")] = None,
    grid: Annotated[Optional[Path], typer.Option(help="YAML list of cells, each a mapping of distill options, e.g. "
                                                   "- {scales: \\[enc, dec], loss: contrastive, pmd: true}. Give --grid or --preset. \\[default: none]",
                                              dir_okay=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="quick (minutes on the sample data) | study (the reference "
                                                       "study's scales x PMD x loss grid). \\[default: none]")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="Comma list of seeds for every row. \\[default: the grid's, else 0,1,2]")] = None,
    correction: Annotated[str, typer.Option(help="Multiple-comparison adjustment of the p-values over all non-baseline "
                                                 "rows: holm (family-wise error) | bh (false discovery rate) | none; "
                                                 "a row is significant when its adjusted p < 0.05.")] = "holm",
    config: ConfigOpt = None,
    seed: Annotated[Optional[int], typer.Option(help="One seed for every row (instead of --seeds). \\[default: none]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Retrain finished runs that are stale (config differs, or data/teacher "
                                                                "newer than the run) instead of stopping with an error.")] = False,
    shard: Annotated[Optional[str], typer.Option(help="I/N: train only the I-th of N deterministic slices of the runs "
                                                      "(SLURM arrays, one process per GPU); the last shard to finish "
                                                      "writes the results. \\[default: none, all runs]")] = None,
    report_only: Annotated[bool, typer.Option("--report-only", help="Train nothing: write results.* from the finished "
                                                                    "runs (evaluating those not evaluated yet).")] = False,
    fractions: Annotated[Optional[str], typer.Option(help="Comma list of labelled fractions, e.g. 0.1,0.25,0.5,1: every "
                                                          "cell (that sets no fraction) and its equal-budget baseline "
                                                          "at each; draws label_efficiency.png. \\[default: the grid's, "
                                                          "else none]")] = None,
    no_references: Annotated[bool, typer.Option("--no-references", help="Leave out the reference rows (the student "
                                                                        "given all labels, the teacher) and so the gap "
                                                                        "closed.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    *,
    opts: Optional[Dict[str, Any]] = None,
) -> None:
    """Distill over a grid of settings x seeds, each against a no-KD baseline of the same training budget, plus
    reference rows (all labels, teacher); table of mean ± std, gains, gap closed and p-values.

    Resumable: rerun the same command to skip finished runs and finish the rest.
    """
    from medkd.ablate import CORRECTIONS, GRID_PRESETS, ablate, parse_fractions, parse_seeds
    from medkd.report.ablate_table import ablate_table

    if grid is not None and preset is not None:
        raise fail("give either --grid or --preset, not both", 2)
    if grid is None and preset is None:
        raise fail("give --grid GRID.yaml or --preset quick|study", 2)
    if preset is not None and preset not in GRID_PRESETS:
        raise fail(f"unknown --preset {preset!r}; valid: {', '.join(GRID_PRESETS)}", 2)
    if correction not in CORRECTIONS:
        raise fail(f"unknown --correction {correction!r}; valid: {', '.join(CORRECTIONS)}", 2)
    if (teacher is None) == (teacher_probs is None):
        raise fail("give either --teacher TEACHER_RUN or --teacher-probs DIR" if teacher is None else
                   "give either --teacher or --teacher-probs, not both", 2)
    if seeds is not None and seed is not None:
        raise fail("give --seeds or --seed, not both", 2)
    from medkd.ablate import parse_shard

    if shard is not None and report_only:
        raise fail("give --shard or --report-only, not both", 2)
    try:
        shard_ij = parse_shard(shard)
    except MedkdError as e:
        raise fail(str(e), 2)
    if fractions is not None and (opts or {}).get("fraction") is not None:
        raise fail("give --fraction or --fractions, not both", 2)
    seed_list = fraction_list = None
    try:
        if seeds is not None:
            seed_list = parse_seeds(seeds)
        elif seed is not None:
            seed_list = parse_seeds([seed], "--seed")
        if fractions is not None:
            fraction_list = parse_fractions(fractions)
    except MedkdError as e:
        raise fail(str(e), 2)
    results = ablate(
        data, teacher, out, grid=grid, preset=preset, seeds=seed_list, config=config, correction=correction,
        overwrite=overwrite, shard=shard_ij, report_only=report_only, fractions=fraction_list,
        references=[] if no_references else None, base_overrides=opts, teacher_probs=teacher_probs,
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
