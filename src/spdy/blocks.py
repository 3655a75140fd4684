"""Structured units: groups of layers that share one pruned dimension (heads, neurons, channels).

A block's structures are column groups of its *consumer* layer's input (the attention output
dense, the feed-forward down projection, the next convolution) and row groups of its
*producers* (query/key/value, the up projection, a convolution and its BatchNorm). The unit the
solver sees is named after the consumer: the consumer's weight with the removed structures'
columns zeroed (and the rest OBS-updated) computes exactly what the physically smaller block
computes, so the database, the stitcher and the search work on it unchanged; `shrink` builds
the smaller model once a profile is chosen.

Model families say where their blocks are and what else a resize must change (head counts, a
block removed whole): `spdy.runtime.modeling.bert_blocks` (BERT-style encoders),
`spdy.runtime.modeling.llama_blocks` (Llama-style decoders, grouped-query attention) and
`spdy.runtime.modeling.cnn_blocks` (ResNet blocks, sequential conv/linear stacks). The slicing
itself is generic and lives here. A layer is resized along one dimension only: blocks that
would share a layer (a convolution consuming one block's channels and producing the next's)
are not chosen together, since the time of such a layer depends on two options at once.
"""

from __future__ import annotations

import copy
import fnmatch
import importlib
import itertools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch
from torch import nn

from spdy.errors import InputError
from spdy.levels import DENSE, Option, kept_structures, structured_options
from spdy.runtime.modules import weight_of
from spdy.units import Unit, unit_kind

if TYPE_CHECKING:
    from spdy.database.structured import StructuredDatabase


@dataclass(frozen=True)
class Block:
    """``count`` structures of ``width`` consumer columns each; options keep multiples of ``step`` of them."""

    name: str  # the consumer's module path: the unit's name
    structure: str  # "heads" | "neurons" | "channels"
    producers: tuple[str, ...]  # layers whose output rows (a BatchNorm's features) are the structures
    owner: str  # the module that runs producers to context (attention.self / intermediate): timed with the consumer
    count: int
    width: int
    step: int
    rows: tuple[int, ...] = ()  # each producer's output rows per structure (grouped-query: q 3 heads, k/v 1); empty: ``width`` each
    family: str = "bert"  # the module `spdy.runtime.modeling.<family>_blocks` that finishes a resize
    chain: tuple[str, ...] = ()  # where no one module is the owner: the modules run in order from the producers' input to the consumer's

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
                "producers": list(self.producers), "owner": self.owner, "rows": list(self.producer_rows()), "family": self.family,
                **({"chain": list(self.chain)} if self.chain else {})}

    @property
    def runs(self) -> tuple[str, ...]:
        """The modules the block runs, in order: its chain (or owner), then the consumer unless the owner holds it."""
        start = self.chain or (self.owner,)
        return start if self.consumer.startswith(self.owner + ".") else (*start, self.consumer)

    def layers(self) -> set[str]:
        """The layers whose shapes this block changes."""
        return {*self.producers, self.consumer}


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
    """The model's structured blocks: Llama-style decoders (``self_attn`` with ``q_proj``), BERT-style
    encoders, or convolutional networks; `InputError` naming what is not recognised."""
    layers = layer_stack(model)
    if layers and hasattr(layers[0][1], "self_attn"):
        from spdy.runtime.modeling.llama_blocks import llama_blocks

        return llama_blocks(model, layers)
    if layers:
        from spdy.runtime.modeling.bert_blocks import bert_blocks

        return bert_blocks(model, layers)
    from spdy.runtime.modeling.cnn_blocks import cnn_blocks

    return cnn_blocks(model)


def disjoint(blocks: Sequence[Block]) -> list[Block]:
    """The blocks in order, skipping any that would resize a layer an earlier one already resizes."""
    taken: set[str] = set()
    chosen = []
    for block in blocks:
        if not block.layers() & taken:
            chosen.append(block)
            taken |= block.layers()
    return chosen


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
    if include:
        for a, b in itertools.combinations(chosen.values(), 2):
            if shared := sorted(a.layers() & b.layers()):
                raise InputError(f"--include picks blocks {a.name!r} and {b.name!r}, which both resize {shared[0]!r}: a layer can shrink "
                                 "along one dimension only; include one of them")
    else:
        chosen = {b.name: b for b in disjoint(list(chosen.values()))}
    return {n: Unit(n, model.get_submodule(n), unit_kind(model.get_submodule(n)), extra={"block": b}) for n, b in chosen.items()}


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
        if kept < blocks[name].count:
            keep_first(model, blocks[name], kept)


def keep_first(model: nn.Module, block: Block, kept: int) -> None:
    """Resize ``block`` to its first ``kept`` structures, the consumer's columns sliced with them, no update: a
    shape to time (speed depends on how many structures remain, not which) or to load weights into."""
    resize(model, block, range(kept), weight_of(model.get_submodule(block.consumer))[:, : kept * block.width].clone())


def pretrained_config(config: object, sizes: Mapping[str, int]) -> str | None:
    """Give ``config`` (a copy) the sizes a structured export kept, in its model family's terms (`resize_to`'s
    counterpart for `from_pretrained`); the reason, where that family's config cannot hold them."""
    family = "llama" if any(n.endswith((".self_attn.o_proj", ".mlp.down_proj")) for n in sizes) else "bert"
    return importlib.import_module(f"spdy.runtime.modeling.{family}_blocks").pretrained_config(config, sizes)


def _sliced(layer: nn.Module, rows: torch.Tensor | None = None, weight: torch.Tensor | None = None) -> nn.Module:
    """A copy of a Linear, Conv2d or BatchNorm with only its output rows (channels, features) ``rows``, or with
    the (out, in) matrix ``weight`` as its weight (a Conv2d's in being in_channels * kh * kw) and ``layer``'s bias."""
    new = copy.copy(layer)  # shares nothing that is replaced below; hyperparameters carried over
    new._parameters, new._buffers = dict(layer._parameters), dict(layer._buffers)
    with torch.no_grad():
        if rows is not None:
            for name, tensor in layer._parameters.items():
                if tensor is not None:
                    new._parameters[name] = nn.Parameter(tensor.data[rows].clone(), tensor.requires_grad)
            for name, tensor in layer._buffers.items():
                if tensor is not None and tensor.dim() > 0:  # not a BatchNorm's step count
                    new._buffers[name] = tensor[rows].clone()
        else:
            shape = (weight.shape[0], -1, *layer.weight.shape[2:])
            new._parameters["weight"] = nn.Parameter(weight.reshape(shape).clone(), layer.weight.requires_grad)
    if rows is not None:
        size = len(rows)
        for attribute in ("out_features", "out_channels", "num_features"):
            if hasattr(layer, attribute):
                setattr(new, attribute, size)
        if isinstance(layer, nn.Conv2d) and layer.groups == layer.in_channels == layer.out_channels:  # depthwise: channel for channel
            new.in_channels = new.groups = size
    else:
        for attribute, value in (("in_features", weight.shape[1]), ("in_channels", new.weight.shape[1])):
            if hasattr(layer, attribute):
                setattr(new, attribute, value)
    return new


class BiasOnly(nn.Linear):
    """The consumer of a block that kept nothing: a Linear with no inputs, whose output is its bias (zeros
    without one). It reads only its input's leading shape, so what feeds it need not be zero-width: ONNX
    runtimes refuse zero-size tensors (DeepSparse 1.8 dies on them, older onnxruntimes reject their Reshapes)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        return x.new_zeros(shape) if self.bias is None else self.bias.expand(shape)


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def resize(model: nn.Module, block: Block, kept: Sequence[int], consumer_weight: torch.Tensor) -> None:
    """Keep only the structures ``kept`` of ``block`` in ``model`` (in place): the producers keep their rows of
    those structures, the consumer gets ``consumer_weight`` (out, len(kept) * width), e.g. an OBS-updated one from
    the database; the block's family then fixes what else depends on the size (`finish_resize`)."""
    kept = sorted(int(k) for k in kept)
    expected = (weight_of(model.get_submodule(block.consumer)).shape[0], len(kept) * block.width)
    if tuple(consumer_weight.shape) != expected:
        raise InputError(f"block {block.name!r}: consumer weight {tuple(consumer_weight.shape)} does not fit {len(kept)} kept "
                         f"{block.structure} (expected {expected})")
    consumer = _sliced(model.get_submodule(block.consumer), weight=consumer_weight)
    if not kept and type(consumer) is nn.Linear:
        consumer.__class__ = BiasOnly  # same parameters; only its forward differs
    set_module(model, block.consumer, consumer)
    for producer, rows in zip(block.producers, block.producer_rows()):
        set_module(model, producer, _sliced(model.get_submodule(producer), rows=structure_columns(kept, rows)))
    importlib.import_module(f"spdy.runtime.modeling.{block.family}_blocks").finish_resize(model, block, kept)


def structure_columns(structures: Sequence[int] | torch.Tensor, width: int) -> torch.Tensor:
    """The indices of the ``width`` consecutive columns (or rows) of each structure, in order."""
    return (torch.as_tensor(structures, dtype=torch.long)[:, None] * width + torch.arange(width)).flatten()


def kept_sizes(model: nn.Module, blocks: Sequence[Block]) -> dict[str, int]:
    """How many structures each block holds in ``model`` now (a resized model's record)."""
    return {b.name: weight_of(model.get_submodule(b.consumer)).shape[1] // b.width for b in blocks}
