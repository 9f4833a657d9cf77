"""The run-folder contract and the file-writing helpers every module uses (nnU-Net's ``file_path_utilities`` habit).

A run folder ``RUN/`` holds (names defined here, once):

* ``config.yaml``: the fully resolved config (re-usable with ``--config``);
* ``summary.json``: what was trained and how well (``kind``, ``arch``, ``params``, ``best_val_dice``, ...);
* ``history.jsonl``: one line per epoch, every loss term by name;
* ``best.pt`` (model alone, best validation Dice) and ``last.pt`` (everything needed to resume);
* ``distill_heads.pt`` (students: adapters and loss heads beside the model), ``curves.png``;
* ``postprocessing.json``: the postprocessing rule chosen on the validation split;
* ``eval-<split>.json``: the evaluate result of that split (:func:`eval_json`).

A run is trained in ``RUN.partial/`` (:func:`partial_dir`) and moved into place as ``RUN/`` when it finishes
(:func:`finalize_run_dir`), so ``RUN/`` is never half-written; an interrupted or failed run leaves
``RUN.partial/last.pt`` (the last completed epoch) for ``--resume``.

Every file medkd writes goes through :func:`atomic_path` (temp file beside the target, fsync, ``os.replace``:
a crash leaves the old file or the new one, never a torn one), and every output folder is moved into place with
:func:`replace_dir` (an old folder is swapped aside, restored if the move fails, and removed only after success).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

from medkd.errors import DataError, MedkdError, OutputError

CONFIG = "config.yaml"
SUMMARY = "summary.json"
HISTORY = "history.jsonl"
BEST = "best.pt"
LAST = "last.pt"
HEADS = "distill_heads.pt"
CURVES = "curves.png"
POSTPROCESSING = "postprocessing.json"  # the connected-component rule chosen on val (medkd.postprocess)
PARTIAL_SUFFIX = ".partial"
CHECKPOINTS = ("best", "last")


def eval_json(run: Path, split: str) -> Path:
    """``RUN/eval-<split>.json``: the saved evaluate result of ``split``."""
    return Path(run) / f"eval-{split}.json"


def partial_dir(run: Path) -> Path:
    """``RUN.partial``: the folder a run is trained in until it finishes."""
    run = Path(run)
    return run.with_name(run.name + PARTIAL_SUFFIX)


def checkpoint_path(run: Path, which: str = "best") -> Path:
    """``RUN/best.pt`` or ``RUN/last.pt`` (not checked)."""
    if which not in CHECKPOINTS:
        raise ValueError(f"which must be one of {CHECKPOINTS}, got {which!r}")
    return Path(run) / (BEST if which == "best" else LAST)


# ------------------------------------------------------------------------------------------------ atomic writes


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    """The SHA-256 of a file's bytes (hex), read in chunks: cache keys, export provenance, teacher records."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def _host_tag() -> str:
    """6 hex digits naming this host in temp names (a pid alone means nothing on a shared file system)."""
    import hashlib
    import socket

    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _temp_name(path: Path, kind: str) -> Path:
    """A hidden, unique sibling of ``path`` that keeps its extension (``.nii.gz`` and ``.npy`` savers need it):
    ``.NAME.<kind>-<pid>-<random>@<host tag><ext>``, so :func:`clean_stale_temps` can tell whose it is."""
    ext = ".nii.gz" if path.name.endswith(".nii.gz") else path.suffix
    stem = path.name[: len(path.name) - len(ext)] if ext else path.name
    return path.with_name(f".{stem}.{kind}-{os.getpid()}-{secrets.token_hex(3)}@{_host_tag()}{ext}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temp path beside ``path``; write it inside the ``with``; on success it is fsynced and moved onto
    ``path`` with ``os.replace``. On any error the temp file is removed and ``path`` is left as it was.

    Raises:
        OutputError: the file cannot be written (``<path>: cannot write (<reason>)``: disk full, file too large,
            I/O error, permission): never a bad input.
    """
    path = Path(path)
    tmp = _temp_name(path, "tmp")
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise OutputError(f"{path}: cannot write ({e.strerror or e})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


_TEMP_RE = re.compile(r"^\.(?P<stem>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)(?:-[0-9a-f]+)?(?:@(?P<host>[0-9a-f]{6}))?"
                      r"(?P<ext>\.nii\.gz|\.[A-Za-z0-9]+)?$")


def clean_stale_temps(folder: Path, stem: Optional[str] = None) -> List[str]:
    """Remove what killed medkd processes left in ``folder``: temp files/folders (``.NAME.tmp-PID-…``) and folders
    set aside by :func:`replace_dir` (``.NAME.old-PID-…``) whose process no longer runs on this host.

    An ``.old-`` folder whose original is missing (killed between the two renames of :func:`replace_dir`) is put
    back instead of removed. Entries of running processes, and of processes on another host (the host tag in the
    name differs: their pid cannot be checked from here), are left alone and named. With ``stem`` only the
    temps of ``folder/stem`` are considered (e.g. a dataset folder's siblings), else every temp in ``folder``.

    Returns:
        One line per entry handled (for the command's log); nothing is raised.
    """
    from medkd.claim import pid_alive

    folder, notes = Path(folder), []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return notes
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or (stem is not None and m["stem"] != stem):
            continue
        pid = int(m["pid"])
        if m["host"] and m["host"] != _host_tag():
            notes.append(f"{entry}: temp of process {pid} on another host; left alone")
            continue
        if pid == os.getpid():
            continue
        if pid_alive(pid):
            notes.append(f"{entry}: temp of process {pid}, which is still running; left alone")
            continue
        original = folder / f"{m['stem']}{m['ext'] or ''}"
        try:
            if m["kind"] == "old" and not (original.exists() or original.is_symlink()):
                os.replace(entry, original)
                notes.append(f"{original}: restored from {entry.name} (left by killed process {pid})")
                continue
            size = _size_mb(entry)
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            notes.append(f"{entry}: removed ({size:.1f} MB left by process {pid}, which no longer runs)")
        except OSError as e:
            notes.append(f"{entry}: stale temp of process {pid}, cannot remove ({e.strerror or e})")
    return notes


def _size_mb(path: Path) -> float:
    if not path.is_dir():
        return path.lstat().st_size / 1e6
    return sum(p.lstat().st_size for p in path.rglob("*")) / 1e6


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, doc: Any, indent: int = 2) -> None:
    """Write strict JSON (no NaN/inf) to ``path`` atomically."""
    write_text(path, json.dumps(doc, indent=indent, allow_nan=False) + "\n")


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` atomically: a crash leaves the old checkpoint.

    The archive is built in memory and written with Python's ``write()``, so a full disk or a file-size limit is
    an ``OSError`` with its errno (torch's own writer reports only "unexpected pos ...").
    """
    import io

    import torch

    with atomic_path(path) as tmp:
        buf = io.BytesIO()
        torch.save(obj, buf)
        with open(tmp, "wb") as f:
            f.write(buf.getbuffer())


def temp_dir_beside(dest: Path) -> Path:
    """A new, empty, hidden folder beside ``dest`` (parents created) to build an output in before
    :func:`replace_dir` moves it into place."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_name(dest, "tmp")
    tmp.mkdir()
    return tmp


def replace_dir(src: Path, dest: Path) -> None:
    """Move the finished folder ``src`` into place as ``dest`` (same parent folder).

    An existing ``dest`` (folder, file or link) is first renamed aside; if moving ``src`` then fails it is put
    back, so ``dest`` is never lost; it is deleted only after ``src`` is in place.
    """
    src, dest = Path(src), Path(dest)
    if not (dest.exists() or dest.is_symlink()):
        os.replace(src, dest)
        return
    old = _temp_name(dest, "old")
    os.replace(dest, old)
    try:
        os.replace(src, dest)
    except OSError:
        os.replace(old, dest)  # put the previous folder back
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


# ----------------------------------------------------------------------------------------- names from data


def check_case_id(cid: Any, where: Any) -> str:
    """``cid`` if it can name a case's files: a non-empty string without path separators, ``..`` or control
    characters (ids come from file names, ``dataset.json`` and ``manifest.json``, and become file names).

    Raises:
        DataError: ``<where>: case id <id> cannot name a file (<reason>)``.
    """
    import unicodedata

    if not isinstance(cid, str) or not cid:
        reason = "empty" if cid == "" else f"a {type(cid).__name__}, not a string"
    elif "/" in cid or "\\" in cid or (os.altsep and os.altsep in cid):
        reason = "it holds a path separator"
    elif ".." in cid:
        reason = "it holds '..'"
    elif any(unicodedata.category(ch) == "Cc" for ch in cid):
        reason = "it holds a control character"
    else:
        return cid
    raise DataError(f"{where}: case id {ascii(cid)[:80]} cannot name a file ({reason})")


def confined(folder: Path, name: str) -> Path:
    """``folder / name``, checked to stay inside ``folder``: ``name`` is one plain file name (no separator, not
    ``.``/``..``) and the resolved path (links followed) lies in the resolved ``folder``. Every file named after
    data (a case id, a tap name) is joined through this.

    Raises:
        MedkdError: ``<folder>: <name> would lead outside the folder``.
    """
    folder = Path(folder)
    path = folder / name
    plain = name not in ("", ".", "..") and "/" not in name and "\\" not in name and "\0" not in name
    if not plain or (os.altsep and os.altsep in name) or not path.resolve().is_relative_to(folder.resolve()):
        raise MedkdError(f"{folder}: {ascii(name)[:80]} would lead outside the folder (refused)")
    return path


def case_file(folder: Path, case_id: str, suffixes) -> Optional[Path]:
    """The first of ``folder/<case_id><suffix>`` (``suffixes`` in order) that is a file, each joined through
    :func:`confined`; ``None`` when there is none (the caller names what it expected).

    Raises:
        MedkdError: ``case_id`` would lead outside ``folder``.
    """
    for suffix in suffixes:
        path = confined(Path(folder), f"{case_id}{suffix}")
        if path.is_file():
            return path
    return None


# ------------------------------------------------------------------------------------------------- run folders


def prepare_run_dir(run: Path, resume: bool, overwrite: bool) -> Optional[Path]:
    """Create/choose the working folder ``RUN.partial``. Returns the checkpoint to resume from (or None).

    Raises:
        MedkdError: RUN (or an interrupted RUN.partial) exists without --overwrite/--resume; --resume with
            nothing to resume.
    """
    run = Path(run)
    work = partial_dir(run)
    if resume:
        if (work / LAST).is_file():
            return work / LAST
        if (run / LAST).is_file():
            if work.exists():
                shutil.rmtree(work)
            shutil.copytree(run, work)
            return work / LAST
        raise MedkdError(f"{run}: nothing to resume (no {LAST} in {run} or {work})")
    if run.exists() and not overwrite:
        raise MedkdError(f"{run}: already exists (use --overwrite to replace it or --resume to continue)")
    if (work / LAST).is_file() and not overwrite:  # never throw away an interrupted run's epochs silently
        raise MedkdError(f"{work}: holds an interrupted run (use --resume to continue it or --overwrite to start again)")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return None


def finalize_run_dir(run: Path) -> None:
    """Move ``RUN.partial`` into place as ``RUN`` (replacing an old RUN only now, after success)."""
    replace_dir(partial_dir(run), Path(run))


def read_summary(run: Path) -> Dict[str, Any]:
    """``RUN/summary.json`` as a dict (``{}`` when missing or unreadable)."""
    path = Path(run) / SUMMARY
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return doc if isinstance(doc, dict) else {}


def require_run_dir(run: Path, what: str = "run folder") -> Path:
    """``run`` if it is a folder.

    Raises:
        MedkdError: ``<run>: <what> does not exist`` (noting an unfinished ``RUN.partial``), or is not a folder.
    """
    run = Path(run)
    if not run.exists():
        hint = f" (training not finished: {partial_dir(run)} exists)" if partial_dir(run).is_dir() else ""
        raise MedkdError(f"{run}: {what} does not exist{hint}")
    if not run.is_dir():
        raise MedkdError(f"{run}: not a {what} (a file)")
    return run


def run_checkpoint(run: Path, which: str = "best") -> Path:
    """The checkpoint file a run's model is loaded from: ``RUN/{which}.pt``, else ``RUN/last.pt``.

    Raises:
        MedkdError: neither exists.
    """
    run = Path(run)
    for path in (checkpoint_path(run, which), run / LAST):
        if path.is_file():
            return path
    raise MedkdError(f"{run}: no {which}.pt checkpoint (is this a finished medkd run?)")
