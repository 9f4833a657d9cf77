"""Trainable adapters mapping student features to the teacher's shape (FitNets regressor).

Built once, given to the optimizer and saved with the run, separately from the student: the
reference study's fresh random 1x1 conv per training step is what this replaces.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class FeatureAdapter(nn.Module):
    """1x1 conv (no bias) + BatchNorm2d from student to teacher channels, then bilinear resize.

    Args:
        student_channels: Channels ``Cs`` of the student feature.
        teacher_channels: Channels ``Ct`` of the teacher feature.
    """

    def __init__(self, student_channels: int, teacher_channels: int):
        super().__init__()
        self.student_channels = int(student_channels)
        self.teacher_channels = int(teacher_channels)
        self.proj = nn.Conv2d(self.student_channels, self.teacher_channels, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(self.teacher_channels)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Adapt a student feature.

        Args:
            x: Student feature ``(B, Cs, hs, ws)``.
            size: Teacher spatial size ``(H, W)``.

        Returns:
            ``(B, Ct, H, W)``.
        """
        size = (int(size[0]), int(size[1]))
        if size[0] * size[1] < x.shape[-2] * x.shape[-1]:
            # Shrinking: resize first. The 1x1 conv and bilinear resizing are both linear and commute,
            # so this is the same map at a fraction of the cost (BN then sees the teacher-sized map).
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # (B, Cs, H, W)
            return self.bn(self.proj(x))
        y = self.bn(self.proj(x))  # (B, Ct, hs, ws)
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y

    def extra_repr(self) -> str:
        return f"{self.student_channels} -> {self.teacher_channels}"


class AdapterSet(nn.ModuleDict):
    """One :class:`FeatureAdapter` per distilled scale: ``adapters[scale](feat, size)``.

    Args:
        student_channels: Scale name -> student channels at that tap.
        teacher_channels: Scale name -> teacher channels at that tap.
        scales: Scales to build adapters for (each must appear in both channel maps).

    Raises:
        KeyError: a scale is missing from ``student_channels`` or ``teacher_channels``.
    """

    def __init__(
        self,
        student_channels: Mapping[str, int],
        teacher_channels: Mapping[str, int],
        scales: Iterable[str],
    ):
        adapters = {}
        for scale in scales:
            for side, channels in (("student", student_channels), ("teacher", teacher_channels)):
                if scale not in channels:
                    raise KeyError(
                        f"scale {scale!r} has no {side} channel count; known: {', '.join(sorted(channels))}"
                    )
            adapters[scale] = FeatureAdapter(student_channels[scale], teacher_channels[scale])
        super().__init__(adapters)
