"""Trainable adapters mapping student features to the teacher's shape (FitNets regressor).

Built once, given to the optimizer and saved with the run, separately from the student: the
reference study's fresh random 1x1 conv per training step is what this replaces.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def shrink(x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``x (B, C, h, w)`` area-averaged down to ``(min(h, H), min(w, W))`` for ``size = (H, W)``: every input
    position weighs in (adaptive average pooling, :func:`torch.nn.functional.adaptive_avg_pool2d`; an integer factor
    ``k`` is ``avg_pool2d`` with a ``k x k`` window), so the gradient reaches all of them (bilinear resizing without
    antialiasing would read 2 of every ``k`` rows and columns: a quarter of the positions at ``k = 4``). An axis that is
    not larger than the target is left as it is; ``x`` itself when nothing shrinks."""
    h, w = x.shape[-2:]
    target = (min(int(h), int(size[0])), min(int(w), int(size[1])))
    return x if target == (h, w) else F.adaptive_avg_pool2d(x, target)


class FeatureAdapter(nn.Module):
    """1x1 conv (no bias) + BatchNorm2d from student to teacher channels, resized to the teacher's map: area
    averaging along an axis that shrinks (:func:`shrink`), bilinear interpolation along one that grows.

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
        # Shrinking first: the 1x1 conv and area averaging are both linear and commute, so this is the same map at
        # a fraction of the cost (BN then sees the shrunk map).
        y = self.bn(self.project(shrink(x, size)))  # (B, Ct, min(hs, H), min(ws, W))
        if tuple(y.shape[-2:]) != size:  # an axis still to grow
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
        return y

    def pooled(self, x: torch.Tensor, size: Tuple[int, int], weights: torch.Tensor) -> Optional[torch.Tensor]:
        """Weighted spatial pools of the adapted feature, without building it: ``sum_p weights[b, k, p] *
        self(x, size)[b, :, p]``, for a loss that reads only pooled values (global average, region prototypes).

        The 1x1 conv and BatchNorm's affine map are per-pixel linear, so pooling commutes with them: the student
        feature is pooled first (``(B, K, Cs)``) and BatchNorm's batch statistics come from the feature's mean and
        second moments (``Cs x Cs``), summed over processes under DDP as the synchronised BatchNorm does. Same
        values and gradients as pooling :meth:`forward`'s output (the running statistics are updated the same
        way), at a fraction of the cost on large maps (the decoder tap: no ``(B, Ct, H, W)`` tensor, no BatchNorm
        pass over it).

        Args:
            x: Student feature ``(B, Cs, hs, ws)``.
            size: Teacher spatial size ``(H, W)``.
            weights: ``(B, K, H, W)`` pooling weights (any; an average when a ``(b, k)`` map sums to 1).

        Returns:
            ``(B, K, Ct)``, or ``None`` when the teacher map is larger than the student's along an axis (the
            bilinear enlargement does not commute with pooling cheaply: use :meth:`forward`).
        """
        from medkd.distributed import global_sum

        size = (int(size[0]), int(size[1]))
        x = shrink(x, size)  # as forward: shrink first
        if tuple(x.shape[-2:]) != size:
            return None
        bn = self.bn
        with torch.autocast(x.device.type, enabled=False):  # second moments in fp32 under CUDA autocast
            xf = x.float().flatten(2)  # (B, Cs, N)
            w = self.proj.weight[:, :, 0, 0].float()  # (Ct, Cs)
            xt = xf.transpose(1, 2)  # (B, N, Cs), a view: bmm reads it transposed, nothing is copied
            wf = weights.float().flatten(2)  # (B, K, N)
            pooled = torch.bmm(wf, xt)  # (B, K, Cs)
            use_batch = bn.training or not bn.track_running_stats
            if use_batch:
                cs = xf.shape[1]
                stats = torch.cat([xf.sum(dim=(0, 2)), torch.bmm(xf, xt).sum(dim=0).flatten(),
                                   xf.new_tensor([xf.shape[0] * xf.shape[2]])])
                stats = global_sum(stats) if bn.training else stats  # synchronised as SyncBatchNorm: in training
                n = stats[-1]
                mean_x = stats[:cs] / n  # (Cs,)
                cov_x = stats[cs:-1].view(cs, cs) / n - mean_x[:, None] * mean_x[None, :]  # (Cs, Cs), biased
                mean = w @ mean_x  # (Ct,): the batch mean of the projected map
                var = ((w @ cov_x) * w).sum(dim=1).clamp_min(0)  # (Ct,): its biased variance
                if bn.training and bn.track_running_stats:
                    with torch.no_grad():
                        bn.num_batches_tracked.add_(1)
                        m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
                        bn.running_mean.lerp_(mean.detach(), m)  # (1 - m) * running + m * batch
                        bn.running_var.lerp_((var * (n / (n - 1).clamp_min(1))).detach(), m)
            else:
                mean, var = bn.running_mean.float(), bn.running_var.float()
            # sum_p w_p * BN(Wx)_p = gamma * (W pooled - (sum_p w_p) mean) / sigma + (sum_p w_p) beta
            mass = wf.sum(dim=2, keepdim=True)  # (B, K, 1); 1 for averaging weights
            y = (pooled @ w.t() - mass * mean) * torch.rsqrt(var + bn.eps)  # (B, K, Ct)
            if bn.affine:
                y = y * bn.weight.float() + mass * bn.bias.float()
        return y

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The 1x1 convolution ``(B, Cs, h, w) -> (B, Ct, h, w)`` as a channel contraction: the same map as
        ``self.proj(x)``, cheaper forward and backward than the general convolution kernel on CPU."""
        return torch.einsum("oc,bchw->bohw", self.proj.weight[:, :, 0, 0], x)

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
