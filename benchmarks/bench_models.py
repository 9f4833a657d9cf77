"""Images per second, forward and forward+backward, for every registered model at the demo size
(1 channel, 128 px, demo widths) and at the reference study's size (3 channels, 256 px, study widths).

Also prints each model's speed relative to the s1 student at the same size (ratios hold across machines).

Usage: python benchmarks/bench_models.py [--repeats 3] [--batch 4] [--skip-study]
"""

from __future__ import annotations

import argparse
import time

import torch
from _common import machine

from medkd.metrics.efficiency import count_params
from medkd.models import build_model, list_models

DEMO = {"unet": 16, "transunet": 16, "s1": None, "s2": None}
STUDY = {"unet": 64, "transunet": 32, "s1": None, "s2": None}


def images_per_s(model, x, backward: bool, repeats: int) -> float:
    model.train(backward)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if backward:
            out = model(x)
            out = out[0] if isinstance(out, tuple) else out
            out.float().mean().backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.no_grad():
                model(x)
        if i:  # first call is warm-up
            times.append(time.perf_counter() - t0)
    return x.shape[0] / (sum(times) / len(times))


def bench(title: str, widths: dict, channels: int, size: int, batch: int, repeats: int) -> None:
    print(f"\n{title}: {channels} channel(s), {size}x{size}, batch {batch}")
    print(f"{'model':<10} {'width':>5} {'params':>12} {'fwd img/s':>10} {'fwd+bwd img/s':>14} {'fwd vs s1':>10}")
    ref = None
    for name in ["s1", "s2", "unet", "transunet"]:
        torch.manual_seed(0)
        kw = {"img_size": size} if name == "transunet" else {}
        m = build_model(name, in_channels=channels, width=widths[name], **kw)
        x = torch.randn(batch, channels, size, size)
        f = images_per_s(m, x, False, repeats)
        fb = images_per_s(m, x, True, repeats)
        ref = ref or f
        print(f"{name:<10} {m.width:>5} {count_params(m):>12,} {f:>10.1f} {fb:>14.1f} {f / ref:>9.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--skip-study", action="store_true")
    args = ap.parse_args()
    assert set(list_models()) == set(DEMO), "update the benchmark for new models"
    print(f"machine: {machine()}")
    bench("demo size", DEMO, 1, 128, args.batch, args.repeats)
    if not args.skip_study:
        bench("study size", STUDY, 3, 256, 2, max(1, args.repeats - 1))


if __name__ == "__main__":
    main()
