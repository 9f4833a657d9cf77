"""Reading a prepared dataset: memmaps, slice items, case-level fractions."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from medkd.data.prepared import PreparedData, SliceDataset, select_fraction
from medkd.errors import DataError


def test_prepared_data_memmaps(tiny_data):
    data = PreparedData(tiny_data)
    assert data.size == 32
    ids = {s: data.case_ids(s) for s in ("train", "val", "test")}
    assert all(ids.values())
    all_ids = sum(ids.values(), [])
    assert len(all_ids) == len(set(all_ids)) == len(data.cases)  # disjoint and complete
    cid = ids["train"][0]
    img, lbl = data.image(cid), data.label(cid)
    assert isinstance(img, np.memmap) and isinstance(lbl, np.memmap)
    assert img.dtype == np.float32 and lbl.dtype == np.uint8
    assert img.shape == lbl.shape == tuple(data.case(cid)["prepared_shape"])
    assert data.image(cid) is img  # cached
    assert len(data.fingerprint()) == 16
    with pytest.raises(DataError, match="unknown split"):
        data.case_ids("training")
    with pytest.raises(DataError, match="unknown case"):
        data.case("nope")


def test_prepared_data_errors(tmp_path, tiny_data):
    with pytest.raises(DataError, match="no manifest.json"):
        PreparedData(tmp_path)
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(DataError, match="invalid manifest"):
        PreparedData(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid manifest"):
        PreparedData(tmp_path)
    man = json.loads((tiny_data / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(man))  # manifest without arrays
    data = PreparedData(tmp_path)
    with pytest.raises(DataError, match="cannot load"):
        data.image(man["cases"][0]["id"])
    man["cases"] = [c for c in man["cases"] if c["split"] != "test"]
    (tmp_path / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match="no cases in split 'test'"):
        SliceDataset(tmp_path, split="test")


def test_slice_dataset_items(tiny_data):
    ds = SliceDataset(tiny_data, split="train")
    data = ds.data
    assert len(ds) == sum(data.case(c)["prepared_shape"][0] for c in ds.case_ids)
    img, mask, idx = ds[len(ds) // 2]
    assert img.shape == mask.shape == (1, 32, 32)
    assert img.dtype == torch.float32 and mask.dtype == torch.float32
    assert idx == len(ds) // 2
    assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
    cid, z = ds.index[len(ds) // 2]
    np.testing.assert_array_equal(img[0].numpy(), np.asarray(data.image(cid)[z]))
    # a DataLoader can batch it
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch[0].shape == (4, 1, 32, 32)


def test_fraction_is_case_level_and_deterministic(tiny_data):
    full = SliceDataset(tiny_data, split="train")
    n = len(full.case_ids)
    for f in (0.1, 0.5, 0.75, 1.0):
        a = SliceDataset(tiny_data, split="train", fraction=f, seed=1)
        b = SliceDataset(tiny_data, split="train", fraction=f, seed=1)
        assert a.case_ids == b.case_ids
        assert len(a.case_ids) == max(1, round(f * n))
        assert set(a.case_ids) <= set(full.case_ids)
        # whole cases: every slice of a chosen case, none of the others
        assert {c for c, _ in a.index} == set(a.case_ids)
        assert len(a) == sum(1 for c, _ in full.index if c in a.case_ids)


def test_select_fraction():
    ids = [f"c{i:02d}" for i in range(20)]
    assert select_fraction(ids, 1.0, 0) == ids
    s = select_fraction(ids, 0.5, 0)
    assert len(s) == 10 and s == sorted(s) and s == select_fraction(list(reversed(ids)), 0.5, 0)
    assert any(select_fraction(ids, 0.5, k) != s for k in range(1, 4))
    assert len(select_fraction(ids, 0.01, 0)) == 1
    assert len(select_fraction(ids, 0.33, 0)) == round(0.33 * 20)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(DataError, match="fraction"):
            select_fraction(ids, bad, 0)
