"""Per-layer speedup over dense F.linear: own sparse kernel vs torch CSR (vs DeepSparse).

Each engine runs in its own worker process (numba's, torch's and DeepSparse's thread
pools would otherwise compete), 2 threads for everything unless --threads says otherwise, dense and sparse calls
alternated, medians over the repeats after warm-up, OMP_WAIT_POLICY=PASSIVE by default. Workers print JSON lines; the
parent prints one Markdown table of ratios dense_time / engine_time (> 1 = faster).

    python bench/bench_kernels.py [--quick] [--threads T] [--sparsities 0,0.5,0.9] [--engines kernel,csr,deepsparse] [--save F] [--load F]
    python bench/bench_kernels.py --engines kernel,base --baseline old_kernels.py   # before/after a kernel change

``base`` is the kernel module from the file given by --baseline (e.g. ``git show REV:src/spdy/runtime/kernels.py``),
in its own worker like every engine.
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

SHAPES = {  # (out, in)
    "MiniLM q/k/v/o": (384, 384),
    "MiniLM ffn up": (1536, 384),
    "MiniLM ffn down": (384, 1536),
    "BERT q/k/v/o": (768, 768),
    "BERT ffn up": (3072, 768),
    "BERT ffn down": (768, 3072),
}
ROWS = (128, 1024)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
QUICK = {"shapes": ("MiniLM ffn down", "BERT ffn up"), "rows": ROWS, "sparsities": (0.7, 0.9, 0.95)}
THREADS = 2
ROOT = Path(__file__).resolve().parents[1]
DEEPSPARSE_PYTHON = ROOT / ".venv-ds" / "bin" / "python"


def _cases(quick: bool, sparsities: tuple[float, ...] | None = None) -> list[tuple[str, int, int, int, float]]:
    shapes = QUICK["shapes"] if quick else tuple(SHAPES)
    rows = QUICK["rows"] if quick else ROWS
    sparsities = sparsities or (QUICK["sparsities"] if quick else SPARSITIES)
    return [(s, *SHAPES[s], n, p) for s in shapes for n in rows for p in sparsities]


def _layer(out_f: int, in_f: int, n: int, sparsity: float):
    """Random layer pruned by magnitude to `sparsity`, and an input; same seed in every worker."""
    import torch

    g = torch.Generator().manual_seed(out_f * 7919 + in_f * 31 + n)
    w = torch.randn(out_f, in_f, generator=g) / in_f**0.5
    k = int(round(sparsity * w.numel()))
    if k:
        cut = w.abs().flatten().kthvalue(k).values
        w = torch.where(w.abs() > cut, w, torch.zeros(()))
    return w, torch.randn(out_f, generator=g), torch.randn(n, in_f, generator=g)


def _median_pair(dense, sparse, repeats: int, warmup: int = 3) -> tuple[float, float]:
    """Medians (s) of alternated dense / sparse calls."""
    for _ in range(warmup):
        dense()
        sparse()
    td, ts = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dense()
        t1 = time.perf_counter()
        sparse()
        t2 = time.perf_counter()
        td.append(t1 - t0)
        ts.append(t2 - t1)
    return statistics.median(td), statistics.median(ts)


def _load_kernels(path: str | None):
    """spdy.runtime.kernels, or the module in the file `path` (a baseline to compare against)."""
    if path is None:
        from spdy.runtime import kernels

        return kernels
    import importlib.util

    spec = importlib.util.spec_from_file_location("baseline_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # numba's disk cache re-imports the module by name
    spec.loader.exec_module(module)
    return module


def _torch_engine(engine: str, w, b, threads: int, baseline: str | None = None):
    """A callable x -> y for the own kernel (or the baseline kernel file) or the best torch CSR layout."""
    import torch

    if engine in ("kernel", "base"):
        from spdy.runtime import cpu

        kernels = _load_kernels(baseline if engine == "base" else None)
        cpu.set_num_threads(threads)
        cpu.keep_freed_memory()  # as the kernel format does in a converted model
        sw = kernels.SparseKernelWeight.from_dense(w, b)
        return sw.matmul
    w_csr, b_col = w.to_sparse_csr(), b[:, None]
    variants = {  # W_csr @ X^T as a strided view, or with X^T made contiguous first
        "addmm(b, W_csr, X^T).T": lambda x: torch.addmm(b_col, w_csr, x.t()).t(),
        "addmm(b, W_csr, X^T.contiguous()).T": lambda x: torch.addmm(b_col, w_csr, x.t().contiguous()).t(),
    }
    return variants


def _deepsparse_engine(w, b, n: int, workdir: str, threads: int):
    import deepsparse
    import numpy as np
    import torch

    layer = torch.nn.Linear(w.shape[1], w.shape[0])
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    path = os.path.join(workdir, f"linear_{w.shape[0]}x{w.shape[1]}_{n}.onnx")
    torch.onnx.export(layer, (torch.zeros(n, w.shape[1]),), path, dynamo=False, opset_version=13,
                      input_names=["x"], output_names=["y"])
    engine = deepsparse.compile_model(path, batch_size=n, num_cores=threads)

    def run(x):
        return engine.run([np.ascontiguousarray(x.numpy())])[0]

    return run


def worker(engine: str, quick: bool, repeats: int, threads: int, baseline: str | None,
           sparsities: tuple[float, ...] | None = None) -> None:
    """Measure one engine on every case; print one JSON object per case."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as workdir, torch.inference_mode():
        for name, out_f, in_f, n, p in _cases(quick, sparsities):
            w, b, x = _layer(out_f, in_f, n, p)
            dense = lambda: F.linear(x, w, b)  # noqa: E731
            if engine == "deepsparse":
                candidates = {"deepsparse": _deepsparse_engine(w, b, n, workdir, threads)}
            elif engine == "csr":
                candidates = _torch_engine("csr", w, b, threads)
            elif engine == "base":
                candidates = {"base": _torch_engine("base", w, b, threads, baseline)}
            else:
                candidates = {"kernel": _torch_engine("kernel", w, b, threads)}
            best = None
            for label, fn in candidates.items():
                td, ts = _median_pair(dense, lambda: fn(x), repeats)
                if best is None or td / ts > best["ratio"]:
                    best = {"dense_ms": td * 1e3, "ms": ts * 1e3, "ratio": td / ts, "variant": label}
            print(json.dumps({"engine": engine, "name": name, "out": out_f, "in": in_f, "n": n,
                              "sparsity": p, **best}), flush=True)


def _run_worker(engine: str, python: str, quick: bool, repeats: int, wait_policy: str, threads: int,
                baseline: str | None, sparsities: str | None) -> list[dict]:
    cmd = [python, __file__, "--worker", engine, "--repeats", str(repeats), "--threads", str(threads)]
    cmd += ["--sparsities", sparsities] if sparsities else []
    cmd += (["--quick"] if quick else []) + (["--baseline", baseline] if baseline else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    if wait_policy:
        env["OMP_WAIT_POLICY"] = wait_policy
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        print(f"[{engine}] failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def table(results: list[dict], engines: list[str]) -> str:
    """Markdown: one row per (layer, N), per sparsity one column per engine."""
    by_key = {(r["engine"], r["out"], r["in"], r["n"], r["sparsity"]): r for r in results}
    layers = sorted({(r["name"], r["out"], r["in"], r["n"]) for r in results},
                    key=lambda k: (list(SHAPES).index(k[0]), k[3]))
    sparsities = sorted({r["sparsity"] for r in results})
    short = {"kernel": "own", "base": "base", "csr": "csr", "deepsparse": "ds"}
    head = ["layer (out x in)", "N", "dense ms"] + [f"{p:.0%} {short[e]}" for p in sparsities for e in engines]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, out_f, in_f, n in layers:
        dense = [by_key[k]["dense_ms"] for k in by_key if k[1:4] == (out_f, in_f, n) and k[0] == engines[0]]
        cells = [f"{name} ({out_f}x{in_f})", str(n), f"{statistics.median(dense):.2f}" if dense else "-"]
        for p in sparsities:
            for e in engines:
                r = by_key.get((e, out_f, in_f, n, p))
                cells.append(f"{r['ratio']:.2f}" if r else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 layers x 3 sparsities")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--sparsities", help="comma-separated, e.g. 0,0.5,0.9 (0 = the kernel on a dense matrix)")
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--baseline", help="kernels.py of an earlier revision, run as engine 'base'")
    ap.add_argument("--engines", default="kernel,csr,deepsparse",
                    help="comma list of kernel, base, csr, deepsparse (deepsparse skipped if its venv is missing)")
    ap.add_argument("--engine", help="only this engine (same as --engines ENGINE)")
    ap.add_argument("--deepsparse-python", default=str(DEEPSPARSE_PYTHON))
    ap.add_argument("--omp-wait-policy", default="PASSIVE",
                    help="OMP_WAIT_POLICY for the workers ('' = inherit); PASSIVE keeps idle OpenMP "
                         "threads (torch's, numba's) from spinning, which on a loaded machine "
                         "otherwise inflates 2-thread timings by 10-100x")
    ap.add_argument("--save", help="write every result as JSON lines to this file")
    ap.add_argument("--load", help="reuse results (JSON lines) for the engines found in this file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sparsities = tuple(float(p) for p in args.sparsities.split(",")) if args.sparsities else None
        worker(args.worker, args.quick, args.repeats, args.threads, args.baseline, sparsities)
        return
    engines = [args.engine] if args.engine else args.engines.split(",")
    if "base" in engines and not args.baseline:
        ap.error("engine 'base' needs --baseline FILE")
    if "deepsparse" in engines and not Path(args.deepsparse_python).exists():
        print(f"skipping deepsparse: {args.deepsparse_python} not found", file=sys.stderr)
        engines.remove("deepsparse")
    results = []
    if args.load:
        results = [json.loads(line) for line in Path(args.load).read_text().splitlines() if line.strip()]
    for e in engines:
        if any(r["engine"] == e for r in results):
            continue
        python = args.deepsparse_python if e == "deepsparse" else sys.executable
        results += _run_worker(e, python, args.quick, args.repeats, args.omp_wait_policy, args.threads, args.baseline,
                               args.sparsities)
    if args.save:
        Path(args.save).write_text("".join(json.dumps(r) + "\n" for r in results))
    engines = [e for e in engines if any(r["engine"] == e for r in results)]
    print(table(results, engines))
    csr = {r["variant"] for r in results if r["engine"] == "csr"}
    if csr:
        print(f"\ncsr = best per case of: {', '.join(sorted(csr))}")


if __name__ == "__main__":
    main()
