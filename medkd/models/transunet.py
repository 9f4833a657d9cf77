"""TransUNet-style teacher T2 (``transunet``): CNN encoder + transformer bottleneck + two decoders.

Structure (width ``w``, default 32):

* encoder: 3 double-conv blocks w·(1,2,4), each followed by 2×2 max pooling (the unet's first levels);
* bottleneck (:class:`TransformerBottleneck`): 1×1 conv patch embedding of the ``(B, 4w, H/8, W/8)``
  map to ``embed_dim`` (default ``16·w``), one token per position, learned positional embedding
  (bilinearly interpolated to whatever token grid arrives), ``depth`` pre-norm
  ``nn.TransformerEncoderLayer`` blocks (multi-head self-attention, batch_first), final LayerNorm,
  tokens reshaped back to a ``(B, embed_dim, H/8, W/8)`` map;
* two decoders of identical structure (as in :mod:`medkd.models.unet`): segmentation (1×1 head to
  ``num_classes``) and reconstruction (1×1 head to ``in_channels``).

Tap points: ``enc`` = ``encoder.2`` (deepest encoder block, before pooling), ``bottleneck`` =
``bottleneck`` (the transformer output as a map), ``dec`` = ``seg_decoder.ups.2``.

Inputs of any H, W >= 8 work (reflect-padded to a multiple of 8, outputs cropped back).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from medkd.models import register_model
from medkd.models.blocks import ConvBlock, Decoder, SegModelBase


class TransformerBottleneck(nn.Module):
    """Patch-embed a feature map, run a transformer encoder over the tokens, reshape back to a map.

    Args:
        in_ch: Channels of the incoming map.
        embed_dim: Token dimension (= output channels).
        depth: Number of transformer layers.
        heads: Attention heads (must divide ``embed_dim``).
        mlp_ratio: Feed-forward width as a multiple of ``embed_dim``.
        grid: Side of the token grid the positional embedding is stored at.
        dropout: Dropout inside the transformer layers.

    Shapes:
        ``(B, in_ch, h, w) -> (B, embed_dim, h, w)``.
    """

    def __init__(
        self,
        in_ch: int,
        embed_dim: int,
        depth: int = 4,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        grid: int = 16,
        dropout: float = 0.0,
    ):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"transunet: embed_dim {embed_dim} is not divisible by heads {heads}")
        self.embed = nn.Conv2d(in_ch, embed_dim, kernel_size=1)
        self.pos = nn.Parameter(torch.zeros(1, embed_dim, grid, grid))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=embed_dim,
            nhead=heads,
            dim_feedforward=int(embed_dim * mlp_ratio),
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers=depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)  # (B, D, h, w)
        b, d, h, w = x.shape
        pos = self.pos
        if pos.shape[-2:] != (h, w):
            pos = F.interpolate(pos, size=(h, w), mode="bilinear", align_corners=False)
        x = x + pos
        tokens = x.flatten(2).transpose(1, 2)  # (B, h*w, D)
        tokens = self.norm(self.transformer(tokens))
        return tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, D, h, w)


class TransUNet(SegModelBase):
    """Multi-task TransUNet teacher.

    Args:
        in_channels: Image channels.
        num_classes: Segmentation output channels (logits).
        width: Channels of the first encoder level (encoder w·(1,2,4)).
        depth: Transformer layers.
        heads: Attention heads.
        embed_dim: Token dimension; default ``16 * width``, rounded up to a multiple of ``heads``.
        mlp_ratio: Transformer feed-forward ratio.
        img_size: Training image side the positional embedding is stored for (grid ``img_size // 8``);
            other sizes interpolate it.
        dropout: Transformer dropout.

    Forward:
        ``x (B, in_channels, H, W) -> (seg (B, num_classes, H, W), recon (B, in_channels, H, W))``.

    Raises:
        ValueError: input not 4D, wrong channel count, or H/W smaller than 8.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 1,
        width: int = 32,
        depth: int = 4,
        heads: int = 8,
        embed_dim: Optional[int] = None,
        mlp_ratio: float = 4.0,
        img_size: int = 128,
        dropout: float = 0.0,
    ):
        super().__init__()
        if width < 1 or in_channels < 1 or num_classes < 1:
            raise ValueError(
                f"transunet: width, in_channels and num_classes must be >= 1 "
                f"(got {width}, {in_channels}, {num_classes})"
            )
        if embed_dim is None:
            embed_dim = -(-16 * width // heads) * heads
        self.arch = "transunet"
        self.kind = "teacher"
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.width = width
        self.n_pools = 3

        chs = [width, 2 * width, 4 * width]
        self.encoder = nn.ModuleList(
            ConvBlock(cin, cout, 2) for cin, cout in zip([in_channels] + chs[:-1], chs)
        )
        self.bottleneck = TransformerBottleneck(
            chs[-1], embed_dim, depth, heads, mlp_ratio, grid=max(1, img_size // 8), dropout=dropout
        )
        self.seg_decoder = Decoder(embed_dim, chs, 2)
        self.seg_head = nn.Conv2d(chs[0], num_classes, kernel_size=1)
        self.recon_decoder = Decoder(embed_dim, chs, 2)
        self.recon_head = nn.Conv2d(chs[0], in_channels, kernel_size=1)

        self.taps = {"enc": "encoder.2", "bottleneck": "bottleneck", "dec": "seg_decoder.ups.2"}
        self._feature_channels = {"enc": chs[-1], "bottleneck": embed_dim, "dec": chs[0]}
        self.config = {
            "name": "transunet",
            "in_channels": in_channels,
            "num_classes": num_classes,
            "width": width,
            "depth": depth,
            "heads": heads,
            "embed_dim": embed_dim,
            "mlp_ratio": mlp_ratio,
            "img_size": img_size,
            "dropout": dropout,
        }
        self._init_weights()  # convs only; the transformer keeps PyTorch's own init

    def _forward_padded(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        z = self.bottleneck(x)  # (B, D, H/8, W/8)
        seg = self.seg_head(self.seg_decoder(z, skips))
        recon = self.recon_head(self.recon_decoder(z, skips))
        return seg, recon


@register_model("transunet", kind="teacher", options_of=TransUNet)
def transunet(
    in_channels: int = 1, num_classes: int = 1, width: Optional[int] = None, **kwargs: Any
) -> TransUNet:
    """Teacher T2: TransUNet (default width 32, depth 4, heads 8, embed_dim 16·width)."""
    return TransUNet(in_channels, num_classes, width or 32, **kwargs)
