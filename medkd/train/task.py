"""The interface between the Trainer and what it trains: a :class:`Task`.

A task owns the network saved in ``best.pt`` (``model``) and everything trained beside it (adapters, loss heads),
turns a batch into named, weighted loss terms (the Trainer sums and logs them) and predicts masks for validation.
The teacher task (:class:`medkd.train.teacher.TeacherTask`) and the distiller
(:class:`medkd.distill.distiller.Distiller`) subclass it; the Trainer calls these methods and nothing else.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import nn


class Task(nn.Module):
    """Base class of the tasks :func:`medkd.train.loop.fit` trains.

    Subclasses set ``self.model`` (the network saved alone in ``best.pt``) and implement :meth:`forward` and
    :meth:`predict`; the other methods default to "nothing beside the model" and "no per-epoch state".

    Attributes:
        model: the network whose weights are the run's result.
        find_unused_parameters: whether DDP must allow trainable parameters that get no gradient in a step
            (e.g. the teacher's reconstruction decoder when its weight is 0).
    """

    model: nn.Module
    find_unused_parameters: bool = False

    def forward(self, images: torch.Tensor, masks: torch.Tensor, index: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The weighted loss terms of one batch, by name (the Trainer sums them).

        Args:
            images: ``(B, C, H, W)``; masks: ``(B, 1, H, W)``; index: ``(B,)`` dataset indices of the slices.
        """
        raise NotImplementedError

    def term_names(self) -> List[str]:
        """Every name :meth:`forward` may return, in a fixed order (a batch may lack some, e.g. ``seg`` on a batch
        without labelled slices): under DDP the per-term sums are added over the processes in this order."""
        raise NotImplementedError

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``(B, K, H, W)`` of ``images`` ``(B, C, H, W)`` (validation, in eval mode)."""
        raise NotImplementedError

    def trainable_state(self) -> Dict[str, Any]:
        """State of the modules trained beside ``model`` (saved in ``last.pt`` and, when not empty, in
        ``distill_heads.pt``); ``{}`` when there are none."""
        return {}

    def load_trainable_state(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`trainable_state`'s content (``{}`` from a checkpoint that has none)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Called before the first step of epoch ``epoch`` (0-based), in training mode."""

    def epoch_stats(self) -> Dict[str, float]:
        """Extra numbers for the epoch's history row (after validation); ``{}`` by default."""
        return {}

    def frozen_child(self) -> Optional[str]:
        """Name of a child module that is never trained (a distillation's teacher): DDP leaves it out of its
        synchronisation and SyncBatchNorm conversion. ``None`` when there is none."""
        return None
