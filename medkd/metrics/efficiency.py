"""Model efficiency as numbers: parameters, FLOPs per slice, latency per slice, checkpoint size.

Models may return a tensor, a tuple/list of tensors or a dict; the outputs are never inspected,
so every form works. Functions that run the model put it in eval mode under ``torch.no_grad()``
and restore its previous train/eval mode afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters.

    Args:
        model: any module.
        trainable_only: count only parameters with ``requires_grad=True``.

    Returns:
        The parameter count (shared parameters counted once).
    """
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _model_device(model: nn.Module) -> torch.device:
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return torch.device("cpu")


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[nn.Module]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def flops_per_slice(model: nn.Module, in_shape: tuple[int, int, int]) -> int:
    """FLOPs of one forward pass on one slice, counted by ``torch.utils.flop_counter.FlopCounterMode``.

    A multiply-add counts as 2 FLOPs (e.g. a conv is ``2 * Cout * Cin * k * k * Hout * Wout``);
    elementwise ops (bias, BN, activations) are not counted, as in PyTorch's counter.

    Args:
        model: the network; run in eval mode on its own device, without gradients.
        in_shape: ``(C, H, W)`` of one input slice; the counted input is ``(1, C, H, W)``.

    Returns:
        FLOPs for a batch of one slice.
    """
    x = torch.zeros((1, *in_shape), device=_model_device(model))  # (1, C, H, W)
    counter = FlopCounterMode(display=False)
    with _eval_no_grad(model), counter:
        model(x)
    return int(counter.get_total_flops())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency_ms(
    model: nn.Module,
    in_shape: tuple[int, int, int],
    device: str | torch.device,
    warmup: int = 3,
    repeats: int = 10,
    batch: int = 1,
) -> float:
    """Median forward time per slice in milliseconds.

    If the model lives on another device it is timed as a copy on ``device`` (the original is not
    moved). CUDA is synchronised before and after each timed forward.

    Args:
        model: the network.
        in_shape: ``(C, H, W)`` of one slice; each forward runs on ``(batch, C, H, W)``.
        device: where to time it, e.g. ``"cpu"`` or ``"cuda"``.
        warmup: untimed forwards first.
        repeats: timed forwards; the median is reported.
        batch: slices per forward; the time is divided by it.

    Returns:
        Median milliseconds per slice (> 0).

    Raises:
        ValueError: if ``repeats`` or ``batch`` is below 1.
    """
    if repeats < 1 or batch < 1:
        raise ValueError(f"repeats and batch must be >= 1, got repeats={repeats}, batch={batch}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if _model_device(model) != device:
        model = copy.deepcopy(model).to(device)
    x = torch.randn((batch, *in_shape), device=device)  # (B, C, H, W)
    times: list[float] = []
    with _eval_no_grad(model):
        for _ in range(max(0, warmup)):
            model(x)
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            model(x)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1000.0 / batch)
    return float(max(statistics.median(times), 1e-9))


def checkpoint_size_mb(path: str | os.PathLike[str]) -> float:
    """Size of a checkpoint file in MiB (bytes / 2**20).

    Args:
        path: the file.

    Returns:
        The size in MiB.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    return Path(path).stat().st_size / 2**20
