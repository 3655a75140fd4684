"""The structured blocks of a Llama-style decoder (Llama, SmolLM2, Mistral, Qwen2 layouts), grouped-query attention included.

Each decoder layer has two blocks (`spdy.blocks.Block`):

* self-attention: the structures are the *key/value groups*. With grouped-query attention a
  key/value head serves ``num_key_value_groups`` consecutive query heads (transformers'
  ``repeat_kv`` maps query head ``h`` to key/value head ``h // groups``), so a group is one
  key/value head and its query heads, and only whole groups can go: removing a query head alone
  would break the fixed heads-per-group ratio every attention kernel assumes. ``q_proj`` gives
  ``groups * head_dim`` rows per structure, ``k_proj`` and ``v_proj`` ``head_dim`` each, and
  ``o_proj`` consumes ``groups * head_dim`` columns. The attention infers its head counts from
  the projections' sizes, so a resized one needs no attribute changed; with no group left it is
  `NoAttention` (the residual passes through, plus ``o_proj``'s bias if any).
* gated feed-forward: ``gate_proj`` and ``up_proj`` rows and ``down_proj`` columns of a neuron go
  together (``down(act(gate(x)) * up(x))``), on a grid of multiples of 64 down to 0.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from spdy.blocks import Block, grid_step, linear_at, set_module
from spdy.errors import InputError

_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


class NoAttention(nn.Module):
    """A self-attention with every key/value group removed: adds nothing but ``o_proj``'s bias. It still
    writes its (zero-head) keys and values to a KV cache, so the cache's length stays right for generation."""

    def __init__(self, o_proj: nn.Linear, layer_idx: int, head_dim: int):
        super().__init__()
        self.o_proj, self.layer_idx, self.head_dim = o_proj, layer_idx, head_dim

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        if cache is not None:
            batch, length = hidden_states.shape[:2]
            empty = hidden_states.new_zeros(batch, 0, length, self.head_dim)
            cache.update(empty, empty, self.layer_idx)
        return self.o_proj(hidden_states), None  # a `spdy.blocks.BiasOnly`: only the shape is read


def llama_blocks(model: nn.Module, layers: Sequence[tuple[str, nn.Module]]) -> list[Block]:
    """Every attention and gated feed-forward block of ``layers`` (`spdy.blocks.layer_stack`); an
    `InputError` naming the layer and what is missing for anything else."""
    blocks = []
    for name, layer in layers:
        missing = [p for p in (*_ATTENTION, *_MLP) if linear_at(layer, p) is None]
        attention = getattr(layer, "self_attn", None)
        head_dim = getattr(attention, "head_dim", None)
        if missing or not isinstance(head_dim, int):
            what = f"no nn.Linear {', '.join(missing)}" if missing else "self_attn has no head_dim"
            raise InputError(f"layer {name!r} ({type(layer).__name__}) is not a Llama-style block that structured pruning knows: "
                             f"{what}; expected {', '.join((*_ATTENTION, *_MLP))} (separate q/k/v and gate/up projections)")
        q, k, v, o = (layer.get_submodule(p) for p in _ATTENTION)
        kv_heads, rest = divmod(k.out_features, head_dim)
        groups = q.out_features // max(k.out_features, 1)
        if rest or not kv_heads or v.out_features != k.out_features or q.out_features != groups * k.out_features \
                or o.in_features != q.out_features:
            raise InputError(f"layer {name!r}: attention shapes do not make whole key/value groups of head_dim {head_dim} "
                             f"(q_proj {q.out_features}, k_proj {k.out_features}, v_proj {v.out_features} rows, o_proj {o.in_features} "
                             "columns): q_proj must have a whole number of query heads per key/value head")
        gate, up, down = (layer.get_submodule(p) for p in _MLP)
        if gate.out_features != up.out_features or down.in_features != gate.out_features:
            raise InputError(f"layer {name!r}: mlp.gate_proj ({gate.out_features}), up_proj ({up.out_features}) and down_proj "
                             f"({down.in_features} inputs) must share the intermediate size")
        blocks.append(Block(f"{name}.self_attn.o_proj", "heads", tuple(f"{name}.{p}" for p in _ATTENTION[:3]), f"{name}.self_attn",
                            kv_heads, groups * head_dim, 1, rows=(groups * head_dim, head_dim, head_dim), family="llama"))
        neurons = gate.out_features
        blocks.append(Block(f"{name}.mlp.down_proj", "neurons", (f"{name}.mlp.gate_proj", f"{name}.mlp.up_proj"), f"{name}.mlp",
                            neurons, 1, grid_step(neurons), family="llama"))
    return blocks


def finish_resize(model: nn.Module, block: Block, kept: Sequence[int]) -> None:
    """An attention with no key/value group left becomes `NoAttention`; anything else needs nothing more."""
    if block.structure == "heads" and not kept:
        attention = model.get_submodule(block.owner)
        head_dim = block.producer_rows()[1]
        set_module(model, block.owner, NoAttention(attention.o_proj, getattr(attention, "layer_idx", 0), head_dim))


def pretrained_config(config: Any, sizes: Mapping[str, int]) -> str | None:
    """Set ``config`` (a copy of the model's) to the sizes a structured export kept, so `from_pretrained` builds
    the smaller decoder (every layer keeps one number of key/value groups and of neurons, none of them zero);
    or say why transformers cannot."""
    groups = {k for n, k in sizes.items() if n.endswith(".self_attn.o_proj")}
    neurons = {k for n, k in sizes.items() if not n.endswith(".self_attn.o_proj")}
    for what, kept in (("key/value groups", groups), ("gated neurons", neurons)):
        if len(kept) > 1 or 0 in kept:
            return f"its layers keep {sorted(kept)} {what}; a config holds one number above 0 for every layer"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if groups:
        queries = config.num_attention_heads // config.num_key_value_heads
        config.head_dim, config.num_key_value_heads = head_dim, groups.pop()
        config.num_attention_heads = config.num_key_value_heads * queries
    if neurons:
        config.intermediate_size = neurons.pop()
    return None

