"""Scale-out on this machine, measured side by side in one run: a teacher epoch with ``torchrun --nproc-per-node 2``
(gloo, 1 thread per process) vs one process with 2 threads and with 1 thread (same global batch, same data);
seconds per epoch from ``history.jsonl`` (epoch 1 dropped).

CPU DDP on 2 cores shows the plumbing's overhead, not a speed-up a GPU job would see: both processes share the same
two cores and the gloo all-reduces go through shared memory.

Usage: python benchmarks/bench_scale.py [--size 64] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from _common import WORK, machine, prepared_sample

PY = sys.executable


def run(cmd, threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t0 = time.time()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def epoch_s(run_dir: Path) -> float:
    rows = [json.loads(x) for x in (run_dir / "history.jsonl").read_text().splitlines()]
    rows = rows[1:] or rows
    return sum(r["seconds"] for r in rows) / len(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    data = prepared_sample(args.size)
    root = WORK / "scale"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    train = ["train-teacher", str(data), "--width", "8", "--epochs", str(args.epochs), "--batch-size", "8",
             "--device", "cpu", "-q"]
    print(f"# {machine()}; sample data at {args.size} px; teacher unet width 8, global batch 8")
    t = {}
    t["1 process, 2 threads"] = run([PY, "-m", "medkd", *train, "-o", str(root / "t1x2")], 2), root / "t1x2"
    t["torchrun 2 processes x 1 thread"] = run([PY, "-m", "torch.distributed.run", "--standalone",
                                                "--nproc-per-node", "2", "-m", "medkd", *train, "-o",
                                                str(root / "t2x1")], 1), root / "t2x1"
    t["1 process, 1 thread"] = run([PY, "-m", "medkd", *train, "-o", str(root / "t1x1")], 1), root / "t1x1"
    ref = epoch_s(root / "t1x2")
    print("| setting | s / epoch | ratio vs 1 process x 2 threads | wall s (incl. start) |")
    print("|---|---|---|---|")
    for name, (wall, d) in t.items():
        print(f"| {name} | {epoch_s(d):.2f} | {epoch_s(d) / ref:.2f} | {wall:.1f} |")



if __name__ == "__main__":
    main()
