"""The optimizer and learning-rate schedule of a run, built from its config."""

from __future__ import annotations

import math

import torch

from medkd.compat import torch_at_least
from medkd.config import TrainConfig


def fused_ok(params) -> bool:
    """Whether torch's fused (one-kernel) Adam/AdamW step can update ``params``: floating-point tensors on CPU or
    CUDA. A student with adapters and heads has many small parameter tensors, which the per-tensor step of the
    default implementation updates one by one."""
    params = list(params)
    devices = ("cpu", "cuda") if torch_at_least(2, 4) else ("cuda",)  # fused CPU kernels since torch 2.4
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def make_optimizer(params, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW, Adam (fused where :func:`fused_ok`) or SGD with Nesterov momentum, as ``cfg.optimizer`` says."""
    params = list(params)
    if cfg.optimizer in ("adamw", "adam"):
        cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused_ok(params) or None)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay, nesterov=True)


def make_scheduler(opt, cfg: TrainConfig):
    """Cosine annealing over ``cfg.epochs``, halving on a validation plateau, or ``None`` (constant rate)."""
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=3)
    return None


def extend_schedule(sched, opt: torch.optim.Optimizer, epochs: int) -> None:
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
