"""Randomness of a run: seeding, determinism on CPU, and the RNG states a checkpoint carries for ``--resume``."""

from __future__ import annotations

import random
from typing import Any, Dict

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_deterministic(device: torch.device) -> None:
    """Same seed + config on CPU -> same numbers. (CUDA keeps cuDNN's fast non-deterministic kernels.)"""
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True, warn_only=True)


def rng_state() -> Dict[str, Any]:
    """The RNG states, as tensors and plain Python values (a checkpoint loads weights-only without an allow-list):
    numpy's legacy state tuple is stored with its uint32 key as a list of ints."""
    name, key, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    st = {"torch": torch.get_rng_state(), "numpy": (str(name), key.tolist(), int(pos), int(has_gauss), float(gauss)),
          "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict[str, Any]) -> None:
    """Restore the RNG states of :func:`rng_state` (numpy's key as a list, or as the ndarray older checkpoints
    hold). Generator states are CPU ``ByteTensor``s whatever device the checkpoint was mapped to
    (``torch.set_rng_state`` and the CUDA generators accept nothing else)."""
    torch.set_rng_state(st["torch"].cpu())
    name, key, *rest = st["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), *rest))
    random.setstate(st["python"])
    if st.get("cuda") and torch.cuda.is_available():
        # a run may resume on a machine with fewer GPUs than it was saved on
        torch.cuda.set_rng_state_all([s.cpu() for s in st["cuda"]][: torch.cuda.device_count()])
