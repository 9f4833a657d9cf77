"""Teacher-output cache.

The teacher is frozen, so without random augmentation its outputs at the tapped scales are fixed per slice.
They are computed once, stored as fp16 ``.npy`` memmaps on disk and reused every epoch and across runs
(``medkd ablate`` relies on this: the teacher runs over the data once per ablation, not once per run).

Location: ``TEACHER_RUN/cache/<key>/`` with one array per output (``enc.npy``, ``bottleneck.npy``, ``dec.npy``,
``logits.npy``), ``rows.json`` (slice -> row) and ``filled.npy`` (which rows hold data). Rows are filled on demand,
so a 50 % student fills only its half. The key hashes the teacher checkpoint's bytes, the prepared dataset's
manifest, the tap paths and the input channels: change any of them and a new cache is used.
With augmentation on (``--augment``) the teacher runs live every step and no cache is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from medkd.data.prepared import PreparedData
from medkd.locks import exclusive_lock
from medkd.rundir import atomic_path


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


class TeacherCache:
    """fp16 on-disk cache of teacher outputs, one row per training slice.

    Args:
        root: the cache root (``TEACHER_RUN/cache``).
        checkpoint: the teacher checkpoint file (its bytes are part of the key).
        data: the prepared dataset (its manifest is part of the key).
        taps: output name -> teacher module path (part of the key).
        in_channels: model input channels (part of the key).
        case_ids: the cases whose slices get rows (the whole train split, so every fraction shares one cache).
    """

    def __init__(self, root: Path, checkpoint: Path, data: PreparedData, taps: Dict[str, str], in_channels: int,
                 case_ids: Sequence[str]):
        self.data = data
        self.taps = dict(taps)
        key_src = json.dumps({"ckpt": file_hash(checkpoint), "data": data.fingerprint(), "taps": taps,
                              "in_channels": in_channels}, sort_keys=True)
        self.key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.names = list(taps) + ["logits"]
        self.rows: Dict[Tuple[str, int], int] = {}
        for cid in sorted(case_ids):
            for z in range(int(data.case(cid)["prepared_shape"][0])):
                self.rows[(cid, z)] = len(self.rows)
        self.arrays: Dict[str, np.ndarray] = {}
        self.filled = np.zeros(len(self.rows), dtype=bool)
        self.hits = 0
        self.teacher_slices = 0  # slices the teacher was run on to fill the cache
        self._reload()

    def _reload(self) -> None:
        """Re-read which rows are filled (another process may have filled some) and open the arrays."""
        if (self.dir / "filled.npy").is_file():
            self.filled = np.load(self.dir / "filled.npy")
            if not self.arrays:
                self.arrays = {name: np.load(self.dir / f"{name}.npy", mmap_mode="r+") for name in self.names}

    def _create(self, shapes: Dict[str, Tuple[int, ...]]) -> None:
        """Create the arrays, each written to a temp file and moved into place (never truncating a published one).

        Called with the lock held and only when no ``filled.npy`` exists yet.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        for name in self.names:
            with atomic_path(self.dir / f"{name}.npy") as tmp:
                a = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(len(self.rows), *shapes[name]))
                a.flush()
                del a
        self.arrays = {name: np.load(self.dir / f"{name}.npy", mmap_mode="r+") for name in self.names}

    def row_of(self, cid: str, z: int) -> int:
        return self.rows[(cid, z)]

    def missing(self, keys: Sequence[Tuple[str, int]]) -> List[Tuple[str, int]]:
        return [k for k in keys if not self.filled[self.rows[k]]]

    def fill(self, keys: Sequence[Tuple[str, int]], run_teacher: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
             device: torch.device, batch_size: int = 16) -> int:
        """Run the teacher on the slices in ``keys`` not cached yet. Returns how many slices were computed.

        Concurrency-safe: the whole fill holds the cache's lock (:func:`medkd.locks.exclusive_lock`), re-reads
        which rows other processes filled meanwhile, creates missing arrays atomically and publishes the filled
        rows (``filled.npy``, temp file + ``os.replace``) only after their data is flushed. A reader therefore
        never sees a truncated array or a row marked filled before its data; a fill killed midway leaves its
        rows unmarked (recomputed by the next run) and no stale lock (the kernel drops it with the process).
        """
        if not self.missing(keys):
            return 0
        with exclusive_lock(self.dir.parent / f".{self.key}.lock"):
            self._reload()
            todo = self.missing(keys)
            for i in range(0, len(todo), batch_size):
                chunk = todo[i : i + batch_size]
                x = torch.from_numpy(np.stack([np.asarray(self.data.image(c)[z], dtype=np.float32) for c, z in chunk]))
                outs = run_teacher(x[:, None].to(device))
                if not self.arrays:
                    self._create({k: tuple(v.shape[1:]) for k, v in outs.items()})
                rows = np.array([self.rows[k] for k in chunk])
                for name, v in outs.items():
                    self.arrays[name][rows] = v.detach().float().cpu().numpy().astype(np.float16)
                self.filled[rows] = True
                self.teacher_slices += len(chunk)
            if todo:
                for a in self.arrays.values():
                    a.flush()
                with atomic_path(self.dir / "filled.npy") as tmp:
                    np.save(tmp, self.filled)
        return len(todo)

    def get(self, keys: Sequence[Tuple[str, int]], device: torch.device) -> Dict[str, torch.Tensor]:
        """Cached outputs for ``keys`` as float32 tensors on ``device``."""
        rows = np.array([self.rows[k] for k in keys])
        self.hits += len(keys)
        return {name: torch.from_numpy(np.asarray(a[rows], dtype=np.float32)).to(device)
                for name, a in self.arrays.items()}
