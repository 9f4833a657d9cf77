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
import os
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch

from medkd.data.prepared import PreparedData


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
        if (self.dir / "filled.npy").is_file():
            self._open("r+")
            self.filled = np.load(self.dir / "filled.npy")

    def _open(self, mode: str, shapes: Dict[str, Tuple[int, ...]] = None) -> None:
        for name in self.names:
            path = self.dir / f"{name}.npy"
            if mode == "w+":
                self.arrays[name] = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16,
                                                              shape=(len(self.rows), *shapes[name]))
            else:
                self.arrays[name] = np.load(path, mmap_mode="r+")

    def row_of(self, cid: str, z: int) -> int:
        return self.rows[(cid, z)]

    def missing(self, keys: Sequence[Tuple[str, int]]) -> List[Tuple[str, int]]:
        return [k for k in keys if not self.filled[self.rows[k]]]

    def fill(self, keys: Sequence[Tuple[str, int]], run_teacher: Callable[[torch.Tensor], Dict[str, torch.Tensor]],
             device: torch.device, batch_size: int = 16) -> int:
        """Run the teacher on the slices in ``keys`` not cached yet. Returns how many slices were computed."""
        todo = self.missing(keys)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            x = torch.from_numpy(np.stack([np.asarray(self.data.image(c)[z], dtype=np.float32) for c, z in chunk]))
            outs = run_teacher(x[:, None].to(device))
            if not self.arrays:
                self.dir.mkdir(parents=True, exist_ok=True)
                self._open("w+", {k: tuple(v.shape[1:]) for k, v in outs.items()})
            rows = np.array([self.rows[k] for k in chunk])
            for name, v in outs.items():
                self.arrays[name][rows] = v.detach().float().cpu().numpy().astype(np.float16)
            self.filled[rows] = True
            self.teacher_slices += len(chunk)
        if todo:
            for a in self.arrays.values():
                a.flush()
            tmp = self.dir / f".filled.{os.getpid()}.npy"
            np.save(tmp, self.filled)
            os.replace(tmp, self.dir / "filled.npy")
        return len(todo)

    def get(self, keys: Sequence[Tuple[str, int]], device: torch.device) -> Dict[str, torch.Tensor]:
        """Cached outputs for ``keys`` as float32 tensors on ``device``."""
        rows = np.array([self.rows[k] for k in keys])
        self.hits += len(keys)
        return {name: torch.from_numpy(np.asarray(a[rows], dtype=np.float32)).to(device)
                for name, a in self.arrays.items()}
