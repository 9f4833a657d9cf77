"""Deployment cost on the CPU: per-slice latency and peak memory of S1, S2 and the teacher under PyTorch eager
and ONNX Runtime, side by side in one run, plus model file sizes.

- Same inputs: real prepared slices of the sample data (128 px, 1 channel), batch 1 (one slice per call, as a
  deployment streams them); both engines see the same arrays.
- Threads pinned: ``torch.set_num_threads(T)`` and ONNX Runtime ``intra_op_num_threads=T`` (``--threads``, default 1),
  inter-op 1.
- Latency: rounds alternate eager and ORT (one call each per round, after warm-up) so machine load hits both alike;
  the median per engine and the ratio ORT / eager are printed.
- Peak memory: each (model, engine) runs in a fresh subprocess that imports only its runtime (the ORT one never
  imports torch), loads the model file, runs the slices, and reports its peak RSS (``VmHWM``, Linux) and the growth
  over the bare runtime import.
- Sizes: ``state_dict`` checkpoint (``torch.save``), ONNX float32, ONNX with ``--fp16`` weights.

Weights are freshly initialised (latency and memory do not depend on their values); the ONNX models are exported
by :mod:`medkd.export` (same wrapper and exporter as ``medkd export``) and checked against eager before timing.

Usage: python benchmarks/bench_deploy.py [--threads 1] [--rounds 30] [--no-study-teacher]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import machine, prepared_sample

from medkd.metrics.efficiency import count_params
from medkd.models import build_model

# (label, registry name, width)
MODELS = [("S1", "s1", None), ("S2", "s2", None), ("teacher T1 (demo width 16)", "unet", 16)]
STUDY_TEACHER = ("teacher T1 (study width 64)", "unet", 64)

CHILD = r"""
import json, resource, sys, time
import numpy as np
engine, path, slices, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
def rss():  # peak resident set of this process image in MiB (VmHWM; ru_maxrss would carry the parent's over fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
x = np.load(slices)
if engine == "eager":
    import torch
    torch.set_num_threads(threads)
    base = rss()
    from medkd.models import build_model
    spec = json.loads(open(path + ".json").read())
    m = build_model(spec["name"], width=spec["width"]).eval()
    m.load_state_dict(torch.load(path, map_location="cpu"))
    with torch.no_grad():
        for s in x:
            m(torch.from_numpy(s[None, None]))
else:
    import onnxruntime as ort
    base = rss()
    so = ort.SessionOptions(); so.intra_op_num_threads = threads; so.inter_op_num_threads = 1
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for s in x:
        sess.run(None, {name: s[None, None]})
print(json.dumps({"peak_mib": rss(), "runtime_mib": base}))
"""


def export_onnx(net, x: torch.Tensor, path: Path, fp16: bool) -> None:
    import onnx

    from medkd.export import _export_onnx, _seg_module

    _export_onnx(_seg_module(net), x, path, 17, fp16, {"benchmark": True}, onnx)


def child_memory(engine: str, path: Path, slices: Path, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", CHILD, engine, str(path), str(slices), str(threads)],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--mem-slices", type=int, default=20)
    ap.add_argument("--no-study-teacher", action="store_true")
    args = ap.parse_args()

    import onnxruntime as ort

    torch.set_num_threads(args.threads)
    data = prepared_sample(128)
    from medkd.data.prepared import PreparedData

    prepared = PreparedData(data)
    cid = prepared.case_ids("test")[0]
    slices = np.array(prepared.image(cid), dtype=np.float32)  # (Z, 128, 128) real prepared slices
    work = Path(tempfile.mkdtemp(prefix="medkd-deploy-"))
    np.save(work / "slices.npy", slices[: args.mem_slices])
    models = MODELS + ([] if args.no_study_teacher else [STUDY_TEACHER])
    print(f"machine: {machine()}; threads pinned: torch {args.threads}, onnxruntime intra-op {args.threads}")
    print(f"inputs: {len(slices)} prepared slices of case {cid} (1x128x128), batch 1; {args.rounds} alternating rounds")
    print(f"onnxruntime {ort.__version__}")
    rows = []
    for label, name, width in models:
        torch.manual_seed(0)
        net = build_model(name, width=width).eval()
        x = torch.from_numpy(slices[:4])[:, None]
        pt, onx, onx16 = work / f"{name}{width}.pt", work / f"{name}{width}.onnx", work / f"{name}{width}-fp16.onnx"
        torch.save(net.state_dict(), pt)
        pt.with_name(pt.name + ".json").write_text(json.dumps({"name": name, "width": width}))
        export_onnx(net, x, onx, False)
        export_onnx(net, x, onx16, True)
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        sess = ort.InferenceSession(str(onx), so, providers=["CPUExecutionProvider"])
        iname = sess.get_inputs()[0].name

        def eager(s):
            with torch.no_grad():
                out = net(torch.from_numpy(s[None, None]))
            return out[0] if isinstance(out, tuple) else out

        def onnxrt(s):
            return sess.run(None, {iname: s[None, None]})[0]

        diff = max(float(np.max(np.abs(eager(s).numpy() - onnxrt(s)))) for s in slices[:4])
        for i in range(args.warmup):
            eager(slices[i % len(slices)]), onnxrt(slices[i % len(slices)])
        te, to = [], []
        for r in range(args.rounds):
            s = slices[r % len(slices)]
            t0 = time.perf_counter()
            eager(s)
            t1 = time.perf_counter()
            onnxrt(s)
            t2 = time.perf_counter()
            te.append((t1 - t0) * 1e3)
            to.append((t2 - t1) * 1e3)
        mem_e = child_memory("eager", pt, work / "slices.npy", args.threads)
        mem_o = child_memory("ort", onx, work / "slices.npy", args.threads)
        me, mo = statistics.median(te), statistics.median(to)
        rows.append({
            "model": label, "params": count_params(net), "eager_ms": me, "ort_ms": mo, "ratio": mo / me,
            "eager_peak": mem_e["peak_mib"], "eager_growth": mem_e["peak_mib"] - mem_e["runtime_mib"],
            "ort_peak": mem_o["peak_mib"], "ort_growth": mem_o["peak_mib"] - mem_o["runtime_mib"],
            "pt_mb": pt.stat().st_size / 2**20, "onnx_mb": onx.stat().st_size / 2**20,
            "onnx16_mb": onx16.stat().st_size / 2**20, "max_abs_diff": diff,
        })
        print(f"  {label}: eager {me:.2f} ms, ORT {mo:.2f} ms (ratio {mo / me:.2f}), max |diff| {diff:.1e}",
              flush=True)
    print("\n| model | params | eager ms/slice | ORT ms/slice | ORT / eager | eager peak RSS MiB (+model) "
          "| ORT peak RSS MiB (+model) | .pt MiB | .onnx MiB | .onnx fp16 MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['model']} | {r['params']:,} | {r['eager_ms']:.2f} | {r['ort_ms']:.2f} | **{r['ratio']:.2f}** "
              f"| {r['eager_peak']:.0f} (+{r['eager_growth']:.0f}) | {r['ort_peak']:.0f} (+{r['ort_growth']:.0f}) "
              f"| {r['pt_mb']:.2f} | {r['onnx_mb']:.2f} | {r['onnx16_mb']:.2f} |")
    print(f"\nmax |ORT - eager| logits over the checked slices: {max(r['max_abs_diff'] for r in rows):.1e}")


if __name__ == "__main__":
    main()
