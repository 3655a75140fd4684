"""Pick the fastest weight format for one layer by measuring it.

Both `convert` and the ``torch-cpu`` timing backend call this, so a deployed model runs
each layer in exactly the format its timing-table entry was measured with.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from spdy.runtime.formats import FORMATS, supported_formats
from spdy.runtime.modules import SparseLinear, sparse_module, weight_of
from spdy.runtime.timer import Stat, alternating_stats

# A sparse format must beat dense by this much to be chosen: smaller wins are noise.
MIN_GAIN = 0.02


def candidate_modules(layer: nn.Module | torch.Tensor, candidates: Sequence[str] = FORMATS, bias: torch.Tensor | None = None) -> dict[str, nn.Module]:
    """The layer built in every candidate format that can hold its weight here.

    ``layer`` is a module (Linear, Conv1D, Conv2d, with its current masked weights) or an
    (out, in) weight matrix treated as a Linear with ``bias``.
    """
    weight = layer.detach() if isinstance(layer, torch.Tensor) else weight_of(layer)
    names = supported_formats(weight, tuple(candidates))
    if isinstance(layer, torch.Tensor):
        return {f: SparseLinear(weight, bias, f) for f in names}
    return {f: sparse_module(layer, f) for f in names}


def pick(stats: dict[str, Stat], min_gain: float = MIN_GAIN) -> str:
    """The fastest format; dense unless another is faster by more than ``min_gain``."""
    best = min(stats, key=lambda f: stats[f].median)
    if "dense" in stats and best != "dense" and stats[best].median > (1 - min_gain) * stats["dense"].median:
        return "dense"
    return best


@torch.no_grad()
def format_stats(
    layer: nn.Module | torch.Tensor,
    input_shape: Sequence[int],
    candidates: Sequence[str] = FORMATS,
    bias: torch.Tensor | None = None,
    rounds: int = 11,
    max_spread: float = 0.15,
) -> dict[str, Stat]:
    """Median time and spread of the layer's forward in each candidate format, alternated
    (a Conv2d on a channels_last input)."""
    modules = candidate_modules(layer, candidates, bias)
    if not modules:
        raise ValueError(f"none of the formats {list(candidates)} can hold this layer's weight")
    x = torch.randn(*input_shape)
    if isinstance(layer, nn.Conv2d) and x.dim() == 4:
        # deployed convs pass channels-last activations along (the kernel format's layout; torch's
        # convs and elementwise ops keep it), so every format is timed on that layout
        x = x.contiguous(memory_format=torch.channels_last)
    return alternating_stats({f: (lambda m=m: m(x)) for f, m in modules.items()}, rounds, max_spread=max_spread)


def fastest_format(
    layer: nn.Module | torch.Tensor,
    input_shape: Sequence[int],
    candidates: Sequence[str] = FORMATS,
    bias: torch.Tensor | None = None,
    rounds: int = 11,
) -> tuple[str, dict[str, float]]:
    """The fastest format for this layer at ``input_shape`` and every candidate's median seconds."""
    stats = format_stats(layer, input_shape, candidates, bias, rounds)
    return pick(stats), {f: s.median for f, s in stats.items()}
