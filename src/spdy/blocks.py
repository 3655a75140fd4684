"""Structured units: groups of layers that share one pruned dimension (heads, neurons).

A block's structures are column groups of its *consumer* layer's input (the attention output
dense, the feed-forward down projection) and row groups of its *producers* (query/key/value, the
up projection). The unit the solver sees is named after the consumer: the consumer's weight
with the removed structures' columns zeroed (and the rest OBS-updated) computes exactly what
the physically smaller block computes, so the database, the stitcher and the search work on it
unchanged; `shrink` builds the smaller model once a profile is chosen. Model families say
where their blocks are (`spdy.runtime.modeling.bert_blocks`).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE, Option, kept_structures, structured_options
from spdy.units import Unit

if TYPE_CHECKING:
    from spdy.database.structured import StructuredDatabase


@dataclass(frozen=True)
class Block:
    """``count`` structures of ``width`` consumer columns each; options keep multiples of ``step`` of them."""

    name: str  # the consumer's module path: the unit's name
    structure: str  # "heads" | "neurons"
    producers: tuple[str, ...]  # layers whose output rows are the structures
    owner: str  # the module that runs producers to context (attention.self / intermediate): timed with the consumer
    count: int
    width: int
    step: int

    @property
    def consumer(self) -> str:
        return self.name

    def options(self) -> list[Option]:
        return structured_options(self.structure, self.count, self.step)

    def kept(self, key: str) -> int:
        """Structures the option ``key`` keeps."""
        return self.count if key == DENSE else kept_structures(Option.parse(key), self.count, self.step)

    def describe(self) -> dict:
        return {"structure": self.structure, "count": self.count, "width": self.width, "step": self.step,
                "producers": list(self.producers), "owner": self.owner}


def find_blocks(model: nn.Module) -> list[Block]:
    """The model's structured blocks (BERT-style encoders); `InputError` naming what is not recognised."""
    from spdy.runtime.modeling.bert_blocks import bert_blocks  # the only family so far

    return bert_blocks(model)


def block_units(model: nn.Module, include: Sequence[str] | None = None, exclude: Sequence[str] = ()) -> dict[str, Unit]:
    """One unit per block (its consumer layer, with the block in ``extra["block"]``), filtered by glob patterns on block names."""
    blocks = {b.name: b for b in find_blocks(model)}
    for patterns, what in ((include or [], "include"), (exclude, "exclude")):
        for p in patterns:
            if not any(fnmatch.fnmatchcase(n, p) for n in blocks):
                raise InputError(f"--{what} pattern {p!r} matches no structured block; blocks are named after their consumer layer, "
                                 f"e.g. {list(blocks)[:2]}")
    chosen = {n: b for n, b in blocks.items() if (not include or any(fnmatch.fnmatchcase(n, p) for p in include))
              and not any(fnmatch.fnmatchcase(n, p) for p in exclude)}
    if not chosen:
        raise InputError(f"--include/--exclude leave no structured block; blocks are e.g. {list(blocks)[:2]}")
    return {n: Unit(n, model.get_submodule(n), "linear", extra={"block": b}) for n, b in chosen.items()}


def block_of(unit: Unit) -> Block:
    try:
        return unit.extra["block"]
    except KeyError:
        raise InputError(f"unit {unit.name!r} is a single layer, not a structured block (use --pattern structured)") from None


def unit_options(units: Mapping[str, Unit]) -> dict[str, list[str]]:
    """Option keys per block unit, dense first."""
    return {n: [o.key for o in block_of(u).options()] for n, u in units.items()}


def shrink(model: nn.Module, units: Mapping[str, Unit], options: Mapping[str, str], db: "StructuredDatabase") -> dict[str, int]:
    """Make ``model`` physically smaller in place: each block keeps the structures its option kept in the
    database, with the database's updated consumer weight. Returns the kept count per block."""
    from spdy.runtime.modeling.bert_blocks import resize

    kept = {}
    for name, key in options.items():
        block = block_of(units[name])
        if key != DENSE:
            resize(model, block, db.kept(name, key).tolist(), db.compact(name, key))
        kept[name] = block.kept(key)
    return kept


def resize_to(model: nn.Module, sizes: Mapping[str, int]) -> None:
    """Give a freshly built model the shapes of an exported smaller one (weights to be loaded after)."""
    import torch

    from spdy.runtime.modeling.bert_blocks import resize

    blocks = {b.name: b for b in find_blocks(model)}
    unknown = [n for n in sizes if n not in blocks]
    if unknown:
        raise InputError(f"the export resized blocks this model does not have, e.g. {unknown[:2]}; blocks are e.g. {list(blocks)[:2]}")
    for name, kept in sizes.items():
        block = blocks[name]
        if kept < block.count:
            out = model.get_submodule(name).out_features
            resize(model, block, range(kept), torch.zeros(out, kept * block.width))
