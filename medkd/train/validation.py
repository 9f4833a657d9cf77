"""The number a run is judged by each epoch: mean 3D Dice on the validation cases."""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from medkd import distributed
from medkd.data.prepared import PreparedData
from medkd.infer import logits_to_mask, predict_volume
from medkd.metrics.segmentation import confusion, overlap_from_counts


def validate(predict: Callable[[torch.Tensor], torch.Tensor], data: PreparedData, ids: Sequence[str], device,
             in_channels: int, batch_size: int) -> float:
    """Mean 3D Dice over the validation cases (cases with empty GT and empty prediction are left out).

    Under DDP each process predicts every N-th case and the per-case Dice values are gathered (in case order).
    """
    e = distributed.env()
    mine = [(i, cid) for i, cid in enumerate(ids) if i % e.world_size == e.rank]
    dices = []
    for i, cid in mine:
        pred = logits_to_mask(predict_volume(predict, data.image(cid), device, in_channels, batch_size))
        c = confusion(pred, np.asarray(data.label(cid)) > 0)
        dice = overlap_from_counts(c["tp"], c["fp"], c["fn"])["dice"]
        if not np.isnan(dice):
            dices.append((i, dice))
    dices = sorted(d for part in distributed.all_gather_objects(dices) for d in part)
    return float(np.mean([d for _, d in dices])) if dices else 0.0
