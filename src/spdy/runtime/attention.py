"""Own CPU attention for the kernel runtime: softmax(Q K^T * scale + mask) V per (batch, head).

Why: once the Linears are sparse, attention is about a third of a pruned MiniLM's time, and
torch's CPU flash attention scales poorly to a second thread on short sequences (MiniLM,
batch 8 x 128: 6.0 -> 4.5 ms per layer from 1 to 2 threads; this kernel 4.9 -> 2.6 ms, see
bench/bench_attention.py). Work items are (batch row, group of heads), shared out over numba's
threads; per item:

* the group's slices of every q, k, v row are read front to back (one head's 128-byte slices,
  1.5 KB apart, starve the hardware prefetcher) into per-head packed copies: K^T as (head dim,
  keys padded to 128) by 16x16 transposes; scores are taken for two query rows at a time, 16
  independent 512-bit FMA chains per head-dim step, each contiguous K^T load feeding two of
  them (1.04-1.08x over one row at a time);
* the mask add and the row max ride along in the score loop; the softmax uses a vector exp
  (libm's is scalar) and keeps 1 / row-sum to scale the output instead of normalising;
* P V accumulates 8 queries at once (8 chains, each V row loaded once for all 8), written
  straight to (batch, seq, heads * head dim), where the output projection reads it.

`attend` takes the (batch, heads, seq, head dim) tensors transformers hands an attention
function; `use_kernel_attention` registers it for a transformers model. `attend_item` is the
per-item body that model-family fusions (`spdy.runtime.modeling`) call inside their own work
items, with `mask_for`'s mask and `attention_scratch`'s buffers.
"""

from __future__ import annotations

import numpy as np
import torch

from spdy.runtime import cpu
from spdy.runtime.buffers import thread_slots

_KEYS = 128  # keys per score chunk: 8 vectors of 16
_GROUP = 8  # queries per P V pass
_MASKED = -1e30  # fastmath assumes no infinities: a large negative stands for -inf
NAME = "spdy_kernel"  # the attention implementation name registered with transformers

if cpu.numba is not None:
    import numba
    from numba import prange

    from spdy.runtime.kernels import ZERO16
    from spdy.runtime.vector import (JIT, hmax, hsum, transpose16, vadd, vexp_sub, vfma, vload, vmax, vscale, vstore,
                                     vzero)

    @numba.njit(**JIT)
    def _store_chunk(s, v0, v1, v2, v3, v4, v5, v6, v7):
        """Store 128 scores (8 vectors) at address s; returns their lane-wise max."""
        vstore(s, v0)
        vstore(s + np.uintp(64), v1)
        vstore(s + np.uintp(128), v2)
        vstore(s + np.uintp(192), v3)
        vstore(s + np.uintp(256), v4)
        vstore(s + np.uintp(320), v5)
        vstore(s + np.uintp(384), v6)
        vstore(s + np.uintp(448), v7)
        return vmax(vmax(vmax(v0, v1), vmax(v2, v3)), vmax(vmax(v4, v5), vmax(v6, v7)))

    @numba.njit(**JIT)
    def _scores(q, qa, qb, kt_addr, keys_padded, head_dim, scale, mask_a, mask_b, s_a, s_b):
        """s_x = scale * q[qx:qx+head_dim] . K^T + mask_x for two query rows x = a, b (the same row
        twice for an odd last one), 128 keys at a time: each K^T load feeds two FMAs (16 chains).
        Returns the two rows' maxima."""
        qa = np.uintp(qa)
        qb = np.uintp(qb)
        top_a = vload(mask_a)  # replaced by the first chunk's max
        top_b = top_a
        for c in range(0, keys_padded, _KEYS):
            a0 = vload(mask_a + np.uintp(4 * c + 0))
            a1 = vload(mask_a + np.uintp(4 * c + 64))
            a2 = vload(mask_a + np.uintp(4 * c + 128))
            a3 = vload(mask_a + np.uintp(4 * c + 192))
            a4 = vload(mask_a + np.uintp(4 * c + 256))
            a5 = vload(mask_a + np.uintp(4 * c + 320))
            a6 = vload(mask_a + np.uintp(4 * c + 384))
            a7 = vload(mask_a + np.uintp(4 * c + 448))
            b0 = vload(mask_b + np.uintp(4 * c + 0))
            b1 = vload(mask_b + np.uintp(4 * c + 64))
            b2 = vload(mask_b + np.uintp(4 * c + 128))
            b3 = vload(mask_b + np.uintp(4 * c + 192))
            b4 = vload(mask_b + np.uintp(4 * c + 256))
            b5 = vload(mask_b + np.uintp(4 * c + 320))
            b6 = vload(mask_b + np.uintp(4 * c + 384))
            b7 = vload(mask_b + np.uintp(4 * c + 448))
            for d in range(head_dim):
                wa = q[qa + np.uintp(d)] * scale
                wb = q[qb + np.uintp(d)] * scale
                p = kt_addr + np.uintp(4 * (d * keys_padded + c))
                a0 = vfma(a0, wa, p)
                b0 = vfma(b0, wb, p)
                a1 = vfma(a1, wa, p + np.uintp(64))
                b1 = vfma(b1, wb, p + np.uintp(64))
                a2 = vfma(a2, wa, p + np.uintp(128))
                b2 = vfma(b2, wb, p + np.uintp(128))
                a3 = vfma(a3, wa, p + np.uintp(192))
                b3 = vfma(b3, wb, p + np.uintp(192))
                a4 = vfma(a4, wa, p + np.uintp(256))
                b4 = vfma(b4, wb, p + np.uintp(256))
                a5 = vfma(a5, wa, p + np.uintp(320))
                b5 = vfma(b5, wb, p + np.uintp(320))
                a6 = vfma(a6, wa, p + np.uintp(384))
                b6 = vfma(b6, wb, p + np.uintp(384))
                a7 = vfma(a7, wa, p + np.uintp(448))
                b7 = vfma(b7, wb, p + np.uintp(448))
            chunk = _store_chunk(s_a + np.uintp(4 * c), a0, a1, a2, a3, a4, a5, a6, a7)
            top_a = chunk if c == 0 else vmax(top_a, chunk)
            chunk = _store_chunk(s_b + np.uintp(4 * c), b0, b1, b2, b3, b4, b5, b6, b7)
            top_b = chunk if c == 0 else vmax(top_b, chunk)
        return hmax(top_a), hmax(top_b)

    @numba.njit(**JIT)
    def _softmax_row(s_addr, top, keys_padded):
        """s = exp(s - top) in place (top = max s); returns 1 / sum. Four vectors per step: one exp's
        polynomial is a chain of dependent FMAs, four interleave (0.80 -> 0.53 ms per MiniLM layer, 1 thread)."""
        t0 = vzero()
        t1 = vzero()
        t2 = vzero()
        t3 = vzero()
        for c in range(0, keys_padded, 64):
            a = s_addr + np.uintp(4 * c)
            e0 = vexp_sub(vload(a), top)
            e1 = vexp_sub(vload(a + np.uintp(64)), top)
            e2 = vexp_sub(vload(a + np.uintp(128)), top)
            e3 = vexp_sub(vload(a + np.uintp(192)), top)
            vstore(a, e0)
            vstore(a + np.uintp(64), e1)
            vstore(a + np.uintp(128), e2)
            vstore(a + np.uintp(192), e3)
            t0 = vadd(t0, e0)
            t1 = vadd(t1, e1)
            t2 = vadd(t2, e2)
            t3 = vadd(t3, e3)
        return 1.0 / hsum(vadd(vadd(t0, t1), vadd(t2, t3)))

    @numba.njit(**JIT)
    def _pv_group(p, i0, keys, keys_padded, v_addr, v_stride, inv, out_addr, out_stride, head_dim):
        """out[i0 + r] = inv[r] * sum_j p[i0 + r, j] V[j] for 8 query rows r, 16 head dims at a time."""
        for u in range(0, head_dim, 16):
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
            a4 = vzero()
            a5 = vzero()
            a6 = vzero()
            a7 = vzero()
            r0 = np.uintp(i0 * keys_padded)
            kp = np.uintp(keys_padded)
            for j in range(keys):
                vp = v_addr + np.uintp(4 * (j * v_stride + u))
                pj = r0 + np.uintp(j)  # unsigned: no negative-index wraparound code per load
                a0 = vfma(a0, p[pj], vp)
                a1 = vfma(a1, p[pj + kp], vp)
                a2 = vfma(a2, p[pj + 2 * kp], vp)
                a3 = vfma(a3, p[pj + 3 * kp], vp)
                a4 = vfma(a4, p[pj + 4 * kp], vp)
                a5 = vfma(a5, p[pj + 5 * kp], vp)
                a6 = vfma(a6, p[pj + 6 * kp], vp)
                a7 = vfma(a7, p[pj + 7 * kp], vp)
            o = out_addr + np.uintp(4 * (i0 * out_stride + u))
            step = np.uintp(4 * out_stride)
            vstore(o, vscale(a0, inv[i0]))
            vstore(o + step, vscale(a1, inv[i0 + 1]))
            vstore(o + 2 * step, vscale(a2, inv[i0 + 2]))
            vstore(o + 3 * step, vscale(a3, inv[i0 + 3]))
            vstore(o + 4 * step, vscale(a4, inv[i0 + 4]))
            vstore(o + 5 * step, vscale(a5, inv[i0 + 5]))
            vstore(o + 6 * step, vscale(a6, inv[i0 + 6]))
            vstore(o + 7 * step, vscale(a7, inv[i0 + 7]))

    @numba.njit(**JIT)
    def _pv_row(p, i, keys, keys_padded, v_addr, v_stride, inv, out_addr, out_stride, head_dim):
        """The same for one query row (the rows past the last group of 8)."""
        for u in range(0, head_dim, 16):
            a = vzero()
            for j in range(keys):
                a = vfma(a, p[i * keys_padded + j], v_addr + np.uintp(4 * (j * v_stride + u)))
            vstore(out_addr + np.uintp(4 * (i * out_stride + u)), vscale(a, inv[i]))

    @numba.njit(**JIT)
    def _pack_heads(q, k, v, h0, hn, head_dim, kt, qp, vp, keys_padded, zero16):
        """Copy heads h0 .. h0+hn-1 of one batch row out of the (seq, heads * head dim) projections,
        rows read front to back (one head's 128-byte slices, 1.5 KB apart, starve the hardware
        prefetcher: 2.5x slower): K^T as (head dim, keys_padded) per head by 16x16 transposes,
        Q and V row-major per head."""
        queries = q.shape[0]
        keys = k.shape[0]
        keys16 = keys - keys % 16
        for j0 in range(0, keys16, 16):
            for hh in range(hn):
                for d0 in range(0, head_dim, 16):
                    src = k.ctypes.data + np.uintp(j0 * k.strides[0] + 4 * ((h0 + hh) * head_dim + d0))
                    dst = kt.ctypes.data + np.uintp(4 * ((hh * head_dim + d0) * keys_padded + j0))
                    transpose16(src, k.strides[0] // 4, dst, keys_padded, zero16.ctypes.data, 0)
        for hh in range(hn):
            for d in range(head_dim):
                row = (hh * head_dim + d) * keys_padded
                for j in range(keys16, keys):
                    kt[row + j] = k[j, (h0 + hh) * head_dim + d]
                for j in range(keys, keys_padded):
                    kt[row + j] = 0.0
        for j in range(keys):
            for hh in range(hn):
                for d in range(0, head_dim, 16):
                    vec = vload(v.ctypes.data + np.uintp(j * v.strides[0] + 4 * ((h0 + hh) * head_dim + d)))
                    vstore(vp.ctypes.data + np.uintp(4 * ((hh * keys + j) * head_dim + d)), vec)
        for i in range(queries):
            for hh in range(hn):
                for d in range(0, head_dim, 16):
                    vec = vload(q.ctypes.data + np.uintp(i * q.strides[0] + 4 * ((h0 + hh) * head_dim + d)))
                    vstore(qp.ctypes.data + np.uintp(4 * ((hh * queries + i) * head_dim + d)), vec)

    @numba.njit(**JIT)
    def attend_item(q, k, v, mask, out, b, h0, hn, heads, scale, kt, qp, vp, p, inv, zero16):
        """Heads h0 .. h0+hn-1 of batch row b: q (Sq, H * D), k and v (Sk, H * D) are that row's
        projections, mask (Bm, Hm, Sqm, Skp) additive (Bm, Hm, Sqm each 1 or full; keys padded to Skp
        with `_MASKED`), out (B, Sq, H * D)."""
        queries, width = q.shape
        keys = k.shape[0]
        head_dim = width // heads
        keys_padded = mask.shape[3]
        full = queries - queries % _GROUP
        _pack_heads(q, k, v, h0, hn, head_dim, kt, qp, vp, keys_padded, zero16)
        p_addr = p.ctypes.data
        mb = min(b, mask.shape[0] - 1)
        for hh in range(hn):
            h = h0 + hh
            kt_addr = kt.ctypes.data + np.uintp(4 * hh * head_dim * keys_padded)
            mh = min(h, mask.shape[1] - 1)
            for i in range(0, queries, 2):
                j = min(i + 1, queries - 1)  # an odd last row is done twice
                s_a = p_addr + np.uintp(4 * i * keys_padded)
                s_b = p_addr + np.uintp(4 * j * keys_padded)
                row_a = (mb * mask.shape[1] + mh) * mask.shape[2] + min(i, mask.shape[2] - 1)
                row_b = (mb * mask.shape[1] + mh) * mask.shape[2] + min(j, mask.shape[2] - 1)
                top_a, top_b = _scores(qp, (hh * queries + i) * head_dim, (hh * queries + j) * head_dim, kt_addr,
                                       keys_padded, head_dim, scale,
                                       mask.ctypes.data + np.uintp(4 * row_a * keys_padded),
                                       mask.ctypes.data + np.uintp(4 * row_b * keys_padded), s_a, s_b)
                inv[i] = _softmax_row(s_a, top_a, keys_padded)
                if j != i:
                    inv[j] = _softmax_row(s_b, top_b, keys_padded)
            v_addr = vp.ctypes.data + np.uintp(4 * hh * keys * head_dim)
            out_addr = out.ctypes.data + np.uintp(4 * (b * queries * width + h * head_dim))
            for i0 in range(0, full, _GROUP):
                _pv_group(p, i0, keys, keys_padded, v_addr, head_dim, inv, out_addr, width, head_dim)
            for i in range(full, queries):
                _pv_row(p, i, keys, keys_padded, v_addr, head_dim, inv, out_addr, width, head_dim)

    @numba.njit(parallel=True, **JIT)
    def _attention(q, k, v, mask, out, heads, group, scale, kt_all, qp_all, vp_all, p_all, inv_all, zero16):
        """q (B, Sq, H * D), k and v (B, Sk, H * D): a work item is one batch row and `group` heads."""
        groups = -(-heads // group)
        for item in prange(q.shape[0] * groups):
            b = item // groups
            h0 = (item - b * groups) * group
            t = numba.get_thread_id()
            attend_item(q[b], k[b], v[b], mask, out, b, h0, min(group, heads - h0), heads, scale, kt_all[t],
                         qp_all[t], vp_all[t], p_all[t], inv_all[t], zero16)


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """"" when `attend` can run these (batch, heads, seq, head dim) tensors, else why not."""
    if not cpu.available()[0]:
        return cpu.available()[1]
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in (query, key, value)):
        return "needs float32 CPU tensors"
    if query.dim() != 4 or key.shape != value.shape or query.shape[:2] != key.shape[:2] or query.shape[3] != key.shape[3]:
        return f"needs (batch, heads, seq, head dim) q/k/v with equal heads, got {tuple(query.shape)}, {tuple(key.shape)}"
    if query.shape[3] % 16:
        return f"head dim {query.shape[3]} is not a multiple of 16"
    if query.requires_grad and torch.is_grad_enabled():
        return "inference only (no autograd)"
    return ""


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H * D) with unit stride along H * D: a view of the projection's
    output (rows may be spaced wider, as in a fused q/k/v output), else a copy."""
    b, h, s, d = t.shape
    t = t.transpose(1, 2)
    if t.stride(3) != 1 or t.stride(2) != d:
        t = t.contiguous()
    return t.reshape(b, s, h * d)


def _padded_mask(mask: torch.Tensor | None, keys: int, keys_padded: int) -> torch.Tensor:
    """An additive float mask of shape (Bm, Hm, Sqm, keys_padded), padding keys masked."""
    if mask is None:
        out = torch.zeros(1, 1, 1, keys_padded)
        out[..., keys:] = _MASKED
        return out
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[2] > 1 and mask.stride(2) == 0:  # a key-padding mask expanded over queries: one row will do
        mask = mask[:, :, :1]
    if mask.dtype == torch.bool:
        mask = torch.where(mask, 0.0, _MASKED)
    out = torch.full((*mask.shape[:3], keys_padded), _MASKED)
    out[..., :keys] = mask.to(torch.float32).clamp(min=_MASKED)
    return out


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None = None,
           scale: float | None = None) -> torch.Tensor:
    """softmax(query key^T * scale + mask) value for (batch, heads, seq, head dim) tensors,
    returned as (batch, seq, heads, head dim). ``mask``: boolean (True = attend) or additive,
    broadcastable to (batch, heads, queries, keys)."""
    reason = supported(query, key, value)
    if reason:
        raise ValueError(f"kernel attention: {reason}")
    batch, heads, queries, head_dim = query.shape
    keys = key.shape[2]
    scale = head_dim ** -0.5 if scale is None else float(scale)
    mask4 = mask_for(mask, batch, heads, queries, keys)
    q, k, v = (_heads_last(t.detach()) for t in (query, key, value))
    out = torch.empty(batch, queries, heads * head_dim)
    # a work item is a batch row and a group of heads: whole rows read once, >= 2 items per thread
    threads = numba.get_num_threads()
    group = max(1, heads // max(1, -(-2 * threads // max(batch, 1))))
    if out.numel():
        _attention(q.numpy(), k.numpy(), v.numpy(), mask4.numpy(), out.numpy(), heads, group, np.float32(scale),
                   *attention_scratch(group, head_dim, queries, keys, mask4.shape[3]), ZERO16)
    return out.view(batch, queries, heads, head_dim)


def mask_for(mask: torch.Tensor | None, batch: int, heads: int, queries: int, keys: int) -> torch.Tensor:
    """`_padded_mask`, checked to broadcast to (batch, heads, queries, keys)."""
    mask4 = _padded_mask(mask, keys, -(-keys // _KEYS) * _KEYS)
    if mask4.shape[0] not in (1, batch) or mask4.shape[1] not in (1, heads) or mask4.shape[2] not in (1, queries):
        raise ValueError(f"kernel attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"({batch}, {heads}, {queries}, {keys})")
    return mask4


def attention_scratch(group: int, head_dim: int, queries: int, keys: int, keys_padded: int) -> list[np.ndarray]:
    """Per-thread K^T, Q, V, score and 1/row-sum buffers for items of `group` heads."""
    return [thread_slots("kt", group * head_dim * keys_padded), thread_slots("q", group * queries * head_dim),
            thread_slots("v", group * keys * head_dim), thread_slots("p", queries * keys_padded),
            thread_slots("inv", queries)]


def _hf_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
                  is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: `attend` where it applies, else torch's SDPA path."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    causal = (is_causal if is_causal is not None else getattr(module, "is_causal", False)) and attention_mask is None
    if dropout or causal or kwargs.get("output_attentions") or kwargs.get("softcap") is not None \
            or supported(query, key, value):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return attend(query, key, value, attention_mask, scaling), None


def use_kernel_attention(model: torch.nn.Module) -> bool:
    """Run a transformers model's attention with `attend` (registered as ``"spdy_kernel"``); calls
    it cannot take (dropout, causal without a mask, grouped KV heads, head dims not a multiple of 16,
    other dtypes) go to torch's SDPA. True when some submodel took it."""
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    if not cpu.available()[0]:
        return False
    AttentionInterface.register(NAME, _hf_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    applied = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module._can_set_attn_implementation():
            module.set_attn_implementation(NAME)
            applied = True
    return applied
