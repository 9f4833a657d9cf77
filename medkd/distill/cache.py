"""On-disk teacher-output cache (the ``disk`` mode of :mod:`medkd.distill.targets`).

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

Integrity: every array is opened through :func:`medkd.data.arrays.open_array`, which checks the ``.npy`` header
(shape, dtype) and the file size against the item's spec before memory-mapping it and never extends a file. A damaged
item (truncated, garbage, another shape, its data or its ``.filled.npy`` missing) is never read: its rows count as
missing, a ``note:`` names the file, and the next fill deletes it (under the lock) and computes it again.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from medkd.data.arrays import ArrayError, load_array, open_array
from medkd.data.prepared import PreparedData
from medkd.locks import exclusive_lock
from medkd.rundir import atomic_path, confined, file_sha256, write_json

FORMAT = "items-v3"  # v3: targets computed in batches of TEACHER_BATCH slices
STORE_DTYPE = np.float16  # every mode (live included) rounds targets to this: same numbers whichever mode runs
TORCH_STORE_DTYPE = torch.float16
#: Slices per teacher forward, in every teacher-output mode (:func:`medkd.distill.targets.in_teacher_batches`).
#: A kernel may round a slice's output differently at another batch size (CPU convolutions do, enough to flip
#: fp16 targets), never because of what the other slices are; so the teacher always
#: sees batches of exactly this many slices, and live, memory and disk targets are the same bits whatever the
#: training batch size or the fill's chunks. Part of the cache key.
TEACHER_BATCH = 8

Key = Tuple[str, int]  # (case id, slice index)
ItemSpec = Tuple[str, Tuple[int, ...]]  # (what the item stores, per-slice shape)


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
        log: called with one line (no ``note:`` prefix) for each damaged item found; the lines are also kept in
            ``notes``.
    """

    def __init__(self, root: Path, checkpoint: Path, data: PreparedData, in_channels: int,
                 case_ids: Sequence[str], items: Dict[str, ItemSpec], log: Optional[Callable[[str], None]] = None):
        key_src = json.dumps({"ckpt": file_sha256(checkpoint), "data": data.fingerprint(), "in_channels": in_channels,
                              "format": FORMAT, "dtype": np.dtype(STORE_DTYPE).name,
                              "teacher_batch": TEACHER_BATCH}, sort_keys=True)
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
        self.teacher_slices = 0  # slices the teacher was run on to fill the cache
        self.log = log
        self.notes: List[str] = []
        self.damaged: Dict[str, str] = {}  # item -> why its files cannot be used (deleted by the next fill)
        self._reload()

    # ---------------------------------------------------------------------------------------------- layout
    def _path(self, name: str, suffix: str = ".npy") -> Path:
        return confined(self.dir, f"{self.stems[name]}{suffix}")  # item names hold tap names the user chose

    def _shape(self, name: str) -> Tuple[int, ...]:
        return (len(self.rows), *self.items[name][1])

    def _open(self, name: str) -> np.memmap:
        """The item's data array, checked against its spec (:func:`~medkd.data.arrays.open_array`)."""
        return open_array(self._path(name), self._shape(name), STORE_DTYPE, "r+")

    def _reload(self, locked: bool = False) -> None:
        """Re-read which rows are filled (another process may have filled some) and open published arrays.

        A damaged item is not used: its rows count as missing and a note names it. With the lock held (``locked``)
        every item is looked at afresh and a damaged one's files are deleted, so that the fill creates it again.
        """
        for name in self.items:
            if locked:
                self.damaged.pop(name, None)
            elif name in self.damaged:
                continue
            f = self._path(name, ".filled.npy")
            if not f.is_file():
                continue
            try:
                # the data before the row marks: marks are published after their data, never before
                array = self.arrays.get(name)
                if array is None:
                    array = self._open(name)
                self.filled[name] = load_array(f, (len(self.rows),), bool)
                self.arrays[name] = array
            except ArrayError as e:
                self._damaged(name, e)
                if locked:
                    self._discard(name)

    def _damaged(self, name: str, e: ArrayError) -> None:
        """Stop using item ``name`` (its rows count as missing) and say so, once per file and reason."""
        self.arrays.pop(name, None)
        self.filled[name] = np.zeros(len(self.rows), dtype=bool)
        self.damaged[name] = str(e)
        note = f"{e}; damaged teacher-cache item discarded, its rows are computed again"
        if note not in self.notes:
            self.notes.append(note)
            if self.log is not None:
                self.log(note)

    def _discard(self, name: str) -> None:
        """Delete a damaged item's files (lock held); :meth:`_create` makes it again."""
        for suffix in (".filled.npy", ".npy", ".json"):
            self._path(name, suffix).unlink(missing_ok=True)

    def _create(self, name: str) -> None:
        """Create an item's array through a temp file + ``os.replace`` (lock held, item not published yet)."""
        if self._path(name).is_file():  # created by a fill that died before publishing rows: reuse it if sound
            try:
                self.arrays[name] = self._open(name)
                return
            except ArrayError as e:
                self._damaged(name, e)
                self._discard(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self._path(name)) as tmp:
            a = np.lib.format.open_memmap(tmp, mode="w+", dtype=STORE_DTYPE, shape=self._shape(name))
            a.flush()
            del a
        self.arrays[name] = self._open(name)
        write_json(self._path(name, ".json"), {"item": name, "stores": self.items[name][0],
                                               "shape": list(self.items[name][1]),
                                               "dtype": np.dtype(STORE_DTYPE).name, "rows": len(self.rows)})

    # ---------------------------------------------------------------------------------------------- sizes
    def planned_bytes(self) -> int:
        """Bytes of every item's array (existing or not)."""
        return item_bytes(self.items, len(self.rows))

    def new_items(self) -> Dict[str, ItemSpec]:
        """The items not created yet (or damaged, to be created again)."""
        return {n: s for n, s in self.items.items() if n in self.damaged or not self._path(n).is_file()}

    def new_bytes(self) -> int:
        """Bytes this run would add to the disk: :meth:`new_items`."""
        return item_bytes(self.new_items(), len(self.rows))

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
            c._reload(locked=True)
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
