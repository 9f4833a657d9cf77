"""``medkd evaluate RUN [RUN ...] --data DATA``: thin wrapper over :func:`medkd.evaluate.evaluate_runs`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    config_options,
    handle_errors,
    log_console,
    print_json,
    stdout_console,
    usage_checks,
)
from medkd.config import DistillConfig
from medkd.metrics import DEFAULT_TOLERANCE_MM
from medkd.options import DEFAULT_DEVICE


@handle_errors
@config_options(DistillConfig, "teacher_label", "teacher_fold", "teacher_checkpoint")  # for external teacher rows
def command(
    runs: Annotated[List[Path], typer.Argument(
        help="Run folder(s), external teachers (an nnU-Net v2 model folder, a MONAI bundle, a TorchScript/ONNX file "
             "with its sidecar) or folders of predicted masks (<case>.nii.gz), one row each; the first is the "
             "reference for relative change.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared dataset folder (from medkd preprocess).")],
    split: Annotated[str, typer.Option(help="Split to evaluate: test | val | train.")] = "test",
    tolerance: Annotated[
        Optional[float],
        typer.Option("--tolerance", help=f"Surface-Dice tolerance in mm. \\[default: per case max({DEFAULT_TOLERANCE_MM:g} mm, "
                                         f"largest voxel spacing), never below the voxel size]"),
    ] = None,
    resolution: Annotated[
        str, typer.Option("--resolution", help="Grid the metrics are computed on: native (each case's original "
                                               "voxels, as nnU-Net reports) | prepared (the resized training grid).")
    ] = "native",
    postprocessing: Annotated[
        bool, typer.Option("--postprocessing/--no-postprocessing",
                           help="Choose (on the val split, saved in RUN/postprocessing.json) and apply the run's "
                                "connected-component postprocessing; reported beside the raw metrics.")
    ] = True,
    onnx: Annotated[
        Optional[List[Path]], typer.Option("--onnx", help="Exported model per run (same order, medkd export): "
                                                          "adds its ONNX Runtime latency. \\[default: none]", dir_okay=False)
    ] = None,
    overlays: Annotated[
        Optional[Path], typer.Option("--overlays", help="Folder for per-case overlay PNGs. \\[default: none]", file_okay=False)
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 16,
    force: Annotated[bool, typer.Option("--force", help="Evaluate even when the split holds cases a run was "
                                                        "trained on (marked as leakage in the table and JSON).")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    opts: Optional[Dict[str, Any]] = None,
) -> None:
    """Test-split metrics (per case 3D Dice, IoU, recall, precision, HD95, surface Dice; pooled) and efficiency,
    one row per run, in each case's native voxel grid by default.

    A row may also be an external teacher (nnU-Net model folder, MONAI bundle, TorchScript/ONNX file) or a folder
    of predicted masks (<case>.nii.gz in the source images' geometry, e.g. nnUNetv2_predict's output). Metrics are
    shown without and with the run's postprocessing (chosen on val). Saves RUN/eval-<split>.json for every run
    (nothing is written into a teacher's or a masks folder). With --json, one JSON document on stdout (the run's
    dict, or {"runs": [...]} for several runs) and the table on stderr.
    """
    from medkd.evaluate import evaluate_runs
    from rich.markup import escape

    from medkd.report.tables import eval_table, print_table

    usage_checks(split=split, device=device, batch_size=batch_size, tolerance=tolerance)
    log = log_console(quiet)

    def progress(run: str, i: int, n: int, cid: str) -> None:
        log.print(escape(f"[{run}] {i}/{n} {cid}"), highlight=False)

    results = evaluate_runs(runs, data, split=split, device=device or DEFAULT_DEVICE, tolerance_mm=tolerance,
                            batch_size=max(1, batch_size), overlays=overlays, progress=progress,
                            resolution=resolution, postprocessing=postprocessing, model_files=onnx, force=force,
                            teacher_label=opts["teacher_label"], teacher_fold=opts["teacher_fold"],
                            teacher_checkpoint=opts["teacher_checkpoint"], console=log)
    for r in results:
        for w in r.get("warnings") or []:
            style = "bold red" if w.startswith("LEAKAGE") else "yellow"
            log.print(f"[{style}]warning:[/] {escape(w)}", highlight=False, soft_wrap=True)
    table = eval_table(results)
    if json_out:
        print_json(results[0] if len(results) == 1 else {"runs": results})
        print_table(log, table)
    else:
        print_table(stdout_console, table)
    if overlays is not None:
        log.print(f"overlays: {overlays}", highlight=False)
