"""The structured blocks of a BERT-style encoder, and how to make them physically smaller.

Each encoder layer has two blocks whose layers share a pruned dimension (`spdy.blocks.Block`):

* self-attention: query, key and value produce the heads, the attention output dense consumes
  them (``attention_head_size`` columns per head);
* feed-forward: ``intermediate.dense`` produces the neurons, ``output.dense`` consumes them.

Resizing slices the producers' rows (and biases) to the kept structures and puts the given
consumer weight in place, so the smaller model computes exactly what the masked one does. A
block with nothing kept leaves only the consumer's bias, added to the residual as before.
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn
from torch.nn.utils import skip_init

from spdy.blocks import Block
from spdy.errors import InputError

_EXPECTED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")
NEURON_OPTIONS = 24  # neuron grid: about this many steps from all to none
SIMD = 16  # neurons per grid step are a multiple of this (AVX-512: 16 floats)


class NoHeads(nn.Module):
    """A self-attention with every head removed: zero-width context, so the output dense adds its bias only."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states.new_zeros(*hidden_states.shape[:-1], 0), None


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The members of every ModuleList whose members have an ``attention`` child: an encoder's layers."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(hasattr(m, "attention") or hasattr(m, "self_attn") for m in module):
            found += [(f"{name}.{i}", m) for i, m in enumerate(module)]
    return found


def _linear(layer: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _grid_step(count: int) -> int:
    """Neurons per option step: a multiple of `SIMD` giving about `NEURON_OPTIONS` steps (1 for tiny blocks)."""
    if count < SIMD * 2:
        return 1
    return max(SIMD, -(-count // NEURON_OPTIONS // SIMD) * SIMD)


def bert_blocks(model: nn.Module) -> list[Block]:
    """Every attention and feed-forward block, layer by layer; a clear error for anything else."""
    layers = _layers(model)
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:8]
        raise InputError(f"structured pruning found no encoder layers in {type(model).__name__}: it expects a BERT-style encoder "
                         f"(an nn.ModuleList of layers with {', '.join(_EXPECTED)}); the model has {kinds}")
    blocks = []
    for name, layer in layers:
        missing = [p for p in _EXPECTED if _linear(layer, p) is None]
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if missing or not hasattr(attention, "attention_head_size"):
            what = f"no nn.Linear {', '.join(missing)}" if missing else "attention.self has no attention_head_size"
            raise InputError(f"layer {name!r} ({type(layer).__name__}) is not a BERT-style block that structured pruning knows: "
                             f"{what}; expected {', '.join(_EXPECTED)} (grouped-query or gated MLP layers are not supported)")
        width = int(attention.attention_head_size)
        heads = layer.get_submodule("attention.self.query").out_features // width
        neurons = layer.get_submodule("intermediate.dense").out_features
        blocks.append(Block(f"{name}.attention.output.dense", "heads", tuple(f"{name}.attention.self.{p}" for p in ("query", "key", "value")),
                            f"{name}.attention.self", heads, width, 1))
        blocks.append(Block(f"{name}.output.dense", "neurons", (f"{name}.intermediate.dense",), f"{name}.intermediate", neurons, 1,
                            _grid_step(neurons)))
    return blocks


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


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def resize(model: nn.Module, block: Block, kept: Sequence[int], consumer_weight: torch.Tensor) -> None:
    """Keep only the structures ``kept`` of ``block`` in ``model`` (in place); the consumer gets
    ``consumer_weight`` (out, len(kept) * width), e.g. an OBS-updated one from the database."""
    kept = sorted(int(k) for k in kept)
    expected = (model.get_submodule(block.consumer).out_features, len(kept) * block.width)
    if tuple(consumer_weight.shape) != expected:
        raise InputError(f"block {block.name!r}: consumer weight {tuple(consumer_weight.shape)} does not fit {len(kept)} kept "
                         f"{block.structure} (expected {expected})")
    rows = torch.tensor([k * block.width + j for k in kept for j in range(block.width)], dtype=torch.long)
    _set(model, block.consumer, _sliced(model.get_submodule(block.consumer), weight=consumer_weight))
    if block.structure == "heads" and not kept:
        _set(model, block.owner, NoHeads())
        return
    for producer in block.producers:
        _set(model, producer, _sliced(model.get_submodule(producer), rows=rows))
    if block.structure == "heads":
        attention = model.get_submodule(block.owner)
        attention.num_attention_heads = len(kept)
        attention.all_head_size = len(kept) * block.width


def kept_sizes(model: nn.Module, blocks: Sequence[Block]) -> dict[str, int]:
    """How many structures each block holds in ``model`` now (a resized model's record)."""
    return {b.name: model.get_submodule(b.consumer).in_features // b.width for b in blocks}

