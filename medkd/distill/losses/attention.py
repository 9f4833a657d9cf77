"""Attention transfer (activation-based spatial attention maps)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from medkd.distill.losses import LOSSES, FeatureLoss


def attention_map(feat: torch.Tensor, p: float = 2.0, eps: float = 1e-12) -> torch.Tensor:
    """Spatial attention map: ``mean_c |f|^p``, flattened and L2-normalised per sample.

    Args:
        feat: ``(B, C, H, W)``.
        p: Exponent.
        eps: Guards an all-zero map.

    Returns:
        ``(B, H*W)`` with unit L2 norm per row.
    """
    a = feat.abs().pow(p).mean(dim=1).flatten(1)  # (B, H*W)
    return F.normalize(a, p=2, dim=1, eps=eps)


def attention_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """``mean_b ||a_s[b] - a_t[b]||_2^2`` with ``a`` from :func:`attention_map`.

    Args:
        student_feat: ``(B, C, H, W)``.
        teacher_feat: ``(B, C, H', W')``; spatial sizes must match (channels may differ).
        p: Exponent of the attention map.

    Returns:
        Scalar tensor in ``[0, 2]`` (maps are non-negative unit vectors).
    """
    diff = attention_map(student_feat, p) - attention_map(teacher_feat, p)  # (B, H*W)
    return diff.pow(2).sum(dim=1).mean()


@LOSSES.register("attention")
class AttentionTransferLoss(FeatureLoss):
    """Attention transfer (Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017).

    Attention map ``a = vec(mean_c |f|^p) / ||vec(mean_c |f|^p)||_2`` (``p = 2``), per sample.
    Loss ``= mean over the batch of ||a_s - a_t||_2^2`` (the *squared* L2 distance, summed over the
    ``H*W`` locations). The paper writes the unsquared p=2 norm with a factor beta/2; the authors' code uses
    the squared difference averaged over locations too. Here: squared, summed over locations, averaged
    over the batch, no extra factor (weight it with ``--weights``).

    Args:
        channels: Teacher channels at the tap (unused; kept for the common signature).
        p: Exponent of the attention map (default 2).
    """

    name = "attention"

    def __init__(self, channels: int, p: float = 2.0):
        super().__init__(channels)
        self.p = float(p)

    @property
    def view_id(self) -> str:
        return f"attention-map(p={self.p})"

    def teacher_view(self, teacher_feat, targets=None):
        """The teacher's normalised attention map ``(B, H*W)``: all the loss reads (1/C of the feature)."""
        return {"attention": attention_map(teacher_feat, self.p)}

    def forward_view(self, student_feat, view, targets=None):
        a_t = view["attention"]  # (B, H*W)
        if student_feat.dim() != 4 or student_feat.shape[0] != a_t.shape[0] or student_feat[0, 0].numel() != a_t.shape[1]:
            raise ValueError(f"attention loss: student feature {tuple(student_feat.shape)} does not match the teacher's "
                             f"attention map {tuple(a_t.shape)}")
        return (attention_map(student_feat, self.p) - a_t).pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"p={self.p}"
