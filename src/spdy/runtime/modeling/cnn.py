"""Fusions for convolutional networks (ResNet Bottlenecks, EfficientNet MBConv blocks): a
kernel-format conv takes the ReLU/ReLU6 and the residual add that follow it into its store.

BatchNorm is already folded into the convs (`spdy.runtime.fold`, at load), so a block's
BatchNorms are ``nn.Identity``. Blocks are recognised by the attribute names torchvision and
``efficientnet-lite-pytorch`` give them and get a fused forward mixed in (`mix_in`), so module
names, hooks and state dicts stay the model's. A conv left dense runs as before, with the
activation and add as separate torch ops.
"""

from __future__ import annotations

import torch
from torch import nn

from spdy.runtime.modeling import mix_in
from spdy.runtime.modules import SparseConv2d

_ACTIVATION = {nn.ReLU: "relu", nn.ReLU6: "relu6"}


def _kernel(conv: nn.Module) -> bool:
    return isinstance(conv, SparseConv2d) and conv.format == "kernel"


def _run(conv: nn.Module, x: torch.Tensor, act: nn.Module | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``act(conv(x) + residual)``: a kernel-format conv adds the residual in its store, and
    applies ``act`` there too when `fuse_cnn_blocks` gave it the activation."""
    if _kernel(conv):
        y = conv(x, residual=residual)
        return act(y) if act is not None and conv.activation is None else y
    y = conv(x)
    if residual is not None:
        y = y + residual
    return act(y) if act is not None else y


class FusedBottleneck:
    """Mixed into a ResNet Bottleneck (conv1/conv2/conv3, folded BatchNorms, ``relu`` or
    ``relu1``..``relu3``, optional ``downsample``): each conv stores its ReLU, conv3 also the
    shortcut's add."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        acts = _bottleneck_relus(self)
        y = _run(self.conv1, x, acts[0])
        y = _run(self.conv2, y, acts[1])
        return _run(self.conv3, y, acts[2], residual=identity)


def _bottleneck_relus(block: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module] | None:
    if all(hasattr(block, f"relu{i}") for i in (1, 2, 3)):
        return block.relu1, block.relu2, block.relu3
    relu = getattr(block, "relu", None)
    return (relu, relu, relu) if relu is not None else None


def _is_bottleneck(block: nn.Module) -> bool:
    names = ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "downsample")
    return (all(hasattr(block, n) for n in names) and _bottleneck_relus(block) is not None
            and all(isinstance(getattr(block, f"bn{i}"), nn.Identity) for i in (1, 2, 3)))


class FusedMBConv:
    """Mixed into an EfficientNet(-Lite) MBConvBlock without squeeze-excitation: the expansion
    conv stores its ReLU6, the projection conv the skip connection's add (inference: no drop
    connect)."""

    def forward(self, inputs: torch.Tensor, drop_connect_rate: float | None = None) -> torch.Tensor:
        args = self._block_args
        x = _run(self._expand_conv, inputs, self._swish) if args.expand_ratio != 1 else inputs
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        skip = self.id_skip and args.stride == 1 and args.input_filters == args.output_filters
        return _run(self._project_conv, x, None, residual=inputs if skip else None)


def _is_mbconv(block: nn.Module) -> bool:
    return (hasattr(block, "_block_args") and hasattr(block, "_project_conv") and not getattr(block, "has_se", True)
            and isinstance(getattr(block, "_bn2", None), nn.Identity) and isinstance(getattr(block, "_bn0", nn.Identity()), nn.Identity))


def _store_activation(conv: nn.Module, act: nn.Module | None) -> bool:
    """Whether a kernel-format conv gains from the fused forward; gives it ``act`` when it can store it."""
    if not _kernel(conv):
        return False
    if conv.activation is None and type(act) in _ACTIVATION:
        conv.activation = _ACTIVATION[type(act)]
    return True


def fuse_sequential_activations(model: nn.Module) -> list[str]:
    """In ``nn.Sequential`` containers, a kernel-format conv followed by a ReLU/ReLU6 (used nowhere
    else) stores it, and the activation becomes ``nn.Identity``. Returns the convs' names."""
    uses: dict[int, int] = {}
    for m in model.modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    fused = []
    for name, seq in list(model.named_modules()):
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (conv_name, conv), (act_name, act) in zip(children, children[1:]):
            if _kernel(conv) and conv.activation is None and type(act) in _ACTIVATION and uses[id(act)] == 1:
                conv.activation = _ACTIVATION[type(act)]
                setattr(seq, act_name, nn.Identity())
                fused.append(f"{name}.{conv_name}" if name else conv_name)
    return fused


def fuse_cnn_blocks(model: nn.Module) -> list[str]:
    """Mix the fused forwards into Bottleneck and MBConv blocks with at least one kernel-format
    conv; returns their names. Needs no example: blocks are found by their attribute names."""
    fused = []
    for name, block in list(model.named_modules()):
        if isinstance(block, (FusedBottleneck, FusedMBConv)):
            continue
        if _is_bottleneck(block):
            acts = _bottleneck_relus(block)
            changed = [_store_activation(getattr(block, f"conv{i}"), acts[i - 1]) for i in (1, 2, 3)]
            if any(changed):
                mix_in(block, FusedBottleneck)
                fused.append(name)
        elif _is_mbconv(block):
            expands = block._block_args.expand_ratio != 1
            changed = [expands and _store_activation(block._expand_conv, block._swish), _store_activation(block._project_conv, None)]
            if any(changed):
                mix_in(block, FusedMBConv)
                fused.append(name)
    return fused
