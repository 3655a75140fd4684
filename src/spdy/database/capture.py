"""One dense pass over the calibration data: per unit, the Hessian of its layer-wise loss.

Each unit sees the *dense* model's inputs, so every unit's pruned weights are computed
independently and any per-unit combination can be stitched. ``H = X X^T / n`` (in x in)
is accumulated batch by batch (float32 products, float64 sums), so memory does not grow with the number of
samples. Pruners that fit weights by gradient descent (AdaPrune) also get a uniform
random subsample of at most ``rows`` input rows (bottom-k of random keys: exact and bounded).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from spdy.errors import InputError
from spdy.progress import progress_bar
from spdy.units import Unit, call_model


@dataclass
class UnitStats:
    """What a pruner knows about one unit's inputs."""

    hessian_sum: torch.Tensor  # float64 (in, in), sum of x x^T
    count: int = 0  # input rows seen
    rows: torch.Tensor | None = None  # float32 (k, in) subsample, or None
    keys: torch.Tensor | None = None  # random keys of the kept rows
    limit: int = 0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    @property
    def hessian(self) -> torch.Tensor:
        """``X X^T / n`` in float64."""
        if self.count == 0:
            raise InputError("no calibration rows reached this unit")
        return self.hessian_sum / self.count

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.hessian_sum += (x.t() @ x).double()  # float32 within a batch, float64 across batches
        self.count += x.shape[0]
        if self.limit:
            keys = torch.rand(x.shape[0], generator=self.generator)
            rows = x
            if self.rows is not None:
                keys, rows = torch.cat([self.keys, keys]), torch.cat([self.rows, rows])
            keep = keys.topk(min(self.limit, keys.numel()), largest=False).indices
            self.keys, self.rows = keys[keep], rows[keep].contiguous()


def unit_inputs(unit: Unit, x: torch.Tensor) -> torch.Tensor:
    """The rows the unit's (out, in) weight matrix multiplies: (..., in)."""
    if unit.kind != "conv2d":
        return x
    conv = unit.module
    if conv.groups != 1:
        raise InputError(f"unit {unit.name!r}: grouped convolutions (groups={conv.groups}) are not supported by the database; exclude the unit")
    padding = conv.padding
    if isinstance(padding, str) or conv.padding_mode != "zeros":
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x, padding = F.pad(x, conv._reversed_padding_repeated_twice, mode=mode), 0
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2)


@torch.no_grad()
def capture(model: torch.nn.Module, units: dict[str, Unit], calibration: Sequence, rows: int = 0, progress: bool = False) -> dict[str, UnitStats]:
    """Run ``calibration`` through the dense model once; return per-unit statistics."""
    stats = {}
    for name, unit in units.items():
        size = unit.weight_shape[1]
        stats[name] = UnitStats(torch.zeros(size, size, dtype=torch.float64), limit=rows)
    hooks = [
        unit.module.register_forward_hook(lambda module, args, output, name=name, unit=unit: stats[name].add(unit_inputs(unit, args[0])))
        for name, unit in units.items()
    ]
    try:
        for batch in progress_bar(calibration, desc="calibration", unit="batch", disable=not progress, leave=False):
            call_model(model, batch)
    finally:
        for hook in hooks:
            hook.remove()
    missed = [name for name, s in stats.items() if s.count == 0]
    if missed:
        raise InputError(f"units never ran on the calibration data (unused layers?): {missed[:5]}; exclude them")
    return stats
