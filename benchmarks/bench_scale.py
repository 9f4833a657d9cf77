"""Scale-out on this machine, measured side by side in one run: a teacher epoch with ``torchrun --nproc-per-node 2``
(gloo, 1 thread per process) vs one process with 2 threads and with 1 thread (same global batch, same data);
seconds per epoch from ``history.jsonl`` (epoch 1 dropped). With ``--ablation``: the wall time of one small
ablation (quick preset, 2 seeds) run unsharded (one process) vs as two ``--shard`` processes started at
the same moment (1 thread in every process) then ``--report-only``, and a check that both give the same results rows.

CPU DDP on 2 cores shows the plumbing's overhead, not a speed-up a GPU job would see: both processes share the same
two cores and the gloo all-reduces go through shared memory.

Usage: python benchmarks/bench_scale.py [--size 64] [--epochs 3] [--ablation [--ablation-epochs 2]]
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
    ap.add_argument("--ablation", action="store_true", help="also time a sharded vs an unsharded ablation")
    ap.add_argument("--ablation-epochs", type=int, default=2)
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
    if args.ablation:
        sharded_ablation(data, root, root / "t1x2", args.ablation_epochs)


def _rows(results: Path) -> list:
    doc = json.loads(results.read_text())
    keys = ("name", "seeds", "dice_mean", "dice_std", "p_value", "p_adjusted")
    return [{k: r.get(k) for k in keys} for r in doc["rows"]]


def sharded_ablation(data: Path, root: Path, teacher: Path, epochs: int) -> None:
    """One ablation unsharded vs two concurrent shards + --report-only (same plan, same teacher)."""
    common = [PY, "-m", "medkd", "ablate", str(data), "--teacher", str(teacher), "--preset", "quick",
              "--seeds", "0,1", "--epochs", str(epochs), "--device", "cpu", "-q"]
    env1 = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    # 1 thread in every process: the thread count changes float reductions, and training amplifies that, so
    # rows compare exactly only at equal thread counts (the wall-time question is the same either way)
    whole = run([*common, "-o", str(root / "ablate-whole")], 1)
    t0 = time.time()
    shards = [subprocess.Popen([*common, "-o", str(root / "ablate-sharded"), "--shard", f"{i}/2"], env=env1,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in (1, 2)]
    errs = [p.communicate()[1] for p in shards]
    for p, err in zip(shards, errs):
        if p.returncode != 0:
            raise SystemExit(f"shard exited {p.returncode}: {err.strip()[-500:]}")
    subprocess.run([*common, "-o", str(root / "ablate-sharded"), "--report-only"], check=True, env=env1,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sharded = time.time() - t0  # both shards + the report
    same = json.dumps(_rows(root / "ablate-whole" / "results.json")) == json.dumps(
        _rows(root / "ablate-sharded" / "results.json"))
    n = len(list((root / "ablate-whole" / "runs").glob("*/seed*")))
    print(f"\n# ablation: quick preset, seeds 0,1, {epochs} epochs, {n} runs, teacher = the 1x2 run above")
    print("| setting | wall s | ratio vs unsharded |")
    print("|---|---|---|")
    print(f"| unsharded, 1 process x 1 thread | {whole:.1f} | 1.00 |")
    print(f"| 2 concurrent shards x 1 thread, then --report-only | {sharded:.1f} | {sharded / whole:.2f} |")
    print(f"results rows identical (name, seeds, Dice mean/sd, p, p adj.): {same}")



if __name__ == "__main__":
    main()
