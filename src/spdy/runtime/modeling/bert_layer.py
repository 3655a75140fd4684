"""A whole BERT-style encoder layer as one kernel call: each batch row is one work item.

Why: run block by block, a layer is three parallel calls (q/k/v with attention, the attention
output, the feed-forward block), and each hands its activations to the next through memory,
to whichever core gets the tile. Here one thread takes a batch row through q/k/v, attention,
the output projection with residual + LayerNorm, and the feed-forward block with its residual
+ LayerNorm, the row's activations staying in that core's L2 (MiniLM-L6, batch 8 x 128, 90%
sparse, 2 threads: the model 1.00-1.16x faster than the same kernels block by block, in
in-process A/Bs; the gain grows with the host's load, see bench/bench_fusions.py).

`fuse_encoder_layers` turns the layers `convert` has fully fused (`ProjectedSelfAttention`,
`ResidualNormOutput`, `FeedForwardOutput`) into `FusedEncoderLayer`s; calls it cannot take go
to the layer's own forward, which runs those blocks one by one.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from spdy.runtime import cpu
from spdy.runtime.attention import attention_scratch, mask_for
from spdy.runtime.buffers import thread_slots
from spdy.runtime.kernels import layer_norm_arrays
from spdy.runtime.modeling import defaults_only, mix_in
from spdy.runtime.modeling.bert import FeedForwardInput, FeedForwardOutput, ProjectedSelfAttention, ResidualNormOutput

if cpu.numba is not None:
    import numba
    from numba import prange

    from spdy.runtime.attention import attend_item
    from spdy.runtime.kernels import CHUNK, ZERO16, pack_tile, residual_norm, row_chunk
    from spdy.runtime.vector import JIT, LANES

    @numba.njit(parallel=True, **JIT)
    def _encoder_layer(x, seq, wq, wk, wv, wo, norm1, wu, wd, norm2, mask, att, h1, y, heads, scale, xp_all, hp_all,
                       yq_all, yk_all, yv_all, kt_all, qp_all, vp_all, p_all, inv_all, zero16):
        """y = FFN block(attention block(x)) for x (B * seq, hidden), one batch row per item. w* are
        (bptr, indices, data, bias) of `SparseKernelWeight`s; norm1, norm2 (weight, bias, eps) of the
        two LayerNorms; att (B, seq, H * D) and h1 (B * seq, hidden) take the intermediate results."""
        width = att.shape[2]
        hidden = x.shape[1]
        inner = wu[3].shape[0]
        tile = 4 * LANES
        for b in prange(x.shape[0] // seq):
            t = numba.get_thread_id()
            xb = x[b * seq:(b + 1) * seq]
            h1b = h1[b * seq:(b + 1) * seq]
            yb = y[b * seq:(b + 1) * seq]
            xp, hp, yq, yk, yv = xp_all[t], hp_all[t], yq_all[t], yk_all[t], yv_all[t]
            for n0 in range(0, seq, tile):
                pack_tile(xb, n0, xp, zero16)
                for o0 in range(0, width, CHUNK):
                    row_chunk(xp, wq[0], wq[1], wq[2], wq[3], yq, n0, o0, 4, 0)
                    row_chunk(xp, wk[0], wk[1], wk[2], wk[3], yk, n0, o0, 4, 0)
                    row_chunk(xp, wv[0], wv[1], wv[2], wv[3], yv, n0, o0, 4, 0)
            attend_item(yq, yk, yv, mask, att, b, 0, heads, heads, scale, kt_all[t], qp_all[t], vp_all[t], p_all[t],
                         inv_all[t], zero16)
            for n0 in range(0, seq, tile):
                n1 = min(seq, n0 + tile)
                pack_tile(att[b], n0, xp, zero16)
                for o0 in range(0, hidden, CHUNK):
                    row_chunk(xp, wo[0], wo[1], wo[2], wo[3], h1b, n0, o0, 4, 0)
                residual_norm(h1b, xb, norm1[0], norm1[1], norm1[2], n0, n1)
                pack_tile(h1b, n0, xp, zero16)
                for o0 in range(0, inner, CHUNK):
                    row_chunk(xp, wu[0], wu[1], wu[2], wu[3], hp, n0, o0, 4, 1, True)
                for o0 in range(0, hidden, CHUNK):
                    row_chunk(hp, wd[0], wd[1], wd[2], wd[3], yb, n0, o0, 4, 0)
                residual_norm(yb, h1b, norm2[0], norm2[1], norm2[2], n0, n1)


def _shares_evenly(batch: int) -> bool:
    """Batch rows (the work items) keep every thread busy: a multiple of the threads, or at least
    four per thread (3 rows on 2 threads would idle one a third of the time)."""
    threads = numba.get_num_threads()
    return batch % threads == 0 or batch >= 4 * threads


class FusedEncoderLayer(nn.Module):
    """Mixed into a BERT-style layer's own class by `fuse_encoder_layers` (the instance keeps its
    modules, names and hooks): inference calls whose batch rows share out evenly run the
    whole layer in one `_encoder_layer` call; anything else (training, caches, cross-attention,
    attention weights requested, batch rows that do not share out evenly over the threads, other
    dtypes, masks that are not 4-D) runs the layer's own forward."""

    whole_block = True  # one call runs all its units: the timing backend times them inside it (`spdy.timing.in_block`)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args, **kwargs):
        if (self.training or not defaults_only(*args, **kwargs)
                or hidden_states.dtype != torch.float32 or hidden_states.dim() != 3
                or not _shares_evenly(hidden_states.shape[0]) or hidden_states.shape[1] == 0
                or (attention_mask is not None and attention_mask.dim() != 4)
                or not _fused_blocks(self) or getattr(self.attention.self, "is_causal", False)):
            return super().forward(hidden_states, attention_mask, *args, **kwargs)
        sa, out, ffn = self.attention.self, self.attention.output, self.output
        heads, width = sa.num_attention_heads, sa.query.out_features
        head_dim = width // heads
        batch, seq, hidden = hidden_states.shape
        mask4 = mask_for(attention_mask, batch, heads, seq, seq)
        x = hidden_states.detach().reshape(batch * seq, hidden).contiguous()
        att, h1, y = torch.empty(batch, seq, width), torch.empty(batch * seq, hidden), torch.empty(batch * seq, hidden)
        tile = 4 * LANES
        up = ffn.up_store.kernel
        _encoder_layer(x.numpy(), seq, *(p.store.kernel.arrays for p in (sa.query, sa.key, sa.value, out.dense)),
                       _norm(out.LayerNorm), up.arrays, ffn.dense.store.kernel.arrays, _norm(ffn.LayerNorm),
                       mask4.numpy(), att.numpy(), h1.numpy(), y.numpy(), heads,
                       np.float32(getattr(sa, "scaling", head_dim ** -0.5)),
                       thread_slots("x", hidden, tile), thread_slots("h", up.shape[0], tile),
                       *(thread_slots(name, seq, width) for name in ("yq", "yk", "yv")),
                       *attention_scratch(heads, head_dim, seq, seq, mask4.shape[3]), ZERO16)
        return y.view(batch, seq, hidden)


def _norm(layer_norm: nn.LayerNorm) -> tuple:
    return layer_norm_arrays(layer_norm.weight, layer_norm.bias, layer_norm.eps)


def _fused_blocks(layer: nn.Module) -> bool:
    """The layer's blocks are the fused ones `_encoder_layer` runs, with matching widths."""
    block = getattr(layer, "attention", None)
    sa, out = getattr(block, "self", None), getattr(block, "output", None)
    inter, ffn = getattr(layer, "intermediate", None), getattr(layer, "output", None)
    if not (isinstance(sa, ProjectedSelfAttention) and type(out) is ResidualNormOutput
            and isinstance(inter, FeedForwardInput) and isinstance(ffn, FeedForwardOutput)):
        return False
    hidden = sa.query.in_features
    return (out.dense.in_features == sa.query.out_features and out.dense.out_features == hidden
            and ffn.dense.out_features == hidden and ffn.up_store.kernel.shape[1] == hidden)


def fuse_encoder_layers(model: nn.Module) -> list[str]:
    """Make each BERT-style layer whose self-attention, attention output and feed-forward block are
    all fused (``attention.self``: `ProjectedSelfAttention`, ``attention.output``:
    `ResidualNormOutput`, ``intermediate``/``output``: `FeedForwardInput`/`FeedForwardOutput` of the
    same width) a `FusedEncoderLayer`, in place. Returns the layers' names."""
    fused = []
    for name, layer in model.named_modules():
        if isinstance(layer, FusedEncoderLayer) or not _fused_blocks(layer) \
                or getattr(layer, "crossattention", None) is not None:
            continue
        mix_in(layer, FusedEncoderLayer)
        fused.append(name)
    return fused
