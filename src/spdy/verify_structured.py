"""Verify a structured profile: build the physically smaller model and time it against the dense one.

The smaller model (`spdy.blocks.shrink`: fewer heads, narrower feed-forward layers) must compute
what the masked model the search scored computes (the consumer weights with removed columns
zero); its output is checked against that one, then it runs alternately with the dense model on
the timing batch, as `spdy.verification.verify` does for sparse formats: in dense torch, or
(``engine="deepsparse"``) both exported to ONNX and compiled by DeepSparse, which gains from a
smaller model without any sparse format, or (``engine="cuda"``) both on a GPU in the dtype the table
was timed in.
"""

from __future__ import annotations

import copy
import math
import warnings
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from spdy.blocks import block_of, keep_first, shrink
from spdy.errors import InputError
from spdy.database.structured import StructuredDatabase
from spdy.levels import DENSE
from spdy.runtime.formats import set_threads
from spdy.runtime.timer import oversubscribed, time_alternating
from spdy.search.profile import Profile
from spdy.timing.blocks import STRUCTURED_FORMAT
from spdy.timing.table import TimingTable
from spdy import verify_engines
from spdy.units import Unit, call_model
from spdy.verification import BASELINE, ROUNDS, TOLERANCE, SpeedupMiss, VerifyResult, _median_spread, _relative_error, _tensor, pruned_copy


@torch.no_grad()
def smaller_model(model: nn.Module, units: Mapping[str, Unit], options: Mapping[str, str], db: StructuredDatabase) -> tuple[nn.Module, dict[str, int]]:
    """A resized copy of ``model`` for the profile ``options``, and the structures each block keeps."""
    small = copy.deepcopy(model).eval()
    return small, shrink(small, units, options, db)


@contextmanager
def _timing(threads: int) -> Iterator[None]:
    """``threads`` torch threads (a warning when the machine has fewer free) and no autograd, restored after."""
    if warning := oversubscribed(threads):
        warnings.warn(f"verify: {warning}", RuntimeWarning, stacklevel=3)
    previous, grad = torch.get_num_threads(), torch.is_grad_enabled()
    set_threads(threads)
    torch.set_grad_enabled(False)
    try:
        yield
    finally:
        set_threads(previous)
        torch.set_grad_enabled(grad)


@torch.no_grad()
def sized_speedup(model: nn.Module, units: Mapping[str, Unit], options: Mapping[str, str], batch: Any, rounds: int,
                  threads: int | None = None, engine: str = "torch-cpu") -> float:
    """Measured speedup over ``model`` of a copy resized to ``options`` with the first structures kept, on
    ``engine``: speed depends on how many remain, not which, so the timing table is checked against the
    runtime before any database exists (`spdy.pipeline.calibrate`)."""
    if engine not in ENGINES:
        raise InputError(f"a structured table is calibrated on {', '.join(ENGINES)}, not {engine!r}")
    small = copy.deepcopy(model).eval()
    for name, key in options.items():
        if key != DENSE:
            keep_first(small, block_of(units[name]), block_of(units[name]).kept(key))
    return speedup_of(model, small, batch, rounds, threads, engine)


@torch.no_grad()
def speedup_of(model: nn.Module, small: nn.Module, batch: Any, rounds: int, threads: int | None = None, engine: str = "torch-cpu") -> float:
    """Median per-round speedup of ``small`` over ``model``, the two run alternately on ``engine`` with ``threads``."""
    threads = int(threads or torch.get_num_threads())
    with _timing(threads):
        dense, pruned, _ = _alternate(model, small, batch, _tensor(call_model(small, batch)), engine, threads, rounds)
    return _median_spread([d / p for d, p in zip(dense, pruned)])[0]


def _alternate(model: nn.Module, small: nn.Module, batch: Any, reference: torch.Tensor, engine: str, threads: int,
               rounds: int, dtype: str = "float16") -> tuple[list[float], list[float], float | None]:
    """Per-round seconds of ``model`` and ``small`` run alternately on ``engine``, and (DeepSparse, CUDA) the relative
    error of ``small``'s output there against ``reference``."""
    if engine == "deepsparse":
        from spdy.runtime.deepsparse import compare

        run = compare(model, small, batch, reference, threads, rounds)
        return run.dense, run.pruned, run.output_error
    if engine == "cuda":
        return _on_gpu(model, small, batch, reference, rounds, getattr(torch, dtype))
    samples = time_alternating({"dense": lambda: call_model(model, batch), "small": lambda: call_model(small, batch)}, rounds)
    return samples["dense"], samples["small"], None


def _on_gpu(model: nn.Module, small: nn.Module, batch: Any, reference: torch.Tensor, rounds: int,
            dtype: torch.dtype) -> tuple[list[float], list[float], float]:
    """Both models on the GPU in ``dtype``, each call synchronized, alternated; ``small``'s output error there."""
    from spdy.timing.cuda_blocks import CudaBlocksBackend
    from spdy.timing.cuda_semi import _to_cuda

    if why := CudaBlocksBackend.missing():
        raise InputError(f"verify: a profile timed on cuda runs on a GPU: {why}")
    inputs = _to_cuda(batch, dtype)
    dense, small = (copy.deepcopy(m).to("cuda", dtype).eval() for m in (model, small))
    error = verify_engines._relative_error(_tensor(call_model(small, inputs)), reference)

    def synchronized(m: nn.Module):
        return lambda: (call_model(m, inputs), torch.cuda.synchronize())

    samples = time_alternating({"dense": synchronized(dense), "small": synchronized(small)}, rounds)
    return samples["dense"], samples["small"], error


# engine -> the dense run the speedup is over, and the relative output error beyond which the smaller model is wrong there
ENGINES = {"torch-cpu": BASELINE, "deepsparse": verify_engines.ENGINES["deepsparse"], "cuda": verify_engines.ENGINES["cuda-2:4"]}
OUTPUT_TOLERANCE = {"torch-cpu": 1e-4, "deepsparse": verify_engines.OUTPUT_TOLERANCE["deepsparse"], "cuda": verify_engines.OUTPUT_TOLERANCE["cuda-2:4"]}


def verify_structured(model: nn.Module, units: Mapping[str, Unit], profile: Profile, batch: Any, table: TimingTable | None,
                      db: StructuredDatabase, rounds: int = ROUNDS, tolerance: float = TOLERANCE, threads: int | None = None,
                      engine: str = "torch-cpu") -> VerifyResult:
    """Measured speedup of the smaller model over the dense one (both on ``engine``), with the output check."""
    if engine not in ENGINES:
        raise InputError(f"verify: a structured profile runs as a smaller dense model on {', '.join(ENGINES)}, not {engine!r}")
    options = dict(profile.options)
    predicted = table.predicted_speedup(options) if table is not None else profile.predicted_speedup
    threads = int(threads or (table.meta.get("threads") if table is not None else None) or torch.get_num_threads())
    with _timing(threads):
        model.eval()
        reference = _tensor(call_model(pruned_copy(model, units, options, db.weight), batch))
        small, kept = smaller_model(model, units, options, db)
        error = _relative_error(_tensor(call_model(small, batch)), reference)
        if engine != "torch-cpu" and (not math.isfinite(error) or error > OUTPUT_TOLERANCE["torch-cpu"]):  # wrong before any engine sees it
            warnings.warn(f"verify: the smaller model's output differs from the masked model by {error:.2e} (relative)", RuntimeWarning, stacklevel=2)
        dtype = table.meta.get("dtype", "float16") if table is not None else "float16"
        dense, pruned, engine_error = _alternate(model, small, batch, reference, engine, threads, rounds, dtype)
        error = error if engine_error is None else engine_error
    formats = {name: STRUCTURED_FORMAT for name, n in kept.items() if n < units[name].extra["block"].count}
    result = VerifyResult.from_samples(dense, pruned, profile.target, predicted, tolerance, threads, error,
                                       formats=formats, fused=[], baseline=ENGINES[engine])
    if result.met is False:
        warnings.warn(f"SPEEDUP MISSED: the smaller model measured {result.speedups()} < target "
                      f"{profile.target:g}x - {tolerance:.0%}; predicted {predicted:.3f}x", SpeedupMiss, stacklevel=2)
    if not math.isfinite(error) or error > OUTPUT_TOLERANCE[engine]:
        warnings.warn(f"verify: the smaller model's output on {engine} differs from the masked model by {error:.2e} (relative)",
                      RuntimeWarning, stacklevel=2)
    return result
