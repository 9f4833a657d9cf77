"""Facts about the installed libraries that code branches on, written once."""

from __future__ import annotations

import re
from typing import Tuple


def version_tuple(version: str) -> Tuple[int, ...]:
    """``"2.13.0+cpu"`` -> ``(2, 13, 0)``: compare versions as numbers (as text, "2.13" < "2.6")."""
    return tuple(int(v) for v in re.findall(r"\d+", version.split("+")[0])[:3])


def torch_at_least(major: int, minor: int) -> bool:
    """Whether the installed torch is ``major.minor`` or newer."""
    import torch

    return version_tuple(torch.__version__)[:2] >= (major, minor)
