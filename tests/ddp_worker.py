"""Run by tests/test_distributed.py, alone or under ``torchrun``: train a tiny teacher (1 epoch, then ``--resume``
to 2) and a tiny distill through the CLI, recording every training step's loss terms and batch size per rank.

Usage: ddp_worker.py DATA TEACHER OUT_DIR
Writes ``OUT_DIR/steps-<rank>.json``: ``{"teacher": [{term: value, ..., "n": batch}, ...], "student": [...]}``.
"""

import json
import os
import sys
from pathlib import Path

import torch

from medkd.cli import app
from medkd.distill.distiller import Distiller
from medkd.train.teacher import TeacherTask

torch.set_num_threads(1)
data, teacher, out = sys.argv[1:4]
out = Path(out)
steps = {"teacher": [], "student": []}


def recording(cls, key):
    orig = cls.forward

    def forward(self, x, y, index=None):
        terms = orig(self, x, y, index)
        if self.training:
            steps[key].append({**{k: float(v.detach()) for k, v in terms.items()}, "n": int(x.shape[0])})
        return terms

    cls.forward = forward


recording(TeacherTask, "teacher")
recording(Distiller, "student")
common = ["--epochs", "1", "--batch-size", "4", "--device", "cpu", "-q"]
for args in (["train-teacher", data, "-o", str(out / "teacher"), "--width", "4", *common],
             ["train-teacher", data, "-o", str(out / "teacher"), "--width", "4", *common, "--epochs", "2", "--resume"],
             ["distill", data, "-o", str(out / "student"), "--teacher", teacher, "--student-width", "4",
              "--scales", "enc,dec", "--loss", "mse", "--fraction", "1", *common]):
    try:
        rc = app(args, standalone_mode=False)
    except SystemExit as e:
        rc = e.code
    if rc:
        sys.exit(rc)
(out / f"steps-{os.environ.get('RANK', '0')}.json").write_text(json.dumps(steps))
