"""Prediction-map distillation (PMD): soften the teacher's segmentation logits and match them per pixel.

Not a feature loss (it takes logits), so it is not in the ``LOSSES`` registry.

The reference study applied a softmax over a single output channel, which is identically 1, so its PMD
term was always zero. Here a one-logit binary head is read as the two-class distribution
``[sigmoid(z/T), 1 - sigmoid(z/T)]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def pmd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Per-pixel KL(teacher || student) of temperature-softened predictions, times ``T^2``.

    * ``C == 1`` (binary, one logit): ``p = sigmoid(z / T)``;
      ``KL = p_t (log p_t - log p_s) + (1 - p_t)(log(1 - p_t) - log(1 - p_s))``, computed with
      ``logsigmoid`` (``log(1 - sigmoid(x)) = logsigmoid(-x)``).
    * ``C > 1``: ``p = softmax_c(z / T)``; ``KL = sum_c p_t (log p_t - log p_s)`` (``log_softmax``).

    The KL is averaged over pixels and batch and multiplied by ``T^2`` (Hinton et al., 2015).

    Args:
        student_logits: ``(B, C, H, W)`` (any trailing spatial dims work).
        teacher_logits: Same shape.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor, ``>= 0``; exactly zero when the logits are equal.

    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"pmd needs student and teacher logits of the same shape; "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"pmd temperature must be > 0, got {temperature}")
    zs = student_logits / temperature
    zt = teacher_logits / temperature
    if zs.shape[1] == 1:
        log_ps1, log_ps0 = F.logsigmoid(zs), F.logsigmoid(-zs)  # (B, 1, H, W) each
        log_pt1, log_pt0 = F.logsigmoid(zt), F.logsigmoid(-zt)
        kl = log_pt1.exp() * (log_pt1 - log_ps1) + log_pt0.exp() * (log_pt0 - log_ps0)  # (B, 1, H, W)
    else:
        log_ps = F.log_softmax(zs, dim=1)  # (B, C, H, W)
        log_pt = F.log_softmax(zt, dim=1)
        kl = (log_pt.exp() * (log_pt - log_ps)).sum(dim=1)  # (B, H, W)
    return kl.mean() * temperature**2


class PMDLoss(nn.Module):
    """Prediction-map distillation: KD of Hinton et al. ("Distilling the Knowledge in a Neural Network",
    2015) applied per pixel to segmentation logits, as in structured KD for dense prediction
    (Liu et al., CVPR 2019, pixel-wise term).

    Args:
        temperature: Softening temperature ``T`` (default 4).
    """

    def __init__(self, temperature: float = 4.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"pmd temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def forward(
        self,
        student_logits: torch.Tensor,
        teacher_logits: torch.Tensor,
        targets: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Args:
            student_logits: ``(B, C, H, W)``.
            teacher_logits: ``(B, C, H, W)``.
            targets: Ignored (accepted so every distillation term can be called alike).

        Returns:
            Scalar tensor.
        """
        return pmd_loss(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"
