"""Attention alone: torch's SDPA (its CPU flash kernel) vs spdy's kernel attention (`attend`).

q/k/v are views of (batch, seq, heads * dim) projection outputs, as transformers hands them
over; the own output is (batch, seq, heads, dim), so SDPA's is made contiguous in that layout too
(what transformers' SDPA path returns). The two alternate call by call in one process; the
ratio is the median of per-repeat ratios.

    python bench/bench_attention.py [--threads 1,2] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
from datetime import datetime

import torch
import torch.nn.functional as F

from spdy.runtime import cpu
from spdy.runtime.attention import attend

SHAPES = {  # name: (batch, heads, seq, head dim)
    "MiniLM-L6, 8 x 128": (8, 12, 128, 32),
    "MiniLM-L6, 1 x 128": (1, 12, 128, 32),
    "MiniLM-L6, 8 x 256, padded": (8, 12, 256, 32),
    "BERT-base, 8 x 128": (8, 12, 128, 64),
}


def _median_ms(fn, calls: int = 10) -> float:
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    cpu.keep_freed_memory()  # both sides: fresh score/output pages would cost page faults
    print(f"{datetime.now():%Y-%m-%d %H:%M}, {args.repeats} repeats of 10 calls each\n")
    print("| shape | threads | SDPA ms | own ms | own speedup |")
    print("|---|---|---|---|---|")
    for name, (batch, heads, seq, dim) in SHAPES.items():
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(batch, seq, heads * dim, generator=g).view(batch, seq, heads, dim).transpose(1, 2)
                   for _ in range(3))
        mask = None
        if "padded" in name:  # a key-padding mask, as transformers builds it: (batch, 1, 1, keys) bool
            lengths = torch.randint(seq // 2, seq + 1, (batch,), generator=g)
            mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
        reference = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)
        error = float((attend(q, k, v, mask) - reference).abs().max() / reference.abs().max())
        assert error < 1e-5, f"{name}: own attention differs from SDPA by {error:.1e}"
        for threads in (int(t) for t in args.threads.split(",")):
            cpu.set_num_threads(threads)
            sdpa = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).contiguous()  # noqa: E731
            own = lambda: attend(q, k, v, mask)  # noqa: E731
            sdpa(), own()
            pairs = [(_median_ms(sdpa), _median_ms(own)) for _ in range(args.repeats)]
            ratio = statistics.median(a / b for a, b in pairs)
            print(f"| {name} | {threads} | {statistics.median(a for a, _ in pairs):.2f} | "
                  f"{statistics.median(b for _, b in pairs):.2f} | {ratio:.2f} |", flush=True)


if __name__ == "__main__":
    main()
