"""Loading checkpoints: weights-only, so a checkpoint file is data and never code.

``best.pt`` / ``last.pt`` hold tensors and plain Python values (:func:`medkd.rundir.atomic_save` writes them); a file
that needs anything else to unpickle is refused before any of it runs. Checkpoints of medkd up to a13dbb9 also held
numpy's RNG state as an ndarray, allowed here by name (:func:`_legacy_globals`).
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any, Dict, List, Optional

from medkd.compat import torch_at_least
from medkd.errors import MedkdError
from medkd.rundir import run_checkpoint


def _legacy_globals() -> List[Any]:
    """The non-tensor types a checkpoint of medkd 0.1.0 up to a13dbb9 may hold, allowed when loading it:
    ``np.random.get_state()``'s uint32 ndarray in ``last.pt`` (as pickled by numpy 1 and numpy 2: the array, its
    dtype and the uint32 dtype class). New checkpoints hold only tensors and plain Python values and need none."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1
        from numpy.core.multiarray import _reconstruct
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), (_reconstruct, "numpy._core.multiarray._reconstruct"),
            (_reconstruct, "numpy.core.multiarray._reconstruct")]


def _allow_legacy_globals():
    """A context that allows :func:`_legacy_globals` in ``torch.load(weights_only=True)`` (torch >= 2.6 takes
    ``(type, name)`` entries; on older torch only checkpoints without them load)."""
    import torch

    if torch_at_least(2, 6):
        return torch.serialization.safe_globals(_legacy_globals())
    return contextlib.nullcontext()  # pragma: no cover - torch < 2.6


def _refused(path: Path, error: Exception) -> str:
    """Why the weights-only unpickler refused ``path``: the globals it would need (found by reading the pickle,
    never by running it), capped, else torch's one-line reason."""
    import torch

    names: List[str] = []
    with contextlib.suppress(Exception), _allow_legacy_globals():
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if names:
        more = f" (+{len(names) - 3} more)" if len(names) > 3 else ""
        return "it needs " + ", ".join(ascii(n)[1:-1][:60] for n in names[:3]) + more
    m = re.search(r"WeightsUnpickler error:(.*?)(Check the documentation|$)", str(error), re.S)
    return " ".join((m.group(1) if m else str(error)).split())[:120]


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a medkd checkpoint, weights-only (:func:`load_weights`).

    Raises:
        MedkdError: missing, truncated, not a medkd checkpoint, or refused (naming what it would need).
    """
    ckpt = load_weights(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise MedkdError(f"{path}: not a medkd checkpoint")
    return ckpt


def load_weights(path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` weights-only: tensors and plain Python values (plus the numpy RNG state of older medkd,
    :func:`_legacy_globals`). A file holding anything else (a pickled object whose loading could run code) is
    refused before any of it runs. Any torch file: a medkd checkpoint, a MONAI bundle's ``model.pt``.

    Raises:
        MedkdError: missing, truncated, or refused (naming what it would need).
    """
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise MedkdError(f"{path}: checkpoint not found")
    try:
        with _allow_legacy_globals():
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        if not zipfile.is_zipfile(path):  # torch checkpoints are zip archives; a cut one has no central directory
            raise MedkdError(f"{path}: cannot load checkpoint, file is truncated or corrupt ({path.stat().st_size} "
                             f"bytes, not a complete torch archive; was the disk full or the copy interrupted?)") from None
        if isinstance(e, pickle.UnpicklingError) and "weights only" in str(e).lower():
            raise MedkdError(f"{path}: refused, not a weights-only checkpoint ({_refused(path, e)}): medkd loads only "
                             f"tensors and plain values, since loading a pickled object can run code") from None
        raise MedkdError(f"{path}: cannot load checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
    return ckpt


def trained_size(ckpt: Dict[str, Any]) -> Optional[int]:
    """In-plane slice size the checkpoint's model was trained on (from the prepared data's settings)."""
    data = ckpt.get("data") or {}
    size = (data.get("settings") or {}).get("size", data.get("size"))
    return None if size is None else int(size)


def load_model_from_run(run: Path, which: str = "best", map_location: Any = "cpu"):
    """Build the model saved in ``RUN/{which}.pt`` (alone: no adapters, no teacher needed).

    Returns:
        (model in eval mode, checkpoint dict)
    """
    from medkd.models import build_model

    path = run_checkpoint(run, which)
    ckpt = load_checkpoint(path, map_location)
    model = build_model(**ckpt["model_config"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise MedkdError(f"{path}: weights do not match the saved architecture ({str(e).splitlines()[0]})") from None
    model.eval()
    return model, ckpt
