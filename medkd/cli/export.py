"""``medkd export RUN -o MODEL.onnx``: thin wrapper over :func:`medkd.export.export_run`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from medkd.cli.common import DeviceOpt, JsonOpt, QuietOpt, fail, handle_errors, log_console, print_json, usage_checks
from medkd.export import DEFAULT_OPSET
from medkd.options import DEFAULT_DEVICE


@handle_errors
def command(
    run: Annotated[Path, typer.Argument(help="Run folder (teacher or student); its best.pt is exported.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model file to write (e.g. s1.onnx).", dir_okay=False)],
    fmt: Annotated[str, typer.Option("--format", help="onnx | torchscript (TorchScript: metadata in OUT.json).")] = "onnx",
    opset: Annotated[int, typer.Option("--opset", help="ONNX opset.")] = DEFAULT_OPSET,
    fp16: Annotated[bool, typer.Option("--fp16", help="Store weights as float16 (half the file; computes in float32).")] = False,
    data: Annotated[
        Optional[Path], typer.Option("--data", help="Prepared dataset for the verification slices (and the "
                                                    "postprocessing choice on val). \\[default: the run's dataset]")
    ] = None,
    tolerance: Annotated[
        Optional[float], typer.Option("--tolerance", help="Max |runtime - PyTorch| logit difference. \\[default: 1e-3; 5e-2 with --fp16]")
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing model file.")] = False,
    device: DeviceOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Export a run as a self-contained model: preprocessing, threshold and postprocessing in its metadata,
    verified against PyTorch on real prepared slices (refused above the tolerance). Needs medkd[deploy]."""
    from medkd.export import check_export_options, export_run
    from medkd.options import OptionError

    usage_checks(device=device)
    try:
        check_export_options(fmt, opset, fp16)
    except OptionError as e:
        raise fail(str(e), 2)
    log = log_console(quiet)
    res = export_run(run, out, fmt=fmt, opset=opset, fp16=fp16, data=data, overwrite=overwrite,
                     tolerance=tolerance, device=device or DEFAULT_DEVICE)
    v = res.metadata["verification"]
    pp = res.metadata.get("postprocessing") or {}
    if json_out:
        print_json({"run": str(run), "out": str(res.out), "format": res.format, "files": res.files,
                    "size_mb": round(res.size_mb, 4), "max_abs_diff": res.max_abs_diff, "tolerance": res.tolerance,
                    "slices": res.n_slices, "seconds": res.seconds, "metadata": res.metadata})
    log.print(f"exported {run} -> {res.out} ({res.format}, {res.size_mb:.2f} MiB); verified on {v['slices']} "
              f"prepared slices ({v['from']}): max |{v['engine']} - PyTorch| = {res.max_abs_diff:.2e} "
              f"(tolerance {res.tolerance:g}); postprocessing: {pp.get('method', 'none')}", highlight=False,
              soft_wrap=True)
