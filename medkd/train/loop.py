"""The training loop: a :class:`Trainer` (one run's state and phases) and :func:`fit` (restore, epochs, finish).

What is trained is a :class:`~medkd.train.task.Task`; losses, hooks and metrics live elsewhere, and so do the
loop's parts: batches (:mod:`.batches`), optimizer (:mod:`.optim`), seeding and RNG state (:mod:`.seeding`),
validation (:mod:`.validation`), loss checks (:mod:`.checks`), provenance and resume checks (:mod:`.provenance`),
the weights' moving average (:mod:`.ema`), the entry-point decorator (:mod:`.entry`) and ``curves.png``
(:mod:`.plots`).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from rich.console import Console
from rich.markup import escape

import medkd
from medkd import distributed, rundir
from medkd.config import TrainConfig, to_dict
from medkd.data.prepared import PreparedData, SliceDataset
from medkd.errors import MedkdError, TrainingError
from medkd.infer import match_channels, resolve_device
from medkd.metrics.efficiency import count_params
from medkd.report.progress import Bars
from medkd.rundir import atomic_save, finalize_run_dir, partial_dir, prepare_run_dir
from medkd.checkpoint import load_checkpoint
from medkd.train.batches import augment_batch, epoch_loader
from medkd.train.checks import all_finite, check_first_step
from medkd.train.ema import ModelEMA
from medkd.train.entry import claims_run
from medkd.train.optim import extend_schedule, make_optimizer, make_scheduler
from medkd.train.plots import plot_curves
from medkd.train.provenance import data_record, resume_mismatch
from medkd.train.seeding import rng_state, set_deterministic, set_rng_state
from medkd.train.task import Task
from medkd.train.validation import validate


def _sum_over_ranks(sums: Dict[str, float], n: int, env: distributed.DistEnv, device: torch.device,
                    names: List[str]):
    """Per-term sums (loss x samples) and the sample count, added over the processes in the fixed order ``names``
    (a process that never saw a term, e.g. no labelled slice in its batches, adds 0 for it)."""
    if env.world_size == 1:
        return sums, n
    keys = list(names)
    t = torch.tensor([sums.get(k, 0.0) for k in keys] + [float(n)], dtype=torch.float64, device=device)  # NCCL: GPU
    t = distributed.all_reduce_(t).cpu()
    return {k: float(v) for k, v in zip(keys, t[:-1])}, int(t[-1])


class Trainer:
    """The state of one training run (task, optimizer, schedule, scaler, history, best) and its phases:
    :meth:`restore` (from ``last.pt``), one epoch (:meth:`train_epoch` + :meth:`end_epoch`), :meth:`finish`.

    Args:
        task: what is trained; moved to ``device``.
        cfg: the training config.
        data: the prepared dataset (validation split; what was trained on is recorded in every checkpoint).
        train_set: the training slices.
        run: the run folder (written into ``RUN.partial`` until :meth:`finish`).
        kind: ``"teacher"`` or ``"student"``.
        device: where to train.
    """

    def __init__(self, task: Task, cfg: TrainConfig, data: PreparedData, train_set: SliceDataset, run: Path,
                 kind: str, device: torch.device):
        self.task, self.cfg, self.data, self.train_set, self.kind, self.device = task, cfg, data, train_set, kind, device
        self.run, self.work = Path(run), partial_dir(run)
        self.env = distributed.env()
        self.main = self.env.is_main  # under torchrun rank 0 writes for the job
        set_deterministic(device)
        task.to(device)
        self.model = task.model
        self.use_cuda = device.type == "cuda"
        if self.use_cuda:
            task.to(memory_format=torch.channels_last)
        # DDP (under torchrun): trainable modules wrapped, BatchNorm synchronised; ``self.task`` stays the plain module
        self.net = distributed.wrap(task, device, frozen=task.frozen_child(),
                                    find_unused_parameters=task.find_unused_parameters)
        self.amp_dtype = torch.bfloat16 if self.use_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = bool(cfg.amp and self.use_cuda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.params = [p for p in task.parameters() if p.requires_grad]
        self.ema = ModelEMA(self.model, cfg.ema_decay) if cfg.ema_decay > 0 else None  # validated and in best.pt
        self.opt = make_optimizer(self.params, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self.val_ids = data.require_split("val")
        self.history: List[Dict[str, Any]] = []
        self.best = {"epoch": 0, "val_dice": -1.0}
        self.epoch, self.seconds = 0, 0.0  # epochs done, training seconds so far
        # the training budget spent so far, measured (None once unknown: resumed from a checkpoint without it)
        self.budget: Dict[str, Optional[int]] = {"steps_per_epoch": None, "optimizer_steps": 0, "images_seen": 0}
        self.resumed = False
        # the resolved config (re-usable with --config; ``kind``/``data`` are run metadata that build_config skips)
        self.config_doc = {"kind": kind, "data": str(data.root.resolve()), **to_dict(cfg)}
        self.data_doc = data_record(data, train_set.case_ids, self.val_ids)

    # ----------------------------------------------------------------------------------------------- restore

    def restore(self, path: Path, copied: bool = False) -> None:
        """Continue from a full checkpoint (``last.pt``): weights, optimizer, schedule (re-fitted to the current
        ``epochs``), scaler, history, best, RNG states.

        Raises:
            MedkdError: the partial run was made with other options or data (its fresh copy removed when
                ``copied``), or its weights do not fit the model.
        """
        ck = load_checkpoint(path, "cpu")  # load_state_dict copies to the modules' device
        differs = resume_mismatch(ck, type(self.cfg), self.config_doc, self.data_doc)
        if differs:
            if copied and self.main:
                shutil.rmtree(self.work, ignore_errors=True)
            raise MedkdError(f"{path}: cannot resume, the partial run differs: {differs} (resume with the "
                             f"same options and data, or start again with --overwrite)")
        try:
            self.model.load_state_dict(ck["model"])
            self.task.load_trainable_state(ck.get("extra", {}))
            self.opt.load_state_dict(ck["optimizer"])
            if self.ema is not None and ck.get("ema"):
                self.ema.load_state_dict(ck["ema"])
            elif self.ema is not None:  # a checkpoint of a run made before the option existed: start it here
                self.ema.reset(self.model)
        except (RuntimeError, KeyError, ValueError) as e:
            raise MedkdError(f"{path}: cannot resume, its weights do not fit this model "
                             f"({str(e).strip().splitlines()[0][:160]})") from None
        if self.sched is not None and ck.get("scheduler"):
            self.sched.load_state_dict(ck["scheduler"])
            extend_schedule(self.sched, self.opt, self.cfg.epochs)
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.history, self.best = ck["history"], ck["best"]
        self.epoch, self.seconds = ck["epoch"], ck.get("seconds", 0.0)
        self.budget = ck.get("budget") or {"steps_per_epoch": None, "optimizer_steps": None, "images_seen": None}
        set_rng_state(ck["rng"])
        self.resumed = True

    def write_config(self) -> None:
        import yaml

        if self.main:
            rundir.write_text(self.work / rundir.CONFIG, yaml.safe_dump(self.config_doc, sort_keys=False))

    # --------------------------------------------------------------------------------------------- one epoch

    def train_epoch(self, bars: Bars) -> Tuple[Dict[str, float], int]:
        """One epoch (``self.epoch``): a pass over the training set, or ``cfg.steps_per_epoch`` steps. Returns each
        term summed over samples, and the number of samples (over all processes); adds both to :attr:`budget`.

        Raises:
            TrainingError: a non-finite loss (the last good ``last.pt`` stays), a dead term at the first step.
        """
        epoch, cfg, device = self.epoch, self.cfg, self.device
        loader, gen = epoch_loader(self.train_set, cfg, epoch, pin_memory=self.use_cuda, env=self.env)
        self.task.train()
        self.task.on_epoch_start(epoch)
        sums: Dict[str, float] = {}
        n = steps = 0
        bars.start(f"epoch {epoch + 1}", inner_total=len(loader))
        for step, (x, y, idx) in enumerate(loader):
            x = x.to(device, non_blocking=True)
            y = y.to(device, non_blocking=True)
            if cfg.augment:
                x, y = augment_batch(x, y, gen)
            x = match_channels(x, cfg.in_channels)
            if self.use_cuda:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                terms = self.net(x, y, idx)
            terms = {k: v.float() for k, v in terms.items()}
            loss = sum(terms.values())
            if not all_finite(loss, self.env):
                bad = [k for k, v in terms.items() if not torch.isfinite(v)]
                last = self.work / rundir.LAST
                kept = (f"last good checkpoint: {last}, epoch {epoch}" if last.is_file()
                        else "no epoch had finished, so there is no checkpoint to resume from")
                raise TrainingError(f"{self.run}: loss term(s) {bad} became non-finite at epoch {epoch + 1} "
                                    f"step {step + 1}; stopped ({kept})")
            if epoch == 0 and step == 0 and not self.resumed:
                check_first_step(terms, self.params)
            self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
            if self.ema is not None:
                self.ema.update(self.model)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * x.shape[0]
            n += x.shape[0]
            steps += 1
            bars.step({k: s / n for k, s in sums.items()})
        sums, n = _sum_over_ranks(sums, n, self.env, device, self.task.term_names())
        self._spend(steps, n)
        return sums, n

    def _spend(self, steps: int, images: int) -> None:
        """Add one epoch's optimizer steps (global: every process takes each step) and images to the budget."""
        b = self.budget
        b["steps_per_epoch"] = steps
        if b["optimizer_steps"] is not None and b["images_seen"] is not None:
            b["optimizer_steps"] += steps
            b["images_seen"] += images

    def end_epoch(self, sums: Dict[str, float], n: int, t0: float) -> Dict[str, Any]:
        """Validate, step the schedule, record the epoch (begun at ``t0``) and write ``best.pt`` (when improved),
        ``last.pt`` and ``history.jsonl``. Returns the history row (``improved`` added, not saved).

        With ``ema_decay`` the model holds the averaged weights while it is validated and ``best.pt`` is written;
        ``last.pt`` keeps the trained weights and the average."""
        self.task.eval()
        with self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext():
            row, improved = self._validate_and_keep_best(sums, n, t0)
        if self.main:
            atomic_save(self.checkpoint(full=True), self.work / rundir.LAST)
            rundir.write_text(self.work / rundir.HISTORY, "".join(json.dumps(r) + "\n" for r in self.history))
        return {**row, "improved": improved}

    def _validate_and_keep_best(self, sums: Dict[str, float], n: int, t0: float) -> Tuple[Dict[str, Any], bool]:
        """Validate the model as it is, step the schedule, append the history row and write ``best.pt`` when the
        validation Dice improved. Returns ``(row, improved)``."""
        val_dice = validate(self.task.predict, self.data, self.val_ids, self.device, self.cfg.in_channels,
                            self.cfg.batch_size * 2)
        lr = self.opt.param_groups[0]["lr"]
        if self.sched is not None:
            self.sched.step(val_dice) if self.cfg.schedule == "plateau" else self.sched.step()
        self.epoch += 1
        self.seconds += time.time() - t0
        n = max(n, 1)
        row = {"epoch": self.epoch, "loss": sum(sums.values()) / n, **{k: s / n for k, s in sums.items()},
               "val_dice": val_dice, "lr": lr,
               **self.task.epoch_stats(),
               "seconds": round(time.time() - t0, 3)}
        self.history.append(row)
        improved = val_dice > self.best["val_dice"]
        if improved:
            self.best = {"epoch": self.epoch, "val_dice": val_dice}
        if self.main and improved:
            atomic_save(self.checkpoint(full=False), self.work / rundir.BEST)
            heads = self.task.trainable_state()
            if heads:  # modules trained beside the model (the teacher has none)
                atomic_save(heads, self.work / rundir.HEADS)
        return row, improved

    def checkpoint(self, full: bool) -> Dict[str, Any]:
        """``best.pt`` content (the model alone, loadable without the task), or with ``full`` ``last.pt``'s."""
        d = {
            "model": self.model.state_dict(), "model_config": self.model.config, "kind": self.kind,
            "epoch": self.epoch, "config": self.config_doc, "medkd_version": medkd.__version__,
            "data": self.data_doc,
        }
        if full:
            d.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict() if self.sched else None,
                     scaler=self.scaler.state_dict(), history=self.history, best=self.best, rng=rng_state(),
                     seconds=self.seconds, budget=dict(self.budget))
            extra = self.task.trainable_state()
            if extra:
                d["extra"] = extra
            if self.ema is not None:
                d["ema"] = self.ema.state_dict()
        return d

    # ------------------------------------------------------------------------------------------------ finish

    def finish(self, summary_extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """Write ``summary.json`` and move ``RUN.partial`` into place as ``RUN``. Returns the summary."""
        h, d = self.history, self.data_doc
        summary = {
            "kind": self.kind, "arch": self.model.arch, "params": count_params(self.model), "epochs_done": len(h),
            "best_epoch": self.best["epoch"], "best_val_dice": self.best["val_dice"],
            "final_val_dice": h[-1]["val_dice"] if h else None, "seconds": round(self.seconds, 2),
            "seed": self.cfg.seed, "device": str(self.device), "medkd_version": medkd.__version__,
            "data": str(self.data.root.resolve()), "train_cases": len(self.train_set.case_ids),
            "train_slices": len(self.train_set), "data_fingerprint": d["fingerprint"],
            "train_case_ids": d["train_cases"], "val_case_ids": d["val_cases"], "world_size": self.env.world_size,
            "budget": {"epochs": len(h), **self.budget, "augment": bool(self.cfg.augment)},
            **(summary_extra or {}),
        }
        if self.main:
            rundir.write_text(self.work / rundir.SUMMARY, json.dumps(summary, indent=2))
            finalize_run_dir(self.run)
        distributed.barrier()  # every rank returns once the run folder is in place
        return summary


def epoch_line(kind: str, row: Dict[str, Any], epochs: int) -> str:
    """``teacher epoch 3/12 loss=... dice=... val_dice=0.8123 * (4.1s)`` (``*``: new best)."""
    terms = " ".join(f"{k}={row[k]:.4f}" for k in row if k not in ("epoch", "val_dice", "lr", "seconds", "improved"))
    return (f"{kind} epoch {row['epoch']}/{epochs} {terms} val_dice={row['val_dice']:.4f}"
            f"{' *' if row['improved'] else ''} ({row['seconds']:.1f}s)")


@claims_run
def fit(
    task: Task,
    cfg: TrainConfig,
    data: PreparedData,
    train_set: SliceDataset,
    run: Path,
    *,
    kind: str,
    summary_extra: Optional[Dict[str, Any]] = None,
    resume: bool = False,
    overwrite: bool = False,
    console: Optional[Console] = None,
    on_epoch: Optional[Callable[[Dict[str, Any]], None]] = None,
    device: Optional[torch.device] = None,
) -> Dict[str, Any]:
    """Train ``task`` and write the run folder: restore, one epoch at a time, finish. Returns ``summary.json``'s
    content.

    ``device``: where to train when the caller resolved it already (default: ``cfg.device``).

    Raises:
        TrainingError: NaN/inf loss (the last good ``last.pt`` is kept in ``RUN.partial``), dead loss term.
        MedkdError: run folder problems.
    """
    main = distributed.env().is_main
    console = console or Console(stderr=True)
    if not main:
        console = Console(stderr=True, quiet=True)  # rank 0 logs for the job
    run, work = Path(run), partial_dir(run)
    copied = resume and not (work / rundir.LAST).is_file()  # resuming a finished RUN: RUN.partial is a fresh copy

    def prepare() -> Optional[Path]:
        for note in rundir.clean_stale_temps(run.parent, stem=run.name) + rundir.clean_stale_temps(work):
            console.print(f"note: {escape(note)}", highlight=False, soft_wrap=True)  # left by a killed process
        return prepare_run_dir(run, resume, overwrite)

    resume_from = distributed.on_main(prepare)  # rank 0 prepares RUN.partial for the job
    t = Trainer(task, cfg, data, train_set, run, kind, resolve_device(device if device is not None else cfg.device))
    if resume_from is not None:
        t.restore(resume_from, copied)
        if t.epoch >= cfg.epochs:
            console.print(f"{run}: already trained for {t.epoch} epoch(s); nothing to resume", highlight=False)
    t.write_config()
    try:
        with Bars(console, f"{kind} epochs", cfg.epochs, t.epoch, inner=True) as bars:
            while t.epoch < cfg.epochs:
                t0 = time.time()
                sums, n = t.train_epoch(bars)
                row = t.end_epoch(sums, n, t0)
                bars.advance(epoch_line(kind, row, cfg.epochs))
                if on_epoch:
                    on_epoch({k: v for k, v in row.items() if k != "improved"})
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt):
            console.print(f"interrupted: last completed epoch kept in {work / rundir.LAST}; rerun with --resume"
                          if (work / rundir.LAST).is_file() else "interrupted before the first epoch finished",
                          highlight=False, soft_wrap=True)
        if t.history and main:  # best effort: a failing plot must not hide why training stopped
            with contextlib.suppress(Exception):
                plot_curves(t.history, work / rundir.CURVES)
        raise
    if t.history and main:
        plot_curves(t.history, work / rundir.CURVES)
    return t.finish(summary_extra)
