"""Building blocks shared by the U-Net family and TransUNet.

All 3×3 convolutions carry a bias *and* are followed by BatchNorm, as in the reference study's
code: this is what makes the reference parameter counts come out exactly (T1 43,236,036;
S1 57,297; S2 227,233 with 3 input channels).
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class ConvBlock(nn.Sequential):
    """``n_convs`` × (Conv3×3 (bias) → BatchNorm → ReLU).

    Args:
        in_ch: Input channels.
        out_ch: Output channels (every conv in the block outputs ``out_ch``).
        n_convs: 2 for the teachers' double conv, 1 for the students.

    Shapes:
        ``(B, in_ch, H, W) -> (B, out_ch, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, n_convs: int = 2):
        layers: List[nn.Module] = []
        for i in range(n_convs):
            layers += [
                nn.Conv2d(in_ch if i == 0 else out_ch, out_ch, kernel_size=3, padding=1, bias=True),
                nn.BatchNorm2d(out_ch),
                nn.ReLU(inplace=True),
            ]
        super().__init__(*layers)


class UpBlock(nn.Module):
    """ConvTranspose2d(k=2, s=2) to ``out_ch``, concatenate the skip, then a :class:`ConvBlock`.

    Args:
        in_ch: Channels of the coarse input.
        skip_ch: Channels of the skip connection.
        out_ch: Output channels.
        n_convs: Convs in the block after concatenation.

    Shapes:
        ``x (B, in_ch, h, w)``, ``skip (B, skip_ch, 2h, 2w) -> (B, out_ch, 2h, 2w)``.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, n_convs: int = 2):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_ch, out_ch, kernel_size=2, stride=2)
        self.conv = ConvBlock(out_ch + skip_ch, out_ch, n_convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.up(x)
        if x.shape[-2:] != skip.shape[-2:]:  # only if a caller skipped the model's padding
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
        return self.conv(torch.cat([skip, x], dim=1))


class Decoder(nn.Module):
    """A U-Net decoder: one :class:`UpBlock` per encoder level, deepest first.

    The output of ``ups[-1]`` (the last decoder block, before any 1×1 head) is the ``dec`` tap.

    Args:
        in_ch: Channels of the bottleneck map.
        skip_chs: Encoder channels, shallowest first (e.g. ``(64, 128, 256, 512)``).
        n_convs: Convs per block.

    Shapes:
        ``x (B, in_ch, H/2^k, W/2^k)``, skips shallowest first -> ``(B, skip_chs[0], H, W)``.
    """

    def __init__(self, in_ch: int, skip_chs: Sequence[int], n_convs: int = 2):
        super().__init__()
        ups = []
        ch = in_ch
        for skip_ch in reversed(skip_chs):
            ups.append(UpBlock(ch, skip_ch, skip_ch, n_convs))
            ch = skip_ch
        self.ups = nn.ModuleList(ups)
        self.out_channels = ch

    def forward(self, x: torch.Tensor, skips: Sequence[torch.Tensor]) -> torch.Tensor:
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return x


class SegModelBase(nn.Module):
    """Common plumbing: input checks, pad-to-multiple / crop-back, taps, config, init.

    Subclasses set ``n_pools`` and implement ``_forward_padded``. Inputs whose H or W is not a
    multiple of ``2**n_pools`` are reflect-padded at the bottom/right to the next multiple and
    every output is cropped back to ``(H, W)``; features caught at the taps therefore have the
    padded size ``ceil(H / 2**n_pools) * 2**n_pools`` (scaled by the tap's stride).
    """

    arch: str = ""
    kind: str = "student"
    n_pools: int = 0
    taps: Dict[str, str]
    config: Dict[str, object]

    @property
    def min_size(self) -> int:
        """Smallest accepted H and W (``2**n_pools``)."""
        return 2 ** self.n_pools

    def feature_channels(self) -> Dict[str, int]:
        """Channel count of the output of each tap module: ``{"enc": C, "bottleneck": C, "dec": C}``."""
        return dict(self._feature_channels)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.arch}: expected a 4D tensor (B, C, H, W), got {shape}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"{self.arch}: expected {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(input shape {tuple(x.shape)})"
            )
        h, w = x.shape[-2:]
        if h < self.min_size or w < self.min_size:
            raise ValueError(
                f"{self.arch}: input {h}x{w} is too small; H and W must be >= {self.min_size} "
                f"(the model pools {self.n_pools} times)"
            )

    def _pad(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        h, w = x.shape[-2:]
        m = self.min_size
        ph, pw = (-h) % m, (-w) % m
        if ph or pw:
            # reflect needs pad < size; guaranteed since size >= m > pad
            x = F.pad(x, (0, pw, 0, ph), mode="reflect")
        return x, (h, w)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor):
        self._check_input(x)
        x, (h, w) = self._pad(x)
        out = self._forward_padded(x)
        if isinstance(out, tuple):
            return tuple(o[..., :h, :w] for o in out)
        return out[..., :h, :w]

    def _forward_padded(self, x: torch.Tensor):  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, kind={self.kind!r}, width={getattr(self, 'width', None)}"
