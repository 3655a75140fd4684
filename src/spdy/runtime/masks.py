"""Magnitude masks for an option: what timing and verification prune with.

A layer's speed depends on how many weights remain and how they are grouped, not on which
ones: so timing uses plain magnitude masks, with whole blocks for block patterns (a BSR
kernel is only fast when the zeros really come in blocks) and N:M groups along the input.
"""

from __future__ import annotations

import torch

from spdy.levels import UNSTRUCTURED, Option, block_shape

_NM_PREFIX = ":"


def _keep_top(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Boolean mask keeping the ``round((1 - sparsity) * n)`` largest scores (at least one)."""
    flat = scores.flatten()
    keep = max(1, int(round((1.0 - sparsity) * flat.numel())))
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


def magnitude_mask(weight: torch.Tensor, option: Option | str) -> torch.Tensor:
    """Boolean (out, in) mask of the weights an ``option`` keeps, chosen by magnitude."""
    option = Option.parse(option) if isinstance(option, str) else option
    if weight.dim() != 2:
        raise ValueError(f"magnitude_mask expects an (out, in) matrix, got shape {tuple(weight.shape)}")
    w = weight.detach().abs().float()
    if option.is_dense:
        return torch.ones_like(w, dtype=torch.bool)
    if option.pattern == UNSTRUCTURED:
        return _keep_top(w, option.sparsity)
    if _NM_PREFIX in option.pattern:
        n, m = (int(v) for v in option.pattern.split(":"))
        if w.shape[1] % m:
            raise ValueError(f"option {option.key}: input size {w.shape[1]} is not a multiple of {m}")
        groups = w.reshape(w.shape[0], -1, m)
        drop = torch.topk(groups, n, dim=-1, largest=False).indices
        mask = torch.ones_like(groups, dtype=torch.bool).scatter_(-1, drop, False)
        return mask.reshape(w.shape)
    r, c = block_shape(option.pattern)
    if w.shape[0] % r or w.shape[1] % c:
        raise ValueError(f"option {option.key}: weight {tuple(w.shape)} is not divisible into {r}x{c} blocks")
    norms = w.reshape(w.shape[0] // r, r, w.shape[1] // c, c).square().sum(dim=(1, 3))
    blocks = _keep_top(norms, option.sparsity)
    return blocks.repeat_interleave(r, 0).repeat_interleave(c, 1)

