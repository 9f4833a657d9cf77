"""On-disk store of a per-case teacher's targets (a 3-D nnU-Net: ``LoadedTeacher.case_probs``).

A per-case teacher's probabilities cost a whole pipeline per case (nnU-Net's preprocessing and sliding window) and
never change, so the ``disk`` mode computes each case once and keeps its foreground logits on the prepared grid:
``<cache_root>/cases-<key>/<case>.npy``, fp16 ``(n_slices, S, S)``, exactly the values
:class:`~medkd.distill.targets.ProbTargets` serves (``prob_logits`` of the probabilities). ``cache_root`` is the
teacher's external cache (``DATA/teacher-cache/<kind>-<sha12>/``, keyed by its files and details: another fold,
label or checkpoint never reads it); the key adds the prepared dataset's manifest, the size and the format.

Filled on demand, case by case, under an exclusive lock (two processes, e.g. ablation shards, may fill at once: the
second finds the first's cases done); each file is written through a temp file + ``os.replace``, so a published
case is whole. Every read goes through :func:`medkd.data.arrays.open_array` (header, shape, dtype, size): a damaged
file (truncated, another shape) is never read; a ``note:`` names it and it is computed again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch

from medkd.data.arrays import ArrayError, open_array
from medkd.data.prepared import PreparedData
from medkd.distill.cache import STORE_DTYPE
from medkd.distill.targets import TeacherTargets, Targets, prob_logits
from medkd.errors import DataError
from medkd.locks import exclusive_lock
from medkd.rundir import atomic_path, confined

FORMAT = "case-logits-v1"


class CaseStore:
    """fp16 per-case logits of a per-case teacher, one ``.npy`` file per case.

    Args:
        root: the teacher's external cache root (:attr:`~medkd.teachers.base.LoadedTeacher.cache_root`).
        data: the prepared dataset (its manifest and size are part of the key).
        log: called with one line (no ``note:`` prefix) per damaged file found.
    """

    def __init__(self, root: Path, data: PreparedData, log: Optional[Callable[[str], None]] = None):
        key_src = json.dumps({"data": data.fingerprint(), "size": data.size, "format": FORMAT,
                              "dtype": np.dtype(STORE_DTYPE).name}, sort_keys=True)
        self.key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self.dir = Path(root) / f"cases-{self.key}"
        self.data = data
        self.log = log
        self.notes: List[str] = []
        self.computed = 0  # cases this process ran the teacher on

    def path(self, cid: str) -> Path:
        return confined(self.dir, f"{cid}.npy")  # case ids name files: kept inside the store

    def shape(self, cid: str):
        """``(n_slices, S, S)`` of the prepared case."""
        return tuple(self.data.expected_shape(cid, "lbl"))

    def case_bytes(self, cid: str) -> int:
        return int(np.prod(self.shape(cid))) * np.dtype(STORE_DTYPE).itemsize

    def open(self, cid: str) -> Optional[np.memmap]:
        """The case's logits (read-only memmap), or ``None`` when missing or damaged (a note names a damaged file)."""
        path = self.path(cid)
        if not path.is_file():
            return None
        try:
            return open_array(path, self.shape(cid), STORE_DTYPE, "r")
        except ArrayError as e:
            note = f"{e}; damaged teacher-store case discarded, computed again"
            if note not in self.notes:
                self.notes.append(note)
                if self.log is not None:
                    self.log(note)
            return None

    def missing(self, cids: Sequence[str]) -> List[str]:
        """Cases not stored yet (or damaged)."""
        return [c for c in cids if self.open(c) is None]

    def new_bytes(self, cids: Sequence[str]) -> int:
        """Bytes the store would add for ``cids``."""
        return sum(self.case_bytes(c) for c in self.missing(cids))

    def stored_bytes(self, cids: Sequence[str]) -> int:
        """Bytes of ``cids``' files once stored."""
        return sum(self.case_bytes(c) for c in cids)

    def fill(self, cids: Sequence[str], case_probs: Callable[[str], np.ndarray],
             on_case: Optional[Callable[[str], None]] = None) -> int:
        """Compute and store every case of ``cids`` not stored yet. Returns how many were computed.

        Raises:
            DataError: a case's probabilities are not ``(n_slices, S, S)`` of the prepared case (one line naming it).
        """
        if not self.missing(cids):
            return 0
        self.dir.mkdir(parents=True, exist_ok=True)
        n = 0
        waiting = (lambda who: self.log(f"teacher store {self.key} is being filled by {who}; waiting")) \
            if self.log is not None else None
        with exclusive_lock(self.dir.parent / f".cases-{self.key}.lock", on_wait=waiting):
            for cid in cids:
                if self.open(cid) is not None:  # stored meanwhile by another process
                    continue
                if on_case is not None:
                    on_case(cid)
                p = np.asarray(case_probs(cid))
                self.data.check_case_probs(cid, p)
                logits = prob_logits(torch.from_numpy(np.ascontiguousarray(p))).numpy()
                with atomic_path(self.path(cid)) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, logits)
                n += 1
        self.computed += n
        return n


class StoreTargets(TeacherTargets):
    """The ``disk`` mode of a per-case teacher: rows of :class:`CaseStore` files, read per batch (row = dataset
    index of ``train_set``); the same fp16 logits :class:`~medkd.distill.targets.ProbTargets` holds in memory."""

    mode = "disk"

    def __init__(self, store: CaseStore, train_set):
        cids = sorted({cid for cid, _ in train_set.index})
        self.arrays: Dict[str, np.memmap] = {}
        for cid in cids:
            a = store.open(cid)
            if a is None:  # damaged after the fill: one line naming it
                raise DataError(f"{store.path(cid)}: teacher-store case unreadable after it was written")
            self.arrays[cid] = a
        self.index = list(train_set.index)

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Targets:
        rows = np.stack([self.arrays[cid][z] for cid, z in (self.index[int(i)] for i in index)])
        return {"logits": torch.from_numpy(rows[:, None]).to(x.device, non_blocking=True)}  # (B, 1, H, W)
