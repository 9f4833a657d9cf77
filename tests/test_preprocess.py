"""``medkd preprocess``: equivalence of inputs, bad-input reporting, source safety, splits, windows, workers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from medkd.cli import app
from medkd.data.phantom import nifti_bytes, write_msd_dataset
from medkd.data.preprocess import PreprocessSettings, assign_splits, preprocess
from medkd.errors import MedkdError

SIZE = 16  # in-plane size of prepared slices in most tests (fast)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pre") / "msd"
    write_msd_dataset(root, n_cases=4, seed=0, size=32, n_slices=8, dicom_case=True)
    return root


def cli(*args: str):
    return CliRunner().invoke(app, ["preprocess", *map(str, args)])


def _load(p: Path):
    img = nib.load(str(p))
    return np.asarray(img.dataobj), img.affine


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _arrays(out: Path, cid: str):
    return np.load(out / "cases" / f"{cid}_img.npy"), np.load(out / "cases" / f"{cid}_lbl.npy")


def _tree_hash(root: Path) -> dict:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _leftovers(parent: Path, out_name: str):
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{out_name}.")]


def _settings(**kw) -> PreprocessSettings:
    base = dict(size=SIZE, test_fraction=0.0, val_fraction=0.0)
    base.update(kw)
    return PreprocessSettings(**base)


# ---------------------------------------------------------------------------------------------- equivalences
def test_dicom_and_nifti_give_the_same_slices(raw, tmp_path):
    a, b = tmp_path / "dcm", tmp_path / "nii"
    a.mkdir(), b.mkdir()
    shutil.copytree(raw / "dicom" / "spleen_000", a / "spleen_000")
    shutil.copy(raw / "dicom" / "spleen_000_label.nii.gz", a / "spleen_000_label.nii.gz")
    shutil.copy(raw / "imagesTr" / "spleen_000.nii.gz", b / "spleen_000.nii.gz")
    shutil.copy(raw / "labelsTr" / "spleen_000.nii.gz", b / "spleen_000_label.nii.gz")
    for size in (SIZE, 32):
        preprocess(a, tmp_path / f"pa{size}", _settings(size=size))
        preprocess(b, tmp_path / f"pb{size}", _settings(size=size))
        ia, la = _arrays(tmp_path / f"pa{size}", "spleen_000")
        ib, lb = _arrays(tmp_path / f"pb{size}", "spleen_000")
        assert ia.shape == ib.shape and ia.shape[1:] == (size, size)
        np.testing.assert_allclose(ia, ib, atol=1e-3)
        np.testing.assert_array_equal(la, lb)
    ma, mb = _manifest(tmp_path / "pa32")["cases"][0], _manifest(tmp_path / "pb32")["cases"][0]
    assert ma["modality"] == mb["modality"] == "CT"
    np.testing.assert_allclose(ma["affine"], mb["affine"], atol=1e-3)
    assert ma["n_slices"] == mb["n_slices"] and ma["shape"] == mb["shape"]


def test_orientation_does_not_change_the_slices(raw, tmp_path):
    img, aff = _load(raw / "imagesTr" / "spleen_001.nii.gz")
    lbl, _ = _load(raw / "labelsTr" / "spleen_001.nii.gz")
    src = tmp_path / "src"
    src.mkdir()

    def put(cid, perm=None, flip=None):
        i, l, a = img, lbl, aff.copy()
        if flip is not None:
            i, l = np.flip(i, flip).copy(), np.flip(l, flip).copy()
            f = np.eye(4)
            f[flip, flip], f[flip, 3] = -1, img.shape[flip] - 1
            a = a @ f
        if perm is not None:
            i, l = np.transpose(i, perm).copy(), np.transpose(l, perm).copy()
            a2 = a.copy()
            a2[:, :3] = a[:, list(perm)]
            a = a2
        (src / f"{cid}.nii.gz").write_bytes(nifti_bytes(i, a))
        (src / f"{cid}_label.nii.gz").write_bytes(nifti_bytes(l, a))

    put("orig")
    put("flipx", flip=0)
    put("flipz", flip=2)
    put("permxy", perm=(1, 0, 2))
    put("permzxy", perm=(2, 0, 1))
    out = tmp_path / "out"
    preprocess(src, out, _settings())
    ri, rl = _arrays(out, "orig")
    assert rl.any()
    for cid in ("flipx", "flipz", "permxy", "permzxy"):
        i, l = _arrays(out, cid)
        np.testing.assert_allclose(i, ri, atol=1e-6, err_msg=cid)
        np.testing.assert_array_equal(l, rl, err_msg=cid)
    cases = {c["id"]: c for c in _manifest(out)["cases"]}
    nz = img.shape[2]
    assert cases["permzxy"]["shape"] == [nz, 32, 32] and cases["permzxy"]["n_slices"] == nz == ri.shape[0]


# ------------------------------------------------------------------------------------------------ bad inputs
def _make_bad_folder(raw: Path, src: Path) -> dict:
    """A folder of cases with 4 good cases, one empty label and one case per bad kind. Returns {bad id: path}."""
    import pydicom

    src.mkdir()
    for i in range(4):
        shutil.copy(raw / f"imagesTr/spleen_00{i}.nii.gz", src / f"good{i}.nii.gz")
        shutil.copy(raw / f"labelsTr/spleen_00{i}.nii.gz", src / f"good{i}_label.nii.gz")
    img, aff = _load(raw / "imagesTr/spleen_000.nii.gz")
    lbl, _ = _load(raw / "labelsTr/spleen_000.nii.gz")

    def put(cid, image, label=None, laff=None):
        (src / f"{cid}.nii.gz").write_bytes(nifti_bytes(image, aff))
        if label is not None:
            (src / f"{cid}_label.nii.gz").write_bytes(nifti_bytes(label, aff if laff is None else laff))

    b = (raw / "imagesTr/spleen_000.nii.gz").read_bytes()
    (src / "trunc.nii.gz").write_bytes(b[: len(b) // 2])
    shutil.copy(raw / "labelsTr/spleen_000.nii.gz", src / "trunc_label.nii.gz")
    put("fourd", np.stack([img, img], -1), lbl)
    put("lshape", img, lbl[:, :, :-1])
    a2 = aff.copy()
    a2[0, 3] += 5.0
    put("laffine", img, lbl, a2)
    l3 = lbl.copy()
    l3[0, 0, 0] = 2
    put("lvalues", img, l3)
    f = img.astype(np.float32)
    f[1, 2, 3] = np.nan
    f[2, 2, 3] = np.inf
    put("nan", f, lbl)
    put("nolabel", img)
    put("emptylabel", img, np.zeros_like(lbl))

    def dcm(cid):
        d = src / cid
        shutil.copytree(raw / "dicom/spleen_000", d)
        shutil.copy(raw / "dicom/spleen_000_label.nii.gz", src / f"{cid}_label.nii.gz")
        return d

    d = dcm("mixed")
    ds = pydicom.dcmread(str(d / "IM0002.dcm"))
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.save_as(str(d / "IM0002.dcm"))
    d = dcm("gap")
    (d / "IM0004.dcm").unlink()
    d = dcm("dtrunc")
    b = (d / "IM0003.dcm").read_bytes()
    (d / "IM0003.dcm").write_bytes(b[: len(b) - 300])
    return {
        "trunc": ("trunc.nii.gz", "truncated"),
        "fourd": ("fourd.nii.gz", "3D"),
        "lshape": ("lshape_label.nii.gz", "shape"),
        "laffine": ("laffine_label.nii.gz", "affine"),
        "lvalues": ("lvalues_label.nii.gz", "values [2]"),
        "nan": ("nan.nii.gz", "2 NaN/inf"),
        "nolabel": ("nolabel.nii.gz", "missing label"),
        "mixed": ("mixed", "series"),
        "gap": ("gap", "slice spacing"),
        "dtrunc": ("IM0003.dcm", "truncated"),
    }


@pytest.fixture(scope="module")
def bad_src(raw, tmp_path_factory):
    src = tmp_path_factory.mktemp("bad") / "src"
    return src, _make_bad_folder(raw, src)


def test_every_bad_case_is_reported_once_and_good_cases_land(bad_src, tmp_path):
    src, expected = bad_src
    before = _tree_hash(src)
    out = tmp_path / "out"
    r = cli(src, "-o", out, "--size", SIZE, "--quiet")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    err_lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    for cid, (fname, why) in expected.items():
        hits = [ln for ln in err_lines if f"/{cid}" in ln]
        assert len(hits) == 1, (cid, hits)
        assert fname in hits[0] and why in hits[0], (cid, hits[0])
    assert not any("good" in ln or "emptylabel" in ln for ln in err_lines if ln.startswith("bad case"))
    man = _manifest(out)
    assert {c["id"] for c in man["cases"]} == {"good0", "good1", "good2", "good3", "emptylabel"}
    skipped = {Path(s["source"]).name.split(".")[0] for s in man["skipped"]}
    assert skipped == set(expected)
    assert all(set(s) == {"source", "reason"} and s["reason"] for s in man["skipped"])
    empty = {c["id"]: c["empty_label"] for c in man["cases"]}
    assert empty == {"good0": False, "good1": False, "good2": False, "good3": False, "emptylabel": True}
    assert _tree_hash(src) == before
    assert _leftovers(tmp_path, "out") == []

    # --skip-bad: same work, exit 0; --json gives one document on stdout with the empty-label count
    out2 = tmp_path / "out2"
    r = cli(src, "-o", out2, "--size", SIZE, "--skip-bad", "--json", "--test-fraction", "0", "--val-fraction", "0")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert len(doc["skipped"]) == len(expected)
    train = [s for s in doc["splits"] if s["split"] == "train"][0]
    assert train["cases"] == 5 and train["empty_labels"] == 1
    assert _tree_hash(src) == before


def test_label_values_allowed_by_dataset_json(raw, tmp_path):
    src = tmp_path / "msd"
    shutil.copytree(raw, src, ignore=shutil.ignore_patterns("dicom"))
    lbl, aff = _load(src / "labelsTr/spleen_002.nii.gz")
    lbl = lbl.copy()
    lbl[lbl > 0] = 2
    lbl[0, 0, 0] = 1
    (src / "labelsTr/spleen_002.nii.gz").write_bytes(nifti_bytes(lbl, aff))
    res = preprocess(src, tmp_path / "o1", _settings())  # dataset.json allows {0, 1}: case 2 is bad
    assert [Path(b["source"]).name for b in res.bad] == ["spleen_002.nii.gz"]
    assert "values [2]" in res.bad[0]["reason"]
    meta = json.loads((src / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "spleen", "2": "spleen hilum"}
    (src / "dataset.json").write_text(json.dumps(meta))
    res = preprocess(src, tmp_path / "o2", _settings())
    assert res.bad == []
    _, l2 = _arrays(tmp_path / "o2", "spleen_002")
    assert set(np.unique(l2)) == {0, 1, 2}


def test_msd_missing_label_file_and_bad_dataset_json(raw, tmp_path):
    src = tmp_path / "msd"
    shutil.copytree(raw, src, ignore=shutil.ignore_patterns("dicom"))
    (src / "labelsTr/spleen_001.nii.gz").unlink()
    r = cli(src, "-o", tmp_path / "o", "--size", SIZE, "-q")
    assert r.exit_code == 1
    lines = [ln for ln in r.stderr.splitlines() if "spleen_001" in ln]
    assert len(lines) == 1 and "label file not found" in lines[0]
    for bad in ('{"training": ["a"]}', '{"training": [{"label": "x"}]}', "{oops", "[]"):
        (src / "dataset.json").write_text(bad)
        r = cli(src, "-o", tmp_path / "o3", "-q")
        assert r.exit_code == 1 and "dataset.json" in r.stderr, r.output
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.output


# ----------------------------------------------------------------------------------------- source/out safety
def test_out_is_never_overwritten_without_flag_and_source_untouched(raw, tmp_path):
    before = _tree_hash(raw)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = cli(raw, "-o", out, "--size", SIZE)
    assert r.exit_code == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    r = cli(raw, "-o", out, "--size", SIZE, "--overwrite", "-q")
    assert r.exit_code == 0, r.output
    assert not (out / "keep.txt").exists() and (out / "manifest.json").is_file()
    assert _leftovers(tmp_path, "out") == []

    # a failing run (every case bad) leaves the previous OUT and no temp folder
    empty = tmp_path / "junk"
    empty.mkdir()
    (empty / "a.nii.gz").write_bytes(b"garbage")
    (empty / "a_label.nii.gz").write_bytes(b"garbage")
    old = _tree_hash(out)
    r = cli(empty, "-o", out, "--overwrite", "-q")
    assert r.exit_code == 1 and "no usable case" in r.stderr
    assert _tree_hash(out) == old
    assert _leftovers(tmp_path, "out") == []
    assert _tree_hash(raw) == before


def test_out_inside_or_around_source_is_refused(raw, tmp_path):
    r = cli(raw, "-o", raw / "prepared")
    assert r.exit_code == 1 and "inside SOURCE" in r.stderr
    assert not (raw / "prepared").exists()
    src = tmp_path / "data" / "raw"
    shutil.copytree(raw, src)
    r = cli(src, "-o", tmp_path / "data", "--overwrite")
    assert r.exit_code == 1 and "contain SOURCE" in r.stderr
    assert (src / "dataset.json").is_file()


# ------------------------------------------------------------------------------------------------- splits
def test_assign_splits_properties():
    ids = [f"c{i:02d}" for i in range(20)]
    s = assign_splits(ids, 0.2, 0.1, seed=0)
    assert set(s) == set(ids)
    assert sum(v == "test" for v in s.values()) == 4
    assert sum(v == "val" for v in s.values()) == 2
    assert sum(v == "train" for v in s.values()) == 14
    assert assign_splits(list(reversed(ids)), 0.2, 0.1, seed=0) == s  # order of discovery does not matter
    assert any(assign_splits(ids, 0.2, 0.1, seed=k) != s for k in range(1, 4))
    small = assign_splits(["a", "b", "c"], 0.2, 0.1, seed=0)  # at least one each when fractions > 0
    assert sorted(small.values()) == ["test", "train", "val"]
    assert set(assign_splits(ids, 0.0, 0.0, 0).values()) == {"train"}
    with pytest.raises(MedkdError, match="too few"):
        assign_splits(["a", "b"], 0.2, 0.1, seed=0)


def test_manifest_contract_and_case_level_splits(raw, tmp_path):
    out = tmp_path / "out"
    res = preprocess(raw, out, PreprocessSettings(size=SIZE, test_fraction=0.25, val_fraction=0.25, seed=3))
    man = _manifest(out)
    assert man == res.manifest
    assert man["schema"] == 1 and man["skipped"] == []
    assert man["settings"]["size"] == SIZE and man["settings"]["seed"] == 3
    assert len(man["cases"]) == 4
    for c in man["cases"]:
        for k in ("id", "split", "source", "label_source", "shape", "spacing", "affine", "n_slices"):
            assert k in c, k
        assert c["split"] in ("train", "val", "test")
        assert np.array(c["affine"]).shape == (4, 4) and len(c["shape"]) == 3 and len(c["spacing"]) == 3
        img, lbl = _arrays(out, c["id"])
        assert img.dtype == np.float32 and lbl.dtype == np.uint8
        assert img.shape == lbl.shape == (c["n_slices"], SIZE, SIZE) == tuple(c["prepared_shape"])
        assert 0.0 <= img.min() and img.max() <= 1.0
    counts = {s: sum(c["split"] == s for c in man["cases"]) for s in ("train", "val", "test")}
    assert counts == {"train": 2, "val": 1, "test": 1}
    again = tmp_path / "again"
    preprocess(raw, again, PreprocessSettings(size=SIZE, test_fraction=0.25, val_fraction=0.25, seed=3))
    assert [c["split"] for c in _manifest(again)["cases"]] == [c["split"] for c in man["cases"]]


# ------------------------------------------------------------------------------------------------ intensity
def test_window_options_change_intensities(raw, tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    shutil.copy(raw / "imagesTr/spleen_000.nii.gz", src / "c.nii.gz")
    shutil.copy(raw / "labelsTr/spleen_000.nii.gz", src / "c_label.nii.gz")
    hu, _ = _load(src / "c.nii.gz")
    # phantom affine is diag(-sx, -sy, sz): canonical RAS flips x and y; slices are (Z, X, Y); size 32 = no resize
    canon = np.moveaxis(hu[::-1, ::-1, :].astype(np.float32), 2, 0)

    def run(*opts):
        out = tmp_path / f"o{len(list(tmp_path.iterdir()))}"
        r = cli(src, "-o", out, "--size", 32, "--test-fraction", 0, "--val-fraction", 0, "-q", *opts)
        assert r.exit_code == 0, r.output
        return _arrays(out, "c")[0], _manifest(out)

    for opts, (lo, hi) in [((), (-160, 240)), (("--window", "-100,200"), (-100, 200)),
                           (("--window-preset", "liver"), (-45, 105))]:
        img, man = run(*opts)
        np.testing.assert_allclose(img, np.clip((canon - lo) / (hi - lo), 0, 1), atol=1e-6)
        assert man["cases"][0]["intensity"] == {"rule": "ct_window", "low": lo, "high": hi}
        assert man["settings"]["window"] == [lo, hi]

    for opts, msg in [(("--window", "-100,200", "--window-preset", "liver"), "not both"),
                      (("--window", "abc"), "LOW,HIGH"), (("--window", "200,100"), "HIGH > LOW"),
                      (("--window-preset", "nope"), "unknown --window-preset")]:
        r = cli(src, "-o", tmp_path / "never", *opts)
        assert r.exit_code == 2 and msg in r.stderr, (opts, r.output)  # usage errors
        assert len(r.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "never").exists()


def test_mr_uses_percentile_rule(raw, tmp_path):
    src = tmp_path / "mr"
    shutil.copytree(raw, src, ignore=shutil.ignore_patterns("dicom"))
    meta = json.loads((src / "dataset.json").read_text())
    meta["modality"] = {"0": "MRI"}
    (src / "dataset.json").write_text(json.dumps(meta))
    preprocess(src, tmp_path / "out", _settings())
    for c in _manifest(tmp_path / "out")["cases"]:
        rule = c["intensity"]
        assert rule["rule"] == "percentile" and rule["percentiles"] == [0.5, 99.5]
        assert rule["low"] < rule["high"]
        img, _ = _arrays(tmp_path / "out", c["id"])
        assert img.min() >= 0.0 and img.max() <= 1.0


# ----------------------------------------------------------------------------------------------- workers
def test_workers_give_identical_output(bad_src, tmp_path):
    src, _ = bad_src
    outs = {}
    for w in (1, 2):
        out = tmp_path / f"w{w}"
        res = preprocess(src, out, PreprocessSettings(size=SIZE, workers=w, test_fraction=0.2, val_fraction=0.2))
        assert len(res.bad) == 10
        outs[w] = out
    m1, m2 = _manifest(outs[1]), _manifest(outs[2])
    m1["settings"].pop("workers"), m2["settings"].pop("workers")
    assert m1 == m2
    for c in m1["cases"]:
        for a, b in zip(_arrays(outs[1], c["id"]), _arrays(outs[2], c["id"])):
            np.testing.assert_array_equal(a, b)
