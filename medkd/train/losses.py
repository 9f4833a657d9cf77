"""The supervised segmentation loss shared by teacher and student training (distillation losses live in
:mod:`medkd.distill.losses`)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss


SMOOTH = 1e-5


def global_batch_dice(logits: torch.Tensor, target: torch.Tensor, reduce=None) -> torch.Tensor:
    """Soft Dice loss over the whole batch, as MONAI's ``DiceLoss(sigmoid|softmax, batch=True, smooth 1e-5)``, with
    the per-class sums passed through ``reduce`` first (under DDP: summed over processes, so the loss is the global
    batch's).

    Args:
        logits: ``(B, K, H, W)``; K = 1 (sigmoid) or K > 1 (softmax, ``target`` one-hot encoded).
        target: ``(B, 1, H, W)`` mask (K = 1) or class indices.
        reduce: applied to the stacked ``(3, K)`` sums [intersection, target, prediction]; ``None`` = identity.

    Returns:
        Scalar: mean over classes of ``1 - (2 I + s) / (T + P + s)``.
    """
    if logits.shape[1] == 1:
        p, t = torch.sigmoid(logits), target
    else:
        p = torch.softmax(logits, dim=1)
        t = F.one_hot(target[:, 0].long(), logits.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
    dims = (0, *range(2, p.dim()))
    sums = torch.stack([(p * t).sum(dims), t.sum(dims), p.sum(dims)])  # (3, K)
    if reduce is not None:
        sums = reduce(sums)
    inter, tsum, psum = sums
    return (1.0 - (2.0 * inter + SMOOTH) / (tsum + psum + SMOOTH)).mean()


class SegLoss(nn.Module):
    """Dice (MONAI, sigmoid/softmax on logits, batch Dice) + BCE/CE.

    Under DDP (:mod:`medkd.distributed`) the Dice term is computed over the global batch (its sums added over the
    processes, :func:`global_batch_dice`), so it equals the single-process loss of the whole batch.

    Args:
        num_classes: 1 (binary: sigmoid Dice + BCE with logits) or K > 1 (softmax Dice + cross-entropy).

    Shapes: logits ``(B, K, H, W)``; target ``(B, 1, H, W)`` (0/1 floats, or class indices for K > 1).
    Returns ``(dice, ce)`` scalars.
    """

    def __init__(self, num_classes: int = 1):
        super().__init__()
        self.num_classes = num_classes
        if num_classes == 1:
            self.dice = DiceLoss(sigmoid=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH, batch=True)
        else:
            self.dice = DiceLoss(softmax=True, to_onehot_y=True, smooth_nr=SMOOTH, smooth_dr=SMOOTH, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        from medkd import distributed

        if self.training and distributed.env().active:
            dice = global_batch_dice(logits, target, distributed.global_sum)
        else:
            dice = self.dice(logits, target)
        if self.num_classes == 1:
            return dice, F.binary_cross_entropy_with_logits(logits, target)
        return dice, F.cross_entropy(logits, target[:, 0].long())
