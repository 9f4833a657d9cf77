"""The supervised segmentation loss shared by teacher and student training (distillation losses live in
:mod:`medkd.distill.losses`)."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import DiceLoss


class SegLoss(nn.Module):
    """Dice (MONAI, sigmoid/softmax on logits, batch Dice) + BCE/CE.

    Args:
        num_classes: 1 (binary: sigmoid Dice + BCE with logits) or K > 1 (softmax Dice + cross-entropy).

    Shapes: logits ``(B, K, H, W)``; target ``(B, 1, H, W)`` (0/1 floats, or class indices for K > 1).
    Returns ``(dice, ce)`` scalars.
    """

    def __init__(self, num_classes: int = 1):
        super().__init__()
        self.num_classes = num_classes
        if num_classes == 1:
            self.dice = DiceLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)
        else:
            self.dice = DiceLoss(softmax=True, to_onehot_y=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes == 1:
            return self.dice(logits, target), F.binary_cross_entropy_with_logits(logits, target)
        return self.dice(logits, target), F.cross_entropy(logits, target[:, 0].long())
