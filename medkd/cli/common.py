"""Option definitions and helpers shared by every command (defined once, used everywhere).

Training options default to ``None`` on the command line so that the merge order
``dataclass defaults < --config YAML < explicit flags`` can tell what the user actually set.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import inspect
import json
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from medkd.errors import MedkdError

if TYPE_CHECKING:
    from medkd.options import OptionSpec

ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="YAML file of options; command-line flags override it. \\[default: none]",
                 dir_okay=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
PresetOpt = Annotated[Optional[str], typer.Option(help="Packaged training options: 'study' (the reference study's recipe, "
                                                        "medkd/presets/train-study.yaml). \\[default: none]")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from RUN's last.pt.")]

def with_default(help_text: str, default: str) -> str:
    """``help_text`` with ``[default: ...]`` appended, escaped for Rich markup (which would take it for a tag)."""
    from rich.markup import escape

    return f"{help_text} {escape(f'[default: {default}]')}"



# Human output (tables) -> stdout; logs/progress -> stderr.
stdout_console = Console()
stderr_console = Console(stderr=True)


def log_console(quiet: bool = False) -> Console:
    """Console for logs and progress (stderr); silent when ``quiet`` and on every torchrun rank but 0."""
    from medkd.distributed import env

    return Console(stderr=True, quiet=quiet or not env().is_main)


def fail(message: str, code: int = 1) -> "typer.Exit":
    """Print ``error: message`` on one line to stderr and return the Exit to raise."""
    from rich.markup import escape

    first = " ".join(str(message).split())
    stderr_console.print(f"[bold red]error:[/] {escape(first)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn ``MedkdError`` into a one-line message + exit 1, Ctrl-C into exit 130."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MedkdError as e:
            raise fail(str(e), 1)
        except OSError as e:  # last resort: an OS error no library function turned into a MedkdError
            where = f"{e.filename}: " if getattr(e, "filename", None) else ""
            raise fail(f"{where}{e.strerror or e} ({errno.errorcode.get(e.errno, 'OSError')})", 1)
        except KeyboardInterrupt:
            stderr_console.print("interrupted", highlight=False)
            raise typer.Exit(130)

    return wrapper


def print_json(doc: Any) -> None:
    """Write one JSON document to stdout (and nothing else; under torchrun rank 0 alone prints it)."""
    from medkd.distributed import env

    if not env().is_main:
        return
    sys.stdout.write(json.dumps(doc, indent=2, default=_json_default) + "\n")
    sys.stdout.flush()


def _json_default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


# ------------------------------------------------------------------------ options declared on the config fields


def default_text(value: Any) -> str:
    """How a default reads in ``--help``: ``0.5``, ``on``/``off``, ``a,b`` for lists, ``k=v,...`` for mappings."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items()) or "none"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _field_default(f: "dataclasses.Field[Any]") -> Any:
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def declared_help(f: "dataclasses.Field[Any]", spec: "OptionSpec", default: Optional[str] = None) -> str:
    """The ``--help`` text of a declared option: its sentence, its valid values, its default."""
    text = spec.help
    if spec.choices is not None:
        text += f" One of: {', '.join(map(str, spec.choices()))}."
    return with_default(text, default or spec.default_text or default_text(_field_default(f)))


def _flag_param(f: "dataclasses.Field[Any]", spec: "OptionSpec", default: Optional[str] = None) -> inspect.Parameter:
    """The Typer parameter of one declared option: optional (``None`` = not given, so the merge order
    defaults < preset < --config < flags can tell), typed, with its default and valid values in the help."""
    text = declared_help(f, spec, default)
    base = spec.cli_type or _plain_type(f.type)
    flags = (spec.flag or "--" + f.name.replace("_", "-")).split(" ")
    info = typer.Option(*flags, help=text)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[base], info])


def _plain_type(t: Any) -> Any:
    """``int`` from ``"int"`` / ``"Optional[int]"`` (the config module uses postponed annotations)."""
    name = str(t).replace("Optional[", "").rstrip("]")
    return {"int": int, "float": float, "bool": bool, "str": str}.get(name, str)


def config_options(cls: type, *names: str, defaults: Optional[Dict[str, str]] = None
                   ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command the flags of the config options ``names`` of ``cls``, all derived from their declarations
    (:func:`medkd.options.option`): flag, type, help with the default, and the usage check (exit 2).

    The command declares a keyword ``opts``; it receives ``{name: canonical value or None}``, ready for
    :func:`medkd.config.build_config`. The flags are listed after the command's required parameters, before its own options. ``defaults``
    rewords a default where the command layers something over the config's (``ablate``: the grid's epochs).
    """
    from medkd.options import option_specs

    fields = {f.name: f for f in dataclasses.fields(cls)}
    specs = option_specs(cls)

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            given = {n: kwargs.pop(n, None) for n in names}
            given = {n: str(v) if isinstance(v, Path) else v for n, v in given.items()}  # paths are text in configs
            return fn(*args, opts=usage_checks(cls, **given), **kwargs)

        sig = inspect.signature(fn)
        hints = typing.get_type_hints(fn, include_extras=True)  # the command's own Annotated options, resolved
        own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
               if p.name != "opts"]
        required = [p for p in own if p.default is inspect.Parameter.empty]
        rest = [p for p in own if p.default is not inspect.Parameter.empty]
        added = [_flag_param(fields[n], specs[n], (defaults or {}).get(n)) for n in names]
        wrapper.__signature__ = sig.replace(parameters=[  # type: ignore[attr-defined]
            *required, *added, *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in rest)])
        wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *added]}
        return wrapper

    return deco


def _device_opt() -> Any:
    """``--device`` of the commands that run a model without training it (evaluate, predict, export): the same
    declaration as the training commands' (``TrainConfig.device``)."""
    from medkd.config import TrainConfig
    from medkd.options import option_specs

    f = next(f for f in dataclasses.fields(TrainConfig) if f.name == "device")
    return Annotated[Optional[str], typer.Option("--device", help=declared_help(f, option_specs(TrainConfig)["device"]))]


DeviceOpt = _device_opt()

#: Checks of the options that are not config fields (evaluate's --split and --tolerance).
_OTHER_CHECKS = {"split": "check_split", "tolerance": "check_tolerance"}


def usage_checks(cls: Optional[type] = None, **values: Any) -> Dict[str, Any]:
    """Check command-line values with their declared checks (the fields of ``cls``, else of the configs); a bad one
    is a usage error (exit 2).

    ``None`` values (flag not given) are kept. Returns the values in canonical form (e.g. ``scales`` parsed into a
    list).

    Raises:
        typer.Exit: code 2, after one ``error: unknown --student 's9'; valid: s1, s2`` line.
    """
    from medkd import options
    from medkd.config import DistillConfig, TeacherConfig

    specs = {**options.option_specs(TeacherConfig), **options.option_specs(DistillConfig),
             **(options.option_specs(cls) if cls is not None else {})}
    out: Dict[str, Any] = {}
    for name, value in values.items():
        out[name] = value
        if value is None:
            continue
        spec = specs.get(name)
        flag = (spec.flag if spec and spec.flag else "--" + name.replace("_", "-")).split("/")[0]
        try:
            if spec is None:
                out[name] = getattr(options, _OTHER_CHECKS[name])(value, flag)
                continue
            if spec.parse is not None:
                value = spec.parse(value, flag)
            out[name] = spec.check(value, flag) if spec.check is not None else value
        except options.OptionError as e:
            raise fail(str(e), 2)
    return out
