"""Seconds per epoch, same data and student, measured side by side in one run:

(a) plain student training (``--scales none --no-pmd``),
(b) distillation with the teacher run live every step (``--no-cache``),
(c) distillation with the teacher-output cache warm,

plus the one-off cost of filling the cache. Target: (c)/(a) <= 1.3.

Usage: python benchmarks/bench_distill.py [--epochs 3] [--teacher-width 16] [--student s1]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from _common import WORK, machine, prepared_sample, quiet

from medkd.config import DistillConfig, TeacherConfig, build_config
from medkd.distill.run import distill
from medkd.train.teacher import train_teacher


def epoch_seconds(run) -> float:
    import json

    rows = [json.loads(l) for l in (run / "history.jsonl").read_text().splitlines()]
    # the first epoch pays one-off warm-up costs; report the median of the rest when there are any
    secs = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    return statistics.median(secs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--teacher-width", type=int, default=16)
    ap.add_argument("--student", default="s1")
    ap.add_argument("--loss", default="contrastive")
    args = ap.parse_args()

    data = prepared_sample(128)
    teacher = WORK / f"teacher-w{args.teacher_width}"
    if not (teacher / "best.pt").is_file():
        train_teacher(data, teacher, build_config(TeacherConfig, overrides=dict(width=args.teacher_width, epochs=1,
                                                                                 device="cpu")),
                      overwrite=True, console=quiet())
    shutil.rmtree(teacher / "cache", ignore_errors=True)
    common = dict(student=args.student, epochs=args.epochs, device="cpu", seed=0, loss=args.loss)

    def run(name, **kw):
        cfg = build_config(DistillConfig, overrides={**common, **kw})
        t0 = time.time()
        summary = distill(data, WORK / name, cfg, overwrite=True, console=quiet())
        wall = time.time() - t0
        return epoch_seconds(WORK / name), wall, summary

    a, _, _ = run("plain", scales="none", pmd=False)
    b, _, _ = run("live", teacher=str(teacher), cache=False)
    c_cold, wall_cold, s_cold = run("cache-cold", teacher=str(teacher), cache=True)
    c, wall_warm, s_warm = run("cache-warm", teacher=str(teacher), cache=True)
    fill = (wall_cold - s_cold["seconds"]) - (wall_warm - s_warm["seconds"])
    print(f"machine: {machine()}")
    print(f"data: sample_data at 128 px, {s_warm['train_slices']} training slices (fraction 0.5); "
          f"student {args.student}; teacher unet width {args.teacher_width}; loss {args.loss}, all scales + PMD")
    print(f"(a) plain student          {a:7.2f} s/epoch")
    print(f"(b) distill, teacher live  {b:7.2f} s/epoch   (b)/(a) = {b / a:.2f}")
    print(f"(c) distill, cache warm    {c:7.2f} s/epoch   (c)/(a) = {c / a:.2f}   target <= 1.3")
    print(f"one-off cache fill         {fill:7.2f} s      ({fill / a:.2f} plain epochs)")


if __name__ == "__main__":
    main()
