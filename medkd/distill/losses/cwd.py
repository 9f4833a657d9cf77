"""Channel-wise distillation: match each channel's spatial distribution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medkd.distill.losses import LOSSES, FeatureLoss


def cwd_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Channel-wise KL(teacher || student) of spatial softmax distributions.

    For every sample ``b`` and channel ``c``: ``p = softmax_{hw}(f[b, c] / tau)``;
    ``KL = sum_{hw} p_t (log p_t - log p_s)``. Result ``= tau^2 * mean_{b,c} KL``.

    Args:
        student_feat: ``(B, C, H, W)``.
        teacher_feat: ``(B, C, H, W)``.
        temperature: ``tau``.

    Returns:
        Scalar tensor, ``>= 0``.
    """
    b, c = student_feat.shape[:2]
    log_ps = F.log_softmax(student_feat.reshape(b * c, -1) / temperature, dim=1)  # (B*C, H*W)
    log_pt = F.log_softmax(teacher_feat.reshape(b * c, -1) / temperature, dim=1)  # (B*C, H*W)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # (B*C,)
    return kl.mean() * temperature**2


@LOSSES.register("cwd")
class ChannelWiseDistillationLoss(FeatureLoss):
    """Channel-wise distillation (Shu et al., "Channel-wise Knowledge Distillation for Dense
    Prediction", ICCV 2021).

    Each channel is turned into a distribution over the ``H*W`` locations by a softmax with temperature
    ``tau``; the loss is KL(teacher || student) summed over locations, averaged over channels and batch,
    times ``tau^2`` (as in the authors' code: sum / (C * N) * tau^2).

    Args:
        channels: Teacher channels at the tap (unused; kept for the common signature).
        temperature: ``tau`` (default 4).
        pool: Compare both maps average-pooled by this factor (see :class:`~medkd.distill.losses.FeatureLoss`).
    """

    name = "cwd"

    def __init__(self, channels: int, temperature: float = 4.0, pool: int = 1):
        super().__init__(channels, pool)
        if temperature <= 0:
            raise ValueError(f"cwd temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def compute(self, student_feat, teacher_feat, targets=None):
        return cwd_loss(student_feat, teacher_feat, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
