"""``medkd train-teacher``: the multi-task teacher (segmentation + reconstruction)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from rich.console import Console

from medkd.config import TeacherConfig
from medkd.data.prepared import PreparedData, SliceDataset
from medkd.errors import MedkdError
from medkd.models import build_model
from medkd.train.entry import claims_run
from medkd.train.loop import fit
from medkd.train.losses import SegLoss
from medkd.train.seeding import seed_everything
from medkd.train.task import Task


class TeacherTask(Task):
    """Loss terms: ``dice`` + ``bce`` on the segmentation head, ``recon`` = recon_weight x MSE(recon, input)."""

    def __init__(self, model: nn.Module, recon_weight: float):
        super().__init__()
        self.model = model
        self.recon_weight = recon_weight
        self.seg_loss = SegLoss(model.num_classes)
        self.find_unused_parameters = recon_weight == 0  # DDP: the reconstruction decoder then gets no gradient

    def forward(self, x: torch.Tensor, y: torch.Tensor, index: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        seg, recon = self.model(x)
        dice, bce = self.seg_loss(seg.float(), y)  # losses in fp32 under CUDA autocast
        terms = {"dice": dice, "bce": bce}
        if self.recon_weight > 0:
            terms["recon"] = self.recon_weight * F.mse_loss(recon.float(), x.float())
        return terms

    def term_names(self) -> List[str]:
        return ["dice", "bce", *(["recon"] if self.recon_weight > 0 else [])]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]


@claims_run  # before reading anything: a second process to the same RUN fails at once
def train_teacher(
    data_dir: Path,
    run: Path,
    cfg: TeacherConfig,
    resume: bool = False,
    overwrite: bool = False,
    console: Optional[Console] = None,
) -> Dict[str, Any]:
    """Train a multi-task teacher on its seeded ``cfg.fraction`` of the training cases (all of them by default;
    the subset a student with the same ``fraction`` and subset seed is given labels of). Returns the run summary."""
    data = PreparedData(data_dir)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, in_channels=cfg.in_channels, num_classes=1, width=cfg.width, **cfg.model_kwargs)
    if data.size < model.min_size:
        raise MedkdError(f"{data_dir}: slices of {data.size} px are smaller than {cfg.arch}'s minimum {model.min_size}")
    train_set = SliceDataset(data, "train", fraction=cfg.fraction, seed=cfg.subset_draw_seed)
    task = TeacherTask(model, cfg.recon_weight)
    return fit(task, cfg, data, train_set, run, kind="teacher", resume=resume, overwrite=overwrite, console=console,
               summary_extra={"width": cfg.width, "fraction": cfg.fraction,
                              "subset_seed": cfg.effective().get("subset_seed")})
