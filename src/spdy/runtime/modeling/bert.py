"""Fusions for BERT-style encoders (BERT, MiniLM, RoBERTa, ...): their blocks run as single
kernel calls once `convert` has put their Linears in the kernel format.

Each fusion finds blocks by the names transformers gives them (``*Intermediate`` with
``dense`` and ``intermediate_act_fn``, ``*Output`` with ``dense`` and ``LayerNorm``,
``*SelfAttention`` with ``query``/``key``/``value``) and swaps or mixes in a module that keeps
those names, so layer names, hooks and outputs stay the model's. The whole-layer fusion
builds on these blocks (`spdy.runtime.modeling.bert_layer`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from spdy.runtime import cpu
from spdy.runtime.attention import attention_scratch, mask_for
from spdy.runtime.buffers import thread_slots
from spdy.runtime.kernels import CHUNK, SparseKernelWeight, feed_forward
from spdy.runtime.modeling import defaults_only, mix_in
from spdy.runtime.modules import SparseLinear, set_module

if cpu.numba is not None:
    import numba
    from numba import prange

    from spdy.runtime.attention import attend_item
    from spdy.runtime.kernels import ZERO16, pack_tile, row_chunk
    from spdy.runtime.vector import JIT, LANES


def _exact_gelu(module: nn.Module) -> bool:
    """nn.GELU() or transformers' GELUActivation (both the erf GELU, not the tanh approximation)."""
    if isinstance(module, nn.GELU):
        return module.approximate == "none"
    return type(module).__name__ == "GELUActivation" and getattr(module, "act", None) is F.gelu


def fuse_activations(model: nn.Module) -> list[str]:
    """Move the GELU of BERT-style ``*Intermediate`` blocks (``act(dense(x))``) into their
    kernel-format `SparseLinear`, which applies it while storing its output (one pass over
    the 8 x 128 x 1536 MiniLM activation less per layer). Returns the fused blocks' names."""
    fused = []
    for name, block in model.named_modules():
        dense, act = getattr(block, "dense", None), getattr(block, "intermediate_act_fn", None)
        if (type(block).__name__.endswith("Intermediate") and isinstance(dense, SparseLinear) and dense.format == "kernel"
                and dense.activation is None and act is not None and _exact_gelu(act)):
            dense.activation = "gelu"
            block.intermediate_act_fn = nn.Identity()
            fused.append(name)
    return fused


class ResidualNormOutput(nn.Module):
    """A BERT-style output block, ``LayerNorm(dense(x) + input)``, run as one kernel call that
    normalises each tile while it is in cache (dropout is inference's identity). Keeps the names
    ``dense`` and ``LayerNorm`` so the layer names stay those of the original model."""

    def __init__(self, dense: SparseLinear, norm: nn.LayerNorm):
        super().__init__()
        self.dense = dense
        self.LayerNorm = norm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        norm = (self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        x = hidden_states.reshape(-1, self.dense.in_features)
        y = self.dense.store.kernel.matmul(x, residual=input_tensor.reshape(x.shape[0], -1), norm=norm)
        return y.reshape(*hidden_states.shape[:-1], self.dense.out_features)


def fuse_residual_norms(model: nn.Module) -> list[str]:
    """Swap BERT-style ``*Output`` blocks (``LayerNorm(dropout(dense(x)) + input)``) whose dense is a
    kernel-format `SparseLinear` for `ResidualNormOutput`, which adds the residual and normalises
    inside the kernel call instead of two more torch passes over the output. Returns their names."""
    fused = []
    for name, block in list(model.named_modules()):
        dense, norm = getattr(block, "dense", None), getattr(block, "LayerNorm", None)
        if (type(block).__name__.endswith("Output") and isinstance(dense, SparseLinear) and dense.format == "kernel"
                and dense.activation is None and isinstance(norm, nn.LayerNorm) and norm.elementwise_affine
                and norm.bias is not None and tuple(norm.normalized_shape) == (dense.out_features,)):
            set_module(model, name, ResidualNormOutput(dense, norm))
            fused.append(name)
    return fused


class FeedForwardInput(nn.Module):
    """Stands in for a BERT-style ``*Intermediate`` block whose up projection `FeedForwardOutput`
    runs: passes its input through (it keeps ``dense`` so layer names stay the model's)."""

    def __init__(self, dense: SparseLinear):
        super().__init__()
        self.dense = dense

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states


class FeedForwardOutput(ResidualNormOutput):
    """``LayerNorm(dense(gelu(up(x))) + input)``, a whole BERT feed-forward block in one kernel call
    (`kernels.feed_forward`): each thread's token tile goes through both projections in its L2,
    the wide intermediate never stored. Measured 1.33x over the two calls at 90%, 1.13x at 70%
    (MiniLM shapes, 1024 tokens, 2 threads)."""

    def __init__(self, up: SparseLinear, dense: SparseLinear, norm: nn.LayerNorm):
        super().__init__(dense, norm)
        self.up_store = up.store  # the up projection's module stays at its own name

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        norm = (self.LayerNorm.weight, self.LayerNorm.bias, self.LayerNorm.eps)
        x = hidden_states.reshape(-1, self.up_store.kernel.shape[1])
        y = feed_forward(x, self.up_store.kernel, self.dense.store.kernel, input_tensor.reshape(x.shape[0], -1), norm)
        return y.reshape(*hidden_states.shape[:-1], self.dense.out_features)


def fuse_feed_forwards(model: nn.Module) -> list[str]:
    """Run each BERT-style layer's feed-forward block (``intermediate`` with its GELU fused, then a
    `ResidualNormOutput`) as one `FeedForwardOutput` call. Returns the layers' names."""
    fused = []
    for name, layer in list(model.named_modules()):
        inter, out = getattr(layer, "intermediate", None), getattr(layer, "output", None)
        up = getattr(inter, "dense", None)
        if (type(out) is ResidualNormOutput and isinstance(up, SparseLinear) and up.format == "kernel"
                and up.activation == "gelu" and isinstance(getattr(inter, "intermediate_act_fn", None), nn.Identity)
                and up.out_features == out.dense.in_features and up.in_features == out.dense.out_features):
            layer.intermediate = FeedForwardInput(up)
            layer.output = FeedForwardOutput(up, out.dense, out.LayerNorm)
            fused.append(name)
    return fused


class ProjectedSelfAttention(nn.Module):
    """Mixed into a BERT-style ``*SelfAttention`` block by `fuse_self_attentions`: its q/k/v
    projections and attention run as one kernel call (`attention.project_attend`), each (batch
    row, head group) projecting its tokens and attending while they are in its L2. Calls it
    cannot take (training, caches, cross-attention, attention weights requested, causal blocks,
    other dtypes, masks that are not 4-D) run the block's own forward."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past_key_values=None, **kwargs):
        if (self.training or not defaults_only(past_key_values, **kwargs) or getattr(self, "is_causal", False)
                or hidden_states.dtype != torch.float32 or hidden_states.dim() != 3
                or (attention_mask is not None and attention_mask.dim() != 4) or not projectable(self)):
            return super().forward(hidden_states, attention_mask=attention_mask, past_key_values=past_key_values,
                                   **kwargs)
        out = project_attend(hidden_states, self.query.store.kernel, self.key.store.kernel, self.value.store.kernel,
                             self.num_attention_heads, attention_mask,
                             getattr(self, "scaling", self.attention_head_size ** -0.5))
        return out, None


def projectable(block: nn.Module) -> bool:
    """A BERT-style self-attention block whose query, key and value are kernel-format
    `SparseLinear`s of one shape, heads a multiple of 16 wide."""
    layers = [getattr(block, n, None) for n in ("query", "key", "value")]
    heads, size = getattr(block, "num_attention_heads", None), getattr(block, "attention_head_size", None)
    return (type(block).__name__.endswith("SelfAttention") and isinstance(heads, int) and isinstance(size, int)
            and size % 16 == 0
            and all(isinstance(l, SparseLinear) and l.format == "kernel" and l.activation is None
                    and (l.out_features, l.in_features) == (heads * size, layers[0].in_features) for l in layers))


def fuse_self_attentions(model: nn.Module) -> list[str]:
    """Make every `projectable` self-attention block a `ProjectedSelfAttention`, in place.
    Returns their names."""
    fused = []
    for name, block in model.named_modules():
        if not isinstance(block, ProjectedSelfAttention) and projectable(block):
            mix_in(block, ProjectedSelfAttention)
            fused.append(name)
    return fused


def project_attend(hidden: torch.Tensor, query: SparseKernelWeight, key: SparseKernelWeight,
                   value: SparseKernelWeight, heads: int, mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Self-attention of `hidden` (batch, seq, in) with its q/k/v projections: `attention.attend` on
    ``hidden @ W^T + b`` for the three weights, returned as (batch, seq, heads * head dim).

    One work item is a batch row and the heads of one kernel row chunk: it projects its tokens
    and attends right away, the projections never leaving its L2 (a BERT attention block at
    MiniLM shapes, 90% sparse: 1.28x over three `matmul` calls and `attend` at 1 thread, 1.38x at 2).
    """
    if not cpu.available()[0]:
        raise RuntimeError(cpu.available()[1])
    shapes = {query.shape, key.shape, value.shape}
    if hidden.dim() != 3 or hidden.dtype != torch.float32 or len(shapes) != 1 or hidden.shape[2] != query.shape[1]:
        raise ValueError(f"project_attend: needs float32 (batch, seq, {query.shape[1]}) input and q/k/v weights of "
                         f"one shape, got input {tuple(hidden.shape)} {hidden.dtype} and weights {sorted(shapes)}")
    width = query.shape[0]
    if heads < 1 or width % heads or (width // heads) % 16:
        raise ValueError(f"project_attend: {width} features do not split into {heads} heads of a multiple of 16")
    batch, seq, _ = hidden.shape
    head_dim = width // heads
    scale = head_dim ** -0.5 if scale is None else float(scale)
    mask4 = mask_for(mask, batch, heads, seq, seq)
    # heads per item: one kernel row chunk of them when they tile it, else all
    group = CHUNK // head_dim if CHUNK % head_dim == 0 else heads
    x = hidden.detach().reshape(batch * seq, -1).contiguous()
    out = torch.empty(batch, seq, width)
    if out.numel():
        tile = 4 * LANES
        _project_attend(x.numpy(), seq, query.arrays, key.arrays, value.arrays, mask4.numpy(), out.numpy(), heads,
                        min(group, heads), np.float32(scale), thread_slots("x", x.shape[1], tile),
                        *(thread_slots(name, seq, width) for name in ("yq", "yk", "yv")),
                        *attention_scratch(min(group, heads), head_dim, seq, seq, mask4.shape[3]), ZERO16)
    return out


if cpu.numba is not None:
    @numba.njit(parallel=True, **JIT)
    def _project_attend(x, seq, wq, wk, wv, mask, out, heads, group, scale, xp_all, yq_all, yk_all, yv_all, kt_all,
                        qp_all, vp_all, p_all, inv_all, zero16):
        """The attention kernel (`attention.attend`) on q/k/v projected inside each work item: x (B * seq, hidden); wq, wk, wv are
        (bptr, indices, data, bias) of `SparseKernelWeight`s. An item's token tiles are packed once
        and run through the rows of all three weights that its heads need, into per-thread buffers
        (seq, H * D) that stay in L2 for the attention right after."""
        width = out.shape[2]
        head_dim = width // heads
        groups = -(-heads // group)
        for item in prange((x.shape[0] // seq) * groups):
            b = item // groups
            h0 = (item - b * groups) * group
            hn = min(group, heads - h0)
            t = numba.get_thread_id()
            xb = x[b * seq:(b + 1) * seq]
            xp, yq, yk, yv = xp_all[t], yq_all[t], yk_all[t], yv_all[t]
            for n0 in range(0, seq, 4 * LANES):
                pack_tile(xb, n0, xp, zero16)
                for o0 in range(h0 * head_dim, (h0 + hn) * head_dim, CHUNK):
                    row_chunk(xp, wq[0], wq[1], wq[2], wq[3], yq, n0, o0, 4, 0)
                    row_chunk(xp, wk[0], wk[1], wk[2], wk[3], yk, n0, o0, 4, 0)
                    row_chunk(xp, wv[0], wv[1], wv[2], wv[3], yv, n0, o0, 4, 0)
            attend_item(yq, yk, yv, mask, out, b, h0, hn, heads, scale, kt_all[t], qp_all[t], vp_all[t], p_all[t],
                         inv_all[t], zero16)
