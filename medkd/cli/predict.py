"""``medkd predict RUN INPUT... -o OUT``: thin wrapper over :func:`medkd.predict.predict_paths`."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    handle_errors,
    log_console,
    print_json,
    stderr_console,
    stdout_console,
    usage_checks,
)
from medkd.options import DEFAULT_DEVICE


@handle_errors
def command(
    run: Annotated[Path, typer.Argument(help="Run folder (its best.pt is used) or a model file from medkd export "
                                             "(.onnx under ONNX Runtime; no run folder needed).")],
    inputs: Annotated[
        List[Path], typer.Argument(help="NIfTI files, DICOM series folders, or folders of them.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for <case>_seg.nii.gz masks.")],
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write <case>_prob.nii.gz (float32 foreground probability).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace existing output files.")] = False,
    modality: Annotated[
        Optional[str], typer.Option(help="CT | MR: override detection (DICOM tag, else CT when min < -500 HU). \\[default: detected]")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 16,
    postprocessing: Annotated[
        bool, typer.Option("--postprocessing/--no-postprocessing",
                           help="Apply the run's connected-component postprocessing (chosen on val by evaluate/export).")
    ] = True,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Segment volumes with a trained run or an exported model; masks keep each input's shape and orientation.

    Bad inputs are reported one line each and skipped (exit 1); the good ones are still written.
    """
    from rich.markup import escape

    from medkd.predict import predict_paths
    from medkd.report.tables import predict_table, print_table

    usage_checks(device=device, batch_size=batch_size)
    log = log_console(quiet)

    def progress(i: int, n: int, case: str) -> None:
        log.print(f"[{i}/{n}] {case}", highlight=False)

    result = predict_paths(run, inputs, out, probabilities=probabilities, overwrite=overwrite,
                           device=device or DEFAULT_DEVICE, batch_size=max(1, batch_size),
                           modality=modality.upper() if modality else None, progress=progress,
                           postprocessing=postprocessing)
    for note in result.notes:
        log.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    for w in result.written:  # suspicious inputs: segmented, but the user should look
        for line in w.get("warnings") or []:
            log.print(f"[yellow]warning:[/] {escape(line)}", highlight=False, soft_wrap=True)
    for f in result.failed:
        stderr_console.print(f"[bold red]error:[/] {escape(f['reason'])}", highlight=False, soft_wrap=True)
    if json_out:
        print_json({"run": str(run), "out": str(out), "engine": result.engine,
                    "postprocessing": result.postprocessing, "written": result.written, "failed": result.failed})
    elif result.written:  # the result table is stdout output; --quiet only silences stderr logs
        print_table(stdout_console, predict_table(result.written, out))
    if result.failed or not result.written:
        if not result.failed:
            stderr_console.print("[bold red]error:[/] no input to segment", highlight=False)
        raise typer.Exit(1)
