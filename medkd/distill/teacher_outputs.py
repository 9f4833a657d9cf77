"""Where the frozen teacher's targets come from during distillation: a cost model, not a fixed policy.

Modes (``medkd distill --teacher-outputs``):

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

What is stored is what the active losses read (:meth:`medkd.distill.distiller.Distiller.teacher_targets`), rounded
to fp16 in *every* mode and computed by the teacher in batches of exactly
:data:`~medkd.distill.cache.TEACHER_BATCH` slices (fp32, autocast off), so on one machine the mode (and therefore
``auto``'s machine-dependent choice) never changes the numbers. A disk cache filled on another machine (device,
thread count, library versions) is reused too and may differ from live targets by fp16 rounding.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from medkd.distill.cache import STORE_DTYPE, TORCH_STORE_DTYPE, ItemSpec, Key, TeacherCache, fill_together, item_bytes
from medkd.infer import match_channels

MODES = ("auto", "live", "disk", "memory")
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
    parts = [f"{m} {_sec(v)}" for m, v in sorted(feasible.items(), key=lambda kv: kv[1])]
    span = f"{work.runs} runs x {work.epochs} epochs" if work.runs > 1 else f"{work.epochs} epoch(s)"
    why = [f"estimated teacher-output cost over {span}: " + ", ".join(parts)]
    if work.disk_blocked:
        why.append(f"no disk cache: {work.disk_blocked}")
    elif est["disk"] is None and work.disk_new_bytes > work.budget_bytes:
        why.append(f"disk cache would need {_mb(work.disk_new_bytes)} > budget {_mb(work.budget_bytes)}")
    if est["memory"] is None and work.memory_bytes > work.memory_limit_bytes:
        why.append(f"memory would need {_mb(work.memory_bytes)} > limit {_mb(work.memory_limit_bytes)}")
    return mode, "; ".join(why), est


def _sec(v: float) -> str:
    return f"{v:.2f} s" if v < 100 else f"{v:.0f} s"


def _mb(n: float) -> str:
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


# ---------------------------------------------------------------------------------------------------- providers
class MemoryTargets:
    """The ``memory`` mode: targets of every training slice in tensors, row = dataset index."""

    mode = "memory"

    def __init__(self, tensors: Dict[str, torch.Tensor]):
        self.tensors = tensors

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        out = {}
        for k, v in self.tensors.items():
            out[k] = v[index.to(v.device)].to(x.device, non_blocking=True)  # (B, ...)
        return out


class DiskTargets:
    """The ``disk`` mode: rows of :class:`~medkd.distill.cache.TeacherCache`, keyed by ``(case id, slice)``."""

    mode = "disk"

    def __init__(self, cache: TeacherCache, index_keys: Sequence[Key], live):
        self.cache, self.index_keys, self.live = cache, index_keys, live

    def get(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        keys = [self.index_keys[int(i)] for i in index]
        if self.cache.missing(keys):  # cannot happen after the fill; the live teacher gives the same numbers
            return self.live.get(x, y, index)
        return self.cache.get(keys, x.device)


# ---------------------------------------------------------------------------------------------------- measuring
def _batch(dataset, ids: Sequence[int], in_channels: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Slices ``ids`` of ``dataset`` as one batch ``(x (B, in_channels, H, W), y (B, 1, H, W))`` on ``device``."""
    items = [dataset[i] for i in ids]
    x = match_channels(torch.stack([a for a, _, _ in items]).to(device), in_channels)
    return x, torch.stack([m for _, m, _ in items]).to(device)


def batch_slices(batch_size: int, n_slices: int) -> int:
    """Slices in a training batch: the batch size, or all ``n_slices`` when the batch size is larger (the loader
    then gives one batch of the whole set). What measuring and filling allocate per batch, so that a huge
    ``--batch-size`` never builds a batch larger than the data."""
    return max(1, min(int(batch_size), int(n_slices)))


def _batches(train_set, cfg, device: torch.device, n: int, bs: Optional[int] = None):
    """The first ``n`` real training batches (of ``bs`` slices, default the batch size capped by
    :func:`batch_slices`) as ``(x, y, index)`` on ``device``, loaded one at a time as they are asked for."""
    bs = bs or batch_slices(cfg.batch_size, len(train_set))
    for b in range(n):
        ids = [(b * bs + j) % len(train_set) for j in range(bs)]
        yield (*_batch(train_set, ids, cfg.in_channels, device), torch.tensor(ids))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


#: a teacher batch slower than this is timed once (its own noise is small; the study teacher on CPU takes ~10 s)
SLOW_BATCH_S = 1.0


def _teacher_seconds(task, train_set, cfg, device: torch.device, n: int) -> float:
    """Seconds per teacher batch: after a warm-up on two slices, the first full batch; when that is fast
    (< :data:`SLOW_BATCH_S`), it counts as the warm-up and the median of ``n`` more is taken. Measuring so costs
    little beside a slow teacher (one batch, not ``n + 1``) and is not noisy beside a fast one."""
    warm = next(_batches(train_set, cfg, device, 1, bs=min(2, len(train_set))))
    _timed(lambda: task.teacher_targets(warm[0], warm[1]), device)
    batches = _batches(train_set, cfg, device, n + 1)

    def one() -> float:
        x, y, _ = next(batches)
        return _timed(lambda: task.teacher_targets(x, y), device)

    first = one()
    if first >= SLOW_BATCH_S:
        return first
    return float(np.median([one() for _ in range(n)]))


def measure_costs(task, train_set, cfg, device: torch.device, specs: Dict[str, ItemSpec],
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
    teacher_s = _teacher_seconds(task, train_set, cfg, device, n)
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
def _compute(task, train_set, cfg, device):
    """``compute(dataset indices) -> {item: (n, ...)}``: the teacher's targets for those slices."""

    def compute(ids: List[int]) -> Dict[str, torch.Tensor]:
        return task.teacher_targets(*_batch(train_set, ids, cfg.in_channels, device))

    return compute


def fill_memory(task, train_set, cfg, device: torch.device, specs: Dict[str, ItemSpec],
                storage: torch.device, pinned: bool) -> Dict[str, torch.Tensor]:
    """Run the teacher once over the training slices and keep the targets (row = dataset index)."""
    n = len(train_set)
    held = {k: torch.empty((n, *shape), dtype=TORCH_STORE_DTYPE, device=storage) for k, (_, shape) in specs.items()}
    if pinned:
        held = {k: v.pin_memory() for k, v in held.items()}
    compute = _compute(task, train_set, cfg, device)
    step = max(2, 2 * batch_slices(cfg.batch_size, n))
    for i in range(0, n, step):
        ids = list(range(i, min(n, i + step)))
        for k, v in compute(ids).items():
            held[k][i : i + len(ids)] = v.to(storage)
    return held


def setup_teacher_outputs(task, cfg, data, train_set, cache_root: Path, checkpoint: Path, device: torch.device,
                          console: Console, note: Optional[str] = None) -> Dict[str, Any]:
    """Pick the teacher-output mode for this run, prepare it (fill a cache if needed) and install it on ``task``.

    Returns the record written to ``summary.json`` under ``teacher_outputs``: ``mode``, ``requested``, ``reason``,
    ``cache_bytes`` (what the mode stores: the disk cache's items or the memory tensors; 0 live),
    ``cache_budget_bytes``, ``cache_key`` (disk), ``costs`` (measured seconds per batch, ``auto`` only) and
    ``estimates`` (seconds over the run per mode, ``auto`` only). ``note`` replaces the reason of a requested
    mode (e.g. the ablation plan that requested it).
    """
    from medkd.distill.distiller import LiveTeacher

    requested = cfg.teacher_outputs
    rec: Dict[str, Any] = {"mode": "live", "requested": requested, "reason": "", "cache_bytes": 0,
                           "cache_budget_bytes": None, "cache_key": None, "costs": None, "estimates": None}
    task.outputs = LiveTeacher(task)
    if cfg.augment:
        rec["reason"] = "augmentation changes every batch, so the teacher runs live"
        return _announce(rec, console)
    if requested == "live":
        rec["reason"] = note or "requested"
        return _announce(rec, console)

    task.teacher.to(device)
    specs = task.target_specs()
    n = len(train_set)
    bs = batch_slices(cfg.batch_size, n)
    nb = n // bs + (1 if n % bs >= 2 else 0)  # the loop drops a final batch of 1
    budget = int(cfg.cache_budget * 1e9) if cfg.cache_budget is not None else default_budget_bytes(cache_root)
    cache = TeacherCache(cache_root, checkpoint, data, cfg.in_channels, data.case_ids("train"), specs,
                         log=_note(console))
    missing = cache.missing(train_set.index)
    mem_bytes = item_bytes(specs, n)
    mem_dev, pinned, mem_limit = memory_placement(mem_bytes, device)
    work = Workload(epochs=cfg.epochs, batches_per_epoch=nb, fill_batches=n / bs, disk_missing_batches=len(missing) / bs,
                    disk_new_bytes=cache.new_bytes(), budget_bytes=budget, memory_bytes=mem_bytes,
                    memory_limit_bytes=mem_limit)
    if cfg.kd_on_unlabelled and task.label_aware:
        work.disk_blocked = LABEL_DEPENDENT
    rec["cache_budget_bytes"] = budget
    disk_fits = work.disk_new_bytes <= budget and not work.disk_blocked
    if requested == "auto":
        t0 = time.perf_counter()
        costs = measure_costs(task, train_set, cfg, device, specs, cache_root if disk_fits else None, mem_dev, pinned)
        mode, reason, est = choose_mode(costs, work)
        rec.update(costs=asdict(costs), estimates=est, measure_seconds=round(time.perf_counter() - t0, 3))
        rec["reason"] = f"auto: {reason}; teacher {costs.teacher_s:.4f} s/batch, reads " + ", ".join(
            f"{m} {v:.4f} s/batch" for m, v in (("memory", costs.memory_read_s), ("disk", costs.disk_read_s))
            if v is not None)
    else:
        mode, why = requested, [note or "requested"]
        if mode == "disk" and not disk_fits:
            mode = "memory" if mem_dev is not None else "live"
            why = [f"disk requested, but {work.disk_blocked or f'the cache would need {_mb(work.disk_new_bytes)} > budget {_mb(budget)}'}: "
                   f"{mode} instead"]
        if mode == "memory" and mem_dev is None:
            mode = "live"
            why.append(f"memory would need {_mb(mem_bytes)} > limit {_mb(mem_limit)}: live instead")
        rec["reason"] = "; ".join(why)
    rec["mode"] = mode
    if mode == "disk":
        if missing:
            console.print(f"teacher cache {cache.key}: computing {len(missing)} slice(s) once", highlight=False)
        compute = _compute(task, train_set, cfg, device)
        pos = {k: i for i, k in enumerate(train_set.index)}
        cache.fill(missing, lambda keys: compute([pos[k] for k in keys]), batch_size=max(2, 2 * bs))
        task.outputs = DiskTargets(cache, train_set.index, task.outputs)
        task.cache = cache
        rec.update(cache_bytes=cache.planned_bytes(), cache_key=cache.key)
    elif mode == "memory":
        task.outputs = MemoryTargets(fill_memory(task, train_set, cfg, device, specs, mem_dev, pinned))
        rec.update(cache_bytes=mem_bytes, memory_device=str(mem_dev) + (" (pinned)" if pinned else ""))
    return _announce(rec, console)


def _note(console: Console):
    """``log(line)`` printing ``note: line`` on ``console`` (the cache's damaged-item notes)."""
    return lambda line: console.print(f"note: {escape(line)}", highlight=False, soft_wrap=True)


def _announce(rec: Dict[str, Any], console: Console) -> Dict[str, Any]:
    size = f", {_mb(rec['cache_bytes'])}" if rec["cache_bytes"] else ""
    console.print(f"teacher outputs: {rec['mode']}{size} ({rec['reason']})", highlight=False, soft_wrap=True)
    return rec



# ---------------------------------------------------------------------------------------------------- several runs
def plan_runs(cfgs: Sequence[Any], teacher_run: Path, data, console: Console,
              cache_root: Optional[Path] = None) -> Tuple[str, Dict[str, Any]]:
    """One teacher-output mode for several distill runs on one teacher (an ablation's pending cells x seeds).

    Measures like ``auto`` (with the items of every distinct cell), weighs ``live`` (every run computes the teacher
    every batch), ``memory`` (every run fills its own) and ``disk`` (one shared cache, each slice computed once for
    all cells in one teacher pass), prints the planned teacher cost, and, when ``disk`` wins, fills the shared cache
    before the first run. Returns ``(mode, record)``; the record (mode, reason, costs, estimates, cache bytes) goes
    into the ablation's results.
    """
    from medkd.data.prepared import SliceDataset
    from medkd.distill.distiller import Distiller, in_teacher_batches
    from medkd.distill.run import load_teacher, student_train_set
    from medkd.infer import resolve_device
    from medkd.models import build_model

    cfg0 = cfgs[0]
    device = resolve_device(cfg0.device)
    teacher, checkpoint = load_teacher(Path(teacher_run), cfg0, data)
    teacher.to(device)
    cache_root = Path(cache_root) if cache_root else Path(teacher_run) / "cache"
    tasks, specs_of, sets = [], [], []
    for cfg in cfgs:
        task = Distiller(build_model(cfg.student, in_channels=cfg.in_channels, num_classes=1, width=cfg.student_width),
                         teacher, cfg, data.size).to(device)
        specs = task.target_specs()
        if specs not in specs_of:
            tasks.append(task)
            specs_of.append(specs)
        sets.append(student_train_set(data, cfg))
    caches = [TeacherCache(cache_root, checkpoint, data, cfg0.in_channels, data.case_ids("train"), sp,
                           log=_note(console)) for sp in specs_of]
    union = {c.stems[n]: spec for c in caches for n, spec in c.items.items()}  # items of all cells, once each
    new_bytes = item_bytes({c.stems[n]: c.items[n] for c in caches for n in c.items if not c._path(n).is_file()}, len(caches[0].rows))
    keys = sorted({k for ds in sets for k in ds.index})
    missing = {k for c in caches for k in c.missing(keys)}
    epochs = max(c.epochs for c in cfgs)
    n_run = max(len(ds) for ds in sets)
    bs = batch_slices(cfg0.batch_size, n_run)
    per_slice = max(item_bytes(sp, 1) for sp in specs_of)
    budget = int(cfg0.cache_budget * 1e9) if cfg0.cache_budget is not None else default_budget_bytes(cache_root)
    mem_dev, pinned, mem_limit = memory_placement(per_slice * n_run, device)
    work = Workload(epochs=epochs, batches_per_epoch=max(1, n_run // bs), fill_batches=n_run / bs,
                    disk_missing_batches=len(missing) / bs, disk_new_bytes=new_bytes, budget_bytes=budget,
                    memory_bytes=per_slice * n_run, memory_limit_bytes=mem_limit, runs=len(cfgs))
    if any(c.kd_on_unlabelled for c in cfgs) and any(t.label_aware for t in tasks):
        work.disk_blocked = LABEL_DEPENDENT
    disk_fits = new_bytes <= budget and not work.disk_blocked
    costs = measure_costs(tasks[0], sets[0], cfg0, device, union, cache_root if disk_fits else None, mem_dev, pinned)
    mode, reason, est = choose_mode(costs, work)
    rec = {"mode": mode, "runs": len(cfgs), "distinct_targets": len(tasks), "reason": reason, "costs": asdict(costs),
           "estimates": est, "cache_bytes": {"live": 0, "disk": item_bytes(union, len(caches[0].rows)),
                                             "memory": per_slice * n_run}[mode],  # memory: per run
           "cache_budget_bytes": budget}
    console.print(f"teacher outputs for {len(cfgs)} run(s): {mode}, planned teacher-output cost {_sec(est[mode])} "
                  f"({reason})", highlight=False, soft_wrap=True)
    if mode == "disk" and missing:
        full = SliceDataset(data, "train")
        pos = {k: i for i, k in enumerate(full.index)}
        console.print(f"teacher cache {caches[0].key}: computing {len(missing)} slice(s) once for "
                      f"{len(tasks)} distinct target set(s)", highlight=False)

        def targets_all(x: torch.Tensor, y: torch.Tensor) -> List[Dict[str, torch.Tensor]]:
            raw = tasks[0].run_teacher(x)  # one forward; every task's hooks caught their taps
            feats = {tasks[0].t_paths[s]: raw[s] for s in tasks[0].scales}
            for t in tasks[1:]:
                if t.t_hooks:
                    feats.update({t.t_paths[s]: f for s, f in t.t_hooks.pop().items()})
            return [t.targets_from(x, y, {**{s: feats[t.t_paths[s]] for s in t.scales}, "logits": raw["logits"]})
                    for t in tasks]

        def compute_all(chunk: List[Key]) -> List[Dict[str, torch.Tensor]]:
            return in_teacher_batches(targets_all, *_batch(full, [pos[k] for k in chunk], cfg0.in_channels, device))

        fill_together(caches, keys, compute_all, batch_size=max(2, 2 * bs))
        rec["teacher_slices"] = caches[0].teacher_slices
    for t in tasks:  # the plan's hooks stay off the runs' teachers (each run loads its own)
        if t.s_hooks:
            t.s_hooks.remove()
        if t.t_hooks:
            t.t_hooks.remove()
    return mode, rec
