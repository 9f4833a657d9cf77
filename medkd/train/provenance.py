"""What a run was made from (data and options), recorded in its checkpoints, and what ``--resume`` compares."""

from __future__ import annotations

from typing import Any, Dict, Sequence

from medkd.config import resume_differences
from medkd.data.prepared import PreparedData


def data_record(data: PreparedData, train_ids: Sequence[str], val_ids: Sequence[str]) -> Dict[str, Any]:
    """What a run was trained on, saved in every checkpoint (``ckpt["data"]``) and, in part, in ``summary.json``:
    the prepared folder, its fingerprint and settings, the source it was prepared from, the exact training and
    validation case ids (``evaluate`` refuses to score a run on its own training cases) and the training data's
    profile (``predict`` compares inputs with it)."""
    return {"root": str(data.root.resolve()), "fingerprint": data.fingerprint(), "size": data.size,
            "settings": data.settings, "source": data.manifest.get("source"),
            "train_cases": sorted(train_ids), "val_cases": sorted(val_ids), "profile": data.profile(sorted(train_ids))}


def resume_mismatch(ck: Dict[str, Any], cls: type, config_doc: Dict[str, Any], data_doc: Dict[str, Any]) -> str:
    """What differs between a partial run's checkpoint and the run being resumed (``""`` when nothing does): the
    options :func:`medkd.config.resume_differences` holds fixed, and the data's fingerprint."""
    diffs = resume_differences(cls, ck.get("config") or {}, config_doc)
    old_data = ck.get("data") or {}
    if old_data.get("fingerprint") and old_data["fingerprint"] != data_doc["fingerprint"]:
        diffs.append(f"data {old_data.get('root')} (fingerprint {old_data['fingerprint']}) there, "
                     f"{data_doc['root']} (fingerprint {data_doc['fingerprint']}) now")
    return "; ".join(diffs)
