"""`convert`: swap a pruned model's layers for runtime modules, in place.

With explicit formats (e.g. the ones a timing table recorded) every named layer runs in
exactly that format. Without, each layer's formats are timed on its own weight at its real
input shape (captured from ``example``, or known from the units) and the fastest is kept;
when no input shape is known a density heuristic decides (documented in `heuristic_format`).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from spdy.errors import InputError
from spdy.runtime.fold import to_channels_last
from spdy.runtime.formats import FORMATS, block_size, kernel_status
from spdy.runtime.modeling.bert import fuse_activations, fuse_feed_forwards, fuse_residual_norms, fuse_self_attentions
from spdy.runtime.modeling.bert_layer import fuse_encoder_layers
from spdy.runtime.modeling.cnn import fuse_cnn_blocks, fuse_sequential_activations
from spdy.runtime.modules import SparseConv2d, SparseLinear, set_module, sparse_module, weight_of
from spdy.runtime.select import fastest_format
from spdy.units import Unit, capture_shapes, find_units, unsupported_reason

# From the engine notes (2 cores, AVX-512, 1024 rows): CSR pays off from ~95% unstructured
# sparsity, BSR over real 16/32 blocks from ~85-90%.
CSR_FROM = 0.95
BSR_FROM = 0.85


def heuristic_format(weight: torch.Tensor) -> str:
    """A format chosen from the weight alone: block BSR >= 85%, CSR (or kernel) >= 95%, else dense."""
    sparsity = 1.0 - float((weight != 0).float().mean())
    if sparsity >= BSR_FROM and block_size(weight) is not None:
        return "bsr"
    if sparsity >= CSR_FROM:
        return "kernel" if kernel_status()[0] else "csr"
    return "dense"


def _pruned_units(model: nn.Module, units: Mapping[str, Unit] | Sequence[str] | None) -> dict[str, Unit]:
    """The units to convert: those given, else every prunable layer that has zero weights."""
    found = find_units(model)
    if units is None:
        return {n: u for n, u in found.items() if bool((weight_of(u.module) == 0).any())}
    if isinstance(units, Mapping):
        return dict(units)
    missing = [n for n in units if n not in found]
    if missing:
        raise InputError(f"convert: no prunable layer named {missing[:5]}; layers are e.g. {list(found)[:4]}")
    return {n: found[n] for n in units}


@torch.no_grad()
def convert(
    model: nn.Module,
    formats: Mapping[str, str] | None = None,
    units: Mapping[str, Unit] | Sequence[str] | None = None,
    example: Any = None,
    candidates: Sequence[str] = FORMATS,
    fuse: bool = True,
) -> nn.Module:
    """Replace pruned layers by `SparseLinear`/`SparseConv2d` in place and return ``model``.

    A kernel-format Linear followed by an exact GELU in a BERT-style block takes the GELU
    into its store (`fuse_activations`); one in a BERT-style output block takes the residual
    add and LayerNorm (`fuse_residual_norms`); a layer's whole feed-forward block then runs as
    one call (`fuse_feed_forwards`), and a self-attention block whose q/k/v are all kernel
    format projects and attends in one call (`fuse_self_attentions`). A layer fused all through
    runs whole, one call per batch (`fuse_encoder_layers`). A kernel-format conv stores the ReLU
    (and a ResNet or MBConv block's residual add) that follows it (`fuse_cnn_blocks`,
    `fuse_sequential_activations`).

    ``formats``: module name -> format; layers mapped to ``"dense"`` stay untouched.
    Otherwise the layers of ``units`` (default: every Linear/Conv1D/Conv2d with zeros) get
    the fastest of ``candidates``, timed at the input shape seen when running ``example``
    (or the units' captured ``input_shape``), else `heuristic_format`. ``fuse=False`` only
    swaps the layers, leaving every block as the model runs it.
    """
    if formats is None:
        chosen_units = _pruned_units(model, units)
        if example is not None:
            capture_shapes(model, chosen_units, example)
        formats = {}
        for name, unit in chosen_units.items():
            if unit.input_shape is None:
                formats[name] = heuristic_format(weight_of(unit.module))
            else:
                formats[name], _ = fastest_format(unit.module, unit.input_shape, candidates)
    for name, fmt in formats.items():
        if fmt not in FORMATS:
            raise InputError(f"convert: layer {name!r}: unknown format {fmt!r}; formats are {', '.join(FORMATS)}")
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"convert: the model has no module {name!r}") from None
        if fmt == "dense" or isinstance(module, (SparseLinear, SparseConv2d)):
            continue
        if (why := unsupported_reason(module)) is not None:
            raise InputError(f"convert: layer {name!r} cannot run in format {fmt!r}: {why}; map it to 'dense'")
        set_module(model, name, sparse_module(module, fmt))
    if fuse:
        for fusion in FUSIONS:
            fusion(model)
    if any(isinstance(m, SparseConv2d) and m.format == "kernel" for m in model.modules()):
        to_channels_last(model)  # the kernel's layout, kept by every dense conv around it
    return model


# in order: each builds on the blocks the ones before it made (model families: spdy.runtime.modeling)
FUSIONS = (fuse_activations, fuse_residual_norms, fuse_feed_forwards, fuse_self_attentions, fuse_encoder_layers,
           fuse_cnn_blocks, fuse_sequential_activations)


def formats_of(model: nn.Module) -> dict[str, str]:
    """Module name -> format of every runtime module in a converted model."""
    return {n: m.format for n, m in model.named_modules() if isinstance(m, (SparseLinear, SparseConv2d))}
