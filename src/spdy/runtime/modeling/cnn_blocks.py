"""The structured blocks of a convolutional network: output channels (or neurons) of one layer with
the matching inputs of the layer that consumes them.

Three layouts are recognised (`spdy.blocks.Block`, structure ``channels``):

* residual blocks in torchvision's layout (``conv1``/``bn1``/``conv2``, and ``conv3`` in a
  Bottleneck): the inner convolutions' channels, ``conv1`` -> ``conv2`` and ``conv2`` ->
  ``conv3``. The block's output channels stay: the shortcut adds them.
* inverted residual blocks without squeeze-and-excitation in ``efficientnet-lite-pytorch``'s
  layout (``_expand_conv``, ``_depthwise_conv``, ``_project_conv``, EfficientNet-Lite): the
  expanded channels, which the depthwise convolution keeps channel for channel, so it loses the
  removed ones too.
* ``nn.Sequential`` stacks: two Conv2d/Linear layers with nothing between them but per-channel
  modules (activations, BatchNorm, pooling, dropout, a Flatten before a Linear). A Linear after
  a Flatten consumes ``height * width`` columns per channel; two Linears share neurons.

A BatchNorm after the producer loses the removed channels' features too. Blocks that chain (a
conv consuming one block's channels and producing the next's) overlap; `spdy.blocks.disjoint`
keeps every other one unless ``--include`` chooses. A convolution keeps at least one channel.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn

from spdy.blocks import Block, grid_step
from spdy.errors import InputError

CHANNEL_OPTIONS = 16  # channel grid: about this many steps from all channels down to the smallest kept
_PER_CHANNEL = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Tanh, nn.Sigmoid, nn.Identity,
                nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout, nn.BatchNorm1d, nn.BatchNorm2d)


def channel_step(count: int) -> int:
    return max(1, count // CHANNEL_OPTIONS)


def _dense_layer(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _outputs(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def _pair(names: Sequence[str], modules: Sequence[nn.Module]) -> Block | None:
    """The block of ``modules`` = (producer, per-channel modules..., consumer), or None when shapes do not pair."""
    producer, between, consumer = modules[0], modules[1:-1], modules[-1]
    count = _outputs(producer)
    flattened = any(isinstance(m, nn.Flatten) for m in between)
    if isinstance(consumer, nn.Conv2d):
        if flattened or consumer.in_channels != count:
            return None
        width = consumer.weight[0, 0].numel()
    elif isinstance(producer, nn.Conv2d) and not flattened:
        return None
    else:
        width, rest = divmod(consumer.in_features, count)
        if rest:
            return None
    norms = tuple(n for n, m in zip(names[1:-1], between) if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)))
    if any(m.num_features != count for m in between if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))):
        return None
    linear = isinstance(producer, nn.Linear)
    structure = "neurons" if linear else "channels"
    return Block(names[-1], structure, (names[0], *norms), names[0], count, width, grid_step(count) if linear else channel_step(count),
                 rows=(1,) * (1 + len(norms)), family="cnn", chain=tuple(names[:-1]))


def _sequential_blocks(path: str, stack: nn.Sequential) -> list[Block]:
    blocks, run = [], []  # run: (name, module) from the last dense layer on
    for child, module in stack.named_children():
        name = f"{path}.{child}" if path else child
        flatten_ok = isinstance(module, nn.Flatten) and module.start_dim == 1
        if _dense_layer(module):
            if run and (block := _pair([n for n, _ in run] + [name], [m for _, m in run] + [module])):
                blocks.append(block)
            run = [(name, module)]
        elif run and (isinstance(module, _PER_CHANNEL) or flatten_ok):
            run.append((name, module))
        else:
            run = []
    return blocks


def _residual_blocks(path: str, block: nn.Module) -> list[Block]:
    found = []
    for i in (1, 2):
        names = [f"conv{i}", f"bn{i}", f"relu{i}" if hasattr(block, f"relu{i}") else "relu", f"conv{i + 1}"]
        modules = [getattr(block, n, None) for n in names]
        if all(isinstance(m, nn.Module) for m in modules) and _dense_layer(modules[0]) and isinstance(modules[-1], nn.Conv2d) \
                and all(isinstance(m, _PER_CHANNEL) for m in modules[1:-1]):
            if pair := _pair([f"{path}.{n}" if path else n for n in names], modules):
                found.append(pair)
    return found


def _depthwise(path: str, module: nn.Module) -> tuple[str, nn.Conv2d] | None:
    """The depthwise Conv2d at ``path`` and its path: the module itself, or the conv after a padding in a Sequential."""
    if isinstance(module, nn.Sequential) and len(module) and all(isinstance(m, nn.ZeroPad2d) for m in list(module)[:-1]):
        path, module = f"{path}.{len(module) - 1}", module[-1]
    ok = isinstance(module, nn.Conv2d) and module.groups == module.in_channels == module.out_channels > 1
    return (path, module) if ok else None


def _inverted_blocks(path: str, block: nn.Module) -> list[Block]:
    names = ("_expand_conv", "_bn0", "_swish", "_depthwise_conv", "_bn1", "_swish")
    if not all(hasattr(block, n) for n in (*names, "_project_conv")) or getattr(block, "has_se", False):
        return []
    at = (lambda n: f"{path}.{n}") if path else (lambda n: n)
    expand, project = block._expand_conv, block._project_conv
    depthwise = _depthwise(at("_depthwise_conv"), block._depthwise_conv)
    if not (depthwise and _dense_layer(expand) and isinstance(project, nn.Conv2d) and project.groups == 1
            and expand.out_channels == depthwise[1].out_channels == project.in_channels):
        return []
    norms = [n for n in ("_bn0", "_bn1") if isinstance(getattr(block, n), (nn.BatchNorm2d, nn.BatchNorm1d))]
    producers = (at("_expand_conv"), depthwise[0], *map(at, norms))
    count = expand.out_channels
    return [Block(at("_project_conv"), "channels", producers, at("_expand_conv"), count, project.weight[0, 0].numel(),
                  channel_step(count), rows=(1,) * len(producers), family="cnn", chain=tuple(map(at, names)))]


def cnn_blocks(model: nn.Module) -> list[Block]:
    """Every channel block of ``model``'s residual blocks and sequential stacks, in module order; an
    `InputError` saying what is expected when there is none."""
    blocks = []
    for path, module in model.named_modules():
        if all(hasattr(module, n) for n in ("conv1", "bn1", "conv2")):
            blocks += _residual_blocks(path, module)
        blocks += _inverted_blocks(path, module)
        if isinstance(module, nn.Sequential):
            blocks += _sequential_blocks(path, module)
    if not blocks:
        kinds = sorted({type(m).__name__ for m in model.modules()})[:8]
        raise InputError(f"structured pruning found no blocks in {type(model).__name__}: it expects a BERT-style encoder or a "
                         "Llama-style decoder (an nn.ModuleList of layers with attention), residual blocks with conv1/bn1/conv2 "
                         "(torchvision layout), EfficientNet-Lite blocks (_expand_conv/_depthwise_conv/_project_conv), or an nn.Sequential in which two Conv2d/Linear layers (groups=1) are separated only "
                         f"by activations, BatchNorm, pooling, dropout or a Flatten; the model has {kinds}")
    return blocks


def finish_resize(model: nn.Module, block: Block, kept: Sequence[int]) -> None:
    """Nothing more: the sliced layers carry their own sizes."""
