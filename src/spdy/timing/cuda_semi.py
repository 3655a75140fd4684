"""The ``cuda-2:4`` backend: each Linear dense (fp16) vs 2:4 semi-structured on an NVIDIA GPU.

The paper's GPU setting: a layer is either dense or 2:4 (50%), and 2:4 pays off only where
the sparse tensor-core kernel beats cuBLAS at that layer's shape, which SPDY then decides
per layer. Options are therefore ``dense`` and ``2:4@0.5000`` only; pass ``--pattern 2:4``.

Times come from CUDA events around ``number`` back-to-back calls (so launch overhead is
amortised the way a real model pays it), dense and sparse alternated round by round, and
the medians kept. The dense model is timed the same way, in the same dtype, so ``base``
and ``fixed`` are consistent with the unit times.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE, Option
from spdy.runtime.masks import magnitude_mask
from spdy.runtime.semi_structured import SemiStructuredLinear, available, backend
from spdy.runtime.timer import Stat
from spdy.timing.backend import Backend, UnitTiming, machine_meta
from spdy.units import Unit, call_model

SEMI = Option(0.5, "2:4").key


def cuda_times(fns: dict[str, Callable[[], Any]], rounds: int = 30, number: int = 20, warmup: int = 5) -> dict[str, Stat]:
    """Seconds per call of each function, timed with CUDA events, alternating every round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(number):
                fns[name]()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3 / number)
    return {name: Stat.of(s) for name, s in samples.items()}


def _to_cuda(batch: Any, dtype: torch.dtype) -> Any:
    """Move a sample batch to the GPU; floating tensors take the model's dtype, ids stay integers."""
    if isinstance(batch, dict):
        return {k: _to_cuda(v, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_cuda(v, dtype) for v in batch)
    if isinstance(batch, torch.Tensor):
        return batch.to("cuda", dtype) if batch.is_floating_point() else batch.to("cuda")
    return batch


class CudaSemiBackend(Backend):
    """NVIDIA GPU, fp16: cuBLAS dense vs 2:4 sparse tensor cores (cuSPARSELt or CUTLASS)."""

    name = "cuda-2:4"
    dtypes = ("float16", "bfloat16")  # what the sparse tensor cores take

    def __init__(self, rounds: int = 30, number: int = 20, dtype: str = "float16"):
        if dtype not in self.dtypes:
            raise InputError(f"{self.name}: dtype must be one of {', '.join(self.dtypes)}, got {dtype!r}")
        self.rounds, self.number, self.dtype = rounds, number, getattr(torch, dtype)
        if why := self.missing():  # fail before any work (the model's loading) when there is no GPU to time on
            raise InputError(f"timing backend {self.name}: {why}")

    @staticmethod
    def missing() -> str | None:
        """Why this backend cannot run here, or None."""
        ok, why = available()
        return None if ok else why

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        wrong = [n for n, u in units.items() if u.kind != "linear"]
        if wrong:
            raise InputError(f"timing backend cuda-2:4 accelerates nn.Linear only; exclude units {wrong[:3]} (--exclude)")

    def signature(self, unit: Unit) -> str | None:
        return f"{unit.kind}:{tuple(unit.weight_shape)}:in{tuple(unit.input_shape or ())}:bias{unit.module.bias is not None}"

    @torch.no_grad()
    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        if unit.input_shape is None:
            raise InputError(f"unit {unit.name!r} has no input shape; run capture_shapes first")
        unknown = sorted(set(options) - {DENSE, SEMI})
        if unknown:
            raise InputError(f"timing backend cuda-2:4 times only {DENSE} (dense) and {SEMI}; unit {unit.name!r} asks for {unknown[:3]} "
                             "(use --pattern 2:4)")
        dense = copy.deepcopy(unit.module).to("cuda", self.dtype).eval()
        x = torch.randn(unit.input_shape, device="cuda", dtype=self.dtype)
        fns: dict[str, Callable[[], Any]] = {DENSE: lambda: dense(x)}
        if SEMI in options:
            masked = copy.deepcopy(unit.module)
            masked.weight.mul_(magnitude_mask(masked.weight, SEMI).to(masked.weight.dtype))
            try:
                sparse = SemiStructuredLinear(masked, self.dtype, unit.name)
            except ValueError as e:
                raise InputError(f"timing backend cuda-2:4: {e}") from None
            fns[SEMI] = lambda: sparse(x)
        stats = cuda_times(fns, self.rounds, self.number)
        return UnitTiming({k: s.median for k, s in stats.items()}, {DENSE: "dense", SEMI: "2:4"} if SEMI in stats else {DENSE: "dense"},
                          {k: s.spread for k, s in stats.items()})

    @torch.no_grad()
    def model_time(self, model: nn.Module, batch: Any) -> Stat:
        deployed = copy.deepcopy(model).to("cuda", self.dtype).eval()
        inputs = _to_cuda(batch, self.dtype)
        return cuda_times({"model": lambda: call_model(deployed, inputs)}, self.rounds, max(1, self.number // 4))["model"]

    def meta(self) -> dict:
        info = {"backend": self.name, **machine_meta(), "dtype": str(self.dtype).removeprefix("torch."), "rounds": self.rounds,
                "number": self.number, "cuda": torch.version.cuda}
        if torch.cuda.is_available():
            info.update(gpu=torch.cuda.get_device_name(), sparse_kernels=backend())
        return info
