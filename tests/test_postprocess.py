"""Connected-component postprocessing: the rules against scipy, and the val-split choice."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from medkd.errors import MedkdError
from medkd.postprocess import Postprocessing, candidates, choose


def _blobs():
    m = np.zeros((8, 20, 20), bool)
    m[1:7, 2:12, 2:12] = True  # 600 voxels: the organ
    m[2:4, 15:17, 15:17] = True  # 8 voxels, apart
    m[6, 18, 1] = True  # 1 voxel
    m[0, 0, 19] = True  # 1 voxel; only diagonally near nothing
    return m


def test_keep_largest_matches_scipy_reference():
    m = _blobs()
    out = Postprocessing("largest").apply(m, (1.0, 1.0, 1.0))
    lab, n = ndimage.label(m)
    sizes = ndimage.sum(m, lab, range(1, n + 1))
    ref = lab == (1 + int(np.argmax(sizes)))
    np.testing.assert_array_equal(out, ref)
    assert out.sum() == 600
    assert not np.shares_memory(out, m)


def test_face_connectivity_and_min_volume_in_ml():
    m = np.zeros((3, 3, 3), bool)
    m[0, 0, 0] = m[1, 1, 1] = True  # corner-touching only: two components with face connectivity
    assert Postprocessing("largest").apply(m, (1, 1, 1)).sum() == 1
    m = _blobs()
    spacing = (2.0, 0.5, 0.5)  # 0.5 mm^3 per voxel
    # 8-voxel blob = 4 mm^3 = 0.004 mL; single voxels = 0.0005 mL
    assert Postprocessing("min_volume", 0.001).apply(m, spacing).sum() == 608
    assert Postprocessing("min_volume", 0.005).apply(m, spacing).sum() == 600
    assert Postprocessing("none").apply(m, spacing).sum() == m.sum()
    with pytest.raises(MedkdError):
        Postprocessing("min_volume")
    with pytest.raises(MedkdError):
        Postprocessing("biggest")


def test_choose_on_val_keeps_a_rule_only_if_it_improves_dice():
    gt = np.zeros((8, 20, 20), bool)
    gt[1:7, 2:12, 2:12] = True
    noisy = _blobs()  # organ right + stray false positives: removing them helps
    rule, rep = choose([noisy, noisy], [gt, gt], [(1, 1, 1)] * 2)
    assert rule.method in ("largest", "min_volume") and rep["val_dice_with"] > rep["val_dice_without"]
    assert rule.method == "largest"  # ties between equally good rules keep the simpler one
    # the GT itself has two components: keeping the largest would hurt, nothing is chosen
    gt2 = gt.copy()
    gt2[2:4, 15:17, 15:17] = True
    rule, rep = choose([gt2], [gt2], [(1, 1, 1)])
    assert rule.method == "none" and rep["val_dice_with"] == rep["val_dice_without"] == 1.0
    # thresholds are fractions of the smallest val organ (in mL)
    vols = [c.min_volume_ml for c in candidates([gt], [(1, 1, 1)]) if c.method == "min_volume"]
    assert vols == pytest.approx([f * 0.6 for f in (0.05, 0.1, 0.25, 0.5)])


def test_saved_rule_is_not_reused_on_other_data(tmp_path, tiny_raw, tiny_data, tiny_teacher):
    """A rule chosen on one dataset's val is not applied to another prepared dataset: it is chosen again there, and
    the rule saved for the run's own training data is not replaced by it."""
    import shutil

    import torch

    from medkd.data.prepared import PreparedData
    from medkd.data.preprocess import PreprocessSettings, preprocess
    from medkd.evaluate import load_run, run_postprocessing
    from medkd.postprocess import for_checkpoint

    run = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, run)
    other = tmp_path / "other"
    preprocess(tiny_raw, other, PreprocessSettings(size=32, test_fraction=0.2, val_fraction=0.2, seed=1))
    a, b = PreparedData(tiny_data), PreparedData(other)
    assert a.fingerprint() != b.fingerprint()
    cpu = torch.device("cpu")
    doc_a = run_postprocessing(load_run(run, a), a, cpu)
    assert doc_a["data_fingerprint"] == a.fingerprint()
    ckpt = load_run(run, a).checkpoint
    assert for_checkpoint(run, ckpt, a.fingerprint()) == doc_a
    assert for_checkpoint(run, ckpt, b.fingerprint()) is None
    doc_b = run_postprocessing(load_run(run, b), b, cpu)
    assert doc_b["data_fingerprint"] == b.fingerprint()
    assert doc_b["val_dice_without"] != doc_a["val_dice_without"]  # scored on the other dataset's val cases
    assert for_checkpoint(run, ckpt, a.fingerprint()) == doc_a  # the run's own rule (what predict applies) is kept
