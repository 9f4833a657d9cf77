"""Per-pixel cosine distance between adapted student and teacher features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medkd.distill.losses import LOSSES, FeatureLoss


def cosine_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``mean_{b,h,w} (1 - cos(s[b,:,h,w], t[b,:,h,w]))``; cosine over the channel dimension.

    Args:
        student_feat: ``(B, C, H, W)``.
        teacher_feat: ``(B, C, H, W)``.
        eps: Guards zero-norm vectors (as in ``torch.nn.functional.cosine_similarity``).

    Returns:
        Scalar tensor in ``[0, 2]``.
    """
    cos = F.cosine_similarity(student_feat, teacher_feat, dim=1, eps=eps)  # (B, H, W)
    return (1.0 - cos).mean()


@LOSSES.register("cosine")
class CosineFeatureLoss(FeatureLoss):
    """Cosine feature distance: 1 - cosine similarity over channels per pixel, averaged over pixels and batch.

    Scale-invariant counterpart of the FitNets hint (Romero et al., ICLR 2015); only the direction of each
    pixel's feature vector is matched.

    Args:
        channels: Teacher channels at the tap (unused; kept for the common signature).
        eps: Guards zero-norm feature vectors.
        pool: Compare both maps average-pooled by this factor (see :class:`~medkd.distill.losses.FeatureLoss`).
    """

    name = "cosine"

    def __init__(self, channels: int, eps: float = 1e-8, pool: int = 1):
        super().__init__(channels, pool)
        self.eps = float(eps)

    def compute(self, student_feat, teacher_feat, targets=None):
        return cosine_loss(student_feat, teacher_feat, self.eps)
