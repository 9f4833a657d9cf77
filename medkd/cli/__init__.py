"""The ``medkd`` Typer app. Each command lives in its own module and is registered here."""

from __future__ import annotations

from typing import Optional

import typer
from typing_extensions import Annotated

import medkd

app = typer.Typer(
    name="medkd",
    help="Knowledge distillation for medical image segmentation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medkd {medkd.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """medkd: train multi-task teachers, distill tiny students, evaluate and ablate."""


def _register() -> None:
    # One module per command, each exposing ``command``.
    from medkd.cli import ablate, distill, evaluate, export, predict, preprocess, sample_data, train_teacher

    for mod, name in [
        (sample_data, "sample-data"),
        (preprocess, "preprocess"),
        (train_teacher, "train-teacher"),
        (distill, "distill"),
        (evaluate, "evaluate"),
        (predict, "predict"),
        (export, "export"),
        (ablate, "ablate"),
    ]:
        app.command(name)(mod.command)


_register()


def main() -> None:
    app()
