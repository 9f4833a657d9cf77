"""Finding cases in a source folder.

Two layouts are accepted:

* **MSD** (Medical Segmentation Decathlon): ``SOURCE/dataset.json`` with a ``training`` list of
  ``{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}``; the modality and label values
  come from ``dataset.json`` (``modality``, ``labels``).
* **Folder of cases**: every ``<id>.nii[.gz]`` file or ``<id>/`` DICOM series folder in SOURCE is an image;
  its label is ``<id>_label.nii[.gz]`` beside it (pairing rule). Files ending in ``_label`` are labels, never images.
  Hidden entries are ignored.

Case ids (file names without the NIfTI suffix) become file names of the prepared dataset, so they are checked
(:func:`medkd.rundir.check_case_id`); ``dataset.json`` entries must lie inside SOURCE unless ``allow_outside``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Set

from medkd.data.io import NIFTI_SUFFIXES, strip_nifti_suffix
from medkd.errors import DataError
from medkd.rundir import check_case_id

LABEL_SUFFIX = "_label"


@dataclass
class CaseSource:
    """One case to preprocess."""

    id: str
    image: Path
    label: Optional[Path]
    modality: Optional[str] = None
    label_values: Set[int] = field(default_factory=lambda: {0, 1})
    layout: str = "folder"  # "folder" | "msd"


def discover(source: Path, allow_outside: bool = False) -> List[CaseSource]:
    """List the cases in ``source`` (MSD layout or folder of cases).

    Args:
        source: the source folder.
        allow_outside: accept ``dataset.json`` entries outside ``source`` (absolute, or leading out with ``..``).

    Raises:
        DataError: the folder does not exist, ``dataset.json`` is unreadable or lists a file outside ``source``,
            a case id cannot name a file, or no case was found.
    """
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: not a folder")
    if (source / "dataset.json").is_file():
        return _discover_msd(source, allow_outside)
    return _discover_folder(source)


def _entry_path(source: Path, rel: str, where: str, allow_outside: bool) -> Path:
    """``source / rel`` for a ``dataset.json`` entry, refused when ``rel`` leads outside ``source`` (absolute, or
    out through ``..``; judged on the text, so links placed inside SOURCE still work) unless ``allow_outside``."""
    if not allow_outside and (os.path.isabs(rel) or os.path.normpath(rel).split(os.sep)[0] == os.pardir):
        raise DataError(f"{where} {_short(rel, 100)} lies outside {source} (refused; --allow-outside reads files "
                        f"anywhere)")
    return source / rel


def _discover_msd(source: Path, allow_outside: bool = False) -> List[CaseSource]:
    path = source / "dataset.json"
    try:
        meta = json.loads(path.read_text())
        training = meta["training"] if isinstance(meta, dict) else None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a valid MSD dataset.json ({type(e).__name__}: {e})") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise DataError(f"{path}: not a valid MSD dataset.json (nested too deeply)") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not a valid MSD dataset.json (expected a JSON object)")
    modality = None
    mod = meta.get("modality") or {}
    if isinstance(mod, dict) and mod:
        modality = str(mod.get("0", next(iter(mod.values())))).upper()
    labels = meta.get("labels") or {"0": "background", "1": "foreground"}
    try:
        label_values = {int(k) for k in labels}
    except (ValueError, TypeError):
        raise DataError(f"{path}: 'labels' keys must be integers") from None
    if not isinstance(training, list):
        raise DataError(f"{path}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} entries")
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not entry["image"]:
            raise DataError(
                f"{path}: training entry {i} must be {{\"image\": \"./imagesTr/<id>.nii.gz\", "
                f"\"label\": \"./labelsTr/<id>.nii.gz\"}}, got {_short(entry)}"
            )
        where = f"{path}: training entry {i}"
        img = _entry_path(source, entry["image"], f"{where} image", allow_outside)
        lbl = _entry_path(source, str(entry["label"]), f"{where} label", allow_outside) if entry.get("label") else None
        cid = check_case_id(strip_nifti_suffix(Path(entry["image"]).name), where)
        cases.append(CaseSource(cid, img, lbl, modality, label_values, layout="msd"))
    if not cases:
        raise DataError(f"{path}: no training cases listed")
    return cases


def _discover_folder(source: Path) -> List[CaseSource]:
    cases = []
    for p in sorted(source.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir():
            cid = p.name
        elif p.name.lower().endswith(NIFTI_SUFFIXES):
            cid = strip_nifti_suffix(p.name)
            if cid.endswith(LABEL_SUFFIX):
                continue
        else:
            continue
        check_case_id(cid, source)  # (not p: the name itself may hold a newline)
        label = None
        for suf in NIFTI_SUFFIXES:
            cand = source / f"{cid}{LABEL_SUFFIX}{suf}"
            if cand.is_file():
                label = cand
                break
        cases.append(CaseSource(cid, p, label))
    if not cases:
        raise DataError(
            f"{source}: no cases found (expected dataset.json, or <id>.nii.gz / <id>/ DICOM folders "
            f"with <id>_label.nii.gz)"
        )
    return cases


def _short(obj: object, n: int = 60) -> str:
    s = " ".join(repr(obj).split())
    return s if len(s) <= n else s[: n - 3] + "..."
