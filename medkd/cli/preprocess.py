"""``medkd preprocess SOURCE -o OUT``: thin wrapper over :func:`medkd.data.preprocess.preprocess`."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional

import typer
from rich.markup import escape
from typing_extensions import Annotated

from medkd.cli.common import (
    config_options,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    fail,
    handle_errors,
    log_console,
    print_json,
    stderr_console,
    stdout_console,
)
from medkd.data.preprocess import PreprocessFailed, PreprocessSettings, preprocess, split_summary
from medkd.data.recipe import parse_window
from medkd.errors import MedkdError
from medkd.report.progress import Bars
from medkd.report.tables import prepared_table


@handle_errors
@config_options(PreprocessSettings, "size", "test_fraction", "val_fraction", "seed", "workers")
def command(
    source: Annotated[Path, typer.Argument(help="MSD folder (dataset.json) or a folder of cases.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder for the prepared dataset.")],
    window: Annotated[Optional[str], typer.Option(help="CT window LOW,HIGH in HU (e.g. -160,240). \\[default: the window preset's]")] = None,
    window_preset: Annotated[
        Optional[str], typer.Option(help="Named CT window: abdomen, liver, bone, lung, brain. \\[default: abdomen]")
    ] = None,
    overwrite: OverwriteOpt = False,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Exit 0 even if some cases were bad.")] = False,
    allow_outside: Annotated[bool, typer.Option(
        "--allow-outside", help="Read dataset.json entries that lie outside SOURCE (absolute or ../ paths).")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
    *,
    opts: Optional[Dict[str, Any]] = None,
) -> None:
    """Check, window, resize and split raw volumes into a prepared slice dataset."""
    try:  # option values out of range are usage errors (exit 2)
        win, preset = parse_window(window, window_preset)
        given = {k: v for k, v in (opts or {}).items() if v is not None}
        settings = PreprocessSettings(window=win, window_preset=preset, **given)
        settings.validate()
    except MedkdError as e:
        raise fail(str(e), 2)
    log = log_console(quiet)
    with Bars(log, "preprocess", None) as bars:
        result = _run(source, out, settings, overwrite, bars.update, log, allow_outside)

    _print_bad(result.bad)
    if result.bad:
        n_good = len(result.manifest["cases"])
        hint = "" if skip_bad else " (exit 1; --skip-bad to accept)"
        stderr_console.print(
            f"{len(result.bad)} bad case(s) skipped, {n_good} good case(s) written to {escape(str(result.out))}{hint}",
            highlight=False, soft_wrap=True,
        )
    rows = split_summary(result.manifest)
    if json_out:
        print_json({"out": str(result.out), "splits": rows, "skipped": result.manifest["skipped"],
                    "seconds": round(result.seconds, 2)})
    elif not quiet:
        stdout_console.print(prepared_table(rows, result.out, len(result.bad), result.seconds))
    if result.bad and not skip_bad:
        raise typer.Exit(1)


def _print_bad(bad) -> None:
    for b in bad:
        stderr_console.print(f"[red]bad case:[/] {escape(b['reason'])}", highlight=False, soft_wrap=True)


def _run(source, out, settings, overwrite, progress, log, allow_outside=False):
    """:func:`preprocess`; when it stops for lack of good cases, the bad cases' reasons come before the error."""
    try:
        return preprocess(source, out, settings, overwrite=overwrite, progress=progress,
                          log=lambda m: log.print(f"note: {escape(m)}", highlight=False, soft_wrap=True),
                          allow_outside=allow_outside)
    except PreprocessFailed as e:
        _print_bad(e.bad)
        raise
