"""The distillation recipe's levers: teacher supervision on unlabelled train images (``kd_images``), per-term
gradient shares in ``history.jsonl``, and the batch-independent scale of the contrastive terms."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from conftest import _quiet
from medkd.cli import app
from medkd.config import STUDY_WEIGHTS, DistillConfig, TeacherConfig, build_config
from medkd.data.prepared import UNLABELLED, SliceDataset, select_fraction
from medkd.distill.losses.contrastive import ContrastiveFeatureLoss, info_nce, supcon_cross
from medkd.errors import MedkdError
from medkd.train.teacher import SegLoss
from test_distill import dcfg, make_distiller


# ------------------------------------------------------------------------------------------- contrastive scale
def _np_log_softmax(x):
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


def _np_supcon_normalized(zs, zt, cls, tau):
    n = len(cls)

    def one_way(a, b):
        out = []
        for i in range(n):
            lp = _np_log_softmax(a[i] @ b.T / tau)
            pos = [j for j in range(n) if cls[j] == cls[i]]
            li = -sum(lp[j] for j in pos) / len(pos)
            out.append((li - math.log(len(pos))) / (math.log(n) - math.log(len(pos))))
        return np.mean(out)

    return 0.5 * (one_way(zs, zt) + one_way(zt, zs))


def test_info_nce_normalized_is_one_at_chance_and_batch_independent():
    for n in (2, 8, 32):
        z = F.normalize(torch.ones(n, 4, dtype=torch.float64), dim=1)  # every logit equal: chance
        assert info_nce(z, z, 0.1).item() == pytest.approx(math.log(n))
        assert info_nce(z, z, 0.1, normalize=True).item() == pytest.approx(1.0)


def test_supcon_normalized_floor_chance_and_numpy():
    cls = torch.tensor([0] * 8 + [1] * 4)
    e = torch.zeros(12, 3, dtype=torch.float64)
    e[:8, 0], e[8:, 1] = 1.0, 1.0  # class-identical embeddings, tau small: the optimum
    floor = (8 * math.log(8) + 4 * math.log(4)) / 12
    assert supcon_cross(e, e, cls, 0.01).item() == pytest.approx(floor, rel=1e-6)  # the raw loss's floor
    assert supcon_cross(e, e, cls, 0.01, normalize=True).item() == pytest.approx(0.0, abs=1e-6)
    same = F.normalize(torch.ones(12, 3, dtype=torch.float64), dim=1)
    assert supcon_cross(same, same, cls, 0.1, normalize=True).item() == pytest.approx(1.0)  # chance
    g = torch.Generator().manual_seed(0)
    zs = F.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=1)
    zt = F.normalize(torch.randn(12, 3, generator=g, dtype=torch.float64), dim=1)
    expected = _np_supcon_normalized(zs.numpy(), zt.numpy(), cls.tolist(), 0.2)
    assert supcon_cross(zs, zt, cls, 0.2, normalize=True).item() == pytest.approx(expected)


def test_contrastive_loss_normalize_option():
    torch.manual_seed(0)
    raw = ContrastiveFeatureLoss(6, proj_dim=4, hidden_dim=5).double()
    norm = ContrastiveFeatureLoss(6, proj_dim=4, hidden_dim=5, normalize=True).double()
    norm.load_state_dict(raw.state_dict())
    s, t = torch.randn(4, 6, 4, 4, dtype=torch.float64), torch.randn(4, 6, 4, 4, dtype=torch.float64)
    zs, zt = raw.embed(s.mean(dim=(2, 3)), t.mean(dim=(2, 3)))
    assert norm(s, t, None).item() == pytest.approx(info_nce(zs, zt, 0.1).item() / math.log(4))
    assert "normalize=True" in repr(norm)


# ------------------------------------------------------------------------------------------- unlabelled images
def test_slice_dataset_hides_labels_outside_labelled_ids(tiny_data):
    ids = SliceDataset(tiny_data, "train").case_ids
    labelled = ids[:1]
    ds = SliceDataset(tiny_data, case_ids=ids, labelled_ids=labelled)
    plain = SliceDataset(tiny_data, case_ids=ids)
    assert ds.labelled_ids == labelled and plain.labelled_ids == ids
    for i in range(len(ds)):
        cid = ds.index[i][0]
        x, y, _ = ds[i]
        x0, y0, _ = plain[i]
        assert torch.equal(x, x0)
        if cid in labelled:
            assert torch.equal(y, y0)
        else:
            assert (y == UNLABELLED).all()


def _mixed_batch(tiny_data):
    ds = SliceDataset(tiny_data, "train")
    items = [ds[i] for i in (2, 5, 8, 11)]
    x, y = torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items])
    y[1], y[3] = UNLABELLED, UNLABELLED
    return x, y, torch.tensor([i for _, _, i in items])


def test_distiller_supervises_labelled_slices_only(tiny_data, tiny_teacher):
    x, y, idx = _mixed_batch(tiny_data)
    cfg = dcfg(tiny_teacher, scales=["dec"], loss="contrastive", kd_images="all", pseudo_label=False,
               weights={"seg": 1.0, "dec": 0.5, "pmd": 1.0})
    task = make_distiller(tiny_teacher, cfg)
    task.eval()  # BatchNorm in eval: the student's logits do not depend on the batch composition
    terms = task(x, y, idx)
    assert set(terms) == {"seg", "dec", "pmd"}
    logits = task.model(x)
    dice, bce = SegLoss(1)(logits[[0, 2]], y[[0, 2]])
    assert terms["seg"].item() == pytest.approx((dice + bce).item(), rel=1e-5)
    none_labelled = task(x, torch.full_like(y, UNLABELLED), idx)
    assert set(none_labelled) == {"dec", "pmd"}
    assert none_labelled["pmd"].item() == pytest.approx(terms["pmd"].item(), rel=1e-5)  # PMD sees every slice


def test_grad_shares_logged_and_sum_to_one(tiny_data, tiny_teacher):
    x, y, idx = _mixed_batch(tiny_data)
    task = make_distiller(tiny_teacher, dcfg(tiny_teacher, scales=["enc", "dec"], loss="mse", grad_share_every=16))
    task.train()
    task(x, y, idx)
    stats = task.epoch_stats()
    assert set(stats) == {"gshare_seg", "gshare_enc", "gshare_dec", "gshare_pmd"}
    assert sum(stats.values()) == pytest.approx(1.0, abs=1e-3) and all(v > 0 for v in stats.values())
    task.on_epoch_start(1)
    assert task.epoch_stats() == {}  # reset per epoch
    with torch.no_grad():
        task(x, y, idx)
    assert task.epoch_stats() == {}


def test_grad_share_every_zero_measures_nothing(tiny_data, tiny_teacher, monkeypatch):
    x, y, idx = _mixed_batch(tiny_data)
    task = make_distiller(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss="mse", grad_share_every=0))
    task.train()
    calls = []
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(1))
    for _ in range(3):
        task(x, y, idx)
    assert calls == [] and task.epoch_stats() == {}
    monkeypatch.undo()
    every2 = make_distiller(tiny_teacher, dcfg(tiny_teacher, scales=["dec"], loss="mse", grad_share_every=2)).train()
    for _ in range(3):  # steps 0 and 2 measure
        every2(x, y, idx)
    assert every2._gnorm_n == 2


def test_distill_run_with_unlabelled_images(tiny_data, tiny_teacher, tmp_path):
    from medkd.distill.run import distill

    train_ids = SliceDataset(tiny_data, "train").case_ids
    summary = distill(tiny_data, tmp_path / "all", dcfg(tiny_teacher, kd_images="all", scales=["dec"], grad_share_every=16),
                      cache_dir=tmp_path / "cache", console=_quiet())
    assert summary["kd_images"] == "all" and summary["train_cases"] == len(train_ids)
    assert summary["labelled_cases"] == len(select_fraction(train_ids, 0.5, 0)) < len(train_ids)
    assert summary["train_slices"] == len(SliceDataset(tiny_data, "train"))
    hist = [json.loads(line) for line in (tmp_path / "all" / "history.jsonl").read_text().splitlines()]
    assert {"gshare_seg", "gshare_dec", "gshare_pmd"} <= set(hist[0])
    # without a teacher the option changes nothing: the baseline sees its labelled fraction only
    base = distill(tiny_data, tmp_path / "base", dcfg(None, scales=[], pmd=False, kd_images="all"), console=_quiet())
    assert base["kd_images"] == "labelled" and base["train_cases"] == base["labelled_cases"] < len(train_ids)


def test_kd_images_config_and_cli(tiny_data, tmp_path):
    assert DistillConfig().kd_images in ("labelled", "all")
    study = build_config(DistillConfig, preset="study", overrides={"teacher": "t"})  # the reference study's recipe
    assert study.kd_images == "labelled" and study.scales == ["enc", "bottleneck", "dec"] and study.pmd
    assert study.loss == "contrastive" and study.effective_weights() == STUDY_WEIGHTS
    default = DistillConfig(teacher="t")  # medkd's default: the recipe chosen on val
    assert default.scales == [] and default.pmd and default.kd_images == "all"
    assert default.effective_weights() == {"seg": 1.0, "pmd": 1.0, "pl": 1.0} and default.uses_pseudo_labels
    assert default.epochs == 24 and TeacherConfig().epochs == 12  # distill's budget past the baseline's plateau
    with pytest.raises(MedkdError, match="kd_images"):
        build_config(DistillConfig, overrides={"kd_images": "some", "scales": "none", "pmd": False})
    r = CliRunner().invoke(app, ["distill", str(tiny_data), "-o", str(tmp_path / "r"), "--scales", "none",
                                 "--no-pmd", "--kd-images", "unlabeled"])
    assert r.exit_code == 2 and "--kd-images" in r.output and "labelled, all" in r.output


def test_ablate_names_rows_that_use_unlabelled_images(tiny_data):
    from pathlib import Path

    import medkd.ablate as ab
    from medkd.data.prepared import PreparedData

    doc = {"source": "g", "cells": [{}, {"scales": ["dec"], "loss": "mse", "kd_images": "labelled"}], "seeds": None,
           "options": {}}
    plan = ab.build_plan(doc, Path("T"), None, {"device": "cpu"}, data=PreparedData(tiny_data), references=[])
    names = [c.name for c in plan.cells]
    # the +unlabelled row takes more steps per epoch: its baseline gets as many (ablate's equal budgets)
    assert names[0] == "baseline" and names[1].startswith("baseline [steps/epoch=")
    assert names[2:] == ["PMD only +PL +unlabelled", "D mse +PMD"]  # the default recipe: PMD + pseudo-labels
    assert plan.cells[0].cfg.uses_teacher is False  # the baseline has no teacher, so no unlabelled images


def test_pooled_adapter_path_matches_the_adapted_map(tiny_data, tiny_teacher, monkeypatch):
    """The contrastive term computed from the adapter's pools (no adapted map) equals the same term computed on
    the adapted map, values and gradients on the student, at every scale (same-size and shrinking taps)."""
    x, y, idx = _mixed_batch(tiny_data)
    cfg = dcfg(tiny_teacher, scales=["enc", "bottleneck", "dec"], pmd=False, grad_share_every=0)
    fast = make_distiller(tiny_teacher, cfg).train()
    slow = make_distiller(tiny_teacher, cfg).train()
    slow.load_state_dict(fast.state_dict())
    for adapter in slow.adapters.values():  # the map path: adapt, then pool inside the loss
        monkeypatch.setattr(adapter, "pooled", lambda *a: None)
    used = []
    for adapter in fast.adapters.values():
        orig = adapter.pooled
        monkeypatch.setattr(adapter, "pooled", lambda *a, _o=orig: used.append(1) or _o(*a))
    tf, ts = fast(x, y, idx), slow(x, y, idx)
    assert len(used) == 3
    for k in ("enc", "bottleneck", "dec"):
        torch.testing.assert_close(tf[k], ts[k], rtol=1e-4, atol=1e-5)
    sum(tf.values()).backward()
    sum(ts.values()).backward()
    # one relative error over all student gradients (a conv bias before BatchNorm has a gradient of ~0: noise)
    gf = torch.cat([p.grad.flatten() for p in fast.model.parameters()])
    gs = torch.cat([p.grad.flatten() for p in slow.model.parameters()])
    assert float((gf - gs).norm()) <= 1e-4 * float(gs.norm()) and float(gs.norm()) > 0


# ------------------------------------------------------------------------------------------- pseudo-labels
def test_pseudo_label_term_is_the_supervised_loss_on_the_teachers_mask(tiny_data, tiny_teacher):
    """``pl`` = w_pl * (batch Dice + BCE) of the student on the unlabelled slices, against the teacher's mask
    (sigmoid > 0.5), computed by hand here; labelled slices are left to ``seg``."""
    from medkd.checkpoint import load_model_from_run

    x, y, idx = _mixed_batch(tiny_data)  # slices 1 and 3 unlabelled
    cfg = dcfg(tiny_teacher, scales=[], pmd=False, kd_images="all", pseudo_label=True,
               weights={"seg": 1.0, "pl": 0.7})
    assert cfg.effective_weights() == {"seg": 1.0, "pl": 0.7}
    task = make_distiller(tiny_teacher, cfg)
    task.eval()  # BatchNorm in eval: the student's logits do not depend on the batch composition
    terms = task(x, y, idx)
    assert set(terms) == {"seg", "pl"}
    with torch.no_grad():
        teacher = load_model_from_run(tiny_teacher)[0]
        mask = (torch.sigmoid(teacher(x[[1, 3]])[0]) > 0.5).double()  # the teacher's hard labels
        p = torch.sigmoid(task.model(x)[[1, 3]].double())
    assert 0 < mask.sum() < mask.numel()  # both classes: Dice and BCE both at work
    dice = 1 - (2 * (p * mask).sum() + 1e-5) / (p.sum() + mask.sum() + 1e-5)
    bce = -(mask * p.log() + (1 - mask) * (1 - p).log()).mean()
    assert terms["pl"].item() == pytest.approx(0.7 * (dice + bce).item(), rel=1e-5)
    labelled = y.clone()
    labelled[[1, 3]] = 0  # an empty label is a label
    assert "pl" not in task(x, labelled, idx)
    every = task(x, torch.full_like(y, UNLABELLED), idx)
    assert set(every) == {"pl"}  # no labelled slice: no seg


def test_pseudo_label_option_acts_only_on_unlabelled_images():
    on = dict(teacher="t", scales=[], pmd=False, pseudo_label=True, fraction=0.5)
    cfg = build_config(DistillConfig, overrides={**on, "kd_images": "all"})
    assert cfg.uses_pseudo_labels and cfg.uses_teacher and cfg.effective()["pseudo_label"] is True
    assert cfg.effective_weights() == {"seg": 1.0, "pl": 1.0}  # the default weight of an enabled term
    for inert in ({"kd_images": "labelled"}, {"kd_images": "all", "fraction": 1.0}):
        c = build_config(DistillConfig, overrides={**on, **inert, "teacher": None})  # no teacher needed
        assert not c.uses_pseudo_labels and not c.uses_teacher and "pseudo_label" not in c.effective()
        assert c.effective_weights() == {"seg": 1.0}
    default = build_config(DistillConfig, overrides={"teacher": "t"})  # unset: on with PMD (the default recipe)
    assert default.pseudo_label is None and default.uses_pseudo_labels and default.effective()["pseudo_label"] is True
    assert default.effective() == build_config(DistillConfig, overrides={"teacher": "t", "pseudo_label": True}).effective()
    off = build_config(DistillConfig, overrides={"teacher": "t", "pseudo_label": False})
    assert "pseudo_label" not in off.effective() and "pl" not in off.effective_weights()
    alone = build_config(DistillConfig, overrides={"scales": "none", "pmd": False})  # the contract's student alone
    assert not alone.uses_pseudo_labels and not alone.uses_teacher and alone.effective_weights() == {"seg": 1.0}
    with pytest.raises(MedkdError, match="--teacher"):
        build_config(DistillConfig, overrides={**on, "kd_images": "all"} | {"teacher": None})


# ------------------------------------------------------------------------------------------- KD warm-up
def test_kd_ramp_values():
    from medkd.distill.distiller import kd_ramp

    assert [kd_ramp(e, 0) for e in range(3)] == [1.0, 1.0, 1.0]
    assert [kd_ramp(e, 4) for e in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_kd_warmup_scales_every_kd_term_but_seg(tiny_data, tiny_teacher):
    x, y, idx = _mixed_batch(tiny_data)
    common = dict(scales=["dec"], loss="mse", kd_images="all", pseudo_label=True)
    full = make_distiller(tiny_teacher, dcfg(tiny_teacher, **common)).eval()
    ramp = make_distiller(tiny_teacher, dcfg(tiny_teacher, kd_warmup_epochs=3, **common)).eval()
    ramp.load_state_dict(full.state_dict())
    ref = full(x, y, idx)
    assert set(ref) == {"seg", "dec", "pmd", "pl"}
    for epoch, f in [(0, 1 / 3), (1, 2 / 3), (2, 1.0), (7, 1.0)]:
        ramp.on_epoch_start(epoch)
        got = ramp(x, y, idx)
        assert got["seg"].item() == pytest.approx(ref["seg"].item(), rel=1e-6)
        for k in ("dec", "pmd", "pl"):
            assert got[k].item() == pytest.approx(f * ref[k].item(), rel=1e-5), (epoch, k)
        assert ramp.epoch_stats()["kd_ramp"] == round(f, 4)
    assert "kd_ramp" not in full.epoch_stats()


def test_kd_warmup_run_logs_terms_that_follow_the_ramp(tiny_data, tiny_teacher, tmp_path):
    """Two runs that barely move (lr 1e-9, one batch of every slice per epoch): the logged KD terms of the warm-up
    run are the other run's times min(k/N, 1) in epoch k; seg is the same."""
    from medkd.distill.run import distill

    n = len(SliceDataset(tiny_data, "train"))
    common = dict(scales=[], pmd=True, kd_images="all", pseudo_label=True, epochs=3, batch_size=n, lr=1e-9,
                  teacher_outputs="memory")
    hist = {}
    for name, warm in (("plain", 0), ("warm", 2)):
        distill(tiny_data, tmp_path / name, dcfg(tiny_teacher, kd_warmup_epochs=warm, **common),
                cache_dir=tmp_path / "cache", console=_quiet())
        hist[name] = [json.loads(line) for line in (tmp_path / name / "history.jsonl").read_text().splitlines()]
    assert [r["kd_ramp"] for r in hist["warm"]] == [0.5, 1.0, 1.0] and "kd_ramp" not in hist["plain"][0]
    for k, (plain, warm) in enumerate(zip(hist["plain"], hist["warm"]), start=1):
        f = min(k / 2, 1.0)
        assert warm["seg"] == pytest.approx(plain["seg"], rel=1e-4)
        for term in ("pmd", "pl"):
            assert warm[term] == pytest.approx(f * plain[term], rel=1e-4), (k, term)
