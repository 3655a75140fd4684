"""Per-layer speedup of each runtime format over dense, on MiniLM-L6's Linear shapes.

    .venv/bin/python bench/bench_formats.py [--rounds 15] [--threads N] [--rows 1024]

Shapes (out, in): 384x384 (q/k/v/attention output), 1536x384 (FFN up), 384x1536 (FFN
down), with N = 8 x 128 = 1024 input rows, as in MiniLM at batch 8 x seq 128. Each level
uses a magnitude mask; ``bsr`` gets a 16x16-block mask at the same sparsity (it is only
offered for block masks). The formats of one shape and level are timed alternately in one
process, as the timing backend does; each cell is ``dense median / format median``, i.e.
the full `SparseLinear` forward (transposes included) against dense ``F.linear``.
Prints Markdown.
"""

from __future__ import annotations

import argparse
import os

import torch

from spdy.runtime import FORMATS, SparseLinear, kernel_status, magnitude_mask
from spdy.runtime.timer import alternating_stats

SHAPES = [(384, 384), (1536, 384), (384, 1536)]
LEVELS = [0.0, 0.5, 0.7, 0.9, 0.95]


def set_threads(n: int) -> None:
    if kernel_status()[0]:
        from spdy.runtime import cpu, kernels

        cpu.set_num_threads(n)
        kernels.warmup()
    else:
        torch.set_num_threads(n)


def run(rounds: int, rows: int) -> list[tuple]:
    torch.manual_seed(0)
    formats = [f for f in FORMATS if f != "kernel" or kernel_status()[0]]
    out = []
    for shape in SHAPES:
        weight, bias = torch.randn(*shape) / shape[1] ** 0.5, torch.randn(shape[0])
        x = torch.randn(rows, shape[1])
        for level in LEVELS:
            key = f"{level:.4f}"
            unstructured = weight * magnitude_mask(weight, key)
            blocks = weight * magnitude_mask(weight, f"16x16@{key}") if level > 0 else None
            modules = {}
            for f in formats:
                if f == "bsr":
                    if blocks is not None:
                        modules[f] = SparseLinear(blocks, bias, f)
                else:
                    modules[f] = SparseLinear(unstructured, bias, f)
            with torch.no_grad():
                stats = alternating_stats({f: (lambda m=m: m(x)) for f, m in modules.items()}, rounds)
            dense = stats["dense"].median
            out.append((shape, level, dense, {f: dense / s.median for f, s in stats.items()}, max(s.spread for s in stats.values())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rows", type=int, default=1024)
    args = parser.parse_args()
    set_threads(args.threads)
    ok, why = kernel_status()
    rows = run(args.rounds, args.rows)
    formats = [f for f in FORMATS if f != "kernel" or ok]
    print(f"threads={args.threads}, rows={args.rows}, rounds={args.rounds}, kernel: {'available' if ok else why}, loadavg={os.getloadavg()[0]:.1f}\n")
    print("| weight (out x in) | sparsity | dense (ms) | " + " | ".join(f"{f} speedup" for f in formats) + " | max spread |")
    print("|---|---|---|" + "---|" * len(formats) + "---|")
    for shape, level, dense, speedups, spread in rows:
        cells = " | ".join(f"{speedups[f]:.2f}x" if f in speedups else "-" for f in formats)
        print(f"| {shape[0]}x{shape[1]} | {level:.0%} | {dense * 1e3:.2f} | {cells} | {spread:.0%} |")


if __name__ == "__main__":
    main()
