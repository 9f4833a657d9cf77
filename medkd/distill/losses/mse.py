"""FitNets hint loss: mean squared error between adapted student and teacher features."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medkd.distill.losses import LOSSES, check_pair


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
class MSEFeatureLoss(nn.Module):
    """FitNets hint loss (Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015).

    ``mean_{b,c,h,w} (s - t)^2``. The regressor of the paper is the :class:`~medkd.distill.adapters.FeatureAdapter`.

    Args:
        channels: Teacher channels at the tap (unused; kept for the common signature).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = int(channels)

    def forward(
        self, student_feat: torch.Tensor, teacher_feat: torch.Tensor, targets: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Args:
            student_feat: Adapted student feature ``(B, C, H, W)``.
            teacher_feat: Teacher feature ``(B, C, H, W)``.
            targets: Ignored.

        Returns:
            Scalar tensor.
        """
        check_pair(student_feat, teacher_feat, "mse")
        return mse_loss(student_feat, teacher_feat)
