"""What each of `convert`'s fusions buys end to end: MiniLM-L6 (batch 8 x 128), all 36 encoder
Linears magnitude-pruned, in the kernel format, fused step by step.

One process holds one model per step (the same weights): "layers only" (``convert(...,
fuse=False)``: every block run as transformers runs it, attention by torch's SDPA), then each of
`spdy.runtime.convert.FUSIONS` added in turn. Models run alternately, one median of a few calls
each per round; reported are medians and the median per-round ratio to the step before (above 1
means the step made it faster). Only ratios inside one run compare on this shared VM.

    python bench/bench_fusions.py [--threads 2] [--sparsity 0.9] [--rounds 12]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import _bundle, _pruned  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--calls", type=int, default=5, help="calls per model per round (their median is the round's time)")
    args = ap.parse_args()

    import torch

    from spdy.runtime import convert, cpu
    from spdy.runtime.convert import FUSIONS
    from spdy.units import call_model

    cpu.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, units, batch = _bundle()
    steps, models = ["layers only"], []
    pruned, _ = _pruned(model, units, args.sparsity)
    reference = call_model(pruned, batch)
    models.append(convert(pruned, {u: "kernel" for u in units}, fuse=False))
    for i, fusion in enumerate(FUSIONS):
        step, _ = _pruned(model, units, args.sparsity)
        convert(step, {u: "kernel" for u in units}, fuse=False)
        for earlier in FUSIONS[:i + 1]:
            earlier(step)
        steps.append(f"+ {fusion.__name__}")
        models.append(step)
    errors = [float((call_model(m, batch) - reference).abs().max() / reference.abs().max()) for m in models]
    for m in models:  # compile and warm
        call_model(m, batch)

    times: list[list[float]] = [[] for _ in models]
    for r in range(args.rounds):
        order = list(range(len(models)))
        order = order[r % len(order):] + order[:r % len(order)]
        for i in order:
            calls = []
            for _ in range(args.calls):
                t0 = time.perf_counter()
                call_model(models[i], batch)
                calls.append(time.perf_counter() - t0)
            times[i].append(statistics.median(calls))

    print(f"{datetime.now():%Y-%m-%d %H:%M}, {args.threads} thread(s), {args.sparsity:.0%} sparse, {args.rounds} rounds, "
          f"load average {os.getloadavg()[0]:.2f}\n")
    print("| step | ms | vs step before | vs layers only | output error vs masked dense |")
    print("|---|---|---|---|---|")
    for i, step in enumerate(steps):
        before = "-" if i == 0 else f"{statistics.median(a / b for a, b in zip(times[i - 1], times[i])):.2f}"
        first = "-" if i == 0 else f"{statistics.median(a / b for a, b in zip(times[0], times[i])):.2f}"
        print(f"| {step} | {statistics.median(times[i]) * 1e3:.1f} | {before} | {first} | {errors[i]:.1e} |")


if __name__ == "__main__":
    main()
