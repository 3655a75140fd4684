"""Structured units: groups of layers that share one pruned dimension (heads, neurons).

A block's structures are column groups of its *consumer* layer's input (the attention output
dense, the feed-forward down projection) and row groups of its *producers* (query/key/value, the
up projection). The unit the solver sees is named after the consumer: the consumer's weight
with the removed structures' columns zeroed (and the rest OBS-updated) computes exactly what
the physically smaller block computes, so the database, the stitcher and the search work on it
unchanged; `shrink` builds the smaller model once a profile is chosen.

Model families say where their blocks are and what else a resize must change (head counts, a
block removed whole): `spdy.runtime.modeling.bert_blocks` (BERT-style encoders) and
`spdy.runtime.modeling.llama_blocks` (Llama-style decoders, grouped-query attention). The
slicing itself is generic and lives here.
"""

from __future__ import annotations

import fnmatch
import importlib
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

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
    rows: tuple[int, ...] = ()  # each producer's output rows per structure (grouped-query: q 3 heads, k/v 1); empty: ``width`` each
    family: str = "bert"  # the module `spdy.runtime.modeling.<family>_blocks` that finishes a resize

    @property
    def consumer(self) -> str:
        return self.name

    def options(self) -> list[Option]:
        return structured_options(self.structure, self.count, self.step)

    def kept(self, key: str) -> int:
        """Structures the option ``key`` keeps."""
        return self.count if key == DENSE else kept_structures(Option.parse(key), self.count, self.step)

    def producer_rows(self) -> tuple[int, ...]:
        return self.rows or (self.width,) * len(self.producers)

    def describe(self) -> dict:
        return {"structure": self.structure, "count": self.count, "width": self.width, "step": self.step,
                "producers": list(self.producers), "owner": self.owner, "rows": list(self.producer_rows()), "family": self.family}


NEURON_OPTIONS = 24  # neuron grid: about this many steps from all to none
SIMD = 16  # neurons per grid step are a multiple of this (AVX-512: 16 floats)


def grid_step(count: int) -> int:
    """Neurons per option step: a multiple of `SIMD` giving about `NEURON_OPTIONS` steps (1 for tiny blocks)."""
    if count < SIMD * 2:
        return 1
    return max(SIMD, -(-count // NEURON_OPTIONS // SIMD) * SIMD)


def layer_stack(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The members of every ModuleList whose members have an attention child: an encoder's or decoder's layers."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(hasattr(m, "attention") or hasattr(m, "self_attn") for m in module):
            found += [(f"{name}.{i}", m) for i, m in enumerate(module)]
    return found


def linear_at(layer: nn.Module, path: str) -> nn.Linear | None:
    """``layer``'s submodule ``path`` when it is an nn.Linear, else None."""
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def find_blocks(model: nn.Module) -> list[Block]:
    """The model's structured blocks: Llama-style decoders (``self_attn`` with ``q_proj``) or else
    BERT-style encoders; `InputError` naming what is not recognised."""
    layers = layer_stack(model)
    if layers and hasattr(layers[0][1], "self_attn"):
        from spdy.runtime.modeling.llama_blocks import llama_blocks

        return llama_blocks(model, layers)
    from spdy.runtime.modeling.bert_blocks import bert_blocks

    return bert_blocks(model, layers)


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
    kept = {}
    for name, key in options.items():
        block = block_of(units[name])
        if key != DENSE:
            resize(model, block, db.kept(name, key).tolist(), db.compact(name, key))
        kept[name] = block.kept(key)
    return kept


def resize_to(model: nn.Module, sizes: Mapping[str, int]) -> None:
    """Give a freshly built model the shapes of an exported smaller one (weights to be loaded after)."""
    blocks = {b.name: b for b in find_blocks(model)}
    unknown = [n for n in sizes if n not in blocks]
    if unknown:
        raise InputError(f"the export resized blocks this model does not have, e.g. {unknown[:2]}; blocks are e.g. {list(blocks)[:2]}")
    for name, kept in sizes.items():
        block = blocks[name]
        if kept < block.count:
            out = model.get_submodule(name).out_features
            resize(model, block, range(kept), torch.zeros(out, kept * block.width))


def pretrained_config(config: object, sizes: Mapping[str, int]) -> str | None:
    """Give ``config`` (a copy) the sizes a structured export kept, in its model family's terms (`resize_to`'s
    counterpart for `from_pretrained`); the reason, where that family's config cannot hold them."""
    family = "llama" if any(n.endswith((".self_attn.o_proj", ".mlp.down_proj")) for n in sizes) else "bert"
    return importlib.import_module(f"spdy.runtime.modeling.{family}_blocks").pretrained_config(config, sizes)


def _sliced(layer: nn.Linear, rows: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> nn.Linear:
    """A new Linear with ``layer``'s rows ``rows``, or with ``weight`` (out, in) and ``layer``'s bias."""
    w = layer.weight.data[rows] if rows is not None else weight
    with warnings.catch_warnings():  # a block with nothing kept has zero-size layers, whose (skipped) init warns
        warnings.simplefilter("ignore", UserWarning)
        new = skip_init(nn.Linear, w.shape[1], w.shape[0], bias=layer.bias is not None, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        new.weight.copy_(w)
        if layer.bias is not None:
            new.bias.copy_(layer.bias.data[rows] if rows is not None else layer.bias.data)
    return new


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def resize(model: nn.Module, block: Block, kept: Sequence[int], consumer_weight: torch.Tensor) -> None:
    """Keep only the structures ``kept`` of ``block`` in ``model`` (in place): the producers keep their rows of
    those structures, the consumer gets ``consumer_weight`` (out, len(kept) * width), e.g. an OBS-updated one from
    the database; the block's family then fixes what else depends on the size (`finish_resize`)."""
    kept = sorted(int(k) for k in kept)
    expected = (model.get_submodule(block.consumer).out_features, len(kept) * block.width)
    if tuple(consumer_weight.shape) != expected:
        raise InputError(f"block {block.name!r}: consumer weight {tuple(consumer_weight.shape)} does not fit {len(kept)} kept "
                         f"{block.structure} (expected {expected})")
    set_module(model, block.consumer, _sliced(model.get_submodule(block.consumer), weight=consumer_weight))
    for producer, rows in zip(block.producers, block.producer_rows()):
        set_module(model, producer, _sliced(model.get_submodule(producer), rows=structure_columns(kept, rows)))
    importlib.import_module(f"spdy.runtime.modeling.{block.family}_blocks").finish_resize(model, block, kept)


def structure_columns(structures: Sequence[int] | torch.Tensor, width: int) -> torch.Tensor:
    """The indices of the ``width`` consecutive columns (or rows) of each structure, in order."""
    return (torch.as_tensor(structures, dtype=torch.long)[:, None] * width + torch.arange(width)).flatten()


def kept_sizes(model: nn.Module, blocks: Sequence[Block]) -> dict[str, int]:
    """How many structures each block holds in ``model`` now (a resized model's record)."""
    return {b.name: model.get_submodule(b.consumer).in_features // b.width for b in blocks}
