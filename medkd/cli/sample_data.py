"""``medkd sample-data OUT``: write the synthetic abdominal CT sample dataset (thin wrapper over
:func:`medkd.data.phantom.make_sample_data`)."""

from __future__ import annotations

from pathlib import Path

import typer
from typing_extensions import Annotated

from medkd.cli.common import OverwriteOpt, QuietOpt, fail, handle_errors, log_console
from medkd.data.phantom import DEFAULT_CASES, DEFAULT_SIZE, DEFAULT_SLICES


@handle_errors
def command(
    out: Annotated[Path, typer.Argument(help="Output folder (MSD-style: dataset.json, imagesTr/, labelsTr/).")],
    cases: Annotated[int, typer.Option("--cases", help="Number of cases.")] = DEFAULT_CASES,
    seed: Annotated[int, typer.Option("--seed", help="Dataset seed; the same seed writes the same bytes.")] = 0,
    size: Annotated[
        int, typer.Option("--size", help="In-plane matrix size (the voxel spacing stays 5.8 mm).")
    ] = DEFAULT_SIZE,
    slices: Annotated[
        int, typer.Option("--slices", help="Nominal slices per case (each case varies by up to 4).")
    ] = DEFAULT_SLICES,
    dicom: Annotated[
        bool, typer.Option("--dicom/--no-dicom", help="Also write case 0 as a DICOM series under dicom/.")
    ] = True,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a synthetic abdominal CT dataset with spleen labels (bit-identical for a given seed)."""
    from medkd.data.phantom import check_sample_options, make_sample_data
    from medkd.options import OptionError

    try:
        check_sample_options(cases, seed, size, slices)
    except OptionError as e:
        raise fail(str(e), 2)
    res = make_sample_data(
        out, overwrite=overwrite, n_cases=cases, seed=seed, size=size, n_slices=slices, dicom_case=dicom
    )
    log_console(quiet).print(
        f"wrote {res['cases']} cases ({res['files']} files, {res['bytes'] / 1e6:.1f} MB) to {res['out']} "
        f"in {res['seconds']:.1f} s (seed {seed})",
        highlight=False,
        soft_wrap=True,
    )
