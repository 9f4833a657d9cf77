"""Option definitions and helpers shared by every command (defined once, used everywhere).

Training options default to ``None`` on the command line so that the merge order
``dataclass defaults < --config YAML < explicit flags`` can tell what the user actually set.
"""

from __future__ import annotations

import errno
import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import typer
from rich.console import Console
from typing_extensions import Annotated

from medkd.errors import MedkdError

DeviceOpt = Annotated[
    Optional[str],
    typer.Option("--device", help="auto | cpu | cuda (auto = CUDA when available). [default: auto]"),
]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed. [default: 0]")]
ConfigOpt = Annotated[
    Optional[Path],
    typer.Option("--config", help="YAML file of options; command-line flags override it.", dir_okay=False),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors on stderr.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print exactly one JSON document on stdout.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]

# Training options shared by train-teacher, distill and ablate (defaults live in medkd.config).
EpochsOpt = Annotated[Optional[int], typer.Option(help="Epochs. [default: 12]")]
BatchSizeOpt = Annotated[Optional[int], typer.Option(help="Batch size. [default: 8]")]
LrOpt = Annotated[Optional[float], typer.Option(help="Learning rate. [default: 2e-3]")]
WeightDecayOpt = Annotated[Optional[float], typer.Option(help="Weight decay. [default: 1e-4]")]
InChannelsOpt = Annotated[Optional[int], typer.Option(help="1, or 3 as in the study (a student must match its teacher). [default: 1]")]
AugmentOpt = Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random flips + intensity jitter (distill: the teacher then runs live).")]
PresetOpt = Annotated[Optional[str], typer.Option(help="Packaged training options: 'study' (the reference study's recipe, "
                                                        "medkd/presets/train-study.yaml).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from RUN's last.pt.")]
SubsetSeedOpt = Annotated[Optional[int], typer.Option(
    min=0, help="Seed of the --fraction subset of training cases, to hold it fixed across seeds. "
                "\\[default: the run's --seed, so the subset varies with the seed]")]

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


#: Command-line option -> its validator in :mod:`medkd.options` (the value it returns is the canonical form).
_VALIDATORS = {
    "student": "check_student", "arch": "check_teacher", "loss": "check_loss", "scales": "parse_scales",
    "device": "check_device", "split": "check_split", "weights": "parse_weights", "kd_images": "check_kd_images",
    "epochs": "check_epochs", "batch_size": "check_batch_size", "lr": "check_lr", "weight_decay": "check_weight_decay",
    "temperature": "check_temperature", "fraction": "check_fraction", "width": "check_width",
    "recon_weight": "check_recon_weight", "tolerance": "check_tolerance",
    "teacher_outputs": "check_teacher_outputs", "cache_budget": "check_cache_budget",
    "seed": "check_seed", "subset_seed": "check_seed", "in_channels": "check_in_channels",
    "optimizer": "check_optimizer", "schedule": "check_schedule", "student_width": "check_width",
    "grad_share_every": "check_count",
}


def usage_checks(**values: Any) -> Dict[str, Any]:
    """Check command-line values with the validators the configs use; a bad one is a usage error (exit 2).

    ``None`` values (flag not given) are skipped. Returns the checked values in canonical form (e.g. ``scales``
    parsed into a list), ``None`` kept.

    Raises:
        typer.Exit: code 2, after one ``error: unknown --student 's9'; valid: s1, s2`` line.
    """
    from medkd import options

    out: Dict[str, Any] = {}
    for name, value in values.items():
        if value is None:
            out[name] = None
            continue
        check = getattr(options, _VALIDATORS[name])
        try:
            out[name] = check(value, "--" + name.replace("_", "-"))
        except options.OptionError as e:
            raise fail(str(e), 2)
    return out

