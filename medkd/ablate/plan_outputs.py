"""One teacher-output mode for an ablation's pending runs (cells x seeds) on one teacher.

The single-run choice (:func:`medkd.distill.teacher_outputs.setup_teacher_outputs`) weighs one run; an ablation
weighs them together: ``live`` (every run computes the teacher every batch), ``memory`` (every run fills its own)
and ``disk`` (one shared cache, each slice computed once for all cells in one teacher pass). Same cost model, same
:func:`~medkd.distill.teacher_outputs.workload`, with ``runs`` > 1.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from rich.console import Console

from medkd.data.prepared import SliceDataset
from medkd.distill.cache import Key, TeacherCache, fill_together, item_bytes
from medkd.distill.distiller import DistillTerms
from medkd.distill.inputs import load_teacher, student_train_set
from medkd.distill.targets import TeacherView, batch_slices, in_teacher_batches, joint_targets, slice_batch
from medkd.distill.teacher_outputs import choose_mode, console_notes, format_seconds, measure_costs, workload
from medkd.infer import resolve_device
from medkd.models import build_model
from medkd.train.batches import pass_steps


def plan_runs(cfgs: Sequence[Any], teacher_run: Path, data, console: Console,
              cache_root: Optional[Path] = None) -> Tuple[str, Dict[str, Any]]:
    """Choose one teacher-output mode for the distill runs ``cfgs`` (all on the teacher ``teacher_run``).

    Measures like ``auto`` (with the items of every distinct cell), prints the planned teacher cost and, when
    ``disk`` wins, fills the shared cache before the first run.

    Returns:
        ``(mode, record)``; the record (mode, reason, costs, estimates, cache bytes, ``distinct_targets``, and
        ``teacher_slices`` when the plan filled the cache) goes into the ablation's results.
    """
    cfg0 = cfgs[0]
    device = resolve_device(cfg0.device)
    loaded = load_teacher(cfg0, data, teacher=Path(teacher_run))
    if loaded.module is None:  # a per-case teacher (3-D nnU-Net): each run's own set-up reads its store
        reason = ("per-case teacher: its outputs are computed once per case into the teacher store by the first "
                  "run that needs them (medkd.distill.case_store) and read by the others")
        console.print(f"teacher outputs for {len(cfgs)} run(s): auto ({reason})", highlight=False, soft_wrap=True)
        return "auto", {"mode": "auto", "runs": len(cfgs), "reason": reason, "cache_bytes": None,
                        "cache_budget_bytes": None}
    teacher, checkpoint = loaded.module, loaded.cache_key_file
    teacher.to(device)
    cache_root = Path(cache_root) if cache_root else loaded.cache_root
    views, specs_of = distinct_views(cfgs, teacher, data.size)
    try:
        sets = [student_train_set(data, cfg) for cfg in cfgs]
        caches = [TeacherCache(cache_root, checkpoint, data, cfg0.in_channels, data.case_ids("train"), sp,
                               log=console_notes(console)) for sp in specs_of]
        union = {c.stems[n]: spec for c in caches for n, spec in c.items.items()}  # items of all cells, once each
        new_bytes = item_bytes({c.stems[n]: spec for c in caches for n, spec in c.new_items().items()},
                               len(caches[0].rows))
        keys = sorted({k for ds in sets for k in ds.index})
        missing = {k for c in caches for k in c.missing(keys)}
        # the cost model counts the most steps any run takes per epoch (a run's budget, else one pass)
        steps = max(c.steps_per_epoch or pass_steps(len(ds), c.batch_size) for c, ds in zip(cfgs, sets))
        work, mem_dev, pinned = workload(
            replace(cfg0, steps_per_epoch=steps), max(len(ds) for ds in sets), max(item_bytes(sp, 1) for sp in specs_of), len(missing), new_bytes,
            cache_root, device, runs=len(cfgs), epochs=max(c.epochs for c in cfgs),
            label_dependent=any(c.kd_on_unlabelled for c in cfgs) and any(v.label_aware for v in views))
        costs = measure_costs(views[0], sets[0], cfg0, device, union, cache_root if work.disk_fits else None,
                              mem_dev, pinned)
        mode, reason, est = choose_mode(costs, work)
        rec = {"mode": mode, "runs": len(cfgs), "distinct_targets": len(views), "reason": reason,
               "costs": asdict(costs), "estimates": est,
               "cache_bytes": {"live": 0, "disk": item_bytes(union, len(caches[0].rows)),
                               "memory": work.memory_bytes}[mode],  # memory: per run
               "cache_budget_bytes": work.budget_bytes}
        console.print(f"teacher outputs for {len(cfgs)} run(s): {mode}, planned teacher-output cost "
                      f"{format_seconds(est[mode])} ({reason})", highlight=False, soft_wrap=True)
        if mode == "disk" and missing:
            console.print(f"teacher cache {caches[0].key}: computing {len(missing)} slice(s) once for "
                          f"{len(views)} distinct target set(s)", highlight=False)
            _fill_shared(views, caches, keys, data, cfg0, device)
            rec["teacher_slices"] = caches[0].teacher_slices
    finally:
        for v in views:  # the plan's hooks stay off the runs' teachers (each run loads its own)
            v.close()
    return mode, rec


def distinct_views(cfgs: Sequence[Any], teacher: torch.nn.Module,
                   size: int) -> Tuple[List[TeacherView], List[Dict[str, Any]]]:
    """One :class:`~medkd.distill.targets.TeacherView` per distinct set of targets among ``cfgs`` (cells that
    read the same items share one), with its cache items."""
    views, specs_of = [], []
    for cfg in cfgs:
        student = build_model(cfg.student, in_channels=cfg.in_channels, num_classes=1, width=cfg.student_width)
        view = DistillTerms(student, teacher, cfg, size).teacher_view()
        specs = view.specs()
        if specs in specs_of:
            view.close()
            continue
        views.append(view)
        specs_of.append(specs)
    return views, specs_of


def _fill_shared(views: Sequence[TeacherView], caches: Sequence[TeacherCache], keys: Sequence[Key], data, cfg,
                 device: torch.device) -> None:
    """Fill every view's cache items for ``keys`` in one teacher pass (one forward per batch for all views)."""
    full = SliceDataset(data, "train")
    pos = {k: i for i, k in enumerate(full.index)}

    def compute_all(chunk: List[Key]) -> List[Dict[str, torch.Tensor]]:
        x, y = slice_batch(full, [pos[k] for k in chunk], cfg.in_channels, device)
        return in_teacher_batches(lambda xc, yc: joint_targets(views, xc, yc), x, y)

    fill_together(caches, keys, compute_all, batch_size=max(2, 2 * batch_slices(cfg.batch_size, len(keys))))
