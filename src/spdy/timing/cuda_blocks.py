"""The ``cuda-blocks`` backend: structured blocks at every kept size, as dense torch runs them on an NVIDIA GPU.

A GPU gains nothing from unstructured zeros, but a physically smaller model is faster there as
anywhere: ``--engine cuda --pattern structured``. Each block is cut out of the model as on the CPU
(`spdy.timing.blocks.block_part`, the first structures kept), moved to the GPU in the table's
dtype with the inputs it really gets in the model, and timed with CUDA events against the whole
block, alternated (`cuda_times`); an option's time is the ratio times the block's dense time. The
dense model is timed the same way (`CudaSemiBackend.model_time`), so ``base`` and ``fixed`` match.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from spdy.blocks import block_of
from spdy.errors import InputError
from spdy.levels import DENSE
from spdy.timing.backend import UnitTiming
from spdy.timing.blocks import STRUCTURED_FORMAT, BlockInputs, block_part
from spdy.timing.cuda_semi import CudaSemiBackend, _to_cuda, cuda_times
from spdy.units import Unit


class CudaBlocksBackend(BlockInputs, CudaSemiBackend):
    """NVIDIA GPU, dense torch in float16 (or bfloat16, float32): each block resized to every kept size."""

    name = "cuda-blocks"
    dtypes = ("float16", "bfloat16", "float32")

    @staticmethod
    def missing() -> str | None:
        return None if torch.cuda.is_available() else "no CUDA GPU (torch.cuda.is_available() is False)"

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        not_blocks = [n for n, u in units.items() if "block" not in u.extra]
        if not_blocks:
            raise InputError(f"timing backend {self.name} times structured blocks only (--pattern structured); {not_blocks[:3]} are layers")
        self.capture(model, units, batch)

    @torch.no_grad()
    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        block = block_of(unit)
        args, kwargs = _to_cuda(self._inputs[unit.name], self.dtype)
        dense = block_part(self._model, block, block.count).to("cuda", self.dtype).eval()
        run_dense = lambda: dense(args, kwargs)
        ref = cuda_times({DENSE: run_dense}, self.rounds, self.number)[DENSE]
        result = UnitTiming({DENSE: ref.median}, {DENSE: "dense"}, {DENSE: ref.spread}, unpruned=ref.median)
        for key in options:
            if key == DENSE:
                continue
            part = block_part(self._model, block, block.kept(key)).to("cuda", self.dtype).eval()
            stats = cuda_times({DENSE: run_dense, key: lambda: part(args, kwargs)}, self.rounds, self.number)
            result.times[key] = stats[key].median / stats[DENSE].median * ref.median  # the ratio cancels slow phases
            result.formats[key], result.spread[key] = STRUCTURED_FORMAT, stats[key].spread
        return result

    def meta(self) -> dict:
        info = {**super().meta(), "formats_tried": ["dense", STRUCTURED_FORMAT]}
        info.pop("sparse_kernels", None)
        return info
