"""Wall time of ``medkd ablate --preset quick`` on the sample data, and the ratio of the total ablation time to
(number of runs x one plain student run) measured in the same process: the teacher's cost should be paid once
(cache filled on the first distilled run, reused by all the others), so the ratio should stay near
(mean distill epoch / plain epoch) plus evaluation overhead.

Usage: python benchmarks/bench_ablate.py [--teacher-epochs 12]
"""

from __future__ import annotations

import argparse
import shutil
import time

from _common import WORK, machine, prepared_sample, quiet

from medkd.ablate import ablate
from medkd.config import DistillConfig, TeacherConfig, build_config
from medkd.distill.cache import TeacherCache
from medkd.distill.run import distill
from medkd.train.teacher import train_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-epochs", type=int, default=12)
    args = ap.parse_args()
    data = prepared_sample(128)
    teacher = WORK / f"teacher-w16-e{args.teacher_epochs}"
    if not (teacher / "best.pt").is_file():
        train_teacher(data, teacher, build_config(TeacherConfig, overrides=dict(epochs=args.teacher_epochs,
                                                                                 device="cpu")),
                      overwrite=True, console=quiet())
    shutil.rmtree(teacher / "cache", ignore_errors=True)

    t0 = time.time()
    distill(data, WORK / "plain-ref", build_config(DistillConfig, overrides=dict(scales="none", pmd=False, device="cpu")),
            overwrite=True, console=quiet())
    plain = time.time() - t0

    fills = []
    orig_fill = TeacherCache.fill

    def counting_fill(self, keys, *a, **kw):
        n = orig_fill(self, keys, *a, **kw)
        fills.append(n)
        return n

    TeacherCache.fill = counting_fill
    shutil.rmtree(WORK / "ablate-quick", ignore_errors=True)
    t0 = time.time()
    res = ablate(data, teacher, WORK / "ablate-quick", preset="quick", base_overrides={"device": "cpu"},
                 console=quiet())
    wall = time.time() - t0
    TeacherCache.fill = orig_fill
    n_runs = sum(len(r["seeds"]) for r in res["rows"])  # rows include the baseline
    n_distilled = sum(len(r["seeds"]) for r in res["rows"] if not r["is_baseline"])
    print(f"machine: {machine()}")
    print(f"quick ablation: {n_runs} runs, wall {wall:.1f} s ({wall / 60:.1f} min)")
    print(f"one plain student run (same epochs): {plain:.1f} s")
    print(f"ablation / (runs x plain run) = {wall / (n_runs * plain):.2f}")
    print(f"teacher slices computed for the cache across the whole ablation: {sum(fills)} "
          f"(computed by {sum(1 for n in fills if n)} of {n_distilled} distilled runs: one per seed's data subset)")


if __name__ == "__main__":
    main()
