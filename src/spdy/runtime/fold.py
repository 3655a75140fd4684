"""Fold eval-mode BatchNorm into the convolution that feeds it, as inference engines do.

A BatchNorm after a conv is a per-channel affine map, so ``bn(conv(x))`` equals a conv with
scaled weights and a shifted bias. Folding removes a full pass over every activation map
(eager ResNet-50 spends ~40% of its time outside the convs), so a CNN's fixed cost is what a
deployed engine pays, and it keeps every zero of a pruned conv a zero.

Pairs are found by running an example: a BatchNorm whose input is exactly the tensor a conv
returned. Functional uses of that tensor elsewhere are invisible to hooks, so the folded
model is checked against the original on the example and restored if they differ.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from spdy.errors import InputError
from spdy.runtime.modules import set_module
from spdy.units import call_model

TOLERANCE = 1e-4  # relative to the output's scale; float32 refolding rounds far below this


def _pairs(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) where the BatchNorm ran on the conv's output tensor."""
    produced: dict[int, str] = {}
    pairs: dict[str, str] = {}
    calls: dict[str, int] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(lambda m, args, out, name=name: produced.__setitem__(id(out), name)))
        elif isinstance(module, nn.BatchNorm2d):

            def pre(m, args, name=name):
                calls[name] = calls.get(name, 0) + 1
                conv = produced.get(id(args[0]))
                if conv is not None:
                    pairs[name] = conv

            hooks.append(module.register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            call_model(model, example)
    finally:
        for h in hooks:
            h.remove()
    # A BatchNorm or conv reused in several places cannot fold into one of them.
    convs = list(pairs.values())
    return [(conv, bn) for bn, conv in pairs.items() if calls[bn] == 1 and convs.count(conv) == 1]


def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() if bn.affine else torch.zeros_like(bn.running_mean)
    bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.data.mul_(scale.reshape(-1, 1, 1, 1).to(conv.weight.dtype))
    conv.bias = nn.Parameter((shift + (bias - bn.running_mean) * scale).to(conv.weight.dtype))


def _outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = call_model(model, example)
    if isinstance(out, torch.Tensor):
        return [out]
    values = out.values() if isinstance(out, dict) else out if isinstance(out, (list, tuple)) else getattr(out, "__dict__", {}).values()
    return [v for v in values if isinstance(v, torch.Tensor)]


@torch.no_grad()
def fold_batchnorms(model: nn.Module, example: Any) -> list[tuple[str, str]]:
    """Fold every BatchNorm2d that directly follows a Conv2d into it, in place; returns the pairs.

    The model must be in eval mode (a training BatchNorm normalises by batch statistics,
    which no weight can hold). Folded BatchNorms become ``nn.Identity``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if not norms:
        return []
    if any(m.training for m in norms):
        raise InputError("fold_batchnorms: the model is in training mode; call model.eval() first")
    if any(m.running_mean is None for m in norms):
        raise InputError("fold_batchnorms: a BatchNorm2d tracks no running statistics, so it depends on the batch and cannot fold")
    pairs = _pairs(model, example)
    if not pairs:
        return []
    reference = _outputs(model, example)
    saved = []
    for conv_name, bn_name in pairs:
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        saved.append((conv, conv.weight.detach().clone(), conv.bias, bn_name, bn))
        _fold(conv, bn)
        set_module(model, bn_name, nn.Identity())
    folded = _outputs(model, example)
    if len(folded) == len(reference) and all(_close(a, b) for a, b in zip(folded, reference)):
        return pairs
    warnings.warn("fold_batchnorms: the folded model's outputs differ from the original's (a conv output is also "
                  "used elsewhere?); BatchNorms left unfolded", RuntimeWarning, stacklevel=2)
    for conv, weight, bias, bn_name, bn in saved:
        conv.weight.data.copy_(weight)
        conv.bias = bias
        set_module(model, bn_name, bn)
    return []


def to_channels_last(model: nn.Module) -> bool:
    """Lay a CNN's 4-D weights out channels-last, in place; returns whether it has convs.

    The kernel format's convs read and write channels-last activations; dense oneDNN convs
    follow their weights' layout (and ran ~10% faster so on ResNet-50 here), so the whole
    network keeps one layout and no layer pays a transpose. The input may stay NCHW.
    """
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    model.to(memory_format=torch.channels_last)
    return True


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(b.abs().max()) if b.numel() else 0.0
    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), rtol=0, atol=TOLERANCE * max(scale, 1e-6)))
