"""Seconds per distill epoch by teacher-output mode, measured side by side in one run, repeated.

For each repeat, in this order on the same data and student:

* plain   -- the student alone (``--scales none --no-pmd``), the reference;
* live    -- distillation, the teacher run on every batch (``--teacher-outputs live``);
* disk    -- distillation from ``TEACHER_RUN/cache`` (cold in repeat 1: its one-off fill is reported apart, warm after);
* memory  -- distillation from targets held in memory (filled once per run, reported apart);
* auto    -- what ``auto`` picks after measuring (its choice, reason and measuring time are printed).

Each setting's s/epoch is the median of epochs 2..N (epoch 1 pays warm-up); the table gives the median over repeats
of the ratio to plain (each repeat's own plain run) and the min-max spread over repeats, plus what each mode stores.

Sizes:

* ``demo``  -- sample data at 64 px (``make demo``'s size), 1 channel, teacher unet width 16 (trained 1 epoch), student s1 on 50 %.
* ``study`` -- the reference study's shapes: 3 x 256 x 256 slices, teacher T1 (unet width 64, 43 M parameters).
  On CPU a T1 forward is ~0.5 s per slice, so the data is a slice of the sample data (``--cases`` cases,
  ``--slices`` slices around the organ each) and the teacher is a randomly initialised T1 saved as a teacher run
  (only timing is measured, never Dice).

Recipes (``--recipe``):

* ``study``   -- the reference study's (``--scales``, default all three, contrastive + PMD, labelled images only);
* ``default`` -- ``medkd distill``'s defaults (PMD + pseudo-labels, the teacher on every train image): the plain
  student then takes the same optimizer steps per epoch over the same number of images (``--steps-per-epoch``), so
  the ratio is the cost of the distillation terms, not of the unlabelled images.

Usage: python benchmarks/bench_distill.py [--size demo|study] [--recipe study|default] [--epochs 6] [--repeats 3]
       [--device cpu|cuda] [--scales enc,bottleneck,dec|none] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from _common import ROOT, WORK, machine, prepared_sample, quiet

from medkd.ablate.budget import natural_steps_per_epoch
from medkd.config import DistillConfig, TeacherConfig, build_config
from medkd.data.prepared import PreparedData
from medkd.distill.run import distill

MODES = ("plain", "live", "disk", "memory", "auto")


def epoch_seconds(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    secs = [r["seconds"] for r in rows[1:]] or [rows[0]["seconds"]]
    return statistics.median(secs)


def demo_setup(args):
    from medkd.train.teacher import train_teacher

    data = prepared_sample(64)
    teacher = WORK / "teacher-w16-64"
    if not (teacher / "best.pt").is_file():
        train_teacher(data, teacher, build_config(TeacherConfig, overrides=dict(width=16, epochs=1, device=args.device)),
                      overwrite=True, console=quiet())
    return data, teacher, dict(in_channels=1), "sample data at 64 px (the demo's size), 1 channel; teacher unet width 16"


def study_setup(args):
    """A few sample cases, cropped to ``--slices`` slices, prepared at 256 px; a random-weight T1 teacher run."""
    import nibabel as nib
    import numpy as np
    import torch

    import medkd
    from medkd.data.preprocess import PreprocessSettings, preprocess
    from medkd.models import build_model
    from medkd.rundir import atomic_save, write_json

    src = WORK / f"study-src-{args.cases}x{args.slices}"
    data = WORK / f"study-data-{args.cases}x{args.slices}"
    if not (data / "manifest.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        (src / "imagesTr").mkdir(parents=True)
        (src / "labelsTr").mkdir()
        doc = json.loads((ROOT / "sample_data" / "dataset.json").read_text())
        doc["training"] = doc["training"][: args.cases]
        doc["numTraining"] = args.cases
        for case in doc["training"]:
            img, lbl = (nib.load(ROOT / "sample_data" / case[k]) for k in ("image", "label"))
            z = np.flatnonzero(np.asarray(lbl.dataobj).any(axis=(0, 1)))
            mid = int(z.mean()) if len(z) else img.shape[2] // 2
            lo = max(0, min(img.shape[2] - args.slices, mid - args.slices // 2))
            for k, v in (("image", img), ("label", lbl)):
                nib.save(v.slicer[:, :, lo : lo + args.slices], src / case[k])
        (src / "dataset.json").write_text(json.dumps(doc))
        preprocess(src, data, PreprocessSettings(size=256, test_fraction=0.25, val_fraction=0.25), overwrite=True)
    teacher = WORK / "teacher-T1-random"
    if not (teacher / "best.pt").is_file():
        torch.manual_seed(0)
        model = build_model("unet", in_channels=3, num_classes=1, width=64)
        teacher.mkdir(parents=True, exist_ok=True)
        atomic_save({"model": model.state_dict(), "model_config": model.config, "kind": "teacher", "epoch": 0,
                     "medkd_version": medkd.__version__, "data": {"size": 256}}, teacher / "best.pt")
        write_json(teacher / "summary.json", {"kind": "teacher", "arch": "unet", "note": "random weights (timing only)"})
    return data, teacher, dict(in_channels=3), (f"sample data cut to {args.cases} cases x {args.slices} slices, 3 x 256 x 256; "
                                                f"teacher T1 unet width 64 (random weights)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=("demo", "study"), default="demo")
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--student", default="s1")
    ap.add_argument("--loss", default="contrastive")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--cases", type=int, default=4, help="study size: sample cases used")
    ap.add_argument("--slices", type=int, default=12, help="study size: slices kept per case")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--scales", default="enc,bottleneck,dec", help="distilled scales ('none' = PMD only)")
    ap.add_argument("--recipe", choices=("study", "default"), default="study",
                    help="study: --scales + contrastive + PMD on labelled images; default: medkd distill's defaults")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda (a GPU machine: the issue's H100 comparison)")
    args = ap.parse_args()

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    scales = [] if args.scales == "none" else args.scales.split(",")
    data, teacher, extra, what = (demo_setup if args.size == "demo" else study_setup)(args)
    modes = args.modes.split(",")
    shutil.rmtree(teacher / "cache", ignore_errors=True)
    common = dict(student=args.student, epochs=args.epochs, device=args.device, seed=0, batch_size=args.batch_size,
                  **extra)
    if args.recipe == "study":  # the reference study's recipe (--scales, contrastive, PMD, labelled images only)
        kd = dict(scales=scales or "none", pmd=True, loss=args.loss, kd_images="labelled")
        plain_kw = dict(scales="none", pmd=False)
    else:  # medkd distill's defaults; the plain student takes as many steps per epoch (same images seen)
        kd = {}
        steps = natural_steps_per_epoch(build_config(DistillConfig, overrides={**common, "teacher": str(teacher)}),
                                        PreparedData(data))
        plain_kw = dict(scales="none", pmd=False, steps_per_epoch=steps)
    results = {m: [] for m in modes}
    for rep in range(args.repeats):
        for mode in modes:
            kw = plain_kw if mode == "plain" else dict(teacher=str(teacher), teacher_outputs=mode, **kd)
            cfg = build_config(DistillConfig, overrides={**common, **kw})
            run = WORK / f"distill-{args.size}-{mode}"
            t0 = time.time()
            s = distill(data, run, cfg, overwrite=True, console=quiet())
            wall = time.time() - t0
            rec = s.get("teacher_outputs") or {}
            results[mode].append({"epoch_s": epoch_seconds(run), "setup_s": wall - s["seconds"], "rec": rec,
                                  "train_slices": s["train_slices"]})
            plain = results.get("plain", [])
            ratio = (f"(ratio {results[mode][-1]['epoch_s'] / plain[rep]['epoch_s']:.2f})  "
                     if len(plain) > rep else "")
            print(f"repeat {rep + 1} {mode:6s} {results[mode][-1]['epoch_s']:7.2f} s/epoch  {ratio}"
                  f"set-up {wall - s['seconds']:6.1f} s  {rec.get('mode', '')} {rec.get('reason', '')[:160]}",
                  flush=True)

    print(f"\nmachine: {machine()}")
    n = max(r[0]["train_slices"] for r in results.values())  # the distilled runs' (the plain one: its labelled part)
    recipe = ("medkd distill's defaults (PMD + pseudo-labels, teacher on every train image; plain at the same "
              "steps per epoch)" if args.recipe == "default" else
              ('loss ' + args.loss + ' at ' + '+'.join(scales) + ' + PMD') if scales else 'PMD only')
    print(f"size {args.size}: {what}; student {args.student} on {n} training slices, batch {args.batch_size}, "
          f"{recipe}; {args.epochs} epochs (median of epochs 2-{args.epochs}), {args.repeats} repeat(s)")
    print("| setting | s/epoch (median over repeats) | ratio to plain: median [min-max] | one-off set-up s | stores |")
    print("|---|---:|---:|---:|---:|")
    for m in modes:
        rows = results[m]
        ratios = [r["epoch_s"] / p["epoch_s"] for r, p in zip(rows, results.get("plain", rows))]
        rec = rows[-1]["rec"]
        stored = f"{rec.get('cache_bytes', 0) / 1e6:.2f} MB ({rec.get('mode')})" if rec else "-"
        setups = "/".join(f"{r['setup_s']:.1f}" for r in rows)
        print(f"| {m} | {statistics.median(r['epoch_s'] for r in rows):.2f} | {statistics.median(ratios):.2f} "
              f"[{min(ratios):.2f}-{max(ratios):.2f}] | {setups} | {stored} |")
    if "auto" in results:
        rec = results["auto"][-1]["rec"]
        print(f"\nauto chose {[r['rec']['mode'] for r in results['auto']]}; last reason: {rec['reason']}")
        print(f"measured costs (s/batch): {json.dumps(rec['costs'])}; measuring took "
              f"{[r['rec'].get('measure_seconds') for r in results['auto']]} s")


if __name__ == "__main__":
    main()
