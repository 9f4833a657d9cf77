"""On-disk teacher-output cache (the ``disk`` mode of :mod:`medkd.distill.teacher_outputs`).

The teacher is frozen, so without random augmentation what the losses read of it is fixed per slice. Those
*targets* (one array per item: e.g. ``dec.gap`` and ``dec.proto`` for a contrastive loss that pools, ``dec.map`` for
one that compares maps, ``logits`` for PMD) are stored as fp16 ``.npy`` memmaps, one row per training slice, and
reused every epoch and across runs.

Location: ``TEACHER_RUN/cache/<key>/`` where the key hashes the teacher checkpoint's bytes, the prepared dataset's
manifest, the input channels and the storage format; inside, each item is ``<item>-<id>.npy`` plus
``<item>-<id>.filled.npy`` (which rows hold data), where ``<id>`` hashes what the item stores (tap path, the loss's
view of it, per-slice shape). Runs that read the same items share them (an ablation whose cells all use PMD shares
``logits``); a run that needs another view adds its own item beside them. Rows cover the whole training split and
are filled on demand, so a 50 % student fills only its half.

Concurrency: fills hold an exclusive lock (:func:`medkd.locks.exclusive_lock`, released by the kernel if the holder
dies), re-read what others filled, create arrays through a temp file + ``os.replace`` (a published array is never
truncated) and mark rows filled only after their data is flushed. Readers only read rows marked filled.
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
from medkd.rundir import atomic_path, confined, write_json

FORMAT = "items-v2"
STORE_DTYPE = np.float16  # every mode (live included) rounds targets to this: same numbers whichever mode runs
TORCH_STORE_DTYPE = torch.float16

Key = Tuple[str, int]  # (case id, slice index)
ItemSpec = Tuple[str, Tuple[int, ...]]  # (what the item stores, per-slice shape)


def file_hash(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def item_bytes(specs: Dict[str, ItemSpec], n_rows: int) -> int:
    """Bytes of ``n_rows`` rows of every item."""
    return int(sum(n_rows * int(np.prod(shape)) * np.dtype(STORE_DTYPE).itemsize for _, shape in specs.values()))


class TeacherCache:
    """fp16 on-disk cache of teacher targets, one row per training slice per item.

    Args:
        root: the cache root (``TEACHER_RUN/cache``).
        checkpoint: the teacher checkpoint file (its bytes are part of the key).
        data: the prepared dataset (its manifest is part of the key).
        in_channels: model input channels (part of the key).
        case_ids: the cases whose slices get rows (the whole train split, so every fraction shares one cache).
        items: item name -> (identity of what it stores, per-slice shape); the identity is part of the file name.
    """

    def __init__(self, root: Path, checkpoint: Path, data: PreparedData, in_channels: int,
                 case_ids: Sequence[str], items: Dict[str, ItemSpec]):
        key_src = json.dumps({"ckpt": file_hash(checkpoint), "data": data.fingerprint(), "in_channels": in_channels,
                              "format": FORMAT, "dtype": np.dtype(STORE_DTYPE).name}, sort_keys=True)
        self.key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
        self.dir = Path(root) / self.key
        self.items = dict(items)
        self.stems = {name: f"{name}-{hashlib.sha256(json.dumps([spec, list(shape)]).encode()).hexdigest()[:12]}"
                      for name, (spec, shape) in self.items.items()}
        self.rows: Dict[Key, int] = {}
        for cid in sorted(case_ids):
            for z in range(int(data.case(cid)["prepared_shape"][0])):
                self.rows[(cid, z)] = len(self.rows)
        self.arrays: Dict[str, np.ndarray] = {}
        self.filled = {name: np.zeros(len(self.rows), dtype=bool) for name in self.items}
        self.hits = 0
        self.teacher_slices = 0  # slices the teacher was run on to fill the cache
        self._reload()

    # ---------------------------------------------------------------------------------------------- layout
    def _path(self, name: str, suffix: str = ".npy") -> Path:
        return confined(self.dir, f"{self.stems[name]}{suffix}")  # item names hold tap names the user chose

    def _reload(self) -> None:
        """Re-read which rows are filled (another process may have filled some) and open published arrays."""
        for name in self.items:
            f = self._path(name, ".filled.npy")
            if f.is_file():
                self.filled[name] = np.load(f)
                if name not in self.arrays:
                    self.arrays[name] = np.load(self._path(name), mmap_mode="r+")

    def _create(self, name: str) -> None:
        """Create an item's array through a temp file + ``os.replace`` (lock held, item not published yet)."""
        if self._path(name).is_file():  # created by a fill that died before publishing rows: reuse it
            self.arrays[name] = np.load(self._path(name), mmap_mode="r+")
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(name)) as tmp:
            a = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORE_DTYPE, shape=(len(self.rows), *self.items[name][1]))
            a.flush()
            del a
        self.arrays[name] = np.load(self._path(name), mmap_mode="r+")
        write_json(self._path(name, ".json"), {"item": name, "stores": self.items[name][0],
                                               "shape": list(self.items[name][1]),
                                               "dtype": np.dtype(STORE_DTYPE).name, "rows": len(self.rows)})

    # ---------------------------------------------------------------------------------------------- sizes
    def planned_bytes(self) -> int:
        """Bytes of every item's array (existing or not)."""
        return item_bytes(self.items, len(self.rows))

    def new_bytes(self) -> int:
        """Bytes this run would add to the disk: items not created yet."""
        return item_bytes({n: s for n, s in self.items.items() if not self._path(n).is_file()}, len(self.rows))

    # ---------------------------------------------------------------------------------------------- rows
    def missing(self, keys: Sequence[Key]) -> List[Key]:
        """Keys with at least one item not filled yet (as far as this process knows)."""
        return [k for k in keys if not all(f[self.rows[k]] for f in self.filled.values())]

    def fill(self, keys: Sequence[Key], compute: Callable[[List[Key]], Dict[str, torch.Tensor]],
             batch_size: int = 16) -> int:
        """Compute and store the targets of the slices in ``keys`` not cached yet. Returns how many were computed.

        ``compute(chunk)`` returns ``{item: (len(chunk), *shape)}`` for every item. Concurrency-safe (see the
        module docstring): a fill killed midway leaves its rows unmarked (recomputed next time) and no stale lock.
        """
        return fill_together([self], keys, lambda chunk: [compute(chunk)], batch_size)

    def get(self, keys: Sequence[Key], device: torch.device) -> Dict[str, torch.Tensor]:
        """Cached targets for ``keys`` as fp16 tensors on ``device``: ``{item: (len(keys), *shape)}``."""
        rows = np.array([self.rows[k] for k in keys])
        self.hits += len(keys)
        return {name: torch.from_numpy(np.ascontiguousarray(self.arrays[name][rows])).to(device, non_blocking=True)
                for name in self.items}


def fill_together(caches: Sequence[TeacherCache], keys: Sequence[Key],
                  compute: Callable[[List[Key]], List[Dict[str, torch.Tensor]]], batch_size: int = 16) -> int:
    """Fill several caches of one key (e.g. the item sets of an ablation's cells) in one pass of the teacher.

    ``compute(chunk)`` returns one ``{item: (len(chunk), *shape)}`` per cache, in order. Holds the key's lock.
    Returns how many slices were computed.
    """
    assert len({c.dir for c in caches}) == 1, "caches of one key only"
    if not any(c.missing(keys) for c in caches):
        return 0
    first = caches[0]
    with exclusive_lock(first.dir.parent / f".{first.key}.lock"):
        for c in caches:
            c._reload()
        todo = sorted({k for c in caches for k in c.missing(keys)}, key=lambda k: first.rows[k])
        if todo:
            for c in caches:
                for name in c.items:
                    if name not in c.arrays:
                        c._create(name)
        for i in range(0, len(todo), batch_size):
            chunk = todo[i : i + batch_size]
            rows = np.array([first.rows[k] for k in chunk])
            written = set()  # an item two caches share (e.g. ``logits``) is written once
            for c, outs in zip(caches, compute(chunk)):
                for name, v in outs.items():
                    if c.stems[name] in written:
                        continue
                    written.add(c.stems[name])
                    new = ~c.filled[name][rows]  # rows others may already read are never rewritten
                    if new.any():
                        c.arrays[name][rows[new]] = v.detach().cpu().numpy()[new].astype(STORE_DTYPE)
                for name in c.items:
                    c.filled[name][rows] = True
            first.teacher_slices += len(chunk)
        if todo:
            published = set()
            for c in caches:
                for name, a in c.arrays.items():
                    if c.stems[name] in published:
                        continue
                    published.add(c.stems[name])
                    a.flush()
                    with atomic_path(c._path(name, ".filled.npy")) as tmp:
                        np.save(tmp, c.filled[name])
    return len(todo)
