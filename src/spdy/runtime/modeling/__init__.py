"""Model-family fusions: one module per family of architectures (`bert`, `bert_layer`), each
recognising its blocks by their names and running them as fewer, bigger kernel calls.

The generic runtime (formats, `SparseLinear`, the kernels, attention) knows no model family;
`spdy.runtime.convert.FUSIONS` lists the fusions `convert` applies. The helpers here are the
ones every family's fused modules share.
"""

from __future__ import annotations

from torch import nn


def defaults_only(*args, **kwargs) -> bool:
    """Every argument is None or False: no input (encoder states, caches, requests for attention
    weights) that a fused path would ignore. ``position_ids`` is not checked: absolute positions
    were added by the embeddings."""
    kwargs.pop("position_ids", None)
    return all(v is None or v is False for v in (*args, *kwargs.values()))


_MIXED: dict[tuple[type, type], type] = {}


def mix_in(module: nn.Module, mixin: type) -> None:
    """Give ``module`` a class deriving from ``mixin`` and then its own class, in place: the
    mixin's forward runs, ``super().forward`` is the module's own, and the instance keeps its
    modules, names and hooks (transformers' output recording matches it by class too)."""
    kind = type(module)
    if (mixin, kind) not in _MIXED:
        _MIXED[mixin, kind] = type(f"{mixin.__name__}_{kind.__name__}", (mixin, kind), {"__doc__": mixin.__doc__})
    module.__class__ = _MIXED[mixin, kind]
