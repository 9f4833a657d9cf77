"""U-Net family: the multi-task teacher T1 (``unet``) and the students S1/S2 (``s1``, ``s2``).

One class, :class:`UNet`, covers all three:

============  ======  =====  ==========================  ==========  =============================
name          kind    pools  encoder / bottleneck         convs/block reference params (3 -> 1 ch)
============  ======  =====  ==========================  ==========  =============================
``unet``      teacher 4      w·(1,2,4,8) / w·16, w=64     2           43,236,036
``s1``        student 2      w·(1,2) / w·4, w=16          1           57,297
``s2``        student 2      w·(1,2) / w·4, w=32          1           227,233
============  ======  =====  ==========================  ==========  =============================

Every 3×3 conv has a bias and is followed by BatchNorm + ReLU; encoders downsample with 2×2 max
pooling; decoders upsample with ConvTranspose2d(k=2, s=2) to the skip's channel count, concatenate
the skip and apply the conv block (milesial Pytorch-UNet with ``bilinear=False``). The teacher has
two decoders of identical structure fed by the same encoder: a segmentation decoder (1×1 head to
``num_classes``) and a reconstruction decoder (1×1 head to ``in_channels``).

Tap points (module paths for ``model.get_submodule``):

* ``enc``: ``encoder.{k-1}``, the deepest encoder block (before the pooling feeding the bottleneck);
* ``bottleneck``: ``bottleneck``;
* ``dec``: ``seg_decoder.ups.{k-1}``, the last segmentation decoder block (before the 1×1 head).

Inputs of any H, W >= 2^k work: they are reflect-padded to the next multiple of 2^k and outputs
are cropped back (taps see the padded size).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from medkd.models import register_model
from medkd.models.blocks import ConvBlock, Decoder, SegModelBase


class UNet(SegModelBase):
    """Configurable U-Net, optionally multi-task (segmentation + reconstruction).

    Args:
        in_channels: Image channels.
        num_classes: Segmentation output channels (logits).
        width: Channels of the first encoder level.
        multipliers: Encoder channel multipliers per level, shallowest first; the bottleneck has
            ``2 * multipliers[-1] * width`` channels.
        n_convs: Conv+BN+ReLU repetitions per block (2 = double conv).
        reconstruction: Add the reconstruction decoder; the model is then a teacher.
        arch: Registry name, stored on the instance and in ``config``.

    Forward:
        ``x (B, in_channels, H, W)`` ->
        teacher: ``(seg (B, num_classes, H, W), recon (B, in_channels, H, W))``;
        student: ``seg (B, num_classes, H, W)``.

    Raises:
        ValueError: input not 4D, wrong channel count, or H/W smaller than ``2**len(multipliers)``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        width: int = 64,
        multipliers: Sequence[int] = (1, 2, 4, 8),
        n_convs: int = 2,
        reconstruction: bool = True,
        arch: str = "unet",
    ):
        super().__init__()
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"{arch}: width, in_channels and num_classes must be >= 1 "
                f"(got {width}, {in_channels}, {num_classes})"
            )
        self.arch = arch
        self.kind = "teacher" if reconstruction else "student"
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.n_pools = len(multipliers)

        chs = [width * m for m in multipliers]
        bott_ch = 2 * chs[-1]
        self.encoder = nn.ModuleList(
            ConvBlock(cin, cout, n_convs) for cin, cout in zip([in_channels] + chs[:-1], chs)
        )
        self.bottleneck = ConvBlock(chs[-1], bott_ch, n_convs)
        self.seg_decoder = Decoder(bott_ch, chs, n_convs)
        self.seg_head = nn.Conv2d(chs[0], num_classes, kernel_size=1)
        if reconstruction:
            self.recon_decoder = Decoder(bott_ch, chs, n_convs)
            self.recon_head = nn.Conv2d(chs[0], in_channels, kernel_size=1)

        k = self.n_pools
        self.taps = {"enc": f"encoder.{k - 1}", "bottleneck": "bottleneck", "dec": f"seg_decoder.ups.{k - 1}"}
        self._feature_channels = {"enc": chs[-1], "bottleneck": bott_ch, "dec": chs[0]}
        self.config = {"name": arch, "in_channels": in_channels, "num_classes": num_classes, "width": width}
        self._init_weights()

    def _forward_padded(self, x: torch.Tensor) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)  # (B, C, H/2, W/2)
        z = self.bottleneck(x)  # (B, 2C, H/2^k, W/2^k)
        seg = self.seg_head(self.seg_decoder(z, skips))
        if self.kind == "teacher":
            recon = self.recon_head(self.recon_decoder(z, skips))
            return seg, recon
        return seg


def _reject_extra(arch: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"{arch}: unexpected option(s) {', '.join(sorted(kwargs))}")


@register_model("unet", kind="teacher")
def unet(in_channels: int = 1, num_classes: int = 1, width: Optional[int] = None, **kwargs: Any) -> UNet:
    """Teacher T1: multi-task U-Net, 4 levels w·(1,2,4,8), bottleneck w·16, default width 64."""
    _reject_extra("unet", kwargs)
    return UNet(in_channels, num_classes, width or 64, (1, 2, 4, 8), n_convs=2, reconstruction=True, arch="unet")


@register_model("s1", kind="student")
def s1(in_channels: int = 1, num_classes: int = 1, width: Optional[int] = None, **kwargs: Any) -> UNet:
    """Student S1: 2 levels w·(1,2), bottleneck w·4, one conv per block, default width 16."""
    _reject_extra("s1", kwargs)
    return UNet(in_channels, num_classes, width or 16, (1, 2), n_convs=1, reconstruction=False, arch="s1")


@register_model("s2", kind="student")
def s2(in_channels: int = 1, num_classes: int = 1, width: Optional[int] = None, **kwargs: Any) -> UNet:
    """Student S2: 2 levels w·(1,2), bottleneck w·4, one conv per block, default width 32."""
    _reject_extra("s2", kwargs)
    return UNet(in_channels, num_classes, width or 32, (1, 2), n_convs=1, reconstruction=False, arch="s2")
