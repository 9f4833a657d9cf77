"""Inference helpers shared by validation, ``evaluate`` and ``predict``."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU. Asking for CUDA without one is an error."""
    from medkd.errors import MedkdError

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedkdError("--device cuda requested but no CUDA device is available (use --device auto or cpu)")
    return torch.device(name)


def seg_logits(out) -> torch.Tensor:
    """Teachers return ``(seg, recon)``; students return ``seg``."""
    return out[0] if isinstance(out, (tuple, list)) else out


def match_channels(x: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Prepared slices have one channel; a 3-channel model (the study's setting) gets it repeated."""
    if x.shape[1] == in_channels:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, in_channels, -1, -1)
    raise ValueError(f"model expects {in_channels} input channels, data has {x.shape[1]}")


@torch.no_grad()
def predict_volume(
    predict: Callable[[torch.Tensor], torch.Tensor],
    volume: np.ndarray,
    device: torch.device,
    in_channels: int = 1,
    batch_size: int = 16,
) -> np.ndarray:
    """Run ``predict`` (images ``(B,C,H,W)`` -> logits ``(B,K,H,W)``) over a ``(Z,H,W)`` stack, slice by slice.

    Returns:
        float32 logits ``(Z, K, H, W)``.
    """
    outs = []
    for z0 in range(0, volume.shape[0], batch_size):
        x = torch.from_numpy(np.array(volume[z0 : z0 + batch_size], dtype=np.float32))[:, None].to(device)
        x = match_channels(x, in_channels)
        outs.append(seg_logits(predict(x)).float().cpu())
    return torch.cat(outs).numpy()


def logits_to_mask(logits: np.ndarray) -> np.ndarray:
    """``(Z,K,H,W)`` logits -> ``(Z,H,W)`` foreground mask (binary: logit > 0; multi-class: argmax > 0)."""
    if logits.shape[1] == 1:
        return logits[:, 0] > 0
    return logits.argmax(axis=1) > 0
