"""Reading a prepared dataset (the output of ``medkd preprocess``) without loading it all into memory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset

from medkd.data.arrays import open_array
from medkd.errors import DataError
from medkd.rundir import check_case_id, confined

SPLITS = ("train", "val", "test")
UNLABELLED = -1.0  # mask value of a slice whose label the student may not see (``SliceDataset(labelled_ids=...)``)


def labelled_rows(masks: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: which slices of a ``(B, 1, H, W)`` mask batch carry a label (not filled with ``UNLABELLED``)."""
    return masks.flatten(1).amin(dim=1) != UNLABELLED


def _check_manifest(doc: object, path: Path) -> None:
    """The parts of ``manifest.json`` every reader relies on: a JSON object whose ``settings`` hold the prepared
    ``size`` and whose ``cases`` are objects, each with a ``split`` in :data:`SPLITS`.

    Raises:
        DataError: one line naming ``path`` and the first thing missing or wrong (the case by position and id).
    """
    from medkd.options import short_repr

    if not isinstance(doc, dict):
        raise DataError(f"{path}: invalid manifest (expected a JSON object, got {type(doc).__name__})")
    settings, cases = doc.get("settings"), doc.get("cases")
    if not isinstance(settings, dict):
        raise DataError(f"{path}: invalid manifest ('settings' must be an object)")
    size = settings.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise DataError(f"{path}: invalid manifest (settings.size must be a positive integer, got {short_repr(size)})")
    if not isinstance(cases, list):
        raise DataError(f"{path}: invalid manifest ('cases' must be a list)")
    for i, c in enumerate(cases):
        if not isinstance(c, dict):
            raise DataError(f"{path}: invalid manifest (case {i} must be an object, got {short_repr(c)})")
        if c.get("split") not in SPLITS:
            what = "has no 'split'" if "split" not in c else f"has split {short_repr(c['split'])}"
            raise DataError(f"{path}: invalid manifest (case {i} ({short_repr(c.get('id'), 40)}) {what}; "
                            f"expected one of {', '.join(SPLITS)})")


class PreparedData:
    """A prepared dataset folder: ``manifest.json`` + ``cases/<id>_{img,lbl}.npy``.

    Args:
        root: the folder written by ``medkd preprocess``.

    Raises:
        DataError: no/invalid manifest.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        path = self.root / "manifest.json"
        if not path.is_file():
            raise DataError(f"{self.root}: no manifest.json (is this a folder written by 'medkd preprocess'?)")
        try:
            self.manifest = json.loads(path.read_text())
            _check_manifest(self.manifest, path)
            self.cases: List[dict] = self.manifest["cases"]
            self.settings: dict = self.manifest["settings"]
            self._by_id = {check_case_id(c["id"], path): c for c in self.cases}  # ids name files: no ../
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path}: invalid manifest ({type(e).__name__}: {e})") from None
        except RecursionError:
            raise DataError(f"{path}: invalid manifest (nested too deeply)") from None
        self._cache: Dict[Tuple[str, str], np.ndarray] = {}
        self._fingerprint: Optional[str] = None

    @property
    def size(self) -> int:
        return int(self.settings["size"])

    def case_ids(self, split: str) -> List[str]:
        if split not in SPLITS:
            raise DataError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
        return [c["id"] for c in self.cases if c["split"] == split]

    def require_split(self, split: str) -> List[str]:
        ids = self.case_ids(split)
        if not ids:
            raise DataError(f"{self.root}: no cases in split {split!r}")
        return ids

    def case(self, cid: str) -> dict:
        try:
            return self._by_id[cid]
        except KeyError:
            raise DataError(f"{self.root}: unknown case {cid!r} (not in manifest.json)") from None

    def image(self, cid: str) -> np.ndarray:
        """``(Z, S, S)`` float32 memmap."""
        return self._load(cid, "img")

    def label(self, cid: str) -> np.ndarray:
        """``(Z, S, S)`` uint8 memmap."""
        return self._load(cid, "lbl")

    #: dtype of each stored array kind (``medkd preprocess`` writes these)
    DTYPES = {"img": np.float32, "lbl": np.uint8}

    def expected_shape(self, cid: str, kind: str) -> Tuple[int, ...]:
        """The shape ``cases/<id>_<kind>.npy`` must have: the manifest's ``prepared_shape`` (``(Z, S, S)``; a label
        has no channel axis), with ``Z`` = the case's ``n_slices`` and ``S`` = the dataset's size.

        Raises:
            DataError: the manifest entry is missing these fields or they disagree (naming manifest.json).
        """
        c = self.case(cid)
        try:
            shape = tuple(int(v) for v in c["prepared_shape"])
            ok = len(shape) in (3, 4) and shape[-2:] == (self.size, self.size) and all(v > 0 for v in shape)
            ok = ok and int(c.get("n_slices", shape[0])) == shape[0]
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise DataError(f"{self.root / 'manifest.json'}: case {cid!r} has no valid prepared_shape "
                            f"(Z, {self.size}, {self.size}) matching its n_slices")
        return shape if kind == "img" else (shape[0], *shape[-2:])

    def check_case_probs(self, cid: str, probs) -> None:
        """A per-case teacher's probabilities of case ``cid`` must be ``(n_slices, S, S)``, the prepared case's grid.

        Raises:
            DataError: another shape (one line naming the case).
        """
        z, s = self.expected_shape(cid, "lbl")[0], self.size
        if tuple(probs.shape) != (z, s, s):
            raise DataError(f"case {cid!r}: teacher probabilities of shape {tuple(probs.shape)}, the prepared case "
                            f"has {z} slice(s) of {s}x{s}")

    def _load(self, cid: str, kind: str) -> np.ndarray:
        """The case's stored array as a read-only memmap, checked against the manifest (shape, dtype, file size)."""
        key = (cid, kind)
        if key not in self._cache:
            path = confined(self.root / "cases", f"{cid}_{kind}.npy")
            self._cache[key] = open_array(path, self.expected_shape(cid, kind), self.DTYPES[kind], "r")
        return self._cache[key]

    def fingerprint(self) -> str:
        """Identifies the prepared content (manifest text hash) for caches; computed once."""
        if self._fingerprint is None:
            import hashlib

            self._fingerprint = hashlib.sha256((self.root / "manifest.json").read_bytes()).hexdigest()[:16]
        return self._fingerprint

    def profile(self, case_ids: Sequence[str], max_slices: int = 32) -> dict:
        """What a model trained on ``case_ids`` has seen, for ``predict``'s plausibility checks.

        Returns:
            ``{"n_cases", "modalities", "spacing_min", "spacing_max", "intensity_mean"}``: the sorted modalities,
            the per-axis range of the canonical (RAS) voxel spacing in mm, and the range over cases of the mean
            prepared intensity (after windowing/normalisation, from at most ``max_slices`` evenly spaced slices).
        """
        cases = [self.case(c) for c in case_ids]
        spacings = np.array([np.sqrt((np.asarray(c.get("canonical_affine") or c["affine"])[:3, :3] ** 2).sum(axis=0))
                             for c in cases]) if cases else np.zeros((0, 3))
        means = []
        for c in case_ids:
            img = self.image(c)
            zs = np.unique(np.linspace(0, img.shape[0] - 1, min(max_slices, img.shape[0])).round().astype(int))
            means.append(float(np.mean(np.asarray(img[zs], dtype=np.float32))))
        return {
            "n_cases": len(cases),
            "modalities": sorted({str(c.get("modality") or "") for c in cases} - {""}),
            "spacing_min": [round(float(v), 4) for v in spacings.min(axis=0)] if cases else None,
            "spacing_max": [round(float(v), 4) for v in spacings.max(axis=0)] if cases else None,
            "intensity_mean": [round(min(means), 4), round(max(means), 4)] if means else None,
        }


def select_fraction(case_ids: Sequence[str], fraction: float, seed: int) -> List[str]:
    """Seeded case-level subset: ``max(1, round(fraction * n))`` cases, returned sorted.

    Raises:
        DataError: fraction outside (0, 1].
    """
    if not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction must be in (0, 1], got {fraction}")
    ids = sorted(case_ids)
    if fraction >= 1.0:
        return ids
    k = max(1, int(round(fraction * len(ids))))
    rng = np.random.default_rng(seed)
    return sorted(ids[i] for i in rng.permutation(len(ids))[:k])


class SliceDataset(Dataset):
    """Axial slices of some cases of a prepared dataset.

    Items are ``(image (1,H,W) float32, mask (1,H,W) float32, index int)``; ``index`` is the global slice index
    (stable for a given dataset/case list), used as the key of the teacher-output cache. Slices of cases outside
    ``labelled_ids`` (when given) carry no label: their mask is filled with ``UNLABELLED`` (-1).

    Args:
        data: a :class:`PreparedData` or its folder.
        split: "train" | "val" | "test".
        fraction: seeded case-level fraction of the split (the student's 50 %).
        seed: seed for the fraction.
        case_ids: explicit case list (overrides split/fraction).
        labelled_ids: the cases whose labels may be used (default: all of them).
    """

    def __init__(
        self,
        data,
        split: str = "train",
        fraction: float = 1.0,
        seed: int = 0,
        case_ids: Optional[Sequence[str]] = None,
        labelled_ids: Optional[Sequence[str]] = None,
    ):
        self.data = data if isinstance(data, PreparedData) else PreparedData(data)
        ids = list(case_ids) if case_ids is not None else self.data.require_split(split)
        self.case_ids = select_fraction(ids, fraction, seed) if case_ids is None else ids
        self.labelled_ids = list(self.case_ids) if labelled_ids is None else sorted(set(labelled_ids))
        self._labelled = set(self.labelled_ids)
        self.index: List[Tuple[str, int]] = []
        for cid in self.case_ids:
            n = int(self.data.case(cid)["prepared_shape"][0])
            self.index.extend((cid, z) for z in range(n))

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int):
        cid, z = self.index[i]
        img = torch.from_numpy(np.array(self.data.image(cid)[z], dtype=np.float32))[None]
        if cid in self._labelled:
            lbl = torch.from_numpy((np.asarray(self.data.label(cid)[z]) > 0).astype(np.float32))[None]
        else:
            lbl = torch.full_like(img, UNLABELLED)
        return img, lbl, i
