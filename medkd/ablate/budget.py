"""Equal training budgets in an ablation: how many optimizer steps a row takes, planned without training, and the
baseline that gets as many.

A distillation row with ``kd_images=all`` iterates its labelled subset *and* the other train cases every epoch, so
it takes more optimizer steps than the student alone on its labelled subset. Compared with that student, a gain
could come from more updates rather than from the teacher. :func:`matched_baseline` gives every row a baseline
with the same epochs, batch size, augmentation, fraction and steps per epoch (``steps_per_epoch``: the baseline
draws its labelled subset again, in fresh permutations, until it has taken as many steps as the row).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from medkd.config import DistillConfig
from medkd.data.prepared import PreparedData
from medkd.distill.inputs import student_train_set
from medkd.train.batches import pass_steps


def baseline_config(cfg: DistillConfig) -> DistillConfig:
    """The student alone: ``cfg`` without any distillation (KD-only options back to their defaults); every
    training option (epochs, batch size, augmentation, fraction, ``steps_per_epoch``) is kept."""
    d = DistillConfig()
    return replace(cfg, scales=[], pmd=False, pseudo_label=False, teacher=None, teacher_probs=None, loss=d.loss,
                   scale_losses={}, loss_options={}, temperature=d.temperature, pmd_loss=d.pmd_loss,
                   weights=dict(d.weights), taps={}, kd_warmup_epochs=d.kd_warmup_epochs)


def natural_steps_per_epoch(cfg: DistillConfig, data: PreparedData) -> int:
    """Optimizer steps of one epoch of a distill run of ``cfg`` without a budget: one pass over the slices the
    student iterates (:func:`medkd.distill.inputs.student_train_set`: its labelled subset of the train cases, drawn
    with its subset seed, plus the other train cases with ``kd_images=all`` and a teacher), in batches of
    ``cfg.batch_size`` as the loader makes them (:func:`medkd.train.batches.pass_steps`; one process)."""
    return pass_steps(len(student_train_set(data, cfg)), cfg.batch_size)


def steps_per_epoch(cfg: DistillConfig, data: PreparedData) -> int:
    """The steps of one epoch of ``cfg`` (its seed included): ``cfg.steps_per_epoch``, else the natural ones."""
    return cfg.steps_per_epoch or natural_steps_per_epoch(cfg, data)


def optimizer_steps(cfg: DistillConfig, data: PreparedData) -> int:
    """The planned total of optimizer steps of a run of ``cfg``: epochs x steps per epoch."""
    return cfg.epochs * steps_per_epoch(cfg, data)


def matched_baseline(cfg: DistillConfig, data: Optional[PreparedData], seeds: Sequence[int]) -> DistillConfig:
    """``cfg``'s baseline with ``cfg``'s budget: :func:`baseline_config` (same epochs, batch size, augmentation,
    fraction, subset seed), and, when the row iterates more slices than the student alone does on its labelled
    subset (``kd_images=all``), ``steps_per_epoch`` set to the row's steps per epoch (the largest over ``seeds``,
    so no seed of the row takes more steps than its baseline). A row with ``steps_per_epoch`` set passes it on.

    Args:
        cfg: a row's config.
        data: the prepared dataset (needed only when the row's budget must be counted).
        seeds: the seeds the row runs with (the labelled subset, and so the slice count, may vary with them).

    Raises:
        ValueError: the budget must be counted and ``data`` is ``None``.
    """
    base = baseline_config(cfg)
    if cfg.steps_per_epoch is not None or not cfg.uses_teacher:
        return base
    if data is None:
        if not cfg.kd_on_unlabelled:  # the same slices as the student alone, by construction
            return base
        raise ValueError("planning an equal budget for a kd_images=all row needs the prepared dataset")
    row = {s: natural_steps_per_epoch(replace(cfg, seed=s), data) for s in seeds}
    own = {s: natural_steps_per_epoch(replace(base, seed=s), data) for s in seeds}
    return base if row == own else replace(base, steps_per_epoch=max(row.values()))
