"""Opening stored ``.npy`` arrays (prepared slices, teacher-output cache items) after checking them.

``np.load(path, mmap_mode="r+")`` trusts the file: a truncated array is silently zero-extended to the size its header
claims (and the zeros are then read as data), and a header of another shape or dtype is opened as it is.
:func:`open_array` reads the header first (``np.lib.format.read_magic`` / ``read_array_header_*``), compares the
shape, dtype and file size with what the caller expects, and only then memory-maps the data, in a mode that can
never extend the file. Every stored array medkd reads goes through it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from medkd.errors import DataError

#: Dimension wildcard in an expected shape (any length is accepted on that axis).
ANY = None


class ArrayError(DataError):
    """A stored array is missing, unreadable, or not the shape/dtype/size it should be. ``path`` names the file."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason


def _describe(shape: Sequence[Optional[int]], dtype: np.dtype) -> str:
    dims = ", ".join("*" if d is None else str(int(d)) for d in shape)
    return f"({dims}{',' if len(shape) == 1 else ''}) {np.dtype(dtype).name}"


def read_header(path: Path) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a C-ordered ``.npy`` file, read from its header alone.

    Raises:
        ArrayError: no such file, or not a ``.npy`` file medkd writes (format 1.0/2.0, C order, no objects).
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ArrayError(path, f"cannot load (unsupported .npy format version {version[0]}.{version[1]})")
            offset = f.tell()
    except FileNotFoundError:
        raise ArrayError(path, "cannot load (no such file)") from None
    except OSError as e:
        raise ArrayError(path, f"cannot load ({e.strerror or e})") from None
    except ValueError as e:  # cut inside the header, bad magic string, malformed header dictionary
        if str(e).startswith("EOF"):
            raise ArrayError(path, f"truncated: {path.stat().st_size} bytes, the .npy header is incomplete") from None
        raise ArrayError(path, f"cannot load (not a .npy array file: {' '.join(str(e).split())[:120]})") from None
    if fortran:
        raise ArrayError(path, "cannot load (Fortran-ordered array; expected C order)")
    if dtype.hasobject:
        raise ArrayError(path, "cannot load (object array; stored arrays hold numbers only)")
    return tuple(int(d) for d in shape), dtype, offset


def open_array(path: Path, shape: Sequence[Optional[int]], dtype, mode: str = "r") -> np.memmap:
    """Memory-map the ``.npy`` file ``path`` after checking it holds exactly a ``shape`` ``dtype`` array.

    Args:
        path: the ``.npy`` file.
        shape: the expected shape; :data:`ANY` (``None``) on an axis accepts any length there.
        dtype: the expected dtype (byte order included: medkd writes native little-endian arrays).
        mode: ``"r"`` (read-only) or ``"r+"`` (write into existing rows). Never a mode that creates or extends.

    Returns:
        A C-ordered ``np.memmap`` of the file's data.

    Raises:
        ArrayError: missing or unreadable file, not a ``.npy`` file, another shape or dtype, or a file size that
            differs from the header's (truncated, or with trailing bytes).
        ValueError: ``mode`` is not ``"r"`` / ``"r+"`` (a programming error).
    """
    if mode not in ("r", "r+"):
        raise ValueError(f"open_array mode must be 'r' or 'r+', got {mode!r}")
    path = Path(path)
    want = np.dtype(dtype)
    got_shape, got_dtype, offset = read_header(path)
    if got_dtype != want or len(got_shape) != len(shape) or any(
            e is not None and int(e) != g for e, g in zip(shape, got_shape)):
        raise ArrayError(path, f"holds a {_describe(got_shape, got_dtype)} array, expected {_describe(shape, want)}")
    expected = offset + int(np.prod(got_shape, dtype=np.int64)) * want.itemsize
    size = path.stat().st_size
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ArrayError(path, f"{what}: {size} bytes, expected {expected} for its {_describe(got_shape, want)} "
                               f"array")
    if not int(np.prod(got_shape, dtype=np.int64)):  # np.memmap cannot map zero bytes
        return np.zeros(got_shape, dtype=want).view(np.memmap)
    return np.memmap(path, dtype=want, mode=mode, offset=offset, shape=got_shape, order="C")


def load_array(path: Path, shape: Sequence[Optional[int]], dtype) -> np.ndarray:
    """:func:`open_array` read fully into memory (a writable in-memory copy; the file is closed)."""
    m = open_array(path, shape, dtype, "r")
    out = np.array(m)
    del m
    return out
