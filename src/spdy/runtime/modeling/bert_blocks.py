"""The structured blocks of a BERT-style encoder, and what a resize changes besides the slicing.

Each encoder layer has two blocks whose layers share a pruned dimension (`spdy.blocks.Block`):

* self-attention: query, key and value produce the heads, the attention output dense consumes
  them (``attention_head_size`` columns per head);
* feed-forward: ``intermediate.dense`` produces the neurons, ``output.dense`` consumes them.

`spdy.blocks.resize` slices the producers' rows (and biases) to the kept structures and puts the
given consumer weight in place, so the smaller model computes exactly what the masked one does;
`finish_resize` here records the new head count. A block with nothing kept leaves only the
consumer's bias (`spdy.blocks.BiasOnly`), added to the residual as before.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from spdy.blocks import Block, grid_step, linear_at, set_module
from spdy.errors import InputError

_EXPECTED = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
             "intermediate.dense", "output.dense")


class NoHeads(nn.Module):
    """A self-attention with every head removed. What it returns only gives the output dense
    (`spdy.blocks.BiasOnly`, which adds its bias alone) its shape."""

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        return hidden_states, None


def bert_blocks(model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> list[Block]:
    """Every attention and feed-forward block of ``layers`` (`spdy.blocks.layer_stack`), layer by layer;
    a clear error for anything else."""
    if not layers:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:8]
        raise InputError(f"structured pruning found no encoder layers in {type(model).__name__}: it expects a BERT-style encoder "
                         f"(an nn.ModuleList of layers with {', '.join(_EXPECTED)}) or a Llama-style decoder (layers with "
                         f"self_attn.q_proj/k_proj/v_proj/o_proj and mlp.gate_proj/up_proj/down_proj); the model has {kinds}")
    blocks = []
    for name, layer in layers:
        missing = [p for p in _EXPECTED if linear_at(layer, p) is None]
        attention = getattr(getattr(layer, "attention", None), "self", None)
        if missing or not hasattr(attention, "attention_head_size"):
            what = f"no nn.Linear {', '.join(missing)}" if missing else "attention.self has no attention_head_size"
            raise InputError(f"layer {name!r} ({type(layer).__name__}) is not a BERT-style block that structured pruning knows: "
                             f"{what}; expected {', '.join(_EXPECTED)}")
        width = int(attention.attention_head_size)
        heads = layer.get_submodule("attention.self.query").out_features // width
        neurons = layer.get_submodule("intermediate.dense").out_features
        blocks.append(Block(f"{name}.attention.output.dense", "heads", tuple(f"{name}.attention.self.{p}" for p in ("query", "key", "value")),
                            f"{name}.attention.self", heads, width, 1))
        blocks.append(Block(f"{name}.output.dense", "neurons", (f"{name}.intermediate.dense",), f"{name}.intermediate", neurons, 1,
                            grid_step(neurons)))
    return blocks


def finish_resize(model: nn.Module, block: Block, kept: Sequence[int]) -> None:
    """The self-attention's head count follows its projections. A block with nothing kept computes no zero-width
    tensor: a self-attention with no head left becomes `NoHeads`, an intermediate with no neuron a pass-through."""
    if not kept:
        set_module(model, block.owner, NoHeads() if block.structure == "heads" else nn.Identity())
        return
    if block.structure != "heads":
        return
    attention = model.get_submodule(block.owner)
    attention.num_attention_heads = len(kept)
    attention.all_head_size = len(kept) * block.width


def pretrained_config(config: Any, sizes: Mapping[str, int]) -> str | None:
    """Set ``config`` (a copy of the model's) to the sizes a structured export kept, so `from_pretrained` builds
    the smaller encoder; or say why transformers cannot. It sizes a head as hidden_size / num_attention_heads, so
    only the feed-forward blocks may shrink, all to one width."""
    heads = {n: k for n, k in sizes.items() if n.endswith(".attention.output.dense")}
    pruned = [n for n, k in heads.items() if k != config.num_attention_heads]
    if pruned:
        return (f"transformers sizes a BERT head as hidden_size / num_attention_heads, so an encoder with heads removed "
                f"({pruned[0]!r} keeps {heads[pruned[0]]} of {config.num_attention_heads}) has no config of its own")
    neurons = {k for n, k in sizes.items() if n not in heads}
    if len(neurons) > 1 or 0 in neurons:
        return f"its layers keep {sorted(neurons)} feed-forward neurons; a config holds one intermediate_size above 0"
    if neurons:
        config.intermediate_size = neurons.pop()
    return None

