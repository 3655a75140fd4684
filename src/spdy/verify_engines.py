"""Verify a profile on the engine its table was timed on, when that is not spdy's torch runtime.

A table timed on ``deepsparse`` or ``cuda-2:4`` promises that engine's speedup (pruned over the
same engine's dense run), so `spdy.verify` sends such profiles here and both models run on that
engine. Engine names are not weight formats: nothing here calls `convert`, and the result's
``formats`` stays empty (the pruned weights are the deployment).
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any, Callable, Mapping

import torch
from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE
from spdy.runtime.timer import oversubscribed, time_alternating
from spdy.search.profile import Profile
from spdy.timing.table import TimingTable
from spdy.units import Unit, call_model
from spdy.verification import SpeedupMiss, VerifyResult, Weights, _tensor, pruned_copy

# engine -> the dense run its measured speedup is over
ENGINES = {"deepsparse": "dense deepsparse", "cuda-2:4": "dense torch cuda"}
# relative output error beyond which the engine's pruned model does not compute the masked model:
# DeepSparse is fp32 with sums reordered; 2:4 kernels run in fp16
OUTPUT_TOLERANCE = {"deepsparse": 1e-3, "cuda-2:4": 1e-2}


def engine_of(table: TimingTable | None, engine: str | None) -> str | None:
    """The engine to verify on: ``engine`` if given, else the backend the table was timed on."""
    if engine is not None and engine != "torch-cpu" and engine not in ENGINES:
        raise InputError(f"verify: unknown engine {engine!r}; engines are torch-cpu, {', '.join(ENGINES)}")
    return engine or (table.meta.get("backend") if table is not None else None)


def _relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    out, reference = out.float().cpu(), reference.float().cpu().reshape(out.shape)
    return float((out - reference).abs().max() / reference.abs().max().clamp_min(1e-30))


def _deepsparse(model: nn.Module, pruned: nn.Module, batch: Any, threads: int, rounds: int) -> tuple[dict[str, list[float]], float]:
    from spdy.runtime.deepsparse import compare

    run = compare(model, pruned, batch, _tensor(call_model(pruned, batch)), threads, rounds)
    return {"dense": run.dense, "pruned": run.pruned}, run.output_error


def _cuda_semi(model: nn.Module, pruned: nn.Module, sparse_units: list[str], batch: Any, meta: Mapping[str, Any],
               rounds: int) -> tuple[dict[str, list[float]], float]:
    """Dense and 2:4 models on the GPU in the table's dtype, each sample ``number`` back-to-back calls
    then one synchronize, as the backend timed them; the output is checked against the masked model
    in the same dtype on the same GPU."""
    from spdy.runtime.semi_structured import to_semi_structured
    from spdy.timing.cuda_semi import _to_cuda

    dtype, number = getattr(torch, meta.get("dtype", "float16")), int(meta.get("number", 20))
    inputs = _to_cuda(batch, dtype)
    dense = copy.deepcopy(model).to("cuda", dtype).eval()
    masked = copy.deepcopy(pruned).to("cuda", dtype).eval()
    deployed = to_semi_structured(pruned, sparse_units, dtype)
    error = _relative_error(_tensor(call_model(deployed, inputs)), _tensor(call_model(masked, inputs)))
    del masked

    def repeated(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            for _ in range(number):
                call_model(m, inputs)
            torch.cuda.synchronize()
        return run

    samples = time_alternating({"dense": repeated(dense), "pruned": repeated(deployed)}, rounds)
    return {k: [t / number for t in v] for k, v in samples.items()}, error


@torch.no_grad()
def verify_on_engine(engine: str, model: nn.Module, units: Mapping[str, Unit], profile: Profile, batch: Any, table: TimingTable | None,
                     weights: Weights | None, rounds: int, tolerance: float, threads: int | None) -> VerifyResult:
    """`spdy.verify` on ``engine`` (a key of ENGINES): the measured speedup is the engine's pruned run
    over the engine's dense run, on the same batch, alternated round by round."""
    if engine == "cuda-2:4":
        from spdy.runtime.semi_structured import available

        ok, why = available()
        if not ok:
            raise InputError(f"verify: cuda-2:4 profiles run on 2:4 sparse tensor cores and cannot be verified without a GPU: {why}")
    options = dict(profile.options)
    target = profile.target
    meta = table.meta if table is not None else {}
    predicted = table.predicted_speedup(options) if table is not None else profile.predicted_speedup
    threads = int(threads or meta.get("threads") or torch.get_num_threads())
    if engine == "deepsparse" and (warning := oversubscribed(threads)):
        warnings.warn(f"verify: {warning}", RuntimeWarning, stacklevel=3)
    model.eval()
    pruned = pruned_copy(model, units, options, weights)
    if engine == "deepsparse":
        samples, error = _deepsparse(model, pruned, batch, threads, rounds)
    else:
        samples, error = _cuda_semi(model, pruned, [u for u, k in options.items() if k != DENSE], batch, meta, rounds)
    result = VerifyResult.from_samples(samples["dense"], samples["pruned"], target, predicted, tolerance, threads, error,
                                       baseline=ENGINES[engine],
                                       fused=[])  # nothing is converted: the engine runs the pruned weights as they are
    met = result.met
    if met is False:
        warnings.warn(f"SPEEDUP MISSED on {engine}: measured {result.speedups()} (spread {result.measured_spread:.1%}) < target {target:g}x "
                      f"- {tolerance:.0%} noise tolerance; re-measure the timing table on this machine", SpeedupMiss, stacklevel=3)
    if not math.isfinite(error) or error > OUTPUT_TOLERANCE[engine]:
        warnings.warn(f"verify: the {engine} pruned model's output differs from the masked dense model by {error:.2e} (relative)",
                      RuntimeWarning, stacklevel=3)
    return result
