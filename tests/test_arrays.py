"""Stored arrays are checked before use: ``open_array`` (header shape/dtype, file size) and the prepared dataset."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from medkd.data.arrays import ArrayError, load_array, open_array
from medkd.data.prepared import PreparedData
from medkd.errors import DataError


@pytest.fixture
def stored(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(24, dtype=np.float16).reshape(6, 4))
    return path


def test_open_array_maps_what_it_should(stored):
    m = open_array(stored, (6, 4), np.float16)
    assert isinstance(m, np.memmap) and m.shape == (6, 4) and float(m[1, 0]) == 4.0
    assert open_array(stored, (None, 4), np.float16).shape == (6, 4)  # None: any length on that axis
    w = open_array(stored, (6, 4), np.float16, "r+")
    w[0, 0] = 7
    w.flush()
    del w
    assert float(np.load(stored)[0, 0]) == 7.0
    assert load_array(stored, (6, 4), np.float16).flags.writeable
    with pytest.raises(ValueError, match="mode"):
        open_array(stored, (6, 4), np.float16, "w+")


@pytest.mark.parametrize("shape, dtype, message", [
    ((6, 5), np.float16, r"holds a \(6, 4\) float16 array, expected \(6, 5\) float16$"),
    ((6, 4), np.float32, r"holds a \(6, 4\) float16 array, expected \(6, 4\) float32$"),
    ((24,), np.float16, r"holds a \(6, 4\) float16 array, expected \(24,\) float16$"),
])
def test_another_shape_or_dtype_is_refused(stored, shape, dtype, message):
    with pytest.raises(ArrayError, match=rf"^{stored}: {message}") as e:
        open_array(stored, shape, dtype, "r+")
    assert e.value.path == stored


def test_truncated_array_is_refused_and_never_extended(stored):
    """``np.load(mmap_mode="r+")`` would zero-extend the file to its header's size; open_array leaves it alone."""
    data = stored.read_bytes()
    stored.write_bytes(data[:-10])
    for mode in ("r", "r+"):
        with pytest.raises(ArrayError, match=rf"^{stored}: truncated: {len(data) - 10} bytes, expected {len(data)} "
                                             r"for its \(6, 4\) float16 array$"):
            open_array(stored, (6, 4), np.float16, mode)
    assert stored.read_bytes() == data[:-10]
    stored.write_bytes(data + b"\0\0")
    with pytest.raises(ArrayError, match="has trailing bytes"):
        open_array(stored, (6, 4), np.float16)


def test_garbage_missing_and_odd_files_are_refused(tmp_path):
    garbage = tmp_path / "g.npy"
    garbage.write_bytes(b"not an array at all" * 4)
    with pytest.raises(ArrayError, match=r"g\.npy: cannot load \(not a \.npy array file"):
        open_array(garbage, (4,), bool)
    garbage.write_bytes(b"\x93NUM")  # cut inside the magic string
    with pytest.raises(ArrayError, match=r"g\.npy: truncated: 4 bytes, the \.npy header is incomplete$"):
        open_array(garbage, (4,), bool)
    with pytest.raises(ArrayError, match=r"nope\.npy: cannot load \(no such file\)"):
        open_array(tmp_path / "nope.npy", (4,), bool)
    fortran = tmp_path / "f.npy"
    np.save(fortran, np.asfortranarray(np.zeros((3, 2), np.float32)))
    with pytest.raises(ArrayError, match="Fortran"):
        open_array(fortran, (3, 2), np.float32)
    empty = tmp_path / "e.npy"
    np.save(empty, np.zeros((0, 3), np.float16))
    assert open_array(empty, (0, 3), np.float16).shape == (0, 3)


# ----------------------------------------------------------------------------------------------- prepared data


@pytest.fixture
def data_copy(tiny_data, tmp_path):
    dst = tmp_path / "data"
    shutil.copytree(tiny_data, dst)
    return dst


def test_prepared_label_of_another_shape_is_one_error(data_copy):
    data = PreparedData(data_copy)
    cid = data.case_ids("train")[0]
    z = data.case(cid)["prepared_shape"][0]
    path = data_copy / "cases" / f"{cid}_lbl.npy"
    np.save(path, np.zeros((z, 16, 16), np.uint8))
    with pytest.raises(DataError, match=rf"^{path}: holds a \({z}, 16, 16\) uint8 array, expected \({z}, 32, 32\) "
                                        r"uint8$"):
        data.label(cid)
    data.image(cid)  # the image is fine


def test_prepared_truncated_image_is_one_error_and_left_alone(data_copy):
    data = PreparedData(data_copy)
    cid = data.case_ids("val")[0]
    path = data_copy / "cases" / f"{cid}_img.npy"
    cut = path.read_bytes()[:-4096]
    path.write_bytes(cut)
    with pytest.raises(DataError, match=rf"^{path}: truncated: {len(cut)} bytes"):
        data.image(cid)
    assert path.read_bytes() == cut


def test_prepared_shape_must_match_the_manifest(data_copy):
    man = json.loads((data_copy / "manifest.json").read_text())
    case = man["cases"][0]
    case["prepared_shape"] = [case["prepared_shape"][0] + 1, 32, 32]  # the array is one slice shorter
    case["n_slices"] += 1
    (data_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=r"_img\.npy: holds a \(\d+, 32, 32\) float32 array, expected"):
        PreparedData(data_copy).image(case["id"])
    case["prepared_shape"] = "twelve"
    (data_copy / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(DataError, match=rf"manifest\.json: case '{case['id']}' has no valid prepared_shape"):
        PreparedData(data_copy).label(case["id"])
