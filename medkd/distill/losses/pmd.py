"""Prediction-map distillation (PMD): soften the teacher's segmentation logits and match them.

Not a feature loss (it takes logits), so it is not in the ``LOSSES`` registry. Two forms (``--pmd-loss``):

* ``kl`` (default): per pixel, KL of the temperature-softened class distributions (:func:`pmd_loss`).
* ``cwd``: channel-wise distillation of the logit map (:func:`pmd_cwd_loss`): per channel, KL of the spatial
  distributions over the slice's positions.

The reference study applied a softmax over a single output channel, which is identically 1, so its PMD
term was always zero. Here a one-logit binary head is read as two classes: ``kl`` compares
``[sigmoid(z/T), 1 - sigmoid(z/T)]`` per pixel, ``cwd`` the two channels ``[z, -z]``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from medkd.distill.losses.cwd import cwd_loss
from medkd.options import PMD_LOSSES


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
    _check(student_logits, teacher_logits, temperature)
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


def pmd_cwd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Channel-wise distillation of the prediction map (Shu et al., ICCV 2021): for every slice ``b`` and channel
    ``c``, ``p = softmax_{hw}(z[b, c] / T)`` over the ``H*W`` positions; ``KL(p_t || p_s)`` summed over positions,
    averaged over channels and batch, times ``T^2`` (:func:`~medkd.distill.losses.cwd.cwd_loss` on the logits).

    A one-logit binary head (``C == 1``) is read as the two channels ``[z, -z]`` (foreground, background): the term
    is then the same whichever class is called foreground, as the ``kl`` form's ``[sigmoid, 1 - sigmoid]`` is. The
    foreground channel puts its mass where the teacher is most sure of the organ, the background channel where it
    is most sure of background; both are matched when the student's logit map equals the teacher's up to a constant
    (a spatial softmax ignores a constant).

    Args:
        student_logits: ``(B, C, H, W)``.
        teacher_logits: Same shape.
        temperature: ``T > 0``.

    Returns:
        Scalar tensor, ``>= 0``; zero when the logits differ by a constant per slice and channel.

    Raises:
        ValueError: shapes differ or ``temperature <= 0``.
    """
    _check(student_logits, teacher_logits, temperature)
    if student_logits.shape[1] == 1:
        student_logits = torch.cat([student_logits, -student_logits], dim=1)  # (B, 2, H, W)
        teacher_logits = torch.cat([teacher_logits, -teacher_logits], dim=1)
    return cwd_loss(student_logits, teacher_logits, temperature)


def _check(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"pmd needs student and teacher logits of the same shape; "
            f"got {tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"pmd temperature must be > 0, got {temperature}")


class PMDLoss(nn.Module):
    """Prediction-map distillation: KD of Hinton et al. ("Distilling the Knowledge in a Neural Network",
    2015) applied per pixel to segmentation logits, as in structured KD for dense prediction
    (Liu et al., CVPR 2019, pixel-wise term), or channel-wise distillation of the logit map (Shu et al.,
    "Channel-wise Knowledge Distillation for Dense Prediction", ICCV 2021).

    Args:
        temperature: Softening temperature ``T`` (default 4).
        loss: ``"kl"`` (:func:`pmd_loss`, default) or ``"cwd"`` (:func:`pmd_cwd_loss`).
    """

    def __init__(self, temperature: float = 4.0, loss: str = "kl"):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"pmd temperature must be > 0, got {temperature}")
        if loss not in PMD_LOSSES:
            raise ValueError(f"unknown pmd loss {loss!r}; valid: {', '.join(PMD_LOSSES)}")
        self.temperature = float(temperature)
        self.loss = loss
        self.fn = pmd_loss if loss == "kl" else pmd_cwd_loss

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
        return self.fn(student_logits, teacher_logits, self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, loss={self.loss}"
