"""Loss terms that would train nothing, or train on garbage: stop the run and name the term."""

from __future__ import annotations

from typing import Dict, List

import torch

from medkd import distributed
from medkd.errors import TrainingError


def check_first_step(terms: Dict[str, torch.Tensor], params: List[torch.nn.Parameter]) -> None:
    """Every enabled term must be finite, non-zero and send gradient to the trainable modules.

    Raises:
        TrainingError: naming the first term that fails.
    """
    for name, v in terms.items():
        if not torch.isfinite(v):
            raise TrainingError(f"loss term {name!r} is {v.item()} at the first step")
        if v.detach().abs().item() == 0.0:
            raise TrainingError(f"loss term {name!r} is exactly zero at the first step (it would teach nothing)")
        grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
        if not any(g is not None and bool(g.abs().sum() > 0) for g in grads):
            raise TrainingError(f"loss term {name!r} gives no gradient to the trainable modules")


def all_finite(loss: torch.Tensor, env: distributed.DistEnv) -> bool:
    """``loss`` is finite on every process (so all stop together instead of hanging in the next all-reduce)."""
    ok = bool(torch.isfinite(loss))
    if env.world_size > 1:
        ok = distributed.all_reduce_(torch.tensor([0.0 if ok else 1.0], device=loss.device), "max").item() == 0.0
    return ok
