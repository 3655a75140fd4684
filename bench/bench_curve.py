"""The speed/quality curve of a `spdy run`: SPDY against the baselines at equal measured speedup.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_curve.py [MODEL] --work-dir DIR [spdy run flags ...]

Runs (or resumes) ``spdy run MODEL --work-dir DIR`` with the given flags (default: the curve of
``--targets auto``), then prints every point (measured speedup over dense torch, held-out
quality loss in the model's own terms) and, at each SPDY point's measured speedup, every
baseline's quality loss interpolated along its own measured curve (linear in speedup; the
dense model is the point (1, 0)), with SPDY's loss relative to the best of them. Wall time of
every stage and the load average come last. Prints Markdown.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from spdy.cli import main as spdy


def interpolate(points: list[tuple[float, float]], speedup: float) -> float | None:
    """A method's quality loss at ``speedup`` along its measured points (None outside them)."""
    xs, ys = zip(*sorted([(1.0, 0.0), *points]))
    return float(np.interp(speedup, xs, ys)) if xs[0] <= speedup <= xs[-1] else None


def main() -> None:
    args = sys.argv[1:]
    work = Path(args[args.index("--work-dir") + 1])
    started, load = time.perf_counter(), os.getloadavg()[0]
    code = spdy(["run", *args])
    wall, load_after = time.perf_counter() - started, os.getloadavg()[0]
    summary = json.loads((work / "summary.json").read_text())
    curve, choice = summary["curve"], summary["choice"]
    print(f"\n{summary['model']}: exit {code}, targets {summary['targets']}; quality loss = {choice['quality_loss_is']}; "
          f"exported {summary['target']:g}x ({choice['why']})\n")
    print("| target | method | measured speedup | measured / target | quality loss | held-out loss (search's) |")
    print("|---|---|---|---|---|---|")
    for p in curve:
        print(f"| {p['target']:g} | {p['method']} | {p['measured_speedup']:.3f} | {p['measured_speedup'] / p['target']:.3f} "
              f"| {p['quality_loss']:.4f} | {p['heldout_loss']:.4f} |")
    methods = list(dict.fromkeys(p["method"] for p in curve))
    lines = {m: [(p["measured_speedup"], p["quality_loss"]) for p in curve if p["method"] == m] for m in methods}
    ours, others = summary["method"], [m for m in methods if m != summary["method"]]
    print(f"\nAt {ours}'s measured speedups, each method's quality loss (interpolated along its own measured curve):\n")
    print(f"| measured speedup | {' | '.join(methods)} | {ours} / best other |")
    print("|---|" + "---|" * (len(methods) + 1))
    for speedup, loss in sorted(lines[ours]):
        row = {m: interpolate(lines[m], speedup) for m in others}
        known = [v for v in row.values() if v is not None]
        ratio = f"{loss / min(known):.3f}" if known and min(known) > 0 else "n/a"
        cells = [f"{loss:.4f}"] + ["-" if row[m] is None else f"{row[m]:.4f}" for m in others]
        print(f"| {speedup:.3f} | {' | '.join(cells)} | {ratio} |")
    print(f"\nWall {wall:.0f} s, load average {load:.2f} before / {load_after:.2f} after. Stages (s): "
          + ", ".join(f"{stage} {info['seconds']}" for stage, info in summary["stages"].items()))


if __name__ == "__main__":
    main()
