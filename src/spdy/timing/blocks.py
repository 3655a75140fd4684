"""The ``torch-cpu-blocks`` backend: times structured blocks at every kept size, as dense torch runs them.

A block's time is its owner (the self-attention with its q/k/v projections, or the up
projection with its activation) plus its consumer (unless the owner holds it, as a Llama
attention holds ``o_proj`` and its MLP ``down_proj``; a convolutional block runs its chain, the
producer and what follows it up to the consumer), run on the inputs the owner really gets
in the model (captured from the timing batch: hidden states, attention mask, and in a decoder
the rotary embeddings and causal mask exactly as the decoder layer passes them). Each option is
timed on a physically resized copy (`spdy.blocks.keep_first`, the first
structures kept: speed depends on how many remain, not which), alternated with the dense copy;
its time is the ratio times the block's dense time, so slow periods between options cancel.
An option whose ratio is out of order with its size (`out_of_order`: a large block much faster than
a smaller one) is measured twice more and the median kept. Last, every option of a block is scaled by
the block's time in whole-model runs over its time alone (`in_model_times`): alone, it runs with
warm caches. Blocks of equal shape and input are timed once.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from spdy.blocks import Block, block_of, keep_first
from spdy.levels import DENSE
from spdy.runtime.timer import alternating_stats
from spdy.timing.backend import UnitTiming
from spdy.timing.torch_cpu import TorchCpuBackend
from spdy.units import Unit, call_model, captured_inputs

STRUCTURED_FORMAT = "structured"  # the format recorded for a resized option: dense torch on a smaller layer


ORDER_SLACK = 0.1  # a block keeping more structures may beat one keeping fewer by this much (aligned sizes) before it is re-timed
WARMUP = 2  # whole-model runs before `in_model_times` records
REMEASURE = 3  # times an out-of-order option is measured in all; its median is kept


def out_of_order(block: Block, ratios: dict[str, float]) -> list[str]:
    """Options whose time ratio to the whole block is out of order with the kept sizes beyond `ORDER_SLACK`
    (keeping more structures, much faster; or fewer, much slower): both of each such pair, to be measured again.
    A machine's slow phase during one option, or a fast one, would otherwise be a bargain or a trap to the solver."""
    sizes = sorted(((block.kept(k), r, k) for k, r in ratios.items()), reverse=True)
    flagged = set()
    for i, (_, more, key) in enumerate(sizes):
        for _, fewer, other in sizes[i + 1:]:
            if fewer > more * (1 + ORDER_SLACK):
                flagged |= {key, other}
    return [k for _, _, k in sizes if k in flagged]


@torch.no_grad()
def in_model_times(model: nn.Module, blocks: dict[str, Block], batch: Any, rounds: int) -> dict[str, float]:
    """Median seconds from each block's first module starting to its last finishing, in whole-model runs.

    A block timed alone finds its weights and input in cache on every call; in the model the layers
    before it have just evicted them, which costs small blocks relatively more (EfficientNet-Lite0 at
    batch 8: 2.5 ms alone, 4.1 ms in the model). Each block's times are scaled by this ratio."""
    started: dict[str, float] = {}
    spans: dict[str, list[float]] = {name: [] for name in blocks}
    handles = []
    for name, block in blocks.items():
        first, last = model.get_submodule(block.runs[0]), model.get_submodule(block.runs[-1])
        handles.append(first.register_forward_pre_hook(lambda module, args, name=name: started.__setitem__(name, time.perf_counter())))
        handles.append(last.register_forward_hook(lambda module, args, out, name=name: spans[name].append(time.perf_counter() - started[name])))
    try:
        for _ in range(WARMUP + rounds):
            call_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: statistics.median(times[WARMUP:]) for name, times in spans.items() if len(times) > WARMUP}


class _Part(nn.Module):
    """A block cut out of the model (`Block.runs`: owner or chain, then consumer), on the first module's captured inputs."""

    def __init__(self, model: nn.Module, block: Block):
        super().__init__()
        self.model = model
        self.runs = [model.get_submodule(p) for p in block.runs]

    def forward(self, args: tuple, kwargs: dict) -> torch.Tensor:
        out = self.runs[0](*args, **kwargs)
        out = out[0] if isinstance(out, tuple) else out
        for module in self.runs[1:]:
            out = module(out)
        return out


def block_part(model: nn.Module, block: Block, kept: int) -> _Part:
    """The block alone (a copy of the modules it uses), keeping ``kept`` structures."""
    holder = nn.Module()
    copied: set[str] = set()
    for path in sorted({block.owner, block.consumer, *block.producers, *block.chain}, key=lambda p: p.count(".")):
        if any(path.startswith(c + ".") for c in copied):  # inside a module copied whole (a padded depthwise conv's Sequential)
            continue
        copied.add(path)
        parts = path.split(".")
        parent = holder
        for p in parts[:-1]:
            if not hasattr(parent, p):
                parent.add_module(p, nn.Module())
            parent = getattr(parent, p)
        if not hasattr(parent, parts[-1]):
            parent.add_module(parts[-1], copy.deepcopy(model.get_submodule(path)))
    if kept < block.count:
        keep_first(holder, block, kept)
    return _Part(holder, block)


class BlockInputs:
    """What the block backends share: each block timed on the inputs its owner gets in the model, and blocks of
    equal structure, shape and input shapes timed once."""

    def capture(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        self._model = model
        owners = {name: block_of(unit).owner for name, unit in units.items()}
        by_owner = captured_inputs(model, sorted(set(owners.values())), batch)
        self._inputs = {name: by_owner[owner] for name, owner in owners.items()}

    def signature(self, unit: Unit) -> str | None:
        block = block_of(unit)
        args, kwargs = self._inputs[unit.name]
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        shapes += [(k, tuple(v.shape)) for k, v in sorted(kwargs.items()) if isinstance(v, torch.Tensor)]
        return f"{block.structure}:{block.count}x{block.width}/{block.step}:{tuple(unit.weight_shape)}:in{shapes}"


class TorchCpuBlocksBackend(BlockInputs, TorchCpuBackend):
    """Dense torch on the CPU, structured blocks at every kept size."""

    name = "torch-cpu-blocks"

    def __init__(self, **options: Any):
        super().__init__(**options, whole_blocks=False)  # a resized block runs in dense torch, never fused

    def prepare(self, model: nn.Module, units: dict[str, Unit], batch: Any) -> None:
        super().prepare(model, units, batch)
        self._in_model = in_model_times(model, {n: block_of(u) for n, u in units.items()}, batch, self.rounds)
        self.capture(model, units, batch)

    @torch.no_grad()
    def unit_times(self, unit: Unit, options: list[str]) -> UnitTiming:
        block = block_of(unit)
        args, kwargs = self._inputs[unit.name]
        dense = block_part(self._model, block, block.count).eval()
        run_dense = lambda: dense(args, kwargs)
        ref = alternating_stats({"dense": run_dense}, self.rounds, max_spread=self.max_spread)["dense"]
        result = UnitTiming({DENSE: ref.median}, {DENSE: "dense"}, {DENSE: ref.spread}, unpruned=ref.median)
        ratios: dict[str, list[float]] = {}

        def time_option(key: str) -> None:
            part = block_part(self._model, block, block.kept(key)).eval()
            try:
                stats = alternating_stats({"dense": run_dense, "part": lambda: part(args, kwargs)}, self.rounds, max_spread=self.max_spread)
            except Exception as e:
                raise RuntimeError(f"timing block {unit.name!r} option {key!r} failed: {e}") from e
            ratios.setdefault(key, []).append(stats["part"].median / stats["dense"].median)
            result.formats[key], result.spread[key] = STRUCTURED_FORMAT, stats["part"].spread

        for key in options:
            if key != DENSE:
                time_option(key)
        for key in out_of_order(block, {k: r[0] for k, r in ratios.items()}):
            for _ in range(REMEASURE - 1):
                time_option(key)
        for key, measured in ratios.items():
            result.times[key] = statistics.median(measured) * ref.median
        if in_model := self._in_model.get(unit.name):  # the block as the whole model runs it: colder caches than alone
            result.times = {key: t * in_model / ref.median for key, t in result.times.items()}
            result.unpruned = in_model
        return result

    def meta(self) -> dict:
        return {**super().meta(), "backend": self.name, "formats_tried": ["dense", STRUCTURED_FORMAT]}
