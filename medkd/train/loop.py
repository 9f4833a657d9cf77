"""The training loop: short on purpose. Losses, hooks and metrics live elsewhere; what is trained is a
:class:`~medkd.train.task.Task`.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape
from torch.utils.data import DataLoader, Dataset

import medkd
from medkd import distributed, rundir
from medkd.config import TrainConfig, resume_differences, to_dict
from medkd.data.prepared import PreparedData, SliceDataset
from medkd.errors import MedkdError, TrainingError
from medkd.infer import logits_to_mask, match_channels, predict_volume, resolve_device
from medkd.metrics.efficiency import count_params
from medkd.metrics.segmentation import confusion, overlap_from_counts
from medkd.report.progress import Bars
from medkd.rundir import atomic_save, finalize_run_dir, load_checkpoint, partial_dir, prepare_run_dir
from medkd.train.task import Task


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(device: torch.device) -> None:
    """Same seed + config on CPU -> same numbers. (CUDA keeps cuDNN's fast non-deterministic kernels.)"""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def fused_ok(params) -> bool:
    """Whether torch's fused (one-kernel) Adam/AdamW step can update ``params``: floating-point tensors on CPU or
    CUDA. On a small student with adapters and heads, the per-tensor step of the default implementation is a
    measurable part of a distillation step on CPU (benchmarks/RESULTS.md, issue 15)."""
    params = list(params)
    devices = ("cpu", "cuda") if torch.__version__ >= "2.4" else ("cuda",)  # fused CPU kernels since torch 2.4
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if cfg.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_ok(params) or None)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)


def make_scheduler(opt, cfg: TrainConfig):
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3)
    return None


def augment_batch(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator):
    """Random flips (per sample, both axes) and intensity scale/shift; ``gen`` is seeded per epoch.

    ``gen`` is a CPU generator (the same draws on every device); the draws are moved to ``x``'s device.

    Args:
        x: images ``(B, C, H, W)``; y: masks ``(B, 1, H, W)`` on the same device.
    """
    b = x.shape[0]
    r = torch.rand(b, 4, generator=gen).to(x.device)  # (B, 4): flip H, flip W, scale, shift
    fh, fw = r[:, 0] < 0.5, r[:, 1] < 0.5
    x, y = x.clone(), y.clone()
    x[fh], y[fh] = x[fh].flip(-2), y[fh].flip(-2)
    x[fw], y[fw] = x[fw].flip(-1), y[fw].flip(-1)
    scale = (0.9 + 0.2 * r[:, 2]).view(b, 1, 1, 1)
    shift = (-0.05 + 0.1 * r[:, 3]).view(b, 1, 1, 1)
    return x * scale + shift, y


def epoch_loader(train_set: Dataset, cfg: TrainConfig, epoch: int, pin_memory: bool = False,
                 env: Optional[distributed.DistEnv] = None):
    """This process's DataLoader for one epoch, and its augmentation generator.

    The sample order is one permutation seeded by ``(cfg.seed, epoch)`` (``DistributedSampler``'s), drawn from its
    own generator, so DataLoader workers and augmentation draws cannot change it, and with N processes the
    ``cfg.batch_size`` slices of a global step are the same as one process's. The augmentation generator is seeded
    by ``(cfg.seed, epoch, rank)``; it also seeds the workers.

    Returns:
        ``(loader, generator)``.

    Raises:
        MedkdError: the global batch size does not divide over the processes.
    """
    from torch.utils.data import DistributedSampler

    e = env or distributed.DistEnv()
    if cfg.batch_size % e.world_size:
        raise MedkdError(f"--batch-size {cfg.batch_size} (the global batch) does not divide over {e.world_size} "
                         f"processes")
    local_bs = cfg.batch_size // e.world_size
    sampler = DistributedSampler(train_set, num_replicas=e.world_size, rank=e.rank, shuffle=True, seed=cfg.seed,
                                 drop_last=False)
    sampler.set_epoch(epoch)
    # modulo 2**64 (what manual_seed takes): the same number for every seed it took before, and no overflow for
    # the largest seeds options.check_seed allows
    gen = torch.Generator().manual_seed((cfg.seed * 100003 + epoch + 7919993 * e.rank) % 2**64)
    # one process: drop a final batch of 1 (BatchNorm cannot train on it; the contrastive loss needs >= 2).
    # Under DDP the BatchNorm statistics are global, so every rank keeps its (equally long) last batch.
    drop_last = e.world_size == 1 and len(sampler) % local_bs == 1
    loader = DataLoader(train_set, batch_size=local_bs, sampler=sampler, generator=gen, drop_last=drop_last,
                        num_workers=cfg.num_workers, pin_memory=pin_memory)
    return loader, gen


def validate(predict, data: PreparedData, ids: Sequence[str], device, in_channels: int, batch_size: int) -> float:
    """Mean 3D Dice over the validation cases (cases with empty GT and empty prediction are left out).

    Under DDP each process predicts every N-th case and the per-case Dice values are gathered (in case order).
    """
    e = distributed.env()
    mine = [(i, cid) for i, cid in enumerate(ids) if i % e.world_size == e.rank]
    dices = []
    for i, cid in mine:
        pred = logits_to_mask(predict_volume(predict, data.image(cid), device, in_channels, batch_size))
        c = confusion(pred, np.asarray(data.label(cid)) > 0)
        dice = overlap_from_counts(c["tp"], c["fp"], c["fn"])["dice"]
        if not np.isnan(dice):
            dices.append((i, dice))
    dices = sorted(d for part in distributed.all_gather_objects(dices) for d in part)
    return float(np.mean([d for _, d in dices])) if dices else 0.0


def _rng_state() -> Dict[str, Any]:
    """The RNG states, as tensors and plain Python values (a checkpoint loads weights-only without an allow-list):
    numpy's legacy state tuple is stored with its uint32 key as a list of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    st = {"torch": torch.get_rng_state(), "numpy": (str(name), key.tolist(), int(pos), int(has_gauss), float(gauss)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: Dict[str, Any]) -> None:
    """Restore the RNG states of :func:`_rng_state` (numpy's key as a list, or as the ndarray older checkpoints
    hold). Generator states are CPU ``ByteTensor``s whatever device the checkpoint was mapped to
    (``torch.set_rng_state`` and the CUDA generators accept nothing else)."""
    torch.set_rng_state(st["torch"].cpu())
    name, key, *rest = st["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(st["python"])
    if st.get("cuda") and torch.cuda.is_available():
        # a run may resume on a machine with fewer GPUs than it was saved on
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]][: torch.cuda.device_count()])


def _extend_schedule(sched, opt: torch.optim.Optimizer, epochs: int) -> None:
    """A resumed cosine schedule follows the *current* ``epochs`` (resuming with more epochs extends the run).

    The learning rate is recomputed in closed form, so stopping after epoch k of N and resuming gives the same
    rates as an uninterrupted N-epoch run, and extending a finished run does not continue at lr ~ 0.
    """
    if not isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingLR) or sched.T_max == epochs:
        return
    sched.T_max = epochs
    t = sched.last_epoch
    for g, base in zip(opt.param_groups, sched.base_lrs):
        g["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * t / epochs)) / 2
    sched._last_lr = [g["lr"] for g in opt.param_groups]


def data_record(data: PreparedData, train_ids: Sequence[str], val_ids: Sequence[str]) -> Dict[str, Any]:
    """What a run was trained on, saved in every checkpoint (``ckpt["data"]``) and, in part, in ``summary.json``:
    the prepared folder, its fingerprint and settings, the source it was prepared from, the exact training and
    validation case ids (``evaluate`` refuses to score a run on its own training cases) and the training data's
    profile (``predict`` compares inputs with it)."""
    return {"root": str(data.root.resolve()), "fingerprint": data.fingerprint(), "size": data.size,
            "settings": data.settings, "source": data.manifest.get("source"),
            "train_cases": sorted(train_ids), "val_cases": sorted(val_ids), "profile": data.profile(sorted(train_ids))}


def resume_mismatch(ck: Dict[str, Any], cls: type, config_doc: Dict[str, Any], data_doc: Dict[str, Any]) -> str:
    """What differs between a partial run's checkpoint and the run being resumed (``""`` when nothing does): the
    options :func:`medkd.config.resume_differences` holds fixed, and the data's fingerprint."""
    diffs = resume_differences(cls, ck.get("config") or {}, config_doc)
    old_data = ck.get("data") or {}
    if old_data.get("fingerprint") and old_data["fingerprint"] != data_doc["fingerprint"]:
        diffs.append(f"data {old_data.get('root')} (fingerprint {old_data['fingerprint']}) there, "
                     f"{data_doc['root']} (fingerprint {data_doc['fingerprint']}) now")
    return "; ".join(diffs)


def _all_finite(loss: torch.Tensor, env: distributed.DistEnv) -> bool:
    """``loss`` is finite on every process (so all stop together instead of hanging in the next all-reduce)."""
    ok = bool(torch.isfinite(loss))
    if env.world_size > 1:
        ok = distributed.all_reduce_(torch.tensor([0.0 if ok else 1.0], device=loss.device), "max").item() == 0.0
    return ok


def _sum_over_ranks(sums: Dict[str, float], n: int, env: distributed.DistEnv, device: torch.device):
    """Per-term sums (loss x samples) and the sample count, added over the processes."""
    if env.world_size == 1:
        return sums, n
    keys = list(sums)
    t = torch.tensor([sums[k] for k in keys] + [float(n)], dtype=torch.float64, device=device)  # NCCL: on the GPU
    t = distributed.all_reduce_(t).cpu()
    return {k: float(v) for k, v in zip(keys, t[:-1])}, int(t[-1])


def check_first_step(terms: Dict[str, torch.Tensor], params: List[torch.nn.Parameter]) -> None:
    """Every enabled term must be finite, non-zero and send gradient to the trainable modules."""
    for name, v in terms.items():
        if not torch.isfinite(v):
            raise TrainingError(f"loss term {name!r} is {v.item()} at the first step")
        if v.detach().abs().item() == 0.0:
            raise TrainingError(f"loss term {name!r} is exactly zero at the first step (it would teach nothing)")
        grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
            raise TrainingError(f"loss term {name!r} gives no gradient to the trainable modules")


def claims_run(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn(..., run, cfg, ...)`` (arguments named ``run`` and ``cfg``) as a training entry point:

    * under torchrun, inside the job's process group (:func:`medkd.distributed.session`, device from ``cfg``);
    * holding the claim on ``run`` (rank 0 claims for the job): a second process training into the same folder
      fails at once (:class:`medkd.claim.ClaimedError`) naming the owner;
    * when ``fn`` fails before any epoch finished, its ``RUN.partial`` (nothing to resume) is removed (by rank 0).
    """
    import functools
    import inspect

    from medkd.claim import Claim

    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs).arguments
        run = Path(bound["run"])
        held: List[Claim] = []
        with distributed.session(resolve_device(bound["cfg"].device)) as env:
            distributed.on_main(lambda: held.append(Claim(run).acquire()))
            try:
                return fn(*args, **kwargs)
            except BaseException:
                work = partial_dir(run)
                if env.is_main and work.is_dir() and not (work / rundir.LAST).is_file():
                    shutil.rmtree(work, ignore_errors=True)
                raise
            finally:
                for claim in held:
                    claim.release()

    return wrapper


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
        self.net = distributed.wrap(task, device, find_unused_parameters=task.find_unused_parameters)
        self.amp_dtype = torch.bfloat16 if self.use_cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.use_amp = bool(cfg.amp and self.use_cuda)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)
        self.params = [p for p in task.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.params, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self.val_ids = data.require_split("val")
        self.history: List[Dict[str, Any]] = []
        self.best = {"epoch": 0, "val_dice": -1.0}
        self.epoch, self.seconds = 0, 0.0  # epochs done, training seconds so far
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
        except (RuntimeError, KeyError, ValueError) as e:
            raise MedkdError(f"{path}: cannot resume, its weights do not fit this model "
                             f"({str(e).strip().splitlines()[0][:160]})") from None
        if self.sched is not None and ck.get("scheduler"):
            self.sched.load_state_dict(ck["scheduler"])
            _extend_schedule(self.sched, self.opt, self.cfg.epochs)
        if ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.history, self.best = ck["history"], ck["best"]
        self.epoch, self.seconds = ck["epoch"], ck.get("seconds", 0.0)
        _set_rng_state(ck["rng"])
        self.resumed = True

    def write_config(self) -> None:
        import yaml

        if self.main:
            rundir.write_text(self.work / rundir.CONFIG, yaml.safe_dump(self.config_doc, sort_keys=False))

    # --------------------------------------------------------------------------------------------- one epoch

    def train_epoch(self, bars: Bars) -> Tuple[Dict[str, float], int]:
        """One pass over the training set (epoch ``self.epoch``). Returns each term summed over samples, and the
        number of samples.

        Raises:
            TrainingError: a non-finite loss (the last good ``last.pt`` stays), a dead term at the first step.
        """
        epoch, cfg, device = self.epoch, self.cfg, self.device
        loader, gen = epoch_loader(self.train_set, cfg, epoch, pin_memory=self.use_cuda, env=self.env)
        self.task.train()
        self.task.on_epoch_start(epoch)
        sums: Dict[str, float] = {}
        n = 0
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
            if not _all_finite(loss, self.env):
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
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.item() * x.shape[0]
            n += x.shape[0]
            bars.step({k: s / n for k, s in sums.items()})
        return _sum_over_ranks(sums, n, self.env, device)

    def end_epoch(self, sums: Dict[str, float], n: int, t0: float) -> Dict[str, Any]:
        """Validate, step the schedule, record the epoch (begun at ``t0``) and write ``best.pt`` (when improved),
        ``last.pt`` and ``history.jsonl``. Returns the history row (``improved`` added, not saved)."""
        self.task.eval()
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
        if self.main:
            if improved:
                atomic_save(self.checkpoint(full=False), self.work / rundir.BEST)
                heads = self.task.trainable_state()
                if heads:  # modules trained beside the model (the teacher has none)
                    atomic_save(heads, self.work / rundir.HEADS)
            atomic_save(self.checkpoint(full=True), self.work / rundir.LAST)
            rundir.write_text(self.work / rundir.HISTORY, "".join(json.dumps(r) + "\n" for r in self.history))
        return {**row, "improved": improved}

    def checkpoint(self, full: bool) -> Dict[str, Any]:
        """``best.pt`` content (the model alone, loadable without the task), or with ``full`` ``last.pt``'s."""
        d = {
            "model": self.model.state_dict(), "model_config": self.model.config, "kind": self.kind,
            "epoch": self.epoch, "config": self.config_doc, "medkd_version": medkd.__version__,
            "data": self.data_doc,
        }
        if full:
            d.update(optimizer=self.opt.state_dict(), scheduler=self.sched.state_dict() if self.sched else None,
                     scaler=self.scaler.state_dict(), history=self.history, best=self.best, rng=_rng_state(),
                     seconds=self.seconds)
            extra = self.task.trainable_state()
            if extra:
                d["extra"] = extra
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
                _plot_curves(t.history, work / rundir.CURVES)
        raise
    if t.history and main:
        _plot_curves(t.history, work / rundir.CURVES)
    return t.finish(summary_extra)


def _plot_curves(history: List[Dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]
    skip = {"epoch", "val_dice", "lr", "seconds"}
    names = [k for k in history[0] if k not in skip and not k.startswith("gshare_")]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k in names:
        a.plot(epochs, [r.get(k, math.nan) for r in history], label=k, lw=2 if k == "loss" else 1)
    a.set_xlabel("epoch"), a.set_ylabel("loss term (weighted)"), a.set_yscale("log"), a.legend(fontsize=7)
    b.plot(epochs, [r["val_dice"] for r in history], marker="o")
    b.set_xlabel("epoch"), b.set_ylabel("val Dice"), b.set_ylim(0, 1), b.grid(alpha=0.3)
    fig.tight_layout()
    try:
        with rundir.atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90, format="png")
    finally:
        plt.close(fig)

