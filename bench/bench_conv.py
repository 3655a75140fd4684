"""Per-layer ResNet-50 convolutions: the own sparse conv kernel vs oneDNN's dense F.conv2d vs
DeepSparse, at the network's every distinct conv shape (torchvision's Bottleneck, stride on
the 3x3, 224x224 input), batch 1 and 8, magnitude-pruned seeded random weights.

    flock /tmp/spdy-bench.lock .venv/bin/python bench/bench_conv.py [--quick] [--threads 2] [--rounds 15]
          [--batches 1,8] [--sparsities 0.7,0.9,0.95] [--no-deepsparse]

All contenders of one case are alternated round by round in one run (order rotated each round),
medians over the rounds. Dense is F.conv2d on a channels_last and on a contiguous input, the
faster one counts. DeepSparse (not importable next to numba) runs in a worker process of
.venv-ds: it compiles the conv alone as an ONNX model and times its own calls when asked, so
pipe latency is not in its figure; a one-conv model includes DeepSparse's layout changes at the
model's edges, which a whole network pays only once. Prints one Markdown table: times, and
ratios dense / engine (> 1 = faster than dense) and DeepSparse / own (> 1 = own faster), with
the 1-minute load average when each row was measured.

OMP_WAIT_POLICY is PASSIVE unless set in the environment (torch's idle OpenMP threads would
otherwise spin on the cores numba's threads need, as in bench_kernels.py); run with
OMP_WAIT_POLICY=ACTIVE to see oneDNN with spinning workers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads must not spin while numba's run

ROOT = Path(__file__).resolve().parents[1]
DEEPSPARSE_PYTHON = ROOT / ".venv-ds" / "bin" / "python"
# (name, in, out, kernel, stride, input height = width, how often ResNet-50 has it)
SHAPES = [
    ("conv1", 3, 64, 7, 2, 224, 1),
    ("l1 1x1 in", 64, 64, 1, 1, 56, 1),
    ("l1 3x3", 64, 64, 3, 1, 56, 3),
    ("l1 1x1 out / ds", 64, 256, 1, 1, 56, 4),
    ("l1 1x1 in'", 256, 64, 1, 1, 56, 2),
    ("l2 1x1 in", 256, 128, 1, 1, 56, 1),
    ("l2 3x3 s2", 128, 128, 3, 2, 56, 1),
    ("l2 1x1 out", 128, 512, 1, 1, 28, 4),
    ("l2 ds s2", 256, 512, 1, 2, 56, 1),
    ("l2 1x1 in'", 512, 128, 1, 1, 28, 3),
    ("l2 3x3", 128, 128, 3, 1, 28, 3),
    ("l3 1x1 in", 512, 256, 1, 1, 28, 1),
    ("l3 3x3 s2", 256, 256, 3, 2, 28, 1),
    ("l3 1x1 out", 256, 1024, 1, 1, 14, 6),
    ("l3 ds s2", 512, 1024, 1, 2, 28, 1),
    ("l3 1x1 in'", 1024, 256, 1, 1, 14, 5),
    ("l3 3x3", 256, 256, 3, 1, 14, 5),
    ("l4 1x1 in", 1024, 512, 1, 1, 14, 1),
    ("l4 3x3 s2", 512, 512, 3, 2, 14, 1),
    ("l4 1x1 out", 512, 2048, 1, 1, 7, 3),
    ("l4 ds s2", 1024, 2048, 1, 2, 14, 1),
    ("l4 1x1 in'", 2048, 512, 1, 1, 7, 2),
    ("l4 3x3", 512, 512, 3, 1, 7, 2),
]
QUICK = ("conv1", "l1 3x3", "l2 3x3 s2", "l3 1x1 out", "l4 3x3")


def _case(c_in: int, c_out: int, k: int, sparsity: float, batch: int, hw: int):
    """Seeded weight pruned by magnitude to `sparsity`, bias and input: the same in every process."""
    import torch

    g = torch.Generator().manual_seed(c_in * 7919 + c_out * 31 + k)
    w = torch.randn(c_out, c_in, k, k, generator=g) / math.sqrt(c_in * k * k)
    drop = int(round(sparsity * w.numel()))
    if drop:
        w = torch.where(w.abs() > w.abs().flatten().kthvalue(drop).values, w, torch.zeros(()))
    return w, torch.randn(c_out, generator=g), torch.randn(batch, c_in, hw, hw, generator=g)


def _per_call(fn, number: int) -> float:
    start = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - start) / number


def ds_worker(threads: int) -> None:
    """DeepSparse side (.venv-ds): JSON requests on stdin, one JSON answer per line on stdout."""
    import deepsparse
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    engine, inputs = None, None
    with tempfile.TemporaryDirectory(prefix="spdy-bench-conv-") as tmp:
        for line in sys.stdin:
            req = json.loads(line)
            if req["cmd"] == "compile":
                w, b, x = _case(req["c_in"], req["c_out"], req["k"], req["sparsity"], req["batch"], req["hw"])
                conv = torch.nn.Conv2d(req["c_in"], req["c_out"], req["k"], req["stride"], req["k"] // 2)
                with torch.no_grad():
                    conv.weight.copy_(w)
                    conv.bias.copy_(b)
                path = os.path.join(tmp, "conv.onnx")
                torch.onnx.export(conv, (x,), path, dynamo=False, opset_version=13, input_names=["x"],
                                  output_names=["y"])
                engine = deepsparse.compile_model(path, batch_size=req["batch"], num_cores=threads)
                inputs = [np.ascontiguousarray(x.numpy())]
                out = torch.from_numpy(np.asarray(engine.run(inputs)[0]))
                ref = F.conv2d(x.double(), w.double(), b.double(), req["stride"], req["k"] // 2)
                answer = {"error": float((out.double() - ref).abs().max() / ref.abs().max())}
            else:  # "time": seconds per call over `number` calls
                answer = {"s": _per_call(lambda: engine.run(inputs), req["number"])}
            print(json.dumps(answer), flush=True)


class DeepSparse:
    """The DeepSparse worker process, compiled for one case at a time."""

    def __init__(self, python: Path, threads: int):
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        self.proc = subprocess.Popen([str(python), __file__, "--ds-worker", "--threads", str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, **request) -> dict:
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the DeepSparse worker died (its stderr is above)")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def alternate(local: dict, remote: DeepSparse | None, rounds: int) -> dict[str, float]:
    """Median seconds per call of every contender, all run in every round in rotated order; each
    sample repeats its call to >= 1 ms. DeepSparse ('ds') times its own calls in its process."""
    import statistics

    names = list(local) + (["ds"] if remote else [])

    def sample(name: str, number: int) -> float:
        return remote.ask(cmd="time", number=number)["s"] if name == "ds" else _per_call(local[name], number)

    number = {}
    for name in names:
        first = min(sample(name, 1) for _ in range(2))  # warm-up: compiles, caches, page faults
        number[name] = max(1, math.ceil(1e-3 / max(first, 1e-9)))
    samples = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(sample(name, number[name]))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--sparsities", default="0.7,0.9,0.95")
    ap.add_argument("--no-deepsparse", action="store_true")
    ap.add_argument("--ds-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ds_worker:
        ds_worker(args.threads)
        return

    import torch
    import torch.nn.functional as F
    from torch import nn

    from spdy.runtime import cpu
    from spdy.runtime.modules import SparseConv2d

    cpu.set_num_threads(args.threads)
    remote = None
    if args.no_deepsparse:
        print("DeepSparse: skipped (--no-deepsparse)")
    elif not DEEPSPARSE_PYTHON.exists():
        print(f"DeepSparse: skipped ({DEEPSPARSE_PYTHON} not found)")
    else:
        remote = DeepSparse(DEEPSPARSE_PYTHON, args.threads)
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK]
    sparsities = [float(p) for p in args.sparsities.split(",")]
    print(f"threads {args.threads}, rounds {args.rounds}, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, "
          f"load average at start {os.getloadavg()}")
    head = ["layer", "in->out k s @hw", "x", "N", "dense ms (layout)"]
    for p in sparsities:
        head += [f"{p:.0%} own ms", f"{p:.0%} dense/own"] + ([f"{p:.0%} dense/ds", f"{p:.0%} ds/own"] if remote else [])
    head.append("load 1m")
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    totals: dict[tuple[int, float], list[float]] = {}
    with torch.inference_mode():
        for batch in [int(n) for n in args.batches.split(",")]:
            for name, c_in, c_out, k, stride, hw, count in shapes:
                cells, dense_best = [], []
                for p in sparsities:
                    w, b, x = _case(c_in, c_out, k, p, batch, hw)
                    conv = nn.Conv2d(c_in, c_out, k, stride, k // 2)
                    with torch.no_grad():
                        conv.weight.copy_(w)
                        conv.bias.copy_(b)
                    own = SparseConv2d(conv, "kernel")
                    x_cl = x.contiguous(memory_format=torch.channels_last)
                    local = {
                        "own": lambda: own(x_cl),
                        "dense channels_last": lambda: F.conv2d(x_cl, w, b, stride, k // 2),
                        "dense contiguous": lambda: F.conv2d(x, w, b, stride, k // 2),
                    }
                    err = (own(x_cl) - F.conv2d(x, w, b, stride, k // 2)).abs().max() / conv(x).abs().max()
                    assert err < 1e-4, f"own kernel wrong on {name} at {p}: relative error {err:.2e}"
                    if remote:
                        ds_err = remote.ask(cmd="compile", c_in=c_in, c_out=c_out, k=k, stride=stride, hw=hw,
                                            batch=batch, sparsity=p)["error"]
                        if ds_err > 1e-3:
                            print(f"warning: DeepSparse output off by {ds_err:.1e} on {name} at {p}", file=sys.stderr)
                    t = alternate(local, remote, args.rounds)
                    layout = min(("dense channels_last", "dense contiguous"), key=t.get)
                    dense = t[layout]
                    dense_best.append((dense, layout.split()[1]))
                    cells += [f"{t['own'] * 1e3:.3f}", f"{dense / t['own']:.2f}"]
                    if remote:
                        cells += [f"{dense / t['ds']:.2f}", f"{t['ds'] / t['own']:.2f}"]
                    for key, value in (("own", t["own"]), ("dense", dense), ("ds", t.get("ds"))):
                        if value is not None:
                            totals.setdefault((batch, p, key), []).append(count * value)
                d, layout = min(dense_best)
                row = [name, f"{c_in}->{c_out} {k}x{k} s{stride} @{hw}", str(count), str(batch),
                       f"{d * 1e3:.3f} ({layout})", *cells, f"{os.getloadavg()[0]:.2f}"]
                print("| " + " | ".join(row) + " |", flush=True)
    if remote:
        remote.close()
    print("\nWhole network (sum of count x median over the shapes above):")
    for (batch, p, key), values in sorted(totals.items()):
        if key == "own":
            own_total = sum(values)
            dense_total = sum(totals[(batch, p, "dense")])
            line = f"N={batch} {p:.0%}: own {own_total * 1e3:.2f} ms, dense {dense_total * 1e3:.2f} ms " \
                   f"(dense/own {dense_total / own_total:.2f})"
            if (batch, p, "ds") in totals:
                ds_total = sum(totals[(batch, p, "ds")])
                line += f", DeepSparse {ds_total * 1e3:.2f} ms (ds/own {ds_total / own_total:.2f})"
            print(line)
    print(f"load average at end {os.getloadavg()}")


if __name__ == "__main__":
    main()
