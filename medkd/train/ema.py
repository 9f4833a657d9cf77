"""An exponential moving average (EMA) of a model's weights (``--ema-decay``): validated and saved in ``best.pt``.

After every optimizer step each floating-point parameter is averaged,
``ema = decay * ema + (1 - decay) * weight`` (what ``torch.optim.swa_utils.get_ema_multi_avg_fn`` computes), and
every buffer (BatchNorm's running statistics and step count) is copied, so the averaged model normalises with the
statistics the training model gathered. The average starts at the model's initial weights. The Trainer swaps the
averaged weights into the model for validation and ``best.pt`` (:meth:`ModelEMA.applied`) and keeps the average
in ``last.pt`` (:meth:`ModelEMA.state_dict`), so ``--resume`` continues it exactly.
"""

from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

import torch
from torch import nn


class ModelEMA:
    """The moving average of ``model``'s weights, held as a state dict of the model's keys.

    Args:
        model: The trained model (its device and memory format are kept).
        decay: ``0 < decay < 1``; the average spans about ``1 / (1 - decay)`` steps.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        self.averaged = {n for n, p in model.named_parameters() if p.is_floating_point()}
        self.weights = self._snapshot(model)

    @staticmethod
    def _snapshot(model: nn.Module) -> Dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Average in the model's current weights (after an optimizer step); copy its buffers."""
        for k, v in model.state_dict().items():
            if k in self.averaged:
                self.weights[k].lerp_(v.detach(), 1.0 - self.decay)  # ema + (1 - d)(w - ema)
            else:
                self.weights[k].copy_(v)

    def reset(self, model: nn.Module) -> None:
        """Start the average again at the model's current weights."""
        self.weights = self._snapshot(model)

    @contextlib.contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """Inside the block ``model`` holds the averaged weights; its own are put back on exit (the same tensors,
        so the optimizer's references stay valid)."""
        own = self._snapshot(model)
        model.load_state_dict(self.weights)
        try:
            yield
        finally:
            model.load_state_dict(own)

    def state_dict(self) -> Dict[str, Any]:
        """``{"decay", "weights"}`` for ``last.pt``."""
        return {"decay": self.decay, "weights": self.weights}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s content (copied onto the tensors' current devices).

        Raises:
            KeyError: a key of the model is missing from ``state["weights"]``.
        """
        self.weights = {k: state["weights"][k].to(v.device, v.dtype).clone(memory_format=torch.preserve_format)
                        for k, v in self.weights.items()}
