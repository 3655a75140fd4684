"""Pick the fastest weight format for one layer by measuring it.

Both `convert` and the ``torch-cpu`` timing backend call this, so a deployed model runs
each layer in exactly the format its timing-table entry was measured with.
"""

from __future__ import annotations

import copy
import itertools
import math
from typing import Sequence

import torch
from torch import nn

from spdy.runtime.cpu import last_level_cache_bytes
from spdy.runtime.formats import FORMATS, supported_formats
from spdy.runtime.modules import SparseLinear, sparse_module, weight_of
from spdy.runtime.timer import Stat, alternating_stats

# A sparse format must beat dense by this much to be chosen: smaller wins are noise.
MIN_GAIN = 0.02
# Up to this many input rows a Linear does too little arithmetic per weight to hide reading it (a
# decoder's matrix-vector products): its time is its weight's bytes coming from memory.
COLD_ROWS = 16
# Copies of a memory-bound layer timed in turn span this many last-level caches, so each call finds
# its weights in memory, as in a model larger than the cache running one layer after another.
COLD_CACHES = 4
MAX_COPIES = 64


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


def memory_bound(layer: nn.Module | torch.Tensor, input_shape: Sequence[int]) -> bool:
    """A Linear-like layer multiplying at most `COLD_ROWS` rows (never a conv)."""
    return not isinstance(layer, nn.Conv2d) and math.prod(input_shape[:-1]) <= COLD_ROWS


def cold_copies(layer: nn.Module | torch.Tensor) -> int:
    """How many copies of the layer fill `COLD_CACHES` last-level caches with their weights."""
    weight = layer if isinstance(layer, torch.Tensor) else weight_of(layer)
    return min(MAX_COPIES, max(2, math.ceil(COLD_CACHES * last_level_cache_bytes() / (weight.numel() * weight.element_size()))))


@torch.no_grad()
def format_stats(
    layer: nn.Module | torch.Tensor,
    input_shape: Sequence[int],
    candidates: Sequence[str] = FORMATS,
    bias: torch.Tensor | None = None,
    rounds: int = 11,
    max_spread: float = 0.15,
    cold: bool | None = None,
) -> dict[str, Stat]:
    """Median time and spread of the layer's forward in each candidate format, alternated
    (a Conv2d on a channels_last input).

    ``cold`` (default: when the layer is `memory_bound`) times each format on `cold_copies`
    copies of the layer called in turn, so the weights come from memory: timed again and again
    on one copy, a decoder's layer would run from the cache, several times faster than in the
    model, and the table would promise a speedup its bytes cannot give.
    """
    cold = memory_bound(layer, input_shape) if cold is None else cold
    copies = cold_copies(layer) if cold else 1
    built = [candidate_modules(_copy(layer) if i else layer, candidates, bias) for i in range(copies)]
    if not built[0]:
        raise ValueError(f"none of the formats {list(candidates)} can hold this layer's weight")
    x = torch.randn(*input_shape)
    if isinstance(layer, nn.Conv2d) and x.dim() == 4:
        # deployed convs pass channels-last activations along (the kernel format's layout; torch's
        # convs and elementwise ops keep it), so every format is timed on that layout
        x = x.contiguous(memory_format=torch.channels_last)
    for modules in built[1:]:
        for module in modules.values():
            module(x)  # lazy builds (the kernels' small-row layout) happen here, not in a timed call
    turns = {f: itertools.cycle([modules[f] for modules in built]) for f in built[0]}
    return alternating_stats({f: (lambda turn=turn: next(turn)(x)) for f, turn in turns.items()}, rounds, max_spread=max_spread)


def _copy(layer: nn.Module | torch.Tensor) -> nn.Module | torch.Tensor:
    return layer.clone() if isinstance(layer, torch.Tensor) else copy.deepcopy(layer)


def fastest_format(
    layer: nn.Module | torch.Tensor,
    input_shape: Sequence[int],
    candidates: Sequence[str] = FORMATS,
    bias: torch.Tensor | None = None,
    rounds: int = 11,
) -> tuple[str, dict[str, float]]:
    """The fastest format for this layer at ``input_shape`` and every candidate's median seconds
    (cold when `memory_bound`, as the timing table)."""
    stats = format_stats(layer, input_shape, candidates, bias, rounds)
    return pick(stats), {f: s.median for f, s in stats.items()}
