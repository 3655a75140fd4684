"""Per-layer times at 1-16 rows (a decoder's matrix-vector products): the small-row sparse kernel
vs dense F.linear vs the large-batch kernel vs DeepSparse, on SmolLM2-135M's Linear shapes.

Each engine runs in its own worker process (numba's, torch's and DeepSparse's thread pools would
otherwise compete), alternated call by call with dense F.linear on the same weights and input;
medians over the repeats after warm-up. A worker of dense alone (no numba in the process) gives
the reference time the ratios divide (> 1 = faster than dense); the dense time measured beside
each engine is kept in the JSON lines (``--save``). Two cache states:

* ``hot``: the same layer called again and again, its weights in L2/L3.
* ``cold``: a buffer of `select.COLD_CACHES` last-level caches (the timing table's cold protocol) is read before every
  timed call (untimed), so the weights come from memory as when a model of hundreds of MB decodes
  one token through all its layers.

    python bench/bench_decode.py [--quick] [--threads T] [--engines small,old,deepsparse] [--cache hot,cold]
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

SHAPES = {  # SmolLM2-135M: hidden 576, intermediate 1536, 9 heads, 3 KV heads of 64; (out, in), no biases
    "q/o proj": (576, 576),
    "k/v proj": (192, 576),
    "gate/up proj": (1536, 576),
    "down proj": (576, 1536),
}
ROWS = (1, 4, 16)
SPARSITIES = (0.5, 0.7, 0.9)
QUICK = {"shapes": ("gate/up proj", "down proj"), "rows": (1, 16), "sparsities": (0.5, 0.9)}
THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
DEEPSPARSE_PYTHON = ROOT / ".venv-ds" / "bin" / "python"


def _cases(quick: bool) -> list[tuple[str, int, int, int, float]]:
    shapes = QUICK["shapes"] if quick else tuple(SHAPES)
    rows = QUICK["rows"] if quick else ROWS
    sparsities = QUICK["sparsities"] if quick else SPARSITIES
    return [(s, *SHAPES[s], n, p) for s in shapes for n in rows for p in sparsities]


def _layer(out_f: int, in_f: int, n: int, sparsity: float):
    """Random weight pruned by magnitude to `sparsity`, and an input; same seed in every worker."""
    import torch

    g = torch.Generator().manual_seed(out_f * 7919 + in_f * 31 + n + int(sparsity * 1000))
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    k = int(round(sparsity * w.numel()))
    if k:
        cut = w.abs().flatten().kthvalue(k).values
        w = torch.where(w.abs() > cut, w, torch.zeros(()))
    return w, torch.randn(n, in_f, generator=g)


def _engine(engine: str, w, x, workdir: str, threads: int):
    """A callable running one product on x with engine's representation of w."""
    import numpy as np

    if engine == "deepsparse":
        import deepsparse
        import torch

        layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            layer.weight.copy_(w)
        path = os.path.join(workdir, f"linear_{w.shape[0]}x{w.shape[1]}_{x.shape[0]}.onnx")
        torch.onnx.export(layer, (torch.zeros_like(x),), path, dynamo=False, opset_version=13,
                          input_names=["x"], output_names=["y"])
        compiled = deepsparse.compile_model(path, batch_size=x.shape[0], num_cores=threads)
        inputs = [np.ascontiguousarray(x.numpy())]
        return lambda: compiled.run(inputs)
    from spdy.runtime import cpu, kernels

    cpu.set_num_threads(threads)
    cpu.keep_freed_memory()  # as the kernel format does in a converted model
    sw = kernels.SparseKernelWeight.from_dense(w)
    if engine == "old":
        kernels.SMALL_ROWS = 0  # the large-batch kernel at every row count, as before issue 22
        return lambda: sw.matmul(x)
    small = sw.small  # the small-row kernel at every row count, even past the dispatch threshold
    xn, y = x.numpy(), np.empty((x.shape[0], w.shape[0]), np.float32)
    return lambda: small.matmul(xn, y, False)


def worker(engine: str, quick: bool, repeats: int, threads: int, cache: str, flush_bytes: int) -> None:
    """Measure one engine on every case; print one JSON object per case."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    flush = np.ones(flush_bytes // 4, np.float32)
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        for name, out_f, in_f, n, p in _cases(quick):
            w, x = _layer(out_f, in_f, n, p)
            fns = {"dense": lambda: F.linear(x, w)}
            if engine != "dense":
                fns[engine] = _engine(engine, w, x, workdir, threads)
            times = {k: [] for k in fns}
            for i in range(repeats + 5):
                for k, fn in fns.items():
                    if cache == "cold":
                        flush.sum()
                    t0 = time.perf_counter()
                    fn()
                    if i >= 5:  # warm-up calls (compilation, page faults) are not counted
                        times[k].append(time.perf_counter() - t0)
            ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            print(json.dumps({"engine": engine, "cache": cache, "name": name, "out": out_f, "in": in_f, "n": n,
                              "sparsity": p, "dense_ms": ms["dense"], "ms": ms[engine]}), flush=True)


def _run_worker(engine: str, python: str, quick: bool, repeats: int, threads: int, cache: str,
                wait_policy: str, flush_bytes: int) -> list[dict]:
    cmd = [python, __file__, "--worker", engine, "--repeats", str(repeats), "--threads", str(threads),
           "--cache", cache, "--flush-bytes", str(flush_bytes)] + (["--quick"] if quick else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"[{engine}, {cache}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def table(results: list[dict], cache: str, engines: list[str]) -> str:
    """Markdown: one row per (layer, N); per sparsity, dense / small and small / each other engine."""
    by = {(r["engine"], r["out"], r["in"], r["n"], r["sparsity"]): r for r in results if r["cache"] == cache}
    layers = sorted({(r["name"], r["out"], r["in"], r["n"]) for r in results if r["cache"] == cache},
                    key=lambda k: (list(SHAPES).index(k[0]), k[3]))
    sparsities = sorted({r["sparsity"] for r in results if r["cache"] == cache})
    others = [e for e in engines if e not in ("small", "dense")]
    head = ["layer (out x in)", "N", "dense ms"]
    for p in sparsities:
        head += [f"{p:.0%} ms", f"{p:.0%} vs dense"] + [f"{p:.0%} vs {e}" for e in others]
    lines = [f"cache {cache}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, out_f, in_f, n in layers:
        dense = [by[k]["ms"] for k in by if k[0] == "dense" and k[1:4] == (out_f, in_f, n)]
        ref = statistics.median(dense) if dense else None
        cells = [f"{name} ({out_f}x{in_f})", str(n), f"{ref:.3f}" if ref else "-"]
        for p in sparsities:
            small = by.get(("small", out_f, in_f, n, p))
            cells += [f"{small['ms']:.3f}" if small else "-",
                      f"{ref / small['ms']:.2f}" if small and ref else "-"]
            for e in others:
                r = by.get((e, out_f, in_f, n, p))
                cells.append(f"{r['ms'] / small['ms']:.2f}" if r and small else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers x 2 row counts x 2 sparsities")
    ap.add_argument("--repeats", type=int, default=101)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--engines", default="small,old,deepsparse",
                    help="comma list of small, old, deepsparse (skipped if its venv is missing); dense always runs")
    ap.add_argument("--cache", default="hot,cold", help="comma list of hot, cold")
    ap.add_argument("--deepsparse-python", default=str(DEEPSPARSE_PYTHON))
    ap.add_argument("--omp-wait-policy", default="",
                    help="OMP_WAIT_POLICY for the workers ('' = inherit); PASSIVE costs numba ~15 us to wake its "
                         "threads per call here, a third of a small layer's time")
    ap.add_argument("--save", help="write every result as JSON lines to this file")
    ap.add_argument("--flush-bytes", type=int, default=0,
                    help="bytes read before each cold call (default: COLD_CACHES x the last-level cache, as the timing table)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.quick, args.repeats, args.threads, args.cache, args.flush_bytes)
        return
    from spdy.runtime import cpu, select  # in the parent: the DeepSparse worker never imports spdy

    flush_bytes = args.flush_bytes or select.COLD_CACHES * cpu.last_level_cache_bytes()
    engines = ["dense"] + args.engines.split(",")
    if "deepsparse" in engines and not Path(args.deepsparse_python).exists():
        print(f"skipping deepsparse: {args.deepsparse_python} not found", file=sys.stderr)
        engines.remove("deepsparse")
    results = []
    for cache in args.cache.split(","):
        for e in engines:
            python = args.deepsparse_python if e == "deepsparse" else sys.executable
            results += _run_worker(e, python, args.quick, args.repeats, args.threads, cache, args.omp_wait_policy,
                                   flush_bytes)
    if args.save:
        Path(args.save).write_text("".join(json.dumps(r) + "\n" for r in results))
    for cache in args.cache.split(","):
        print(table(results, cache, engines) + "\n")
    print("vs dense = dense F.linear alone (its own process) / small; vs E = E / small (> 1: small is faster)")


if __name__ == "__main__":
    main()
