"""Where 2:4 sparse tensor cores beat dense cuBLAS: one Linear, dense vs 2:4, per shape and row count.

The ``cuda-2:4`` engine gives SPDY a layer's choice of dense or 2:4 only where the sparse kernel
wins at that layer's shape and batch; this maps where that is on the GPU at hand, with the same
timer the backend uses (`cuda_times`: CUDA events around back-to-back calls, alternated, medians).

    python bench/bench_semi.py [--rows 1024,8192,32768] [--json out.json]
"""

from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from spdy.levels import DENSE
from spdy.runtime.masks import magnitude_mask
from spdy.runtime.semi_structured import SemiStructuredLinear, available, kernels_here
from spdy.timing.cuda_semi import SEMI, cuda_times

# (out, in): MiniLM's attention and FFN Linears, SmolLM2-135M's MLP, and a 7B-class square layer.
SHAPES = [(384, 384), (1536, 384), (384, 1536), (1536, 576), (4096, 4096)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,8192,32768", help="comma-separated rows (batch x tokens) per call")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    ok, why = available()
    if not ok:
        raise SystemExit(f"bench_semi: {why}")
    dtype = getattr(torch, args.dtype)
    results = []
    kernels = kernels_here()
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; dense time over each 2:4 library's")
    print(f"{'out x in':>12} {'rows':>7} {'dense us':>9} " + " ".join(f"{k + ' us':>14} {'x':>5}" for k in kernels))
    with torch.no_grad():
        for out_features, in_features in SHAPES:
            layer = nn.Linear(in_features, out_features)
            layer.weight.mul_(magnitude_mask(layer.weight, SEMI).to(layer.weight.dtype))
            dense = nn.Linear(in_features, out_features).to("cuda", dtype)
            dense.load_state_dict(layer.state_dict())
            sparse = {k: SemiStructuredLinear(layer, dtype, f"{out_features}x{in_features}", k) for k in kernels}
            for rows in (int(r) for r in args.rows.split(",")):
                x = torch.randn(rows, in_features, device="cuda", dtype=dtype)
                fns = {DENSE: lambda: dense(x), **{k: (lambda m=m: m(x)) for k, m in sparse.items()}}
                stats = {k: s.median for k, s in cuda_times(fns, args.rounds, 20).items()}
                results.append({"out": out_features, "in": in_features, "rows": rows, "seconds": stats})
                print(f"{out_features:>5} x {in_features:<5} {rows:>7} {stats[DENSE] * 1e6:>9.1f} "
                      + " ".join(f"{stats[k] * 1e6:>14.1f} {stats[DENSE] / stats[k]:>5.2f}" for k in kernels))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "kernels": kernels, "dtype": args.dtype,
                       "rounds": args.rounds, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
