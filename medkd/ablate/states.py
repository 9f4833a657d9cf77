"""The state of an ablation's planned run folders: finished, resumable, to restart, new, stale (config or inputs
changed), and whether a finished run's evaluation can be reused."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple


from medkd import rundir
from medkd.ablate.grid import SPLIT
from medkd.ablate.names import identity
from medkd.ablate.report import METRICS
from medkd.config import DistillConfig, to_dict
from medkd.errors import MedkdError
from medkd.options import short_repr
from medkd.yamlfile import load_yaml


def run_state(run: Path, cfg: DistillConfig, data: Path,
              teacher_files: Optional[Dict[str, str]] = None) -> Tuple[str, str]:
    """``("done"|"resume"|"restart"|"new"|"mismatch"|"stray", detail)`` for one planned run folder
    (``teacher_files``: see :func:`inputs_newer`)."""
    run = Path(run)
    partial = rundir.partial_dir(run)
    if (run / rundir.SUMMARY).is_file():
        diff = config_diff(run / rundir.CONFIG, cfg, data) or inputs_newer(run / rundir.SUMMARY, cfg, data,
                                                                            teacher_files)
        return ("mismatch", diff) if diff else ("done", "")
    if run.exists():
        return "stray", f"exists but is not a finished run (no {rundir.SUMMARY})"
    if partial.is_dir():
        diff = config_diff(partial / rundir.CONFIG, cfg, data)
        if diff:
            return "restart", f"unfinished run had another config ({diff})"
        if (partial / rundir.LAST).is_file():
            return "resume", ""
        return "restart", "unfinished run has no completed epoch"
    return "new", ""


def inputs_newer(summary: Path, cfg: DistillConfig, data: Path,
                 teacher_files: Optional[Dict[str, str]] = None) -> str:
    """A finished run is stale when its data was re-prepared or its teacher changed after it finished.

    The teacher changed when ``teacher_files`` (its files now, ``{name: SHA-256}``, of any kind: a medkd run's
    checkpoint, an ONNX file and its sidecar, an nnU-Net fold's checkpoint ...) differ from those the run's
    ``summary.json`` recorded (``teacher_source.files``); for a run that recorded none, when a medkd teacher's
    ``best.pt`` is newer than the run.
    """
    t = Path(summary).stat().st_mtime
    if (Path(data) / "manifest.json").is_file() and (Path(data) / "manifest.json").stat().st_mtime > t:
        return f"data {data} was prepared again after this run"
    if not cfg.uses_teacher:
        return ""
    recorded = _recorded_teacher_files(summary)
    if teacher_files is not None and recorded is not None:
        changed = sorted(k for k in {*recorded, *teacher_files} if recorded.get(k) != teacher_files.get(k))
        return f"teacher {cfg.teacher_path} changed after this run ({', '.join(changed)})" if changed else ""
    ckpt = Path(cfg.teacher) / rundir.BEST if cfg.teacher else None
    if ckpt is not None and ckpt.is_file() and ckpt.stat().st_mtime > t:
        return f"teacher {cfg.teacher} was trained again after this run"
    return ""


def _recorded_teacher_files(summary: Path) -> Optional[Dict[str, str]]:
    """``teacher_source.files`` of a run's ``summary.json`` (``None``: not recorded, or unreadable)."""
    try:
        files = (json.loads(Path(summary).read_text()).get("teacher_source") or {}).get("files")
    except (OSError, ValueError, AttributeError):
        return None
    return files if isinstance(files, dict) else None


def config_diff(path: Path, cfg: DistillConfig, data: Path) -> str:
    """What differs between a run's recorded ``config.yaml`` and ``cfg`` (``""`` when they match)."""
    try:
        doc = load_yaml(Path(path)) or {}
    except MedkdError:
        return f"{path} unreadable"
    if not isinstance(doc, dict):
        return f"{path} malformed"
    try:
        mine, theirs = identity(to_dict(cfg)), identity(doc)
    except MedkdError as e:
        return f"{path} malformed ({e})"
    diffs = [f"{k}: {short_repr(theirs.get(k))} -> {short_repr(v)}" for k, v in mine.items() if theirs.get(k) != v]
    if doc.get("data") and str(Path(doc["data"]).resolve()) != str(Path(data).resolve()):
        diffs.append(f"data: {doc['data']} -> {Path(data).resolve()}")
    teacher = doc.get("teacher") or doc.get("teacher_probs")
    if cfg.uses_teacher and teacher and str(Path(teacher).resolve()) != str(Path(cfg.teacher_path).resolve()):
        diffs.append(f"teacher: {teacher} -> {cfg.teacher_path}")
    return "; ".join(diffs)


def eval_problem(doc: Any) -> str:
    """What keeps an ``eval-test.json`` document from being an evaluate result the report can use (``""``: nothing).

    The report reads the top-level metrics, ``pooled`` and ``per_case``; a document without them would silently
    drop its seed from the row.
    """
    if not isinstance(doc, dict):
        return f"not an evaluate result (a JSON {type(doc).__name__}, expected an object)"
    missing = [k for k in ("split", "data", *METRICS, "pooled", "per_case") if k not in doc]
    if missing:
        return f"not an evaluate result (no {', '.join(missing)})"
    cases = doc["per_case"]
    if not isinstance(cases, list) or not cases or not all(isinstance(c, dict) and "id" in c for c in cases):
        return "not an evaluate result (per_case is not a list of cases with an id)"
    return ""


def eval_state(run: Path, data: Path) -> Tuple[bool, str]:
    """Whether ``RUN/eval-test.json`` can be used as it is (exists, is newer than ``best.pt``, was computed on
    ``data`` and is a well-formed result), and, when it exists but is damaged, one line saying why (else ``""``)."""
    ev, best = rundir.eval_json(run, SPLIT), Path(run) / rundir.BEST
    if not ev.is_file():
        return False, ""
    if best.is_file() and ev.stat().st_mtime < best.stat().st_mtime:
        return False, ""
    try:
        doc = json.loads(ev.read_text())
    except (OSError, ValueError) as e:
        return False, f"{ev}: unreadable ({type(e).__name__}: {' '.join(str(e).split())[:120]})"
    problem = eval_problem(doc)
    if problem:
        return False, f"{ev}: {problem}"
    return str(doc.get("data")) == str(Path(data).resolve()) and doc.get("split") == SPLIT, ""


def eval_is_fresh(run: Path, data: Path) -> bool:
    """``RUN/eval-test.json`` exists, is newer than ``best.pt``, was computed on ``data`` and is well formed."""
    return eval_state(run, data)[0]
