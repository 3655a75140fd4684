"""Drop-in modules that run a pruned layer in a chosen weight format.

`SparseLinear` replaces ``nn.Linear`` and transformers' ``Conv1D`` (same product, weight
stored transposed); `SparseConv2d` replaces ``nn.Conv2d``: by the own direct sparse
convolution in format ``kernel``, else by an unfold + matmul, the only way torch's sparse
formats can be applied to a convolution. Both compute what the masked
dense layer computes, up to float rounding. Model-family fusions built on them live in
`spdy.runtime.modeling`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from spdy.runtime.formats import conv_kernel, make_format


def conv1d_type() -> type | None:
    """transformers' ``Conv1D`` (a Linear stored transposed, as in GPT-2), or None without transformers."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _bias(module: nn.Module) -> torch.Tensor | None:
    bias = getattr(module, "bias", None)
    return None if bias is None else bias.detach()


class SparseLinear(nn.Module):
    """``y = act(x W^T + b)`` with ``W`` (out, in) held in ``format``; any number of leading dims.

    ``activation`` is None (a plain Linear) or ``"gelu"`` when a fusion (BERT's
    `modeling.bert.fuse_activations`) moved the following exact GELU into this layer.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, format: str = "csr",
                 activation: str | None = None):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.format = format
        self.activation = activation
        self.store = make_format(format, weight.detach(), bias)

    @classmethod
    def from_module(cls, module: nn.Module, format: str) -> "SparseLinear":
        """From an ``nn.Linear`` or a transformers ``Conv1D`` with its current (masked) weight."""
        conv1d = conv1d_type()
        if not (isinstance(module, nn.Linear) or conv1d is not None and isinstance(module, conv1d)):
            raise TypeError(f"SparseLinear replaces nn.Linear or transformers Conv1D, not {type(module).__name__}")
        return cls(weight_of(module), _bias(module), format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"SparseLinear expects inputs with {self.in_features} features in the last dim, got shape {tuple(x.shape)}")
        y = self.store.linear(x.reshape(-1, self.in_features), self.activation)
        return y.reshape(*x.shape[:-1], self.out_features)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in) weight as a dense tensor, zeros included."""
        return self.store.to_dense()

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.format}, bias={self.store.bias is not None}{act}"


CONV_ACTIVATIONS = (None, "relu", "relu6")


class SparseConv2d(nn.Module):
    """``act(conv2d(x, W) + b + residual)`` for a ``groups=1``, zero-padded Conv2d whose weight is held in ``format``.

    ``kernel`` runs the direct sparse convolution of `spdy.runtime.conv_kernels` on channels-last
    activations (its output is channels_last; give it channels_last inputs to save a copy), with
    the residual add and activation in its store. ``dense`` keeps ``F.conv2d`` (oneDNN); the torch
    sparse formats run ``W_sparse @ unfold(x)``; both apply residual and activation as torch ops.
    ``activation`` (None, ``"relu"``, ``"relu6"``) and ``residual`` let a folded conv + BN + add +
    ReLU run as this one module.
    """

    def __init__(self, conv: nn.Conv2d, format: str, activation: str | None = None):
        super().__init__()
        if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                f"SparseConv2d supports groups=1, padding_mode='zeros' and numeric padding; got groups={conv.groups}, "
                f"padding_mode={conv.padding_mode!r}, padding={conv.padding!r}"
            )
        if activation not in CONV_ACTIVATIONS:
            raise ValueError(f"SparseConv2d activation must be one of {CONV_ACTIVATIONS}, got {activation!r}")
        self.format, self.activation = format, activation
        self.out_channels, self.kernel_size = conv.out_channels, conv.kernel_size
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        weight = conv.weight.detach()
        self.weight_shape = tuple(weight.shape)
        if format == "kernel":
            self.store = conv_kernel(weight, _bias(conv), self.stride, self.padding, self.dilation)
        else:
            self.store = make_format(format, weight.reshape(weight.shape[0], -1), _bias(conv))

    @classmethod
    def from_module(cls, module: nn.Module, format: str, activation: str | None = None) -> "SparseConv2d":
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"SparseConv2d replaces nn.Conv2d, not {type(module).__name__}")
        return cls(module, format, activation)

    def _out_size(self, size: int, i: int) -> int:
        return (size + 2 * self.padding[i] - self.dilation[i] * (self.kernel_size[i] - 1) - 1) // self.stride[i] + 1

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"SparseConv2d expects (batch, channels, height, width) inputs, got shape {tuple(x.shape)}")
        if self.format == "kernel":
            return self.store.conv(x, residual, self.activation)
        if self.format == "dense":
            weight = self.store.to_dense().reshape(self.weight_shape)
            y = F.conv2d(x, weight, self.store.bias, self.stride, self.padding, self.dilation)
        else:
            batch = x.shape[0]
            cols = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)  # (B, K, L)
            k, length = cols.shape[1], cols.shape[2]
            yt = self.store.mm_t(cols.transpose(0, 1).reshape(k, batch * length))  # (out, B * L)
            y = yt.reshape(self.out_channels, batch, length).transpose(0, 1)
            y = y.reshape(batch, self.out_channels, self._out_size(x.shape[2], 0), self._out_size(x.shape[3], 1))
        return _add_activate(y, residual, self.activation)

    def dense_weight(self) -> torch.Tensor:
        """The (out, in * kh * kw) weight as a dense tensor, zeros included."""
        return self.store.to_dense().reshape(self.weight_shape[0], -1)

    def extra_repr(self) -> str:
        act = f", activation={self.activation}" if self.activation else ""
        return f"weight={self.weight_shape}, stride={self.stride}, padding={self.padding}, format={self.format}{act}"


def _add_activate(y: torch.Tensor, residual: torch.Tensor | None, activation: str | None) -> torch.Tensor:
    """act(y + residual) with torch ops, in place on ``y`` (the conv's own fresh output)."""
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"residual must have the output's shape {tuple(y.shape)}, got {tuple(residual.shape)}")
        y = y.add_(residual)
    if activation == "relu":
        return y.relu_()
    if activation == "relu6":
        return y.clamp_(0.0, 6.0)
    return y


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at the dotted ``name`` inside ``model`` (replacing what is there)."""
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def weight_of(module: nn.Module) -> torch.Tensor:
    """A Linear's, Conv1D's or Conv2d's weight as an (out, in) matrix (the one the formats store),
    a view where the layout allows (Conv2d: (out, in * kh * kw))."""
    weight = module.weight.detach()
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return weight.t()
    return weight.reshape(weight.shape[0], -1)


def sparse_module(module: nn.Module, format: str) -> nn.Module:
    """The runtime replacement for a Linear, Conv1D or Conv2d with its current weights."""
    if isinstance(module, nn.Conv2d):
        return SparseConv2d.from_module(module, format)
    return SparseLinear.from_module(module, format)
