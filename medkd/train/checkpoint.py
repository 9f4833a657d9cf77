"""Atomic checkpoints and run folders.

A run is trained in ``RUN.partial/`` and moved to ``RUN/`` when it finishes, so ``RUN/`` is never half-written.
An interrupted or failed run leaves ``RUN.partial/last.pt`` (the last completed epoch) for ``--resume``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from medkd.errors import MedkdError


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temp file in the same folder, fsync, then ``os.replace``: a crash leaves the old file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: Path, map_location: Any = "cpu") -> Dict[str, Any]:
    """Load a medkd checkpoint.

    Raises:
        MedkdError: missing, truncated or not a medkd checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise MedkdError(f"{path}: checkpoint not found")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise MedkdError(f"{path}: cannot load checkpoint ({type(e).__name__}: {' '.join(str(e).split())[:100]})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_config" not in ckpt:
        raise MedkdError(f"{path}: not a medkd checkpoint")
    return ckpt


def partial_dir(run: Path) -> Path:
    run = Path(run)
    return run.with_name(run.name + ".partial")


def prepare_run_dir(run: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Create/choose the working folder ``RUN.partial``. Returns the checkpoint to resume from (or None).

    Raises:
        MedkdError: RUN (or an interrupted RUN.partial) exists without --overwrite/--resume; --resume with
            nothing to resume.
    """
    run = Path(run)
    work = partial_dir(run)
    if resume:
        if (work / "last.pt").is_file():
            return work / "last.pt"
        if (run / "last.pt").is_file():
            if work.exists():
                shutil.rmtree(work)
            shutil.copytree(run, work)
            return work / "last.pt"
        raise MedkdError(f"{run}: nothing to resume (no last.pt in {run} or {work})")
    if run.exists() and not overwrite:
        raise MedkdError(f"{run}: already exists (use --overwrite to replace it or --resume to continue)")
    if (work / "last.pt").is_file() and not overwrite:  # never throw away an interrupted run's epochs silently
        raise MedkdError(f"{work}: holds an interrupted run (use --resume to continue it or --overwrite to start again)")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return None


def finalize_run_dir(run: Path) -> None:
    """Move ``RUN.partial`` into place as ``RUN`` (replacing an old RUN only now, after success)."""
    run = Path(run)
    work = partial_dir(run)
    if run.exists():
        old = run.with_name(f".{run.name}.old-{os.getpid()}")
        os.replace(run, old)
        os.replace(work, run)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(work, run)


def run_checkpoint(run: Path, which: str = "best") -> Path:
    """The checkpoint file a run's model is loaded from: ``RUN/{which}.pt``, else ``RUN/last.pt``.

    Raises:
        MedkdError: neither exists.
    """
    run = Path(run)
    for path in (run / f"{which}.pt", run / "last.pt"):
        if path.is_file():
            return path
    raise MedkdError(f"{run}: no {which}.pt checkpoint (is this a finished medkd run?)")


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
