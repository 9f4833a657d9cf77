"""``medkd train-teacher``: the training loop, checkpoints, resume, determinism, NaN stop and the CLI.

Runs are tiny (width 4, 32 px, 1-2 epochs); module-scoped fixtures train each run once and share it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import _quiet, cli as _cli, interrupt_at_validation, tiny_teacher_config
from medkd.errors import MedkdError, TrainingError
from medkd.rundir import atomic_save, partial_dir
from medkd.checkpoint import load_checkpoint, load_model_from_run
from medkd.train.teacher import train_teacher

SUMMARY_KEYS = {"kind", "arch", "params", "epochs_done", "best_epoch", "best_val_dice", "seconds", "seed",
                "medkd_version"}


def _weights(run: Path, which: str = "last") -> dict:
    return load_checkpoint(Path(run) / f"{which}.pt")["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def _metrics(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k not in ("seconds",)}


def _history(run: Path) -> list:
    return [json.loads(line) for line in (Path(run) / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("train_runs")


@pytest.fixture(scope="module")
def run2(tiny_data, runs):
    """An uninterrupted 2-epoch teacher run (the reference for resume tests)."""
    run = runs / "straight2"
    summary = train_teacher(tiny_data, run, tiny_teacher_config(epochs=2), console=_quiet())
    return run, summary


# ------------------------------------------------------------------------------------------- library: the loop


def test_two_epochs_reduce_loss_and_write_contract_files(run2):
    run, summary = run2
    assert not partial_dir(run).exists()
    for name in ("best.pt", "last.pt", "config.yaml", "summary.json", "history.jsonl"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk == summary
    assert SUMMARY_KEYS <= set(summary)
    assert summary["kind"] == "teacher" and summary["arch"] == "unet" and summary["epochs_done"] == 2
    assert summary["seed"] == 0 and summary["params"] > 0
    assert 1 <= summary["best_epoch"] <= 2 and 0.0 <= summary["best_val_dice"] <= 1.0
    hist = _history(run)
    assert [r["epoch"] for r in hist] == [1, 2]
    for r in hist:  # every term by name, plus the total
        assert {"loss", "dice", "bce", "recon", "val_dice", "lr"} <= set(r)
        assert r["loss"] == pytest.approx(r["dice"] + r["bce"] + r["recon"], rel=1e-6)
    assert hist[1]["loss"] < hist[0]["loss"]
    assert summary["best_val_dice"] == max(r["val_dice"] for r in hist)


def test_config_yaml_is_resolved(run2, tiny_data):
    run, _ = run2
    doc = yaml.safe_load((run / "config.yaml").read_text())
    assert doc["kind"] == "teacher" and Path(doc["data"]) == Path(tiny_data).resolve()
    assert doc["width"] == 4 and doc["epochs"] == 2 and doc["arch"] == "unet" and doc["lr"] == 3e-3
    from medkd.config import TeacherConfig, build_config, to_dict

    again = build_config(TeacherConfig, run / "config.yaml")  # re-usable as --config
    assert to_dict(again) == to_dict(tiny_teacher_config(epochs=2))


def test_best_loads_alone(run2):
    run, summary = run2
    model, ck = load_model_from_run(run)
    assert not model.training and model.arch == "unet" and ck["epoch"] == summary["best_epoch"]
    seg, recon = model(torch.zeros(2, 1, 32, 32))
    assert seg.shape == (2, 1, 32, 32) and recon.shape == (2, 1, 32, 32)


def test_same_seed_is_deterministic(tiny_data, tiny_teacher, runs):
    run = runs / "again"
    summary = train_teacher(tiny_data, run, tiny_teacher_config(), console=_quiet())
    first = json.loads((tiny_teacher / "summary.json").read_text())
    assert _metrics(summary) == _metrics(first)
    assert _history(run)[0]["loss"] == _history(tiny_teacher)[0]["loss"]
    assert_same_weights(_weights(run), _weights(tiny_teacher))


def test_extending_a_finished_run_with_resume_equals_straight_run(tiny_data, tiny_teacher, run2, runs):
    """1 epoch (finished), then ``--resume`` with epochs=2 == 2 epochs straight, bit for bit."""
    run = runs / "extended"
    shutil.copytree(tiny_teacher, run)
    summary = train_teacher(tiny_data, run, tiny_teacher_config(epochs=2), resume=True, console=_quiet())
    assert summary["epochs_done"] == 2 and not partial_dir(run).exists()
    assert_same_weights(_weights(run), _weights(run2[0]))
    assert _metrics(summary) == _metrics(run2[1])
    assert [r["loss"] for r in _history(run)] == [r["loss"] for r in _history(run2[0])]


def test_interrupted_then_resumed_equals_straight_run(tiny_data, run2, runs, monkeypatch):
    """Ctrl-C during epoch 2 keeps RUN.partial/last.pt (epoch 1); --resume ends with the straight run's weights."""
    run = runs / "interrupted"
    undo = interrupt_at_validation(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny_data, run, tiny_teacher_config(epochs=2), console=_quiet())
    undo()
    assert not run.exists()
    assert load_checkpoint(partial_dir(run) / "last.pt")["epoch"] == 1
    with pytest.raises(MedkdError, match="interrupted run.*--resume"):  # its epochs are not thrown away silently
        train_teacher(tiny_data, run, tiny_teacher_config(epochs=2), console=_quiet())
    assert (partial_dir(run) / "last.pt").is_file()
    summary = train_teacher(tiny_data, run, tiny_teacher_config(epochs=2), resume=True, console=_quiet())
    assert summary["epochs_done"] == 2
    assert_same_weights(_weights(run), _weights(run2[0]))
    assert _metrics(summary) == _metrics(run2[1])


def test_resume_with_nothing_to_resume_fails(tiny_data, runs):
    with pytest.raises(MedkdError, match="nothing to resume"):
        train_teacher(tiny_data, runs / "nothing", tiny_teacher_config(), resume=True, console=_quiet())


def test_nan_loss_stops_with_last_good_checkpoint(tiny_data, runs, monkeypatch):
    import medkd.train.loop as loop
    from medkd.train.teacher import TeacherTask

    run = runs / "nan"
    real_validate, real_forward = loop.validate, TeacherTask.forward
    state = {"epochs": 0}

    def counting_validate(*a, **kw):
        state["epochs"] += 1
        return real_validate(*a, **kw)

    def forward(self, x, y, index=None):
        terms = real_forward(self, x, y, index)
        if state["epochs"] >= 1:  # epoch 2
            terms["recon"] = terms["recon"] * float("nan")
        return terms

    monkeypatch.setattr(loop, "validate", counting_validate)
    monkeypatch.setattr(TeacherTask, "forward", forward)
    with pytest.raises(TrainingError) as e:
        train_teacher(tiny_data, run, tiny_teacher_config(epochs=3), console=_quiet())
    msg = str(e.value)
    assert "\n" not in msg and "recon" in msg and "epoch 2" in msg and "last.pt" in msg
    assert not run.exists()
    ck = load_checkpoint(partial_dir(run) / "last.pt")
    assert ck["epoch"] == 1 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_first_step_check_names_a_dead_term(tiny_data, runs, monkeypatch):
    from medkd.train.teacher import TeacherTask

    real_forward = TeacherTask.forward

    def forward(self, x, y, index=None):
        terms = real_forward(self, x, y, index)
        terms["recon"] = torch.zeros((), requires_grad=True) + 0.5  # constant: no gradient to the model
        return terms

    monkeypatch.setattr(TeacherTask, "forward", forward)
    with pytest.raises(TrainingError, match="'recon' gives no gradient"):
        train_teacher(tiny_data, runs / "dead", tiny_teacher_config(), console=_quiet())


# ------------------------------------------------------------------------------------ moving average of the weights


def test_model_ema_hand_values_and_swap():
    """ema = d^2 w0 + d (1 - d) w1 + (1 - d) w2 after two steps; buffers are the model's; ``applied`` swaps the
    average in and puts the model's own weights back into the same parameter tensors."""
    from medkd.train.ema import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    ema = ModelEMA(model, 0.9)
    steps = []
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.train()(torch.randn(4, 2))  # BatchNorm's running statistics move
        steps.append({k: v.clone() for k, v in model.state_dict().items()})
        ema.update(model)
    for k in ("0.weight", "0.bias", "1.weight", "1.bias"):
        torch.testing.assert_close(ema.weights[k], 0.81 * w0[k] + 0.09 * steps[0][k] + 0.1 * steps[1][k])
    for k in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        assert torch.equal(ema.weights[k], steps[1][k]), k  # copied, not averaged
    params = list(model.parameters())
    with ema.applied(model):
        assert all(torch.equal(v, ema.weights[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, steps[1][k]) for k, v in model.state_dict().items())
    assert all(p is q for p, q in zip(params, model.parameters()))  # the optimizer's references stay valid


@pytest.fixture(scope="module")
def ema_run(tiny_data, runs):
    """A straight 2-epoch teacher run with ``ema_decay=0.9``."""
    run = runs / "ema"
    return run, train_teacher(tiny_data, run, tiny_teacher_config(epochs=2, ema_decay=0.9), console=_quiet())


def test_ema_run_validates_and_keeps_the_average(ema_run, run2, tiny_data):
    from medkd.data.prepared import PreparedData
    from medkd.train.validation import validate

    run, summary = ema_run
    last = load_checkpoint(run / "last.pt")
    assert last["ema"]["decay"] == 0.9 and last["ema"]["weights"].keys() == last["model"].keys()
    assert any(not torch.equal(last["ema"]["weights"][k], last["model"][k]) for k in last["model"])
    assert_same_weights(last["model"], _weights(run2[0]))  # the average does not change what is trained
    model, ck = load_model_from_run(run)  # best.pt: the average at its epoch, which scored the recorded Dice
    data = PreparedData(tiny_data)
    dice = validate(lambda x: model(x)[0], data, data.require_split("val"), torch.device("cpu"), 1, 8)
    assert dice == _history(run)[ck["epoch"] - 1]["val_dice"] == summary["best_val_dice"]
    if ck["epoch"] == 2:
        assert_same_weights(ck["model"], last["ema"]["weights"])


def test_ema_interrupted_then_resumed_equals_straight_run(tiny_data, ema_run, runs, monkeypatch):
    straight, summary = ema_run
    run = runs / "ema-interrupted"
    cfg = tiny_teacher_config(epochs=2, ema_decay=0.9)
    undo = interrupt_at_validation(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(tiny_data, run, cfg, console=_quiet())
    undo()
    first = load_checkpoint(partial_dir(run) / "last.pt")
    assert first["epoch"] == 1 and "ema" in first
    assert_same_weights(load_checkpoint(partial_dir(run) / "best.pt")["model"], first["ema"]["weights"])
    with pytest.raises(MedkdError, match="ema_decay=0.9 there, 0.5 now"):
        train_teacher(tiny_data, run, tiny_teacher_config(epochs=2, ema_decay=0.5), resume=True, console=_quiet())
    resumed = train_teacher(tiny_data, run, cfg, resume=True, console=_quiet())
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(straight / "last.pt")
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"]["weights"], b["ema"]["weights"])
    assert_same_weights(_weights(run, "best"), _weights(straight, "best"))
    assert _metrics(resumed) == _metrics(summary)
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in _history(run)] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in _history(straight)]


# ------------------------------------------------------------------------------------------------ checkpoints


def test_atomic_save_crash_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"model": {"w": torch.ones(3)}, "model_config": {}}, path)
    real_save = torch.save

    def crash(obj, f, *a, **kw):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(MedkdError, match=r"last.pt: cannot write \(disk full\)"):
        atomic_save({"model": {"w": torch.zeros(3)}, "model_config": {}}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_truncated_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(MedkdError, match="cannot load checkpoint") as e:
        load_checkpoint(tmp_path / "last.pt")
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_json_with_config_and_flag_override(tiny_data, tiny_teacher, runs):
    """``--config`` a run's config.yaml (width 4, lr 3e-3) with ``--lr`` overriding it; ``--json`` = only JSON."""
    run = runs / "cli"
    r = _cli(["train-teacher", tiny_data, "-o", run, "--config", tiny_teacher / "config.yaml", "--lr", "0.001",
              "--device", "cpu", "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)  # the whole of stdout is one JSON document
    assert SUMMARY_KEYS <= set(doc) and doc["epochs_done"] == 1 and doc["kind"] == "teacher"
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["lr"] == 0.001 and cfg["width"] == 4 and cfg["batch_size"] == 4
    assert json.loads((run / "summary.json").read_text()) == doc


def test_cli_existing_run_needs_overwrite(tiny_data, tiny_teacher):
    before = (tiny_teacher / "summary.json").read_text()
    r = _cli(["train-teacher", tiny_data, "-o", tiny_teacher, "--width", "4", "--epochs", "1", "--device", "cpu"])
    assert r.exit_code == 1
    assert "already exists" in r.stderr and "--overwrite" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tiny_teacher / "summary.json").read_text() == before


def test_cli_unknown_arch_is_usage_error(tiny_data, tmp_path):
    r = _cli(["train-teacher", tiny_data, "-o", tmp_path / "r", "--arch", "resnet", "--device", "cpu"])
    assert r.exit_code == 2
    assert "resnet" in r.stderr and "unet" in r.stderr and "transunet" in r.stderr
    assert not (tmp_path / "r").exists()


def test_cli_missing_data_is_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    r = _cli(["train-teacher", tmp_path / "empty", "-o", tmp_path / "r", "--device", "cpu"])
    assert r.exit_code == 1
    assert "manifest.json" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists() and not partial_dir(tmp_path / "r").exists()


def test_cli_config_unknown_key_is_named(tiny_data, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("width: 4\nepocs: 2\n")
    r = _cli(["train-teacher", tiny_data, "-o", tmp_path / "r", "--config", bad, "--device", "cpu"])
    assert r.exit_code == 1
    assert "epocs" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cli_bad_value_is_one_line_error(tiny_data, tmp_path):
    r = _cli(["train-teacher", tiny_data, "-o", tmp_path / "r", "--epochs", "0", "--device", "cpu"])
    assert r.exit_code == 2 and "--epochs must be >= 1" in r.stderr  # a bad flag is a usage error


def test_flags_override_yaml(tmp_path):
    from medkd.config import TeacherConfig, build_config

    y = tmp_path / "c.yaml"
    y.write_text("width: 8\nlr: 1e-4\nepochs: 3\n")
    cfg = build_config(TeacherConfig, y, {"epochs": 5, "width": None})
    assert (cfg.width, cfg.lr, cfg.epochs) == (8, 1e-4, 5)


def test_torch_versions_compare_as_numbers():
    """'2.13' is newer than '2.4' (as text it sorts before): the fused CPU optimizer and the legacy checkpoint
    allow-list are chosen by number."""
    from medkd.compat import version_tuple

    assert version_tuple("2.13.0+cpu") == (2, 13, 0) > (2, 6) > version_tuple("2.4.1")
    assert version_tuple("2.6.0a0+git123") == (2, 6, 0)


# ------------------------------------------------------------------------------------- training budget, subset


def test_pass_steps_is_the_loaders_length():
    """The steps of one pass (used to plan equal budgets without training) are what the loader makes."""
    from torch.utils.data import TensorDataset

    from medkd.config import TeacherConfig
    from medkd.train.batches import epoch_loader, pass_steps

    for n in (1, 2, 7, 8, 9, 17):
        for bs in (1, 4, 8):
            loader, _ = epoch_loader(TensorDataset(torch.zeros(n)), TeacherConfig(batch_size=bs), 0)
            assert pass_steps(n, bs) == len(loader), (n, bs)


def test_budget_sampler_draws_permutations_back_to_back():
    from torch.utils.data import DistributedSampler

    from medkd.train.batches import BudgetSampler

    n, bs, steps = 5, 4, 3
    order = BudgetSampler(n, steps * bs, seed=7, epoch=2).indices()
    assert len(order) == 12
    assert sorted(order[:5]) == sorted(order[5:10]) == list(range(5)) and len(set(order[10:])) == 2  # then a partial
    plain = DistributedSampler(range(n), num_replicas=1, rank=0, shuffle=True, seed=7)
    plain.set_epoch(2)
    assert order[:5] == list(plain)  # the first pass is the epoch's order without a budget
    assert BudgetSampler(n, 12, seed=7, epoch=3).indices() != order  # a new epoch, a new order
    # two processes: each takes its half of every global batch of ``bs`` (DistributedSampler's interleaving)
    ranks = [list(BudgetSampler(n, 12, seed=7, epoch=2, rank=r, world_size=2)) for r in (0, 1)]
    assert all(len(r) == 6 for r in ranks)
    for step in range(steps):
        local = [r[step * 2:(step + 1) * 2] for r in ranks]  # local batch size bs / 2
        assert sorted(local[0] + local[1]) == sorted(order[step * bs:(step + 1) * bs])


def test_budget_is_measured_and_recorded(tiny_data, run2, runs):
    from medkd.train.batches import pass_steps

    summary = run2[1]
    per_epoch = pass_steps(summary["train_slices"], 4)
    n_images = summary["train_slices"] - (1 if summary["train_slices"] % 4 == 1 else 0)
    assert summary["budget"] == {"epochs": 2, "steps_per_epoch": per_epoch, "optimizer_steps": 2 * per_epoch,
                                 "images_seen": 2 * n_images, "augment": False}
    # a fixed budget: exactly that many full batches, whatever the training set's size
    s = train_teacher(tiny_data, runs / "budget", tiny_teacher_config(steps_per_epoch=3, augment=True),
                      console=_quiet())
    assert s["budget"] == {"epochs": 1, "steps_per_epoch": 3, "optimizer_steps": 3, "images_seen": 12,
                           "augment": True}
    assert yaml.safe_load((runs / "budget" / "config.yaml").read_text())["steps_per_epoch"] == 3


def test_budget_of_one_pass_trains_like_no_budget(tiny_data, run2, runs):
    """steps_per_epoch = one pass (a batch size that divides the training slices): the same run, bit for bit."""
    n = run2[1]["train_slices"]
    bs = next(b for b in range(2, n + 1) if n % b == 0)  # n itself when n is prime: one step per epoch
    a = train_teacher(tiny_data, runs / "nobudget", tiny_teacher_config(batch_size=bs), console=_quiet())
    b = train_teacher(tiny_data, runs / "onepass", tiny_teacher_config(batch_size=bs, steps_per_epoch=n // bs),
                      console=_quiet())
    assert_same_weights(_weights(runs / "nobudget"), _weights(runs / "onepass"))
    assert a["best_val_dice"] == b["best_val_dice"] and a["budget"] == b["budget"]


def test_teacher_fraction_trains_on_the_students_subset(tiny_data, runs):
    """train-teacher --fraction/--subset-seed: the seeded subset a student with the same options is given labels of."""
    from medkd.config import DistillConfig, build_config
    from medkd.data.prepared import PreparedData
    from medkd.distill.run import student_train_set

    s = train_teacher(tiny_data, runs / "semi", tiny_teacher_config(fraction=0.5, subset_seed=3), console=_quiet())
    student = build_config(DistillConfig, overrides={"fraction": 0.5, "subset_seed": 3, "scales": "none",
                                                     "pmd": False, "seed": 9})
    labelled = student_train_set(PreparedData(tiny_data), student).case_ids
    all_train = PreparedData(tiny_data).case_ids("train")
    assert s["train_case_ids"] == sorted(labelled) and len(labelled) < len(all_train)
    assert s["fraction"] == 0.5 and s["subset_seed"] == 3
    # the default: every train case (the reference study's setting), recorded
    default = json.loads((runs / "budget" / "summary.json").read_text())
    assert default["fraction"] == 1.0 and default["subset_seed"] is None
    assert default["train_case_ids"] == sorted(all_train)


def test_teacher_fraction_cli_flags(tiny_data, tmp_path):
    r = _cli(["train-teacher", tiny_data, "-o", tmp_path / "t", "--fraction", "0"])
    assert r.exit_code == 2 and "fraction must be in (0, 1]" in r.stderr
    r = _cli(["train-teacher", tiny_data, "-o", tmp_path / "t", "--steps-per-epoch", "0"])
    assert r.exit_code == 2 and "steps-per-epoch must be >= 1" in r.stderr
    from medkd.config import TeacherConfig, build_config
    from medkd.options import OptionError

    with pytest.raises(OptionError, match="steps_per_epoch must be an integer, got 2.5"):
        build_config(TeacherConfig, overrides={"steps_per_epoch": 2.5})
    assert not (tmp_path / "t").exists()


def test_term_sums_are_added_over_ranks_in_the_tasks_order(monkeypatch):
    """Under DDP every process adds its per-term sums in the task's fixed order, 0 for a term it never saw (a rank
    whose batches had no labelled slice has no 'seg'): the vectors line up, whatever each rank's first batch was."""
    import medkd.train.loop as loop
    from medkd import distributed

    seen = []
    monkeypatch.setattr(distributed, "all_reduce_", lambda t, *a: seen.append(t.tolist()) or t)
    env = distributed.DistEnv(rank=1, world_size=2, local_rank=1)
    sums, n = loop._sum_over_ranks({"pmd": 2.0, "pl": 1.0}, 3, env, torch.device("cpu"), ["seg", "pmd", "pl"])
    assert seen == [[0.0, 2.0, 1.0, 3.0]] and sums == {"seg": 0.0, "pmd": 2.0, "pl": 1.0} and n == 3
