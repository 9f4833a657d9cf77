"""``medkd evaluate``: test-split metrics and efficiency of trained runs, as one dict per run.

For every case of the split, every prepared slice is predicted (batched) and the metrics of
:func:`medkd.metrics.case_metrics` are computed on the case's 3D volume, at one of two resolutions:

- ``native`` (default, as nnU-Net reports): the foreground probabilities are taken back to the case's original
  voxel grid with :func:`medkd.infer.prob_to_native` (the very mapping ``predict`` uses), thresholded, and compared
  with the original label file (``label_source`` in the manifest) at the original voxel spacing;
- ``prepared``: the mask on the resized ``(Z, S, S)`` training grid (``logits_to_mask``) against the prepared label,
  with the prepared spacing (``prepared_spacing``).

``summarize`` gives the means over cases (NaN excluded, see the empty-mask policy in
:mod:`medkd.metrics.segmentation`) and the pooled metrics (TP/FP/FN summed over every voxel of every case, the
reference study's convention). The top-level metrics are the network's own; the run's connected-component
postprocessing (:mod:`medkd.postprocess`, chosen on the val split and stored in ``RUN/postprocessing.json``) is
applied on top and reported separately under ``"postprocessed"``, so a distillation gain is never confused
with a postprocessing gain.

Surface-Dice tolerance: ``tolerance_mm`` if given, else per case ``max(2 mm, largest voxel spacing)`` (never
below the voxel size of the grid the metrics are computed on); each case records the value used.

A row may also be a model medkd did not train (:func:`load_external`: an nnU-Net model folder, a MONAI bundle, a
TorchScript/ONNX file, opened by :func:`medkd.teachers.open_teacher` as for ``distill --teacher``) or a folder of
predicted masks in the source images' geometry (:func:`load_masks`), scored on the same cases and grid; nothing is
written into their folders.

The result dict (the "Evaluate JSON" of the design contract) is the single source of the Rich table
(:func:`medkd.report.tables.eval_table`), the JSON document and ``RUN/eval-<split>.json``.
"""

from __future__ import annotations

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
from medkd.cases import MASK_SUFFIXES, case_masks, mask_masks, prob_masks
from medkd.infer import resolve_device
from medkd.options import DEFAULT_DEVICE, check_tolerance
from medkd.metrics import (
    COUNT_KEYS,
    DEFAULT_TOLERANCE_MM,
    METRIC_KEYS,
    case_metrics,
    checkpoint_size_mb,
    count_params,
    flops_per_slice,
    latency_ms,
    summarize,
    to_jsonable,
)
from medkd import rundir
from medkd.rundir import run_checkpoint
from medkd.checkpoint import load_model_from_run, trained_size

#: Per-case keys kept in the result (``case_metrics`` output minus nothing; order = JSON order).
CASE_KEYS = (*METRIC_KEYS, "gt_empty", "pred_empty", *COUNT_KEYS)
#: Per-case metric keys reported again after postprocessing.
PP_CASE_KEYS = (*METRIC_KEYS, "pred_empty", *COUNT_KEYS)
#: Summary keys (means over cases) of a result, with and without postprocessing.
SUMMARY_KEYS = METRIC_KEYS
#: Grids metrics can be computed on (``--resolution``); the first is the default.
RESOLUTIONS = ("native", "prepared")
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
    train_overlap: Optional[List[str]] = None  # evaluated cases the run was trained on (None: not recorded)
    teacher: Optional[Any] = None  # an external teacher (medkd.teachers.LoadedTeacher): not a medkd run
    masks: bool = False  # a folder of predicted masks (``run``), not a model
    masks_label: Optional[int] = None  # the foreground label in those masks (None: any non-zero voxel)


def is_external_teacher(path: Path) -> bool:
    """Whether ``path`` is a teacher of another kind than a medkd run (nnU-Net folder, MONAI bundle, model file,
    ...): an existing path that a registered teacher kind other than ``medkd`` recognises. Anything else is
    treated as a run folder (so a missing or broken run keeps its own error)."""
    from medkd.teachers import detect_kind

    if not Path(path).exists():
        return False
    try:
        return detect_kind(Path(path)) != "medkd"
    except MedkdError:
        return False


def is_mask_folder(path: Path) -> bool:
    """A folder of predicted masks (``<case>.nii.gz``, e.g. ``nnUNetv2_predict``'s output): NIfTI files and no run
    files (``summary.json``, ``config.yaml``, checkpoints)."""
    path = Path(path)
    if not path.is_dir() or any((path / n).exists() for n in ("summary.json", "config.yaml", "best.pt", "last.pt")):
        return False
    return any(p.name.endswith(MASK_SUFFIXES) for p in path.iterdir())


def load_masks(path: Path, label: Optional[int] = None) -> LoadedRun:
    """A folder of predicted masks as a row: each case's ``<case>.nii.gz`` in its source image's geometry, compared
    as it is (native grid) or brought to the prepared grid like the labels. No model: no parameters, FLOPs,
    latency or postprocessing; nothing is written into the folder."""
    path = Path(path)
    warn = f"{path}: predicted masks of a model medkd does not know (nor which cases it was trained on)"
    return LoadedRun(path, None, {"kind": "masks"}, path, {"kind": "masks"}, [warn], masks=True, masks_label=label)


def load_external(path: Path, data: PreparedData, label: Optional[int] = None, fold: Optional[str] = None,
                  checkpoint: Optional[str] = None, device: str = DEFAULT_DEVICE, console: Any = None) -> LoadedRun:
    """Open an external teacher (:func:`medkd.teachers.open_teacher`, which prints its one ``teacher: <kind> <path>
    (...)`` line on ``console``) as a row of the table, scored like a run.

    The row's ``kind`` is ``teacher``, or what a medkd export's metadata says it is (an exported student is a
    ``student`` row). Nothing is written into the teacher's folder: no ``eval-<split>.json``, no
    ``postprocessing.json`` (its rule is chosen on val at each evaluation). Its training cases are unknown, which
    the row says in a warning.
    """
    from medkd.teachers import TeacherRequest, open_teacher

    req = TeacherRequest(in_channels=_data_channels(data), label=label, fold=fold, checkpoint=checkpoint,
                         device=device)
    teacher = open_teacher(Path(path), req, data, console)
    source = Path(path)
    key = teacher.cache_key_file
    kind = external_kind(teacher)
    warn = (f"{source}: external {teacher.kind} {kind}; medkd does not know which cases it was trained on "
            f"(its test metrics are optimistic if it saw these)")
    return LoadedRun(source, teacher.module, {"kind": kind}, Path(key) if key else source,
                     {"kind": kind}, [warn], teacher=teacher)


def external_kind(teacher: Any) -> str:
    """``teacher``, or ``student`` for a student exported by medkd (its metadata says so)."""
    return "student" if teacher.details.get("model_kind") == "student" else "teacher"


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
    run = rundir.require_run_dir(run)
    model, ckpt = load_model_from_run(run, which)
    summary = rundir.read_summary(run)
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
    path = run_checkpoint(run, which)
    if path.name != f"{which}.pt":
        warnings.append(f"{run}: no {which}.pt, evaluated {path.name} (epoch {ckpt.get('epoch', '?')}) instead")
    return LoadedRun(run, model, ckpt, path, summary, warnings)


def training_overlap(ckpt: Dict[str, Any], data: PreparedData, split: str) -> Optional[List[str]]:
    """Cases of ``split`` that the checkpoint's run was trained on.

    The run's checkpoint records its training case ids and the source folder its data was prepared from
    (``medkd.train.provenance.data_record``); ids are compared when both datasets come from the same source (a dataset
    prepared again with another split seed reshuffles the same patients). Returns ``None`` when the run does
    not record its training cases (runs from before medkd recorded them), ``[]`` for another source.
    """
    rec = ckpt.get("data") or {}
    train = rec.get("train_cases")
    if train is None:
        return None
    mine, theirs = rec.get("source"), data.manifest.get("source")
    if mine and theirs and mine != theirs:
        return []
    return sorted(set(data.case_ids(split)) & set(train))


def _data_channels(data: PreparedData) -> int:
    ids = [c["id"] for c in data.cases]
    if not ids:
        return 1
    img = data.image(ids[0])
    return int(img.shape[1]) if img.ndim == 4 else 1


def case_tolerance(spacing, tolerance_mm: Optional[float]) -> float:
    """Surface-Dice tolerance of one case: the given value, else ``max(2 mm, largest voxel spacing)``."""
    if tolerance_mm is not None:
        return float(tolerance_mm)
    return max(float(DEFAULT_TOLERANCE_MM), max(float(s) for s in spacing))


def run_postprocessing(
    loaded: LoadedRun,
    data: PreparedData,
    device: torch.device,
    batch_size: int = 16,
    save: bool = True,
) -> Dict[str, Any]:
    """The run's postprocessing rule: ``RUN/postprocessing.json`` when it belongs to this checkpoint and was chosen on
    ``data`` (same fingerprint), else chosen now on the **val** split of ``data`` at native resolution
    (:func:`medkd.postprocess.choose`). It is saved only when ``data`` is the run's own training data: the saved
    rule is the one ``medkd predict`` and ``export`` apply, so evaluating on another dataset must not replace it.

    Returns:
        The rule's document (``method``, ``min_volume_ml``, ``val_dice_without``, ``val_dice_with``, ...); with no
        val case the rule is ``none`` and ``chosen_on`` is ``None`` (nothing saved).
    """
    from medkd import postprocess as pp

    if loaded.masks:
        return {**pp.Postprocessing().to_dict(), "chosen_on": None, "note": "predicted masks are scored as given"}
    doc = None if loaded.teacher is not None else pp.for_checkpoint(loaded.run, loaded.checkpoint, data.fingerprint())
    if doc is not None:
        return doc
    val_ids = data.case_ids("val")
    if not val_ids:
        return {**pp.Postprocessing().to_dict(), "chosen_on": None,
                "note": f"{data.root}: no val split to choose postprocessing on"}
    model = loaded.model.to(device).eval() if loaded.model is not None else None
    in_ch = int(getattr(model, "in_channels", 1))
    preds, gts, spacings = [], [], []
    for cid in val_ids:
        pred, gt, spacing, _ = _masks(loaded, model, data, cid, device, in_ch, batch_size, "native")
        preds.append(pred), gts.append(gt), spacings.append(spacing)
    rule, report = pp.choose(preds, gts, spacings)
    doc = {**rule.to_dict(), "chosen_on": "val", "resolution": "native", "n_cases": len(val_ids), **report,
           "data": str(data.root.resolve()), "data_fingerprint": data.fingerprint(),
           **(pp.checkpoint_stamp(loaded.checkpoint) if loaded.checkpoint.is_file() else {}),
           "medkd_version": medkd.__version__}
    doc = to_jsonable(doc)
    if save and loaded.teacher is None and data.fingerprint() == (loaded.ckpt.get("data") or {}).get("fingerprint"):
        pp.save(loaded.run, doc)
    return doc


def evaluate_loaded(
    loaded: LoadedRun,
    data: PreparedData,
    split: str = "test",
    device: str = DEFAULT_DEVICE,
    tolerance_mm: Optional[float] = None,
    batch_size: int = 16,
    keep_predictions: bool = False,
    progress: Optional[Callable[[str, int, int, str], None]] = None,
    save: bool = True,
    resolution: str = "native",
    postprocessing: bool = True,
    model_file: Optional[Path] = None,
    ids: Optional[Sequence[str]] = None,
) -> Dict[str, Any]:
    """Evaluate one loaded run; see :func:`evaluate_run`.

    With ``keep_predictions`` the returned dict also holds ``"_predictions"``: ``{case_id: (Z, S, S) bool}``
    (not JSON; removed by :func:`public`). ``ids``: the split's case ids when the caller has them already.
    """
    from medkd.postprocess import Postprocessing

    if resolution not in RESOLUTIONS:
        raise MedkdError(f"unknown resolution {resolution!r}; valid: {', '.join(RESOLUTIONS)}")
    t0 = time.time()
    ids = list(ids) if ids is not None else data.require_split(split)
    dev = resolve_device(device)
    model = loaded.model.to(dev).eval() if loaded.model is not None else None
    in_ch = int(getattr(model, "in_channels", 1))
    pp_doc = (run_postprocessing(loaded, data, dev, batch_size, save=save) if postprocessing
              else {**Postprocessing().to_dict(), "chosen_on": None, "note": "disabled (--no-postprocessing)"})
    rule = Postprocessing.from_dict(pp_doc)
    per_case: List[Dict[str, Any]] = []
    pp_case: List[Dict[str, Any]] = []
    preds: Dict[str, np.ndarray] = {}
    for i, cid in enumerate(ids):
        if progress:
            progress(loaded.run.name, i + 1, len(ids), cid)
        pred, gt, spacing, prepared_pred = _masks(loaded, model, data, cid, dev, in_ch, batch_size, resolution)
        tol = case_tolerance(spacing, tolerance_mm)
        m = case_metrics(pred, gt, spacing, tol)
        per_case.append({"id": cid, **{k: m[k] for k in CASE_KEYS}, "tolerance_mm": tol})
        post = rule.apply(pred, spacing)
        mp = m if rule.method == "none" or np.array_equal(post, pred) else case_metrics(post, gt, spacing, tol)
        pp_case.append({"id": cid, **{k: mp[k] for k in PP_CASE_KEYS}, "gt_empty": mp["gt_empty"]})
        if keep_predictions:
            preds[cid] = prepared_pred
    stats = summarize(per_case)
    pp_stats = summarize(pp_case)
    in_shape = (in_ch, data.size, data.size)
    result: Dict[str, Any] = {
        "run": str(loaded.run),
        "name": loaded.run.name,
        "split": split,
        "resolution": resolution,
        "n_cases": stats["n_cases"],
        "n_empty": stats["n_empty"],
    }
    for key in SUMMARY_KEYS:
        result[key] = stats[key]
        result[f"{key}_std"] = stats[f"{key}_std"]
    result["pooled"] = stats["pooled"]
    result["per_case"] = per_case
    result["postprocessing"] = pp_doc
    result["postprocessed"] = {
        **{k: pp_stats[k] for key in SUMMARY_KEYS for k in (key, f"{key}_std")},
        "n_empty": pp_stats["n_empty"], "pooled": pp_stats["pooled"], "per_case": pp_case,
    }
    result.update(
        **(_run_facts(loaded, model, in_shape, dev) if loaded.teacher is None and not loaded.masks else
           _external_facts(loaded, model, in_shape, dev)),
        device=str(dev),
        device_name=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        tolerance_mm=None if tolerance_mm is None else float(tolerance_mm),
        tolerance_rule="given" if tolerance_mm is not None else
        f"per case max({DEFAULT_TOLERANCE_MM:g} mm, largest voxel spacing)",
        input_shape=list(in_shape),
        data=str(data.root.resolve()),
        epoch=loaded.ckpt.get("epoch"),
        warnings=list(loaded.warnings),
        train_overlap=loaded.train_overlap,
        seconds=round(time.time() - t0, 2),
        medkd_version=medkd.__version__,
    )
    if model_file is not None:
        from medkd.exported import ort_latency_ms

        result.update(model_file=str(model_file), model_file_mb=checkpoint_size_mb(model_file),
                      latency_ms_ort=ort_latency_ms(model_file, in_shape, warmup=LATENCY_WARMUP,
                                                    repeats=LATENCY_REPEATS))
    for key in ("scales", "loss", "pmd", "fraction", "teacher"):
        if key in loaded.summary:
            result[key] = loaded.summary[key]
    if loaded.teacher is not None:
        result["teacher_source"] = loaded.teacher.record()
    result = to_jsonable(result)
    if save and loaded.teacher is None and not loaded.masks:
        rundir.write_json(rundir.eval_json(loaded.run, split), result)
    if keep_predictions:
        result["_predictions"] = preds
    return result


def _masks(loaded: LoadedRun, model: Optional[nn.Module], data: PreparedData, cid: str, device: torch.device,
           in_ch: int, batch_size: int, resolution: str):
    """:func:`medkd.cases.case_masks` of a run or a slice-model teacher; a per-case teacher's probabilities; a
    folder's saved masks."""
    if loaded.masks:
        return mask_masks(loaded.run, data, cid, resolution, loaded.masks_label)
    if model is None:
        return prob_masks(loaded.teacher.case_probs(cid), data, cid, resolution, str(loaded.run))
    return case_masks(model, data, cid, device, in_ch, batch_size, resolution)


def _run_facts(loaded: LoadedRun, model: nn.Module, in_shape, dev: torch.device) -> Dict[str, Any]:
    """A medkd run's kind, architecture and efficiency (parameters, FLOPs and latency per slice, checkpoint)."""
    return dict(
        kind=loaded.ckpt.get("kind", loaded.summary.get("kind")),
        arch=getattr(model, "arch", loaded.ckpt["model_config"].get("name")),
        params=count_params(model),
        flops=flops_per_slice(model, in_shape),
        latency_ms=latency_ms(model, in_shape, dev, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS),
        checkpoint_mb=checkpoint_size_mb(loaded.checkpoint),
        checkpoint=loaded.checkpoint.name,
    )


def _external_facts(loaded: LoadedRun, model: Optional[nn.Module], in_shape, dev: torch.device) -> Dict[str, Any]:
    """The same facts for an external teacher or a folder of masks, where they have them: parameters and FLOPs of a torch network
    (TorchScript included; FLOPs at the prepared input, the bridge to the network's own size included), latency of
    the slice model; an ONNX file: no parameters or FLOPs (not a torch graph), and ``latency_ms_ort``, ONNX
    Runtime's time for the graph alone at its own input size; ``None`` for a teacher that gives only per-case
    probabilities."""
    t = loaded.teacher
    if t is None:  # a folder of masks
        return dict(kind="masks", arch="masks", params=None, flops=None, latency_ms=None, checkpoint_mb=None,
                    checkpoint=loaded.run.name)
    net = getattr(model, "net", model)
    torch_net = isinstance(net, nn.Module) and any(True for _ in net.parameters())
    facts: Dict[str, Any] = dict(
        kind=external_kind(t),
        arch=f"{t.kind}:{t.details.get('network') or t.details.get('configuration') or Path(t.source).name}",
        params=count_params(net) if torch_net else None,
        flops=flops_per_slice(model, in_shape) if torch_net else None,
        latency_ms=(latency_ms(model, in_shape, dev, warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS)
                    if model is not None else None),
        checkpoint_mb=checkpoint_size_mb(loaded.checkpoint) if loaded.checkpoint.is_file() else None,
        checkpoint=loaded.checkpoint.name,
    )
    if t.kind == "onnx" and isinstance(net, nn.Module):
        size = int(getattr(model, "input_size", in_shape[-1]))
        net_shape = (int(getattr(model, "net_channels", in_shape[0])), size, size)
        facts["latency_ms_ort"] = latency_ms(net, net_shape, "cpu", warmup=LATENCY_WARMUP, repeats=LATENCY_REPEATS)
    return facts


def evaluate_run(
    run: Path,
    data: Path,
    split: str = "test",
    device: str = DEFAULT_DEVICE,
    tolerance_mm: Optional[float] = None,
    batch_size: int = 16,
    save: bool = True,
    resolution: str = "native",
    postprocessing: bool = True,
) -> Dict[str, Any]:
    """Evaluate one run on a prepared dataset split and save ``RUN/eval-<split>.json``.

    Args:
        run: run folder with ``best.pt`` (or ``last.pt``).
        data: prepared dataset folder.
        split: ``"test"`` (default), ``"val"`` or ``"train"``.
        device: ``auto | cpu | cuda``: where slices are predicted and latency is timed.
        tolerance_mm: surface-Dice tolerance in mm; ``None``: per case ``max(2 mm, largest voxel spacing)``.
        batch_size: slices per forward pass.
        save: write ``RUN/eval-<split>.json`` (and ``RUN/postprocessing.json`` when it is chosen now).
        resolution: ``"native"`` (original voxel grid, default) or ``"prepared"`` (the resized training grid).
        postprocessing: choose (on val) / apply the run's connected-component rule and report ``"postprocessed"``.

    Returns:
        The Evaluate-JSON dict (JSON-safe: NaN -> ``None``): ``run``, ``name``, ``split``, ``resolution``, ``n_cases``,
        ``n_empty``, ``dice``/``iou``/``recall``/``precision``/``hd95``/``surface_dice`` (means over cases) and
        their ``*_std``, ``pooled`` {dice, iou, recall, precision}, ``per_case`` [{id, metrics, gt_empty,
        pred_empty, tp, fp, fn}], ``kind``, ``arch``, ``params``, ``flops`` (per slice), ``latency_ms``
        (median per slice), ``checkpoint_mb``, ``device``, ``tolerance_mm``, ``postprocessing`` (the rule) and
        ``postprocessed`` (the same metrics, pooled and per case, after the rule), ...

    Raises:
        MedkdError: missing run/checkpoint, missing manifest or empty split, incompatible slice size.
    """
    return evaluate_runs([run], data, split, device, tolerance_mm, batch_size, save=save, resolution=resolution,
                         postprocessing=postprocessing)[0]


def evaluate_runs(
    runs: Sequence[Path],
    data: Path,
    split: str = "test",
    device: str = DEFAULT_DEVICE,
    tolerance_mm: Optional[float] = None,
    batch_size: int = 16,
    overlays: Optional[Path] = None,
    save: bool = True,
    progress: Optional[Callable[[str, int, int, str], None]] = None,
    resolution: str = "native",
    postprocessing: bool = True,
    model_files: Optional[Sequence[Path]] = None,
    force: bool = False,
    teacher_label: Optional[int] = None,
    teacher_fold: Optional[str] = None,
    teacher_checkpoint: Optional[str] = None,
    console: Any = None,
) -> List[Dict[str, Any]]:
    """Evaluate several runs on the same split, in order. Every run is checked before any is evaluated.

    A run is refused when cases of ``split`` (other than ``train``) were among its training cases
    (:func:`training_overlap`: e.g. the data was prepared again with another split seed); with ``force`` it is
    evaluated and the result says so loudly (``train_overlap`` and a ``LEAKAGE`` warning, marked in the table).

    Args:
        runs: run folders; the first one is the reference row of the table.
        data: prepared dataset folder.
        overlays: if given, write one PNG per case there (input, ground truth, each run's prediction).
        model_files: exported models (``.onnx``), one per run in the same order: their ONNX Runtime latency is
            reported as ``latency_ms_ort`` beside PyTorch's ``latency_ms``.
        progress: ``fn(run_name, i, n, case_id)`` called before each case.
        teacher_label, teacher_fold, teacher_checkpoint: for rows that are external teachers (an nnU-Net model
            folder, a MONAI bundle, a TorchScript/ONNX file: :func:`is_external_teacher`), what ``--teacher-label``,
            ``--teacher-fold`` and ``--teacher-checkpoint`` say for ``distill``; such a row is scored on the same
            cases and grid as the runs (:func:`load_external`). A folder of predicted masks (``<case>.nii.gz``:
            :func:`is_mask_folder`) is a row too, ``teacher_label`` its foreground label (:func:`load_masks`).
        console: where an external teacher's ``teacher: <kind> <path> (...)`` line goes (a log console, on
            stderr; ``None``: nowhere).
        Others: as in :func:`evaluate_run`.

    Returns:
        One result dict per run (see :func:`evaluate_run`).

    Raises:
        MedkdError: as in :func:`evaluate_run`, naming the first bad run or the data folder.
    """
    if not runs:
        raise MedkdError("no run given")
    if tolerance_mm is not None:
        check_tolerance(tolerance_mm, "--tolerance")
    if resolution not in RESOLUTIONS:
        raise MedkdError(f"--resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
    model_files = list(model_files or [])
    if model_files and len(model_files) != len(runs):
        raise MedkdError(f"--onnx given {len(model_files)} time(s) for {len(runs)} run(s): give one model per run")
    for f in model_files:
        if not Path(f).is_file():
            raise MedkdError(f"{f}: model file not found")
    prepared = data if isinstance(data, PreparedData) else PreparedData(Path(data))
    ids = prepared.require_split(split)
    dev = resolve_device(device)  # once, before any run is loaded: fail early on --device cuda without CUDA
    loaded = [load_external(Path(r), prepared, teacher_label, teacher_fold, teacher_checkpoint, device, console)
              if is_external_teacher(Path(r)) else load_masks(Path(r), teacher_label) if is_mask_folder(Path(r))
              else load_run(Path(r), prepared) for r in runs]
    outside = [lr.run for lr in loaded if lr.teacher is not None or lr.masks]
    if model_files and outside:
        raise MedkdError(f"--onnx pairs exported models with medkd runs, but {outside[0]} is not a medkd run "
                         f"(an ONNX teacher's own ONNX Runtime latency is reported without --onnx)")
    if model_files:  # before any evaluation: a model file of another run, or one that does not return the logits,
        from medkd.exported import check_model_file, load_exported, probe_exported  # fails at once, named

        for lr, f in zip(loaded, model_files):
            in_ch = int(getattr(lr.model, "in_channels", 1))
            check_model_file(Path(f), in_ch, prepared.size, lr.run)
            probe_exported(load_exported(Path(f)), in_ch, prepared.size)
    for lr in loaded:
        lr.train_overlap = training_overlap(lr.ckpt, prepared, split)
        if split == "train" or not lr.train_overlap:
            continue
        seen = lr.train_overlap  # every case of the split is still evaluated (with --force); these are marked
        what = (f"{len(seen)} of the {len(ids)} {split} case(s) of {prepared.root} were training cases of this run "
                f"({', '.join(seen[:5])}{', ...' if len(seen) > 5 else ''})")
        if not force:
            raise MedkdError(f"{lr.run}: {what}; was the data prepared again with another split seed? "
                             f"(--force evaluates anyway, marked as leakage)")
        lr.warnings.insert(0, f"LEAKAGE: {lr.run}: {what}; its {split} metrics are optimistic")
    results = []
    for i, lr in enumerate(loaded):
        results.append(evaluate_loaded(lr, prepared, split, dev, tolerance_mm, batch_size,
                                       keep_predictions=overlays is not None, progress=progress, save=save,
                                       resolution=resolution, postprocessing=postprocessing,
                                       model_file=Path(model_files[i]) if model_files else None, ids=ids))
        if lr.model is not None:
            lr.model.to("cpu")
    if overlays is not None:
        from medkd.report.overlays import write_overlays

        write_overlays(Path(overlays), prepared, results)
    return [public(r) for r in results]


def public(result: Dict[str, Any]) -> Dict[str, Any]:
    """The result without private keys (``_predictions``)."""
    return {k: v for k, v in result.items() if not k.startswith("_")}

