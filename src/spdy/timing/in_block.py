"""Units timed inside the block the runtime runs them in: the table models the deployed runtime.

Some runtime modules run a whole block in one call (a BERT-style encoder layer after
`spdy.runtime.convert`: q/k/v, attention, output and feed-forward per batch row; such classes set
``whole_block = True``). Timed alone, such a block's units miss what the block does between them
and the table's ``fixed`` counts the unfused model's attention, norms and copies, which the fused
block no longer pays: the table then under-predicts a pruned model's speed by up to 2.8x.

So a unit of such a block is timed as the block runs it, on the block's captured inputs (hidden
states and masks as the model passes them), every unit in the kernel format (what keeps the block
fused, whatever the profile):

* the reference is the *empty* block, every unit's weight zero: attention, norms and loop
  overheads only. A unit's option costs ``t(block with the unit at that option, the others
  empty) - t(empty block)``: a large share of a small time, which a noisy machine measures far
  better than one unit's share of the whole dense block (a 384 x 384 projection is ~5% of a
  MiniLM layer, within one alternated run's noise); each option's ratio to the empty block in
  its own alternated run is scaled by the empty block's median over all of the block's runs, so no
  single measurement sets the scale of every unit (one did, and moved it by 20-50% between runs);
* where torch runs the block left dense faster than the fused block at every unit's 0% (the CPU's
  BLAS beats the kernel on a dense matrix), the table records it as a dense block (`unfused_time`);
* the times fall with sparsity (fewer weights, less work): noise that says otherwise is pooled
  with its neighbours (isotonic fit) rather than handed to the solver as a bargain;
* the table's ``fixed`` is the deployed model with every such unit empty (the other units at
  their dense option), less those other units' dense times: exactly what a profile adds to.

Blocks of equal structure and inputs are timed once.
"""

from __future__ import annotations

import copy
import statistics
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE, Option
from spdy.runtime.convert import convert
from spdy.runtime.masks import magnitude_mask
from spdy.runtime.timer import alternating_stats
from spdy.timing.backend import UnitTiming
from spdy.units import Unit, captured_inputs

FORMAT = "kernel"  # every unit of a whole block runs in it, or the block is not fused


def whole_blocks(model: nn.Module, units: Mapping[str, Unit]) -> dict[str, list[str]]:
    """Block name -> its units, for every layer of a ModuleList that the runtime runs whole once its units are
    in the kernel format. A layer class whose first layer does not fuse is not tried again (a Llama decoder);
    once one has, every layer of the class is tried."""
    blocks: dict[str, list[str]] = {}
    fuses: dict[type, bool] = {}
    for list_name, layers in model.named_modules():
        if not isinstance(layers, nn.ModuleList):
            continue
        for i, layer in enumerate(layers):
            name = f"{list_name}.{i}" if list_name else str(i)
            members = [u for u in units if u.startswith(name + ".")]
            if not members or fuses.get(type(layer)) is False:
                continue
            try:
                trial = convert(copy.deepcopy(layer), {u[len(name) + 1:]: FORMAT for u in members})
            except (InputError, ValueError):  # a unit the kernel format cannot hold: the layer never runs whole
                trial = layer
            whole = bool(getattr(type(trial), "whole_block", False))
            fuses[type(layer)] = fuses.get(type(layer), False) or whole  # one layer left half dense keeps the others in
            if whole:
                blocks[name] = members
    return blocks


def _zeroed(block: nn.Module, relative: Sequence[str]) -> nn.Module:
    """A copy of ``block`` with the weights of the named submodules zero."""
    empty = copy.deepcopy(block)
    with torch.no_grad():
        for r in relative:
            empty.get_submodule(r).weight.zero_()
    return empty


def isotonic_decreasing(values: Sequence[float]) -> list[float]:
    """The closest non-increasing sequence in least squares (pool adjacent violators)."""
    pools: list[list[float]] = []  # [mean, count]
    for v in values:
        pools.append([v, 1])
        while len(pools) > 1 and pools[-2][0] < pools[-1][0]:
            (m1, c1), (m2, c2) = pools.pop(-2), pools.pop()
            pools.append([(m1 * c1 + m2 * c2) / (c1 + c2), c1 + c2])
    return [m for m, c in pools for _ in range(c)]


def monotone(times: Mapping[str, float]) -> dict[str, float]:
    """Option times that never grow with sparsity within a pattern (each pattern's chain starts at the
    dense option, which takes the largest of its fits) and are never negative."""
    chains: dict[str, list[Option]] = {}
    for option in map(Option.parse, times):
        if not option.is_dense:
            chains.setdefault(option.pattern, []).append(option)
    fitted = dict(times)
    heads = []
    for chain in chains.values():
        keys = [DENSE] * (DENSE in times) + [o.key for o in sorted(chain, key=lambda o: o.sparsity)]
        values = isotonic_decreasing([times[k] for k in keys])
        if DENSE in times:
            heads.append(values.pop(0))
            keys.pop(0)
        fitted.update(zip(keys, values))
    if DENSE in times:
        fitted[DENSE] = max(heads, default=times[DENSE])
    return {k: max(t, 0.0) for k, t in fitted.items()}


class WholeBlocks:
    """The model's whole blocks, their captured inputs and empty references; times a member unit's options."""

    def __init__(self, model: nn.Module, units: Mapping[str, Unit], batch: Any, rounds: int, max_spread: float):
        self.model, self.rounds, self.max_spread = model, rounds, max_spread
        self.members = whole_blocks(model, units)
        self.block_of = {u: b for b, us in self.members.items() for u in us}
        self.inputs = captured_inputs(model, list(self.members), batch)
        self._empty: dict[str, tuple[nn.Module, nn.Module]] = {}
        self._unfused: dict[str, float] = {}
        self._empties: dict[str, list[float]] = {}  # the empty block's medians in its alternated runs

    def __contains__(self, unit: str) -> bool:
        return unit in self.block_of

    def _relative(self, block: str) -> list[str]:
        return [u[len(block) + 1:] for u in self.members[block]]

    def _block_signature(self, block: str) -> str:
        module = self.model.get_submodule(block)
        args, kwargs = self.inputs[block]
        shapes = [tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args]
        shapes += [(k, tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in sorted(kwargs.items())]
        parts = [(r, tuple(module.get_submodule(r).weight.shape), module.get_submodule(r).bias is not None) for r in self._relative(block)]
        return f"whole-block:{type(module).__name__}:{parts}:in{shapes}"

    def signature(self, unit: Unit) -> str:
        block = self.block_of[unit.name]
        return f"{self._block_signature(block)}:{unit.name[len(block) + 1:]}"

    def _run(self, block: str, module: nn.Module):
        args, kwargs = self.inputs[block]
        return lambda: module(*args, **kwargs)

    def _converted(self, module: nn.Module, relative: Sequence[str]) -> nn.Module:
        return convert(module, {r: FORMAT for r in relative}).eval()

    def _empty_block(self, block: str) -> tuple[nn.Module, nn.Module]:
        """(unconverted zeroed block, converted empty block), once per block."""
        if block not in self._empty:
            relative = self._relative(block)
            zeroed = _zeroed(self.model.get_submodule(block), relative)
            self._empty[block] = (zeroed, self._converted(copy.deepcopy(zeroed), relative))
        return self._empty[block]

    @torch.no_grad()
    def unit_times(self, unit: Unit, options: Sequence[str], unpruned: float) -> UnitTiming:
        block = self.block_of[unit.name]
        relative = self._relative(block)
        name = unit.name[len(block) + 1:]
        zeroed, empty = self._empty_block(block)
        dense = self.model.get_submodule(unit.name).weight.detach()
        result = UnitTiming({}, {}, {}, unpruned=unpruned)
        ratios = {}
        for key in options:
            variant = copy.deepcopy(zeroed)
            variant.get_submodule(name).weight.copy_(dense * magnitude_mask(dense, key))
            variant = self._converted(variant, relative)
            try:
                stats = alternating_stats({"empty": self._run(block, empty), "unit": self._run(block, variant)}, self.rounds,
                                          max_spread=self.max_spread)
            except Exception as e:
                raise RuntimeError(f"timing unit {unit.name!r} option {key!r} inside {block!r} failed: {e}") from e
            ratios[key] = stats["unit"].median / stats["empty"].median - 1
            self._empties.setdefault(block, []).append(stats["empty"].median)
            result.formats[key], result.spread[key] = FORMAT, stats["unit"].spread
        # each ratio to the empty block in one alternated run, on the empty block's median over all of the block's runs:
        # drift within a run cancels, and no single measurement of the empty block sets the scale of every unit
        anchor = statistics.median(self._empties[block])
        result.times = monotone({key: ratio * anchor for key, ratio in ratios.items()})
        return result

    @torch.no_grad()
    def unfused_time(self, block: str) -> float:
        """The block as torch runs it unpruned (its units all dense, so not fused), over the empty fused block:
        what the table's dense block costs. Blocks of equal structure and inputs are timed once."""
        signature = self._block_signature(block)
        if signature not in self._unfused:
            _, empty = self._empty_block(block)
            stats = alternating_stats({"empty": self._run(block, empty), "torch": self._run(block, self.model.get_submodule(block))},
                                      self.rounds, max_spread=self.max_spread)
            anchor = statistics.median(self._empties.get(block) or [stats["empty"].median])  # the scale of the block's units
            self._unfused[signature] = max(stats["torch"].median / stats["empty"].median - 1, 0.0) * anchor
        return self._unfused[signature]

    @torch.no_grad()
    def emptied_model(self, formats: Mapping[str, str]) -> nn.Module:
        """The model as deployed at ``formats`` (unit -> format), every whole-block unit empty."""
        return convert(_zeroed(self.model, list(self.block_of)), {u: FORMAT if u in self.block_of else f for u, f in formats.items()}).eval()
