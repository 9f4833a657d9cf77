"""Which teacher-output mode a run uses (``medkd distill --teacher-outputs``): a cost model, not a fixed policy.

Modes (served by :mod:`medkd.distill.targets`):

* ``live``: the teacher runs on every training batch. Nothing is stored. The only mode with ``--augment``.
* ``memory``: the targets of the student's training slices are computed once, before the first epoch, and held in
  memory: on CUDA a GPU tensor when it fits a quarter of the free GPU memory, else pinned host memory; on CPU host
  memory. Limit: a quarter of the available host (or GPU) memory. Lives as long as the run.
* ``disk``: ``TEACHER_RUN/cache/`` (:mod:`medkd.distill.cache`), filled on demand and kept: later runs on the same
  teacher and data (an ablation's cells and seeds) reuse it. Never started when it would add more than the cache
  budget (``--cache-budget GB``; default :data:`DEFAULT_BUDGET_SHARE` of the free space on the disk that holds
  the cache).
* ``auto`` (default): measures, on the run's device and data, a few teacher batches against a few reads from each
  storage (a probe file beside the cache, a probe tensor in memory), estimates each mode's teacher-output cost over
  the run (one-off fill + per-batch cost x batches x epochs) from what the losses actually read, and takes the
  cheapest mode whose storage fits; ties go to the mode that stores less (live, then memory, then disk). The choice
  is :func:`choose_mode`, a pure function of the measured costs, sizes and budget.

A per-case teacher (``LoadedTeacher.case_probs``: a 3-D nnU-Net, saved ``--teacher-probs``) has no batches to run:
:func:`setup_case_targets` (a computing teacher's ``disk`` mode is :mod:`medkd.distill.case_store`, each case
computed once).

Every mode serves the same numbers (:mod:`medkd.distill.targets`), so on one machine the mode (and therefore
``auto``'s machine-dependent choice) never changes the training. A disk cache filled on another machine (device,
thread count, library versions) is reused too and may differ from live targets by fp16 rounding.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from medkd.distill.cache import STORE_DTYPE, TORCH_STORE_DTYPE, ItemSpec, TeacherCache, item_bytes
from medkd.distill.targets import (DiskTargets, LiveTargets, MemoryTargets, ProbTargets, TeacherTargets, TeacherView,
                                   batch_slices, fill_memory, slice_batch, targets_of)
from medkd.errors import MedkdError
from medkd.train.batches import pass_steps

DEFAULT_BUDGET_SHARE = 0.2  # of the free space on the cache's disk
MEMORY_SHARE = 0.25  # of the available host memory (or free GPU memory) for the memory mode
TIE_ORDER = ("live", "memory", "disk")  # cheaper storage first when estimates tie
LABEL_DEPENDENT = ("--kd-images all with a label-aware loss: its cached targets would depend on which slices the run "
                   "may label")


# ---------------------------------------------------------------------------------------------------- cost model
@dataclass
class Costs:
    """Measured seconds per training batch (``None``: not measured because that storage does not fit)."""

    teacher_s: float  # teacher forward + the losses' views, one batch
    disk_read_s: Optional[float] = None  # read one batch of targets from the disk cache and move it to the device
    disk_write_s: Optional[float] = None  # write one batch of targets to the disk cache
    memory_read_s: Optional[float] = None  # index one batch in memory and move it to the device


@dataclass
class Workload:
    """What the teacher outputs are needed for. Sizes in bytes."""

    epochs: int
    batches_per_epoch: int
    fill_batches: float  # batches of teacher work to fill the student's slices once (memory mode, per run)
    disk_missing_batches: float  # batches of teacher work still missing from the disk cache (all runs together)
    disk_new_bytes: int  # bytes the disk cache would add (items not created yet)
    budget_bytes: int
    memory_bytes: int  # bytes one run holds in memory
    memory_limit_bytes: int
    runs: int = 1  # runs reading the same targets (an ablation's cells x seeds): share the disk cache
    disk_blocked: str = ""  # why a disk cache cannot serve these runs at all ("" = it can)

    @property
    def disk_fits(self) -> bool:
        """Whether a disk cache may serve these runs: within the budget and not blocked."""
        return self.disk_new_bytes <= self.budget_bytes and not self.disk_blocked


def estimate(costs: Costs, work: Workload) -> Dict[str, Optional[float]]:
    """Seconds of teacher-output work per mode over all ``runs``; ``None`` where the storage does not fit."""
    reads = work.runs * work.epochs * work.batches_per_epoch
    out: Dict[str, Optional[float]] = {"live": reads * costs.teacher_s, "memory": None, "disk": None}
    if costs.memory_read_s is not None and work.memory_bytes <= work.memory_limit_bytes:
        out["memory"] = work.runs * work.fill_batches * costs.teacher_s + reads * costs.memory_read_s
    if costs.disk_read_s is not None and work.disk_new_bytes <= work.budget_bytes and not work.disk_blocked:
        out["disk"] = (work.disk_missing_batches * (costs.teacher_s + (costs.disk_write_s or 0.0))
                       + reads * costs.disk_read_s)
    return out


def choose_mode(costs: Costs, work: Workload) -> Tuple[str, str, Dict[str, Optional[float]]]:
    """The cheapest mode whose storage fits. Returns ``(mode, one-line reason, estimates)``.

    Pure: a test can feed it GPU-like costs (fast teacher, slow reads) and check that it never picks a cache there.
    """
    est = estimate(costs, work)
    feasible = {m: v for m, v in est.items() if v is not None}
    mode = min(TIE_ORDER, key=lambda m: (feasible.get(m, float("inf")), TIE_ORDER.index(m)))
    parts = [f"{m} {format_seconds(v)}" for m, v in sorted(feasible.items(), key=lambda kv: kv[1])]
    span = f"{work.runs} runs x {work.epochs} epochs" if work.runs > 1 else f"{work.epochs} epoch(s)"
    why = [f"estimated teacher-output cost over {span}: " + ", ".join(parts)]
    if work.disk_blocked:
        why.append(f"no disk cache: {work.disk_blocked}")
    elif est["disk"] is None and work.disk_new_bytes > work.budget_bytes:
        why.append(f"disk cache would need {format_bytes(work.disk_new_bytes)} > budget {format_bytes(work.budget_bytes)}")
    if est["memory"] is None and work.memory_bytes > work.memory_limit_bytes:
        why.append(f"memory would need {format_bytes(work.memory_bytes)} > limit {format_bytes(work.memory_limit_bytes)}")
    return mode, "; ".join(why), est


def format_seconds(v: float) -> str:
    """``0.25 s``, ``120 s``."""
    return f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def format_bytes(n: float) -> str:
    """``0.50 MB``, ``2.10 GB``."""
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.2f} MB"


# ---------------------------------------------------------------------------------------------------- budgets
def default_budget_bytes(cache_root: Path) -> int:
    """:data:`DEFAULT_BUDGET_SHARE` of the free space on the filesystem that holds (or will hold) ``cache_root``."""
    p = Path(cache_root).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return int(DEFAULT_BUDGET_SHARE * shutil.disk_usage(p).free)


def host_available_bytes() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (else free physical pages)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def memory_placement(n_bytes: int, device: torch.device) -> Tuple[Optional[torch.device], bool, int]:
    """Where the memory mode would keep ``n_bytes``: ``(storage device or None, pinned, limit bytes)``."""
    host_limit = int(MEMORY_SHARE * host_available_bytes())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if n_bytes <= MEMORY_SHARE * free:
            return device, False, int(MEMORY_SHARE * free)
        return (torch.device("cpu") if n_bytes <= host_limit else None), True, host_limit
    return (torch.device("cpu") if n_bytes <= host_limit else None), False, host_limit


def workload(cfg, slices: int, slice_bytes: int, missing: int, new_bytes: int, cache_root: Path,
             device: torch.device, runs: int = 1, epochs: Optional[int] = None,
             label_dependent: bool = False) -> Tuple[Workload, Optional[torch.device], bool]:
    """What the teacher outputs of ``runs`` runs on one teacher need: one run (:func:`setup_teacher_outputs`), or
    several weighed together (an ablation's pending cells x seeds).

    Args:
        cfg: A run's config (batch size, epochs, cache budget).
        slices: Training slices of one run (the largest run's).
        slice_bytes: Target bytes per slice (of the run that stores the most).
        missing: Slices missing from the disk cache (all runs together).
        new_bytes: Bytes the disk cache would add.
        cache_root: Where the disk cache lives (its free space sets the default budget).
        device: The runs' device (where the memory mode would hold the targets).
        runs: Runs reading the same targets.
        epochs: Epochs per run (default ``cfg.epochs``).
        label_dependent: A run with ``--kd-images all`` reads a label-aware view (no disk cache then).

    Returns:
        ``(workload, memory storage device or None when it does not fit, pinned)``.
    """
    bs = batch_slices(cfg.batch_size, slices)
    steps = cfg.steps_per_epoch or pass_steps(slices, bs)  # the loader's steps per epoch
    budget = int(cfg.cache_budget * 1e9) if cfg.cache_budget is not None else default_budget_bytes(cache_root)
    mem_dev, pinned, mem_limit = memory_placement(slice_bytes * slices, device)
    work = Workload(epochs=cfg.epochs if epochs is None else epochs, batches_per_epoch=steps,
                    fill_batches=slices / bs, disk_missing_batches=missing / bs, disk_new_bytes=new_bytes,
                    budget_bytes=budget, memory_bytes=slice_bytes * slices, memory_limit_bytes=mem_limit, runs=runs,
                    disk_blocked=LABEL_DEPENDENT if label_dependent else "")
    return work, mem_dev, pinned


# ---------------------------------------------------------------------------------------------------- measuring
def _batches(train_set, cfg, device: torch.device, n: int, bs: Optional[int] = None):
    """The first ``n`` real training batches (of ``bs`` slices, default the batch size capped by
    :func:`batch_slices`) as ``(x, y, index)`` on ``device``, loaded one at a time as they are asked for."""
    bs = bs or batch_slices(cfg.batch_size, len(train_set))
    for b in range(n):
        ids = [(b * bs + j) % len(train_set) for j in range(bs)]
        yield (*slice_batch(train_set, ids, cfg.in_channels, device), torch.tensor(ids))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


#: a teacher batch slower than this is timed once: its own timing noise is small beside it
SLOW_BATCH_S = 1.0


def _teacher_seconds(view: TeacherView, train_set, cfg, device: torch.device, n: int) -> float:
    """Seconds per teacher batch: after a warm-up on two slices, the first full batch; when that is fast
    (< :data:`SLOW_BATCH_S`), it counts as the warm-up and the median of ``n`` more is taken. Measuring so costs
    little beside a slow teacher (one batch, not ``n + 1``) and is not noisy beside a fast one."""
    warm = next(_batches(train_set, cfg, device, 1, bs=min(2, len(train_set))))
    _timed(lambda: view.targets(warm[0], warm[1]), device)
    batches = _batches(train_set, cfg, device, n + 1)

    def one() -> float:
        x, y, _ = next(batches)
        return _timed(lambda: view.targets(x, y), device)

    first = one()
    if first >= SLOW_BATCH_S:
        return first
    return float(np.median([one() for _ in range(n)]))


def measure_costs(view: TeacherView, train_set, cfg, device: torch.device, specs: Dict[str, ItemSpec],
                  probe_dir: Optional[Path], memory_device: Optional[torch.device], pinned: bool = False,
                  n: int = 2) -> Costs:
    """Measure per-batch costs on the run's device and data (reads: median of ``n`` after one warm-up; the
    teacher: :func:`_teacher_seconds`).

    The teacher runs on real training batches; reads come from a probe of ``4 x batch`` rows of every item, written
    to ``probe_dir`` (beside the cache, deleted afterwards; skipped when ``None``) and held on ``memory_device``
    (skipped when ``None``). Probe contents are zeros and random row choices use a private generator: measuring
    never touches the global RNG, so ``auto`` trains exactly like the mode it picks.
    """
    bs = batch_slices(cfg.batch_size, len(train_set))
    teacher_s = _teacher_seconds(view, train_set, cfg, device, n)
    rows = max(bs, min(len(train_set), 4 * bs))
    rng = np.random.default_rng(0)
    picks = [np.sort(rng.choice(rows, size=min(bs, rows), replace=False)) for _ in range(n + 1)]
    costs = Costs(teacher_s=teacher_s)
    if probe_dir is not None:
        probe_dir.mkdir(parents=True, exist_ok=True)
        paths = {k: probe_dir / f".probe-{os.getpid()}-{k}.npy" for k in specs}
        try:
            arrays = {k: np.lib.format.open_memmap(paths[k], mode="w+", dtype=STORE_DTYPE, shape=(rows, *shape))
                      for k, (_, shape) in specs.items()}
            src = {k: np.zeros((bs, *shape), dtype=STORE_DTYPE) for k, (_, shape) in specs.items()}

            def write():
                for i in range(0, rows, bs):
                    for k, a in arrays.items():
                        a[i : i + bs] = src[k][: min(bs, rows - i)]
                for a in arrays.values():
                    a.flush()

            costs.disk_write_s = _timed(write, device) * bs / rows
            del arrays
            readers = {k: np.load(p, mmap_mode="r") for k, p in paths.items()}
            reads = [_timed(lambda r=r: [torch.from_numpy(np.ascontiguousarray(a[r])).to(device).float()
                                         for a in readers.values()], device) for r in picks]
            costs.disk_read_s = float(np.median(reads[1:]))
            del readers
        finally:
            for p in paths.values():
                p.unlink(missing_ok=True)
    if memory_device is not None:
        held = {k: torch.zeros((rows, *shape), dtype=TORCH_STORE_DTYPE, device=memory_device) for k, (_, shape) in specs.items()}
        if pinned:
            held = {k: v.pin_memory() for k, v in held.items()}
        idx = [torch.from_numpy(r) for r in picks]
        reads = [_timed(lambda r=r: [v[r.to(v.device)].to(device, non_blocking=True).float() for v in held.values()],
                        device) for r in idx]
        costs.memory_read_s = float(np.median(reads[1:]))
        del held
    return costs


# ---------------------------------------------------------------------------------------------------- set-up
def setup_teacher_outputs(view: TeacherView, cfg, data, train_set, cache_root: Path, checkpoint: Path,
                          device: torch.device, console: Console,
                          note: Optional[str] = None) -> Tuple[TeacherTargets, Dict[str, Any]]:
    """Pick the teacher-output mode for this run and prepare it (fill the memory tensors or the disk cache).

    Args:
        view: What the run's losses read of the teacher.
        cfg: The run's config (``teacher_outputs``, ``augment``, batch size, epochs, budget).
        data: The prepared dataset; train_set: the student's training slices.
        cache_root: Where the disk cache lives; checkpoint: the teacher checkpoint (part of the cache key).
        device: The run's device.
        console: Where the choice (and any damaged cache item) is reported.
        note: Replaces the reason of a requested mode (e.g. the ablation plan that requested it).

    Returns:
        ``(targets, record)``: what the Distiller reads during training, and the record written to
        ``summary.json`` under ``teacher_outputs``: ``mode``, ``requested``, ``reason``, ``cache_bytes`` (what the
        mode stores: the disk cache's items or the memory tensors; 0 live), ``cache_budget_bytes``, ``cache_key``
        (disk), ``costs`` (measured seconds per batch, ``auto`` only) and ``estimates`` (seconds over the run per
        mode, ``auto`` only).
    """
    requested = cfg.teacher_outputs
    rec: Dict[str, Any] = {"mode": "live", "requested": requested, "reason": "", "cache_bytes": 0,
                           "cache_budget_bytes": None, "cache_key": None, "costs": None, "estimates": None}
    live = LiveTargets(view)
    if cfg.augment:
        rec["reason"] = "augmentation changes every batch, so the teacher runs live"
        return live, _announce(rec, console)
    if requested == "live":
        rec["reason"] = note or "requested"
        return live, _announce(rec, console)

    view.teacher.to(device)
    specs = view.specs()
    n = len(train_set)
    cache = TeacherCache(cache_root, checkpoint, data, cfg.in_channels, data.case_ids("train"), specs,
                         log=console_notes(console))
    missing = cache.missing(train_set.index)
    work, mem_dev, pinned = workload(cfg, n, item_bytes(specs, 1), len(missing), cache.new_bytes(), cache_root,
                                     device, label_dependent=cfg.kd_on_unlabelled and view.label_aware)
    rec["cache_budget_bytes"] = work.budget_bytes
    if requested == "auto":
        t0 = time.perf_counter()
        costs = measure_costs(view, train_set, cfg, device, specs, cache_root if work.disk_fits else None, mem_dev,
                              pinned)
        mode, reason, est = choose_mode(costs, work)
        rec.update(costs=asdict(costs), estimates=est, measure_seconds=round(time.perf_counter() - t0, 3))
        rec["reason"] = f"auto: {reason}; teacher {costs.teacher_s:.4f} s/batch, reads " + ", ".join(
            f"{m} {v:.4f} s/batch" for m, v in (("memory", costs.memory_read_s), ("disk", costs.disk_read_s))
            if v is not None)
    else:
        mode, rec["reason"] = _requested_mode(requested, work, mem_dev is not None, note)
    rec["mode"] = mode
    if mode == "disk":
        if missing:
            console.print(f"teacher cache {cache.key}: computing {len(missing)} slice(s) once", highlight=False)
        compute = targets_of(view, train_set, cfg.in_channels, device)
        pos = {k: i for i, k in enumerate(train_set.index)}
        step = max(2, 2 * batch_slices(cfg.batch_size, len(train_set)))
        cache.fill(missing, lambda keys: compute([pos[k] for k in keys]), batch_size=step)
        rec.update(cache_bytes=cache.planned_bytes(), cache_key=cache.key)
        return DiskTargets(cache, train_set.index, live), _announce(rec, console)
    if mode == "memory":
        held = fill_memory(view, train_set, cfg, device, specs, mem_dev, pinned)
        rec.update(cache_bytes=work.memory_bytes, memory_device=str(mem_dev) + (" (pinned)" if pinned else ""))
        return MemoryTargets(held), _announce(rec, console)
    return live, _announce(rec, console)


def setup_case_targets(case_probs: Callable[[str], np.ndarray], source: Path, cfg, train_set, console: Console,
                       cache_root: Optional[Path] = None) -> Tuple[TeacherTargets, Dict[str, Any]]:
    """A per-case teacher's targets: every training case's probabilities as fp16 logits.

    ``--teacher-probs`` files (``cache_root`` ``None``) are the teacher's stored outputs already: read once, before
    the first epoch, and held in host memory (:class:`~medkd.distill.targets.ProbTargets`), whatever
    ``--teacher-outputs`` asks (the reason says so). A teacher that computes them (a 3-D nnU-Net: a whole pipeline
    per case) has a disk store under ``cache_root`` (:class:`~medkd.distill.case_store.CaseStore`): ``auto`` and
    ``disk`` compute each case once and read it from there in every later run (the compute is the cost, reads are
    cheap); ``memory`` computes every case in every run, as without a store; ``live`` does not apply (the teacher
    runs per case, not per batch) and is served as ``auto``. The store is never started when the cases it would add
    exceed the cache budget: memory then, with the reason.

    Returns:
        ``(targets, record)``, the record in :func:`setup_teacher_outputs`'s form.

    Raises:
        MedkdError: the logits would not fit :data:`MEMORY_SHARE` of the available host memory (memory mode); a
            case's probabilities are missing or bad (one line naming the case).
    """
    requested = cfg.teacher_outputs
    rec = {"mode": "memory", "requested": requested, "reason": "", "cache_bytes": 0, "cache_budget_bytes": None,
           "cache_key": None, "cache_root": None, "costs": None, "estimates": None}
    why = []
    if cache_root is not None and requested != "memory":
        from medkd.distill.case_store import CaseStore, StoreTargets

        if requested == "live":
            why.append("live does not apply to a per-case teacher (it runs once per case, not per batch): auto")
        store = CaseStore(Path(cache_root), train_set.data, log=console_notes(console))
        cids = sorted({cid for cid, _ in train_set.index})
        new = store.new_bytes(cids)
        budget = int(cfg.cache_budget * 1e9) if cfg.cache_budget is not None else default_budget_bytes(cache_root)
        rec["cache_budget_bytes"] = budget
        if new <= budget:
            missing = store.missing(cids)
            t0 = time.perf_counter()
            if missing:
                console.print(f"teacher store {store.key}: computing {len(missing)} case(s) once", highlight=False)
            store.fill(missing, case_probs)
            why.append(f"{'requested' if requested == 'disk' else 'auto'}: per-case teacher outputs computed once "
                       f"per case and stored on disk ({store.computed} of {len(cids)} case(s) computed now, "
                       f"{time.perf_counter() - t0:.1f} s); the compute is the cost, reads are cheap")
            rec.update(mode="disk", reason="; ".join(why), cache_bytes=store.stored_bytes(cids),
                       cache_key=store.key, cache_root=str(store.dir))
            return StoreTargets(store, train_set), _announce(rec, console)
        why.append(f"the teacher store would need {format_bytes(new)} > budget {format_bytes(budget)}: memory "
                   f"instead, every case computed in this run")
    size = train_set.data.size
    n_bytes = len(train_set) * size * size * TORCH_STORE_DTYPE.itemsize
    limit = int(MEMORY_SHARE * host_available_bytes())
    if n_bytes > limit:
        raise MedkdError(f"{source}: the teacher probabilities of {len(train_set)} training slices need "
                         f"{format_bytes(n_bytes)} of memory > limit {format_bytes(limit)} (a smaller --fraction or "
                         f"--kd-images labelled reads fewer cases)")
    t0 = time.perf_counter()
    targets = ProbTargets.from_cases(case_probs, train_set)
    what = "saved" if cache_root is None else "computed"
    reason = (f"per-case teacher probabilities from {source}: {len(train_set)} slices {what} once "
              f"({time.perf_counter() - t0:.1f} s), held in memory")
    if cache_root is None and requested not in ("auto", "memory"):
        reason += f" (--teacher-outputs {requested} does not apply to saved probabilities)"
    elif requested == "memory":
        why.append("requested")
    rec.update(reason="; ".join([*why, reason]), cache_bytes=targets.nbytes, memory_device="cpu")
    return targets, _announce(rec, console)


def _requested_mode(requested: str, work: Workload, memory_fits: bool, note: Optional[str]) -> Tuple[str, str]:
    """The requested mode, or the next one that fits (disk -> memory -> live), and why."""
    mode, why = requested, [note or "requested"]
    if mode == "disk" and not work.disk_fits:
        mode = "memory" if memory_fits else "live"
        blocked = work.disk_blocked or (f"the cache would need {format_bytes(work.disk_new_bytes)} > budget "
                                        f"{format_bytes(work.budget_bytes)}")
        why = [f"disk requested, but {blocked}: {mode} instead"]
    if mode == "memory" and not memory_fits:
        mode = "live"
        why.append(f"memory would need {format_bytes(work.memory_bytes)} > limit "
                   f"{format_bytes(work.memory_limit_bytes)}: live instead")
    return mode, "; ".join(why)


def console_notes(console: Console) -> Callable[[str], None]:
    """``log(line)`` printing ``note: line`` on ``console`` (the cache's damaged-item notes)."""
    return lambda line: console.print(f"note: {escape(line)}", highlight=False, soft_wrap=True)


def _announce(rec: Dict[str, Any], console: Console) -> Dict[str, Any]:
    size = f", {format_bytes(rec['cache_bytes'])}" if rec["cache_bytes"] else ""
    console.print(f"teacher outputs: {rec['mode']}{size} ({rec['reason']})", highlight=False, soft_wrap=True)
    return rec
