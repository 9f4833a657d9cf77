"""``medkd evaluate``: test-split metrics and efficiency of trained runs, as one dict per run.

For every case of the split, every slice is predicted (batched), thresholded (``logits_to_mask``) and
:func:`medkd.metrics.case_metrics` is computed on the case's 3D ``(Z, S, S)`` volume with the prepared
voxel spacing (``prepared_spacing``, mm, same axis order). ``summarize`` gives the means over cases (NaN
excluded, see the empty-mask policy in :mod:`medkd.metrics.segmentation`) and the pooled metrics (TP/FP/FN
summed over every slice of every case, the reference study's convention).

The result dict (the "Evaluate JSON" of the design contract) is the single source of the Rich table
(:func:`medkd.report.tables.eval_table`), the JSON document and ``RUN/eval-<split>.json``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

import medkd
from medkd.data.prepared import PreparedData
from medkd.errors import MedkdError
from medkd.infer import logits_to_mask, predict_volume, resolve_device
from medkd.metrics import (
    DEFAULT_TOLERANCE_MM,
    case_metrics,
    checkpoint_size_mb,
    count_params,
    flops_per_slice,
    latency_ms,
    summarize,
    to_jsonable,
)
from medkd.train.checkpoint import load_model_from_run, run_checkpoint, trained_size

#: Per-case keys kept in the result (``case_metrics`` output minus nothing; order = JSON order).
CASE_KEYS = ("dice", "iou", "recall", "precision", "hd95", "surface_dice", "gt_empty", "pred_empty", "tp", "fp", "fn")
LATENCY_WARMUP = 3
LATENCY_REPEATS = 10


@dataclass
class LoadedRun:
    """A run checked against a dataset, ready to evaluate."""

    run: Path
    model: nn.Module
    ckpt: Dict[str, Any]
    checkpoint: Path
    summary: Dict[str, Any]
    warnings: List[str] = field(default_factory=list)


def load_run(run: Path, data: PreparedData, which: str = "best") -> LoadedRun:
    """Load ``RUN/{which}.pt`` and check that it can be evaluated on ``data``.

    Args:
        run: a run folder (``train-teacher`` / ``distill`` output).
        data: the prepared dataset to evaluate on.
        which: ``"best"`` (default) or ``"last"``.

    Returns:
        The loaded run (model in eval mode on the CPU) with warnings (e.g. a different CT window).

    Raises:
        MedkdError: no run folder / checkpoint, or the model expects another slice size or channel count.
    """
    run = Path(run)
    if not run.is_dir():
        partial = run.with_name(run.name + ".partial")
        hint = f" (training not finished: {partial} exists)" if partial.is_dir() else ""
        raise MedkdError(f"{run}: run folder not found{hint}")
    model, ckpt = load_model_from_run(run, which)
    summary: Dict[str, Any] = {}
    if (run / "summary.json").is_file():
        try:
            summary = json.loads((run / "summary.json").read_text())
        except ValueError:
            summary = {}
    settings = (ckpt.get("data") or {}).get("settings") or {}
    run_size = trained_size(ckpt)
    if run_size is not None and run_size != data.size:
        raise MedkdError(
            f"{run}: model was trained on {int(run_size)}x{int(run_size)} slices but {data.root} has "
            f"{data.size}x{data.size} (preprocess the data with --size {int(run_size)})"
        )
    in_ch = int(getattr(model, "in_channels", ckpt["model_config"].get("in_channels", 1)))
    data_ch = _data_channels(data)
    if data_ch not in (1, in_ch):
        raise MedkdError(f"{run}: model expects {in_ch} input channel(s) but {data.root} has {data_ch}")
    warnings = []
    rw, dw = settings.get("window"), data.settings.get("window")
    if rw is not None and dw is not None and [float(v) for v in rw] != [float(v) for v in dw]:
        warnings.append(f"{run}: trained with CT window {list(rw)} but {data.root} uses {list(dw)}")
    return LoadedRun(run, model, ckpt, run_checkpoint(run, which), summary, warnings)


def _data_channels(data: PreparedData) -> int:
    ids = [c["id"] for c in data.cases]
    if not ids:
        return 1
    img = data.image(ids[0])
    return int(img.shape[1]) if img.ndim == 4 else 1


def predict_mask(model: nn.Module, volume: np.ndarray, device: torch.device, in_channels: int,
                 batch_size: int = 16) -> np.ndarray:
    """Foreground mask ``(Z, S, S)`` bool of a prepared ``(Z, S, S)`` image stack."""
    return logits_to_mask(predict_volume(model, volume, device, in_channels, batch_size))


def evaluate_loaded(
    loaded: LoadedRun,
    data: PreparedData,
    split: str = "test",
    device: str = "auto",
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    batch_size: int = 16,
    keep_predictions: bool = False,
    progress: Optional[Callable[[str, int, int, str], None]] = None,
    save: bool = True,
) -> Dict[str, Any]:
    """Evaluate one loaded run; see :func:`evaluate_run`.

    With ``keep_predictions`` the returned dict also holds ``"_predictions"``: ``{case_id: (Z, S, S) bool}``
    (not JSON; removed by :func:`public`).
    """
    t0 = time.time()
    ids = data.require_split(split)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval()
    in_ch = int(getattr(model, "in_channels", 1))
    per_case: List[Dict[str, Any]] = []
    preds: Dict[str, np.ndarray] = {}
    for i, cid in enumerate(ids):
        if progress:
            progress(loaded.run.name, i + 1, len(ids), cid)
        pred = predict_mask(model, data.image(cid), dev, in_ch, batch_size)
        gt = np.asarray(data.label(cid)) > 0
        spacing = data.case(cid)["prepared_spacing"]  # (z, x, y) mm of the (Z, S, S) arrays
        m = case_metrics(pred, gt, spacing, tolerance_mm)
        per_case.append({"id": cid, **{k: m[k] for k in CASE_KEYS}})
        if keep_predictions:
            preds[cid] = pred
    stats = summarize(per_case)
    in_shape = (in_ch, data.size, data.size)
    result: Dict[str, Any] = {
        "run": str(loaded.run),
        "name": loaded.run.name,
        "split": split,
        "n_cases": stats["n_cases"],
        "n_empty": stats["n_empty"],
    }
    for key in ("dice", "iou", "recall", "precision", "hd95", "surface_dice"):
        result[key] = stats[key]
        result[f"{key}_std"] = stats[f"{key}_std"]
    result["pooled"] = stats["pooled"]
    result["per_case"] = per_case
    result.update(
        kind=loaded.ckpt.get("kind", loaded.summary.get("kind")),
        arch=getattr(model, "arch", loaded.ckpt["model_config"].get("name")),
        params=count_params(model),
        flops=flops_per_slice(model, in_shape),
        latency_ms=latency_ms(model, in_shape, dev, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS),
        checkpoint_mb=checkpoint_size_mb(loaded.checkpoint),
        checkpoint=loaded.checkpoint.name,
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        tolerance_mm=float(tolerance_mm),
        input_shape=list(in_shape),
        data=str(data.root.resolve()),
        epoch=loaded.ckpt.get("epoch"),
        warnings=list(loaded.warnings),
        seconds=round(time.time() - t0, 2),
        medkd_version=medkd.__version__,
    )
    for key in ("scales", "loss", "pmd", "fraction", "teacher"):
        if key in loaded.summary:
            result[key] = loaded.summary[key]
    result = to_jsonable(result)
    if save:
        write_json_atomic(loaded.run / f"eval-{split}.json", result)
    if keep_predictions:
        result["_predictions"] = preds
    return result


def evaluate_run(
    run: Path,
    data: Path,
    split: str = "test",
    device: str = "auto",
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    batch_size: int = 16,
    save: bool = True,
) -> Dict[str, Any]:
    """Evaluate one run on a prepared dataset split and save ``RUN/eval-<split>.json``.

    Args:
        run: run folder with ``best.pt`` (or ``last.pt``).
        data: prepared dataset folder.
        split: ``"test"`` (default), ``"val"`` or ``"train"``.
        device: ``auto | cpu | cuda``: where slices are predicted and latency is timed.
        tolerance_mm: surface-Dice tolerance.
        batch_size: slices per forward pass.
        save: write ``RUN/eval-<split>.json``.

    Returns:
        The Evaluate-JSON dict (JSON-safe: NaN -> ``None``): ``run``, ``name``, ``split``, ``n_cases``,
        ``n_empty``, ``dice``/``iou``/``recall``/``precision``/``hd95``/``surface_dice`` (means over cases) and
        their ``*_std``, ``pooled`` {dice, iou, recall, precision}, ``per_case`` [{id, metrics, gt_empty,
        pred_empty, tp, fp, fn}], ``kind``, ``arch``, ``params``, ``flops`` (per slice), ``latency_ms``
        (median per slice), ``checkpoint_mb``, ``device``, ``tolerance_mm``, ...

    Raises:
        MedkdError: missing run/checkpoint, missing manifest or empty split, incompatible slice size.
    """
    return evaluate_runs([run], data, split, device, tolerance_mm, batch_size, save=save)[0]


def evaluate_runs(
    runs: Sequence[Path],
    data: Path,
    split: str = "test",
    device: str = "auto",
    tolerance_mm: float = DEFAULT_TOLERANCE_MM,
    batch_size: int = 16,
    overlays: Optional[Path] = None,
    save: bool = True,
    progress: Optional[Callable[[str, int, int, str], None]] = None,
) -> List[Dict[str, Any]]:
    """Evaluate several runs on the same split, in order. Every run is checked before any is evaluated.

    Args:
        runs: run folders; the first one is the reference row of the table.
        data: prepared dataset folder.
        overlays: if given, write one PNG per case there (input, ground truth, each run's prediction).
        progress: ``fn(run_name, i, n, case_id)`` called before each case.
        Others: as in :func:`evaluate_run`.

    Returns:
        One result dict per run (see :func:`evaluate_run`).

    Raises:
        MedkdError: as in :func:`evaluate_run`, naming the first bad run or the data folder.
    """
    if not runs:
        raise MedkdError("no run given")
    if tolerance_mm <= 0:
        raise MedkdError(f"--tolerance must be > 0 mm, got {tolerance_mm}")
    prepared = data if isinstance(data, PreparedData) else PreparedData(Path(data))
    prepared.require_split(split)
    resolve_device(device)  # fail early on --device cuda without CUDA
    loaded = [load_run(Path(r), prepared) for r in runs]
    results = []
    for lr in loaded:
        results.append(evaluate_loaded(lr, prepared, split, device, tolerance_mm, batch_size,
                                       keep_predictions=overlays is not None, progress=progress, save=save))
        lr.model.to("cpu")
    if overlays is not None:
        from medkd.report.overlays import write_overlays

        write_overlays(Path(overlays), prepared, results, split)
    return [public(r) for r in results]


def public(result: Dict[str, Any]) -> Dict[str, Any]:
    """The result without private keys (``_predictions``)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}


def write_json_atomic(path: Path, doc: Any) -> None:
    """Write JSON to a temp file beside ``path`` and ``os.replace`` it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except OSError as e:
        raise MedkdError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
