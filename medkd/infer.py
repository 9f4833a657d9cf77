"""Inference helpers shared by validation, ``evaluate`` and ``predict``."""

from __future__ import annotations

import os
from typing import Callable, Union

import numpy as np
import torch

from medkd.options import DEFAULT_DEVICE, check_device


def resolve_device(name: Union[str, torch.device, None] = DEFAULT_DEVICE) -> torch.device:
    """``auto`` (or ``None``) -> CUDA when available, else CPU. A ``torch.device`` is returned as it is.

    Raises:
        OptionError: not a device name (see :func:`medkd.options.check_device`).
        MedkdError: CUDA asked for without one.
    """
    from medkd.errors import MedkdError

    if isinstance(name, torch.device):
        return name
    if name is None or check_device(name) == DEFAULT_DEVICE:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MedkdError("--device cuda requested but no CUDA device is available (use --device auto or cpu)")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU per process
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise MedkdError(f"torchrun LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are "
                             f"visible (use --nproc-per-node <= the GPU count)")
        return torch.device("cuda", local)
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


def foreground_prob(logits: np.ndarray) -> np.ndarray:
    """``(Z, K, H, W)`` logits -> ``(Z, H, W)`` float32 foreground probability.

    One output channel: ``sigmoid``; several: ``1 - softmax(...)[background]``. Thresholding the result at
    :data:`THRESHOLD` gives the same mask as :func:`logits_to_mask` (up to float rounding at exactly 0.5).
    """
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
    if t.shape[1] == 1:
        return torch.sigmoid(t[:, 0]).numpy()
    return (1.0 - torch.softmax(t, dim=1)[:, 0]).numpy()


#: Foreground probability above which a voxel is foreground (predict, native evaluate, exported metadata).
THRESHOLD = 0.5


def resize_prob(prob: np.ndarray, shape) -> np.ndarray:
    """Bilinear resize of ``(Z, S, S)`` probabilities to ``(Z, *shape)`` (antialiased when shrinking)."""
    import torch.nn.functional as F

    if tuple(prob.shape[1:]) == tuple(shape):
        return np.asarray(prob, dtype=np.float32)
    t = torch.from_numpy(np.ascontiguousarray(prob, dtype=np.float32))[:, None]
    shrink = shape[0] < prob.shape[1] or shape[1] < prob.shape[2]
    out = F.interpolate(t, size=tuple(int(v) for v in shape), mode="bilinear", align_corners=False, antialias=shrink)
    return out[:, 0].clamp_(0.0, 1.0).numpy()


def prob_to_native(prob: np.ndarray, canonical_xy, affine: np.ndarray, shape) -> np.ndarray:
    """The inverse of the preprocess geometry, shared by ``predict`` and native-resolution ``evaluate``.

    Foreground **probabilities** on the prepared grid are resized back to the canonical (RAS) in-plane size with
    bilinear interpolation, **then** (by the caller) thresholded: smoother borders than resizing a small mask with
    nearest neighbour. Axes go back from ``(Z, X, Y)`` to ``(X, Y, Z)`` and the RAS reorientation is undone.

    Args:
        prob: ``(Z, S, S)`` foreground probability on the prepared grid.
        canonical_xy: ``(X, Y)`` in-plane size of the volume in RAS orientation (before the resize).
        affine: the original volume's 4x4 voxel-to-world affine.
        shape: the original volume's shape ``(I, J, K)``.

    Returns:
        float32 ``(I, J, K)`` probability in the original voxel grid.
    """
    from medkd.data.io import from_canonical

    back = resize_prob(prob, tuple(canonical_xy))  # (Z, X, Y)
    return from_canonical(np.moveaxis(back, 0, 2), np.asarray(affine, dtype=np.float64), tuple(shape)).astype(
        np.float32)
