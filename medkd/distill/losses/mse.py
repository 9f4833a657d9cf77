"""FitNets hint loss: mean squared error between adapted student and teacher features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medkd.distill.losses import LOSSES, FeatureLoss


def mse_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """Mean over all elements of ``(s - t)^2``.

    Args:
        student_feat: ``(B, C, H, W)``.
        teacher_feat: ``(B, C, H, W)``.

    Returns:
        Scalar tensor.
    """
    return F.mse_loss(student_feat, teacher_feat, reduction="mean")


@LOSSES.register("mse")
class MSEFeatureLoss(FeatureLoss):
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    ``mean_{b,c,h,w} (s - t)^2``. The regressor of the paper is the :class:`~medkd.distill.adapters.FeatureAdapter`.

    Args:
        channels: Teacher channels at the tap (unused; kept for the common signature).
        pool: Compare both maps average-pooled by this factor (see :class:`~medkd.distill.losses.FeatureLoss`).
    """

    name = "mse"

    def __init__(self, channels: int, pool: int = 1):
        super().__init__(channels, pool)

    def compute(self, student_feat, teacher_feat, targets=None):
        return mse_loss(student_feat, teacher_feat)
