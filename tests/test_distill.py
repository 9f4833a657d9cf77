"""``medkd distill``: the frozen teacher, adapters, every loss x scale x student x teacher, the cache, the CLI.

One-batch Distiller steps cover the combinations; a few tiny full runs (width 4, 1-2 epochs) cover the run folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import _quiet, tiny_teacher_config
from medkd.config import SCALES, STUDY_WEIGHTS, DistillConfig, build_config
from medkd.data.prepared import PreparedData, SliceDataset, select_fraction
from medkd.distill.cache import TeacherCache
from medkd.distill.distiller import DistillTerms, Distiller
from medkd.distill.losses import LOSSES
from medkd.errors import MedkdError, TrainingError
from medkd.checkpoint import load_checkpoint, load_model_from_run
from medkd.train.checks import check_first_step
from conftest import cli as _cli

STUDENT_KEYS = {"kind", "arch", "params", "epochs_done", "best_epoch", "best_val_dice", "seconds", "seed",
                "medkd_version", "scales", "loss", "pmd", "fraction", "teacher"}


def dcfg(teacher=None, **kw) -> DistillConfig:
    # the reference study's recipe (all scales, contrastive, PMD, its weights, labelled images only) unless changed
    base = dict(student="s1", student_width=4, epochs=1, batch_size=4, lr=3e-3, device="cpu", seed=0,
                teacher=str(teacher) if teacher else None, scales=list(SCALES), loss="contrastive", pmd=True,
                weights=dict(STUDY_WEIGHTS), kd_images="labelled")
    base.update(kw)
    return build_config(DistillConfig, overrides=base)


@pytest.fixture(scope="module")
def tt_teacher(tiny_data, tmp_path_factory) -> Path:
    """A 1-epoch tiny TransUNet teacher run (depth 1): the T2 side of every parametrized step."""
    from medkd.train.teacher import train_teacher

    run = tmp_path_factory.mktemp("druns") / "transunet"
    train_teacher(tiny_data, run, tiny_teacher_config(arch="transunet", model_kwargs={"depth": 1, "heads": 2}),
                  console=_quiet())
    return run


@pytest.fixture(scope="module")
def teachers(tiny_teacher, tt_teacher):
    return {"unet": tiny_teacher, "transunet": tt_teacher}


@pytest.fixture(scope="module")
def batch(tiny_data):
    ds = SliceDataset(tiny_data, "train")
    items = [ds[i] for i in (2, 5, 8, 11)]
    x, y = torch.stack([a for a, _, _ in items]), torch.stack([b for _, b, _ in items])
    return x, y, torch.tensor([i for _, _, i in items])


def make_distiller(teacher_run, cfg, size=32):
    teacher = load_model_from_run(teacher_run)[0] if teacher_run is not None else None
    torch.manual_seed(0)
    from medkd.models import build_model

    student = build_model(cfg.student, in_channels=1, num_classes=1, width=cfg.student_width)
    return Distiller(student, cfg, DistillTerms(student, teacher, cfg, size))


def test_transunet_teacher_trains_one_epoch(tt_teacher):
    s = json.loads((tt_teacher / "summary.json").read_text())
    assert s["arch"] == "transunet" and s["epochs_done"] == 1 and s["kind"] == "teacher"
    hist = [json.loads(line) for line in (tt_teacher / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and all(torch.isfinite(torch.tensor(hist[0][k])) for k in ("dice", "bce", "recon"))


# -------------------------------------------------------------------------------------- one-batch Distiller steps


@pytest.mark.parametrize("teacher_name", ["unet", "transunet"])
@pytest.mark.parametrize("student", ["s1", "s2"])
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("loss", LOSSES.names())
def test_every_loss_scale_student_teacher_steps(teachers, batch, teacher_name, student, scale, loss):
    cfg = dcfg(teachers[teacher_name], student=student, scales=[scale], loss=loss, pmd=True)
    task = make_distiller(teachers[teacher_name], cfg)
    task.train()
    x, y, idx = batch
    terms = task(x, y, idx)
    assert set(terms) == {"seg", scale, "pmd"}
    params = [p for p in task.parameters() if p.requires_grad]
    check_first_step(terms, params)  # finite, non-zero, gradient reaches the trainable modules
    sum(terms.values()).backward()
    assert task.adapters[scale].proj.weight.grad is not None and task.adapters[scale].proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.teacher.parameters())


def test_teacher_frozen_and_unchanged_by_training_steps(tiny_teacher, batch):
    cfg = dcfg(tiny_teacher)
    task = make_distiller(tiny_teacher, cfg)
    before = {k: v.clone() for k, v in task.teacher.state_dict().items()}  # BN running stats included
    task.train()
    assert task.model.training and not task.teacher.training
    assert not any(m.training for m in task.teacher.modules())
    assert not any(p.requires_grad for p in task.teacher.parameters())
    opt = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    assert not any(p is q for p in opt.param_groups[0]["params"] for q in task.teacher.parameters())
    x, y, idx = batch
    for _ in range(2):
        opt.zero_grad()
        sum(task(x, y, idx).values()).backward()
        opt.step()
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("mode", ["frozen", "identity"])
def test_contrastive_teacher_head_is_not_trained(tiny_teacher, batch, mode):
    cfg = dcfg(tiny_teacher, scales=["dec"], loss="contrastive", loss_options={"teacher_head": mode})
    task = make_distiller(tiny_teacher, cfg).train()
    head = task.losses["dec"].teacher_head
    before = {k: v.clone() for k, v in head.state_dict().items()}
    trained = [p for p in task.parameters() if p.requires_grad]
    assert not any(p is q for p in trained for q in head.parameters())
    opt = torch.optim.AdamW(trained, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        sum(task(*batch).values()).backward()
        opt.step()
    assert all(p.grad is None for p in head.parameters())
    assert all(torch.equal(v, before[k]) for k, v in head.state_dict().items())
    assert (mode == "identity") == (len(before) == 0)
    assert task.losses["dec"].student_head[0].weight.grad.abs().sum() > 0


def test_zero_weight_switches_a_term_off(tiny_teacher, batch):
    cfg = dcfg(tiny_teacher, weights={"seg": 0.4, "enc": 0.0, "bottleneck": 0.2, "dec": 0.1, "pmd": 0.0})
    task = make_distiller(tiny_teacher, cfg)
    assert task.scales == ["bottleneck", "dec"] and "enc" not in task.adapters and task.pmd is None
    terms = task(*batch)
    assert set(terms) == {"seg", "bottleneck", "dec"}
    check_first_step(terms, [p for p in task.parameters() if p.requires_grad])
    with pytest.raises(MedkdError, match="weight 0"):
        make_distiller(tiny_teacher, dcfg(tiny_teacher, scales=["enc"], pmd=False,
                                          weights={"seg": 0.0, "enc": 0.0}))


def test_first_step_check_names_constant_loss(tiny_teacher, batch, monkeypatch):
    from medkd.distill.losses import FeatureLoss

    class Constant(FeatureLoss):  # every registered feature loss is a FeatureLoss (one interface)
        name = "constant"

        def compute(self, s, t, y=None):
            return torch.tensor(0.7, requires_grad=True)

    monkeypatch.setitem(LOSSES._items, "constant", Constant)
    cfg = dcfg(tiny_teacher, scales=["dec"], loss="mse", pmd=False)
    cfg.loss = "constant"
    task = make_distiller(tiny_teacher, cfg)
    with pytest.raises(TrainingError, match="'dec' gives no gradient"):
        check_first_step(task(*batch), [p for p in task.parameters() if p.requires_grad])


# ----------------------------------------------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def caches(monkeypatch_module):
    """Every TeacherCache built by medkd.distill.teacher_outputs, in order."""
    import medkd.distill.teacher_outputs as run_mod

    made = []

    class Recording(TeacherCache):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch_module.setattr(run_mod, "TeacherCache", Recording)
    return made


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def student_teacher(tiny_teacher, tmp_path_factory):
    """A private copy of the tiny teacher (its cache folder starts empty)."""
    t = tmp_path_factory.mktemp("dteacher") / "teacher"
    shutil.copytree(tiny_teacher, t)
    return t


def _odd_batch(data, fraction=0.5, seed=0):
    n = len(SliceDataset(data, "train", fraction=fraction, seed=seed))
    bs = n - 1 if n % 2 == 0 else (n - 1) // 2  # n % bs == 1: the loop drops the final batch of 1
    assert n % bs == 1 and bs >= 2
    return bs


@pytest.fixture(scope="module")
def one_epoch(tiny_data, student_teacher, caches, tmp_path_factory):
    from medkd.distill.run import distill

    run = tmp_path_factory.mktemp("sruns") / "one"
    t_hash = load_checkpoint(student_teacher / "best.pt")["model"]
    summary = distill(tiny_data, run, dcfg(student_teacher, batch_size=_odd_batch(tiny_data), teacher_outputs="disk"),
                      console=_quiet())
    return run, summary, t_hash, caches[-1]


def test_distill_run_folder(one_epoch, student_teacher):
    run, summary, t_weights, cache = one_epoch
    assert STUDENT_KEYS <= set(summary) and summary["kind"] == "student" and summary["arch"] == "s1"
    assert summary["scales"] == list(SCALES) and summary["loss"] == "contrastive" and summary["pmd"] is True
    assert summary["fraction"] == 0.5 and Path(summary["teacher"]) == student_teacher.resolve()
    assert json.loads((run / "summary.json").read_text()) == summary
    hist = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert len(hist) == 1 and {"seg", "enc", "bottleneck", "dec", "pmd", "loss", "val_dice"} <= set(hist[0])
    # the teacher on disk is untouched
    for k, v in load_checkpoint(student_teacher / "best.pt")["model"].items():
        assert torch.equal(v, t_weights[k])
    # adapters trained and saved beside the student; the student loads alone
    last = load_checkpoint(run / "last.pt")
    heads = torch.load(run / "distill_heads.pt", weights_only=True)  # state dicts only: loads without an allow-list
    assert set(last["extra"]["adapters"]) == set(heads["adapters"])
    assert any(k.startswith("enc.proj") for k in heads["adapters"])
    model, ck = load_model_from_run(run)
    assert model.arch == "s1" and not any(k.startswith(("adapters", "teacher")) for k in ck["model"])
    assert model(torch.zeros(1, 1, 32, 32)).shape == (1, 1, 32, 32)
    assert cache.teacher_slices == summary["train_slices"]  # the teacher ran once per slice, to fill the cache


def test_second_run_reuses_cache_and_resume_matches_straight_run(one_epoch, tiny_data, student_teacher, caches,
                                                                 tmp_path):
    """A straight 2-epoch run hits the cache (teacher not run); 1 epoch + --resume to 2 gives the same student."""
    from medkd.distill.run import distill

    run1, s1, _, _ = one_epoch
    bs = _odd_batch(tiny_data)
    straight = distill(tiny_data, tmp_path / "two", dcfg(student_teacher, batch_size=bs, epochs=2, teacher_outputs="disk"),
                       console=_quiet())
    assert caches[-1].teacher_slices == 0 and caches[-1].key == s1["teacher_cache"]
    resumed_run = tmp_path / "resumed"
    shutil.copytree(run1, resumed_run)
    resumed = distill(tiny_data, resumed_run, dcfg(student_teacher, batch_size=bs, epochs=2, teacher_outputs="disk"), resume=True,
                      console=_quiet())
    assert caches[-1].teacher_slices == 0
    assert resumed["epochs_done"] == 2
    a, b = load_checkpoint(resumed_run / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["extra"]["adapters"]:
        assert torch.equal(a["extra"]["adapters"][k], b["extra"]["adapters"][k]), k
    assert resumed["best_val_dice"] == straight["best_val_dice"]


def test_fraction_is_case_level_and_seeded(tiny_data, one_epoch):
    data = PreparedData(tiny_data)
    train = data.case_ids("train")
    a = SliceDataset(data, "train", fraction=0.5, seed=0)
    assert a.case_ids == select_fraction(train, 0.5, 0) == SliceDataset(data, "train", fraction=0.5, seed=0).case_ids
    assert len(a.case_ids) == round(0.5 * len(train)) and {c for c, _ in a.index} == set(a.case_ids)
    assert len(a) == sum(data.case(c)["prepared_shape"][0] for c in a.case_ids)  # whole cases only
    assert {tuple(select_fraction(train, 0.5, s)) for s in range(8)} != {tuple(a.case_ids)}  # the seed matters
    assert one_epoch[1]["train_cases"] == len(a.case_ids) and one_epoch[1]["train_slices"] == len(a)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_no_kd_baseline_never_loads_teacher(tiny_data, tmp_path, monkeypatch):
    import medkd.distill.run as run_mod

    def boom(*a, **kw):
        raise AssertionError("the teacher must not be loaded")

    monkeypatch.setattr(run_mod, "load_teacher", boom)
    n = len(SliceDataset(tiny_data, "train", fraction=0.5, seed=0))
    bs = next(b for b in range(3, n) if n % b >= 2)  # a partial last batch that is kept
    r = _cli(["distill", tiny_data, "-o", tmp_path / "base", "--scales", "none", "--no-pmd", "--student-width", "4",
              "--epochs", "1", "--batch-size", bs, "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["teacher"] is None and doc["scales"] == [] and doc["pmd"] is False and doc["kind"] == "student"
    hist = json.loads((tmp_path / "base" / "history.jsonl").read_text())
    assert set(hist) == {"epoch", "loss", "seg", "val_dice", "lr", "seconds"}


def test_cli_subset_seed_holds_the_training_subset(tiny_data, tmp_path):
    """``--subset-seed`` draws the --fraction subset independently of --seed, and is recorded."""
    train = PreparedData(tiny_data).case_ids("train")
    common = ["--scales", "none", "--no-pmd", "--student-width", "4", "--epochs", "1", "--batch-size", "8",
              "--device", "cpu", "--json"]
    docs = []
    for seed in (1, 2):
        r = _cli(["distill", tiny_data, "-o", tmp_path / f"s{seed}", "--seed", seed, "--subset-seed", 5, *common])
        assert r.exit_code == 0, r.output
        docs.append(json.loads(r.stdout))
    assert docs[0]["subset_seed"] == docs[1]["subset_seed"] == 5
    assert docs[0]["labelled_case_ids"] == docs[1]["labelled_case_ids"] == select_fraction(train, 0.5, 5)
    assert yaml.safe_load((tmp_path / "s1" / "config.yaml").read_text())["subset_seed"] == 5
    r = _cli(["distill", tiny_data, "-o", tmp_path / "plain", "--seed", 2, *common])
    doc = json.loads(r.stdout)
    assert doc["subset_seed"] is None and doc["labelled_case_ids"] == select_fraction(train, 0.5, 2)
    assert _cli(["distill", tiny_data, "-o", tmp_path / "bad", "--subset-seed", -1, *common]).exit_code == 2


@pytest.mark.parametrize("opt,value,valid", [
    ("--scales", "enc,middle", "bottleneck"),
    ("--loss", "kl", "contrastive"),
    ("--student", "s3", "s2"),
])
def test_cli_bad_names_are_usage_errors(tiny_data, tmp_path, opt, value, valid):
    r = _cli(["distill", tiny_data, "-o", tmp_path / "r", "--teacher", tmp_path, opt, value, "--device", "cpu"])
    assert r.exit_code == 2
    assert valid in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_cli_distill_needs_teacher(tiny_data, tmp_path):
    r = _cli(["distill", tiny_data, "-o", tmp_path / "r", "--device", "cpu"])
    assert r.exit_code == 1 and "--teacher" in r.stderr


def test_cli_teacher_of_wrong_kind(tiny_data, one_epoch, tmp_path):
    r = _cli(["distill", tiny_data, "-o", tmp_path / "r", "--teacher", one_epoch[0], "--student-width", "4",
              "--device", "cpu"])
    assert r.exit_code == 1 and "not a teacher run" in r.stderr


def test_pmd_only_step_needs_no_feature_taps(tiny_teacher, batch):
    task = make_distiller(tiny_teacher, dcfg(tiny_teacher, scales=[], pmd=True))
    assert task.targets.view.hooks is None and task.s_hooks is None and len(task.adapters) == 0
    terms = task(*batch)
    assert set(terms) == {"seg", "pmd"}
    check_first_step(terms, [p for p in task.parameters() if p.requires_grad])


def test_ema_distill_run_keeps_the_averaged_student(tiny_data, tiny_teacher, tmp_path):
    """--ema-decay on a student (feature hooks on it): best.pt is the average (epoch 1 is always the best so far),
    last.pt keeps the trained weights and the average; the student hooks still catch the training features."""
    from medkd.distill.run import distill

    summary = distill(tiny_data, tmp_path / "ema", dcfg(tiny_teacher, scales=["dec"], loss="mse", ema_decay=0.5,
                                                        teacher_outputs="live"), console=_quiet())
    assert summary["best_epoch"] == 1
    last, best = load_checkpoint(tmp_path / "ema" / "last.pt"), load_checkpoint(tmp_path / "ema" / "best.pt")
    assert last["ema"]["weights"].keys() == best["model"].keys() == last["model"].keys()
    for k, v in best["model"].items():
        assert torch.equal(v, last["ema"]["weights"][k]), k
    assert any(not torch.equal(v, last["model"][k]) for k, v in best["model"].items())
    assert yaml.safe_load((tmp_path / "ema" / "config.yaml").read_text())["ema_decay"] == 0.5
