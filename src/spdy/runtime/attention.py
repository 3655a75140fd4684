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
function; `use_kernel_attention` registers it for a transformers model. `project_attend` also
computes q/k/v inside each work item from kernel-format weights (`ProjectedSelfAttention`), and
`_attend_item` is the per-item body the whole-layer kernel (`encoder_layer`) calls too.
"""

from __future__ import annotations

import numpy as np
import torch

from spdy.runtime import kernels

_KEYS = 128  # keys per score chunk: 8 vectors of 16
_GROUP = 8  # queries per P V pass
_MASKED = -1e30  # fastmath assumes no infinities: a large negative stands for -inf
NAME = "spdy_kernel"  # the attention implementation name registered with transformers

if kernels.numba is not None:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    from spdy.runtime.kernels import (_CHUNK, _JIT, _LANES, _VEC, _broadcast, _f32x16, _fn, _hmax, _hsum, _pack_tile,
                                      _row_chunk, _transpose16, _vadd, _vfma, _vload, _vstore, _vzero)

    def _splat(value):
        return ir.Constant(_VEC, [value] * 16)

    @intrinsic
    def _vmax(typingctx, a, b):
        def codegen(context, builder, sig, args):
            return builder.call(_fn(builder, "llvm.maxnum.v16f32", 2), list(args))

        return _f32x16(_f32x16, _f32x16), codegen

    @intrinsic
    def _vscale(typingctx, a, s):
        """a * s for a scalar s."""
        def codegen(context, builder, sig, args):
            return builder.fmul(args[0], _broadcast(builder, args[1]))

        return _f32x16(_f32x16, types.float32), codegen

    # 2^f on |f| <= 1/2: Taylor coefficients of exp(f ln 2) to degree 7 (truncation error 5e-9).
    _EXP2 = tuple(0.6931471805599453 ** k / float(np.prod(np.arange(1, k + 1))) for k in range(8))

    @intrinsic
    def _vexp_sub(typingctx, a, m):
        """exp(a - m) for a scalar m >= every lane of a (so the result is in (0, 1])."""
        def codegen(context, builder, sig, args):
            x = builder.call(_fn(builder, "llvm.maxnum.v16f32", 2),
                             [builder.fsub(args[0], _broadcast(builder, args[1])), _splat(-87.0)])
            t = builder.fmul(x, _splat(1.4426950408889634))
            n = builder.call(_fn(builder, "llvm.rint.v16f32", 1), [t])
            f = builder.fsub(t, n)
            fma = _fn(builder, "llvm.fma.v16f32", 3)
            p = _splat(_EXP2[-1])
            for c in _EXP2[-2::-1]:
                p = builder.call(fma, [p, f, _splat(c)])
            i32x16 = ir.VectorType(ir.IntType(32), 16)
            bits = builder.shl(builder.add(builder.fptosi(n, i32x16), ir.Constant(i32x16, [127] * 16)),
                               ir.Constant(i32x16, [23] * 16))
            return builder.fmul(p, builder.bitcast(bits, _VEC))

        return _f32x16(_f32x16, types.float32), codegen

    @numba.njit(**_JIT)
    def _store_chunk(s, v0, v1, v2, v3, v4, v5, v6, v7):
        """Store 128 scores (8 vectors) at address s; returns their lane-wise max."""
        _vstore(s, v0)
        _vstore(s + np.uintp(64), v1)
        _vstore(s + np.uintp(128), v2)
        _vstore(s + np.uintp(192), v3)
        _vstore(s + np.uintp(256), v4)
        _vstore(s + np.uintp(320), v5)
        _vstore(s + np.uintp(384), v6)
        _vstore(s + np.uintp(448), v7)
        return _vmax(_vmax(_vmax(v0, v1), _vmax(v2, v3)), _vmax(_vmax(v4, v5), _vmax(v6, v7)))

    @numba.njit(**_JIT)
    def _scores(q, qa, qb, kt_addr, keys_padded, head_dim, scale, mask_a, mask_b, s_a, s_b):
        """s_x = scale * q[qx:qx+head_dim] . K^T + mask_x for two query rows x = a, b (the same row
        twice for an odd last one), 128 keys at a time: each K^T load feeds two FMAs (16 chains).
        Returns the two rows' maxima."""
        qa = np.uintp(qa)
        qb = np.uintp(qb)
        top_a = _vload(mask_a)  # replaced by the first chunk's max
        top_b = top_a
        for c in range(0, keys_padded, _KEYS):
            a0 = _vload(mask_a + np.uintp(4 * c + 0))
            a1 = _vload(mask_a + np.uintp(4 * c + 64))
            a2 = _vload(mask_a + np.uintp(4 * c + 128))
            a3 = _vload(mask_a + np.uintp(4 * c + 192))
            a4 = _vload(mask_a + np.uintp(4 * c + 256))
            a5 = _vload(mask_a + np.uintp(4 * c + 320))
            a6 = _vload(mask_a + np.uintp(4 * c + 384))
            a7 = _vload(mask_a + np.uintp(4 * c + 448))
            b0 = _vload(mask_b + np.uintp(4 * c + 0))
            b1 = _vload(mask_b + np.uintp(4 * c + 64))
            b2 = _vload(mask_b + np.uintp(4 * c + 128))
            b3 = _vload(mask_b + np.uintp(4 * c + 192))
            b4 = _vload(mask_b + np.uintp(4 * c + 256))
            b5 = _vload(mask_b + np.uintp(4 * c + 320))
            b6 = _vload(mask_b + np.uintp(4 * c + 384))
            b7 = _vload(mask_b + np.uintp(4 * c + 448))
            for d in range(head_dim):
                wa = q[qa + np.uintp(d)] * scale
                wb = q[qb + np.uintp(d)] * scale
                p = kt_addr + np.uintp(4 * (d * keys_padded + c))
                a0 = _vfma(a0, wa, p)
                b0 = _vfma(b0, wb, p)
                a1 = _vfma(a1, wa, p + np.uintp(64))
                b1 = _vfma(b1, wb, p + np.uintp(64))
                a2 = _vfma(a2, wa, p + np.uintp(128))
                b2 = _vfma(b2, wb, p + np.uintp(128))
                a3 = _vfma(a3, wa, p + np.uintp(192))
                b3 = _vfma(b3, wb, p + np.uintp(192))
                a4 = _vfma(a4, wa, p + np.uintp(256))
                b4 = _vfma(b4, wb, p + np.uintp(256))
                a5 = _vfma(a5, wa, p + np.uintp(320))
                b5 = _vfma(b5, wb, p + np.uintp(320))
                a6 = _vfma(a6, wa, p + np.uintp(384))
                b6 = _vfma(b6, wb, p + np.uintp(384))
                a7 = _vfma(a7, wa, p + np.uintp(448))
                b7 = _vfma(b7, wb, p + np.uintp(448))
            chunk = _store_chunk(s_a + np.uintp(4 * c), a0, a1, a2, a3, a4, a5, a6, a7)
            top_a = chunk if c == 0 else _vmax(top_a, chunk)
            chunk = _store_chunk(s_b + np.uintp(4 * c), b0, b1, b2, b3, b4, b5, b6, b7)
            top_b = chunk if c == 0 else _vmax(top_b, chunk)
        return _hmax(top_a), _hmax(top_b)

    @numba.njit(**_JIT)
    def _softmax_row(s_addr, top, keys_padded):
        """s = exp(s - top) in place (top = max s); returns 1 / sum. Four vectors per step: one exp's
        polynomial is a chain of dependent FMAs, four interleave (0.80 -> 0.53 ms per MiniLM layer, 1 thread)."""
        t0 = _vzero()
        t1 = _vzero()
        t2 = _vzero()
        t3 = _vzero()
        for c in range(0, keys_padded, 64):
            a = s_addr + np.uintp(4 * c)
            e0 = _vexp_sub(_vload(a), top)
            e1 = _vexp_sub(_vload(a + np.uintp(64)), top)
            e2 = _vexp_sub(_vload(a + np.uintp(128)), top)
            e3 = _vexp_sub(_vload(a + np.uintp(192)), top)
            _vstore(a, e0)
            _vstore(a + np.uintp(64), e1)
            _vstore(a + np.uintp(128), e2)
            _vstore(a + np.uintp(192), e3)
            t0 = _vadd(t0, e0)
            t1 = _vadd(t1, e1)
            t2 = _vadd(t2, e2)
            t3 = _vadd(t3, e3)
        return 1.0 / _hsum(_vadd(_vadd(t0, t1), _vadd(t2, t3)))

    @numba.njit(**_JIT)
    def _pv_group(p, i0, keys, keys_padded, v_addr, v_stride, inv, out_addr, out_stride, head_dim):
        """out[i0 + r] = inv[r] * sum_j p[i0 + r, j] V[j] for 8 query rows r, 16 head dims at a time."""
        for u in range(0, head_dim, 16):
            a0 = _vzero()
            a1 = _vzero()
            a2 = _vzero()
            a3 = _vzero()
            a4 = _vzero()
            a5 = _vzero()
            a6 = _vzero()
            a7 = _vzero()
            r0 = np.uintp(i0 * keys_padded)
            kp = np.uintp(keys_padded)
            for j in range(keys):
                vp = v_addr + np.uintp(4 * (j * v_stride + u))
                pj = r0 + np.uintp(j)  # unsigned: no negative-index wraparound code per load
                a0 = _vfma(a0, p[pj], vp)
                a1 = _vfma(a1, p[pj + kp], vp)
                a2 = _vfma(a2, p[pj + 2 * kp], vp)
                a3 = _vfma(a3, p[pj + 3 * kp], vp)
                a4 = _vfma(a4, p[pj + 4 * kp], vp)
                a5 = _vfma(a5, p[pj + 5 * kp], vp)
                a6 = _vfma(a6, p[pj + 6 * kp], vp)
                a7 = _vfma(a7, p[pj + 7 * kp], vp)
            o = out_addr + np.uintp(4 * (i0 * out_stride + u))
            step = np.uintp(4 * out_stride)
            _vstore(o, _vscale(a0, inv[i0]))
            _vstore(o + step, _vscale(a1, inv[i0 + 1]))
            _vstore(o + 2 * step, _vscale(a2, inv[i0 + 2]))
            _vstore(o + 3 * step, _vscale(a3, inv[i0 + 3]))
            _vstore(o + 4 * step, _vscale(a4, inv[i0 + 4]))
            _vstore(o + 5 * step, _vscale(a5, inv[i0 + 5]))
            _vstore(o + 6 * step, _vscale(a6, inv[i0 + 6]))
            _vstore(o + 7 * step, _vscale(a7, inv[i0 + 7]))

    @numba.njit(**_JIT)
    def _pv_row(p, i, keys, keys_padded, v_addr, v_stride, inv, out_addr, out_stride, head_dim):
        """The same for one query row (the rows past the last group of 8)."""
        for u in range(0, head_dim, 16):
            a = _vzero()
            for j in range(keys):
                a = _vfma(a, p[i * keys_padded + j], v_addr + np.uintp(4 * (j * v_stride + u)))
            _vstore(out_addr + np.uintp(4 * (i * out_stride + u)), _vscale(a, inv[i]))

    @numba.njit(**_JIT)
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
                    _transpose16(src, k.strides[0] // 4, dst, keys_padded, zero16.ctypes.data, 0)
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
                    vec = _vload(v.ctypes.data + np.uintp(j * v.strides[0] + 4 * ((h0 + hh) * head_dim + d)))
                    _vstore(vp.ctypes.data + np.uintp(4 * ((hh * keys + j) * head_dim + d)), vec)
        for i in range(queries):
            for hh in range(hn):
                for d in range(0, head_dim, 16):
                    vec = _vload(q.ctypes.data + np.uintp(i * q.strides[0] + 4 * ((h0 + hh) * head_dim + d)))
                    _vstore(qp.ctypes.data + np.uintp(4 * ((hh * queries + i) * head_dim + d)), vec)

    @numba.njit(**_JIT)
    def _attend_item(q, k, v, mask, out, b, h0, hn, heads, scale, kt, qp, vp, p, inv, zero16):
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

    @numba.njit(parallel=True, **_JIT)
    def _attention(q, k, v, mask, out, heads, group, scale, kt_all, qp_all, vp_all, p_all, inv_all, zero16):
        """q (B, Sq, H * D), k and v (B, Sk, H * D): a work item is one batch row and `group` heads."""
        groups = -(-heads // group)
        for item in prange(q.shape[0] * groups):
            b = item // groups
            h0 = (item - b * groups) * group
            t = numba.get_thread_id()
            _attend_item(q[b], k[b], v[b], mask, out, b, h0, min(group, heads - h0), heads, scale, kt_all[t],
                         qp_all[t], vp_all[t], p_all[t], inv_all[t], zero16)

    @numba.njit(parallel=True, **_JIT)
    def _project_attend(x, seq, wq, wk, wv, mask, out, heads, group, scale, xp_all, yq_all, yk_all, yv_all, kt_all,
                        qp_all, vp_all, p_all, inv_all, zero16):
        """`_attention` on q/k/v projected inside each work item: x (B * seq, hidden); wq, wk, wv are
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
            for n0 in range(0, seq, 4 * _LANES):
                _pack_tile(xb, n0, xp, zero16)
                for o0 in range(h0 * head_dim, (h0 + hn) * head_dim, _CHUNK):
                    _row_chunk(xp, wq[0], wq[1], wq[2], wq[3], yq, n0, o0, 4, 0)
                    _row_chunk(xp, wk[0], wk[1], wk[2], wk[3], yk, n0, o0, 4, 0)
                    _row_chunk(xp, wv[0], wv[1], wv[2], wv[3], yv, n0, o0, 4, 0)
            _attend_item(yq, yk, yv, mask, out, b, h0, hn, heads, scale, kt_all[t], qp_all[t], vp_all[t], p_all[t],
                         inv_all[t], zero16)


def _scratch(name: str, *shape: int) -> np.ndarray:
    """A `kernels._buffer` of (numba threads, *shape): one slot per thread, each starting on a
    cache line (a 1-D slot is rounded up to 16 floats)."""
    if len(shape) == 1:
        shape = (-(-shape[0] // 16) * 16,)
    return kernels._buffer(name, numba.config.NUMBA_NUM_THREADS, *shape)


def supported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """"" when `attend` can run these (batch, heads, seq, head dim) tensors, else why not."""
    if not kernels.available()[0]:
        return kernels.available()[1]
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
    mask4 = _mask_for(mask, batch, heads, queries, keys)
    q, k, v = (_heads_last(t.detach()) for t in (query, key, value))
    out = torch.empty(batch, queries, heads * head_dim)
    # a work item is a batch row and a group of heads: whole rows read once, >= 2 items per thread
    threads = numba.get_num_threads()
    group = max(1, heads // max(1, -(-2 * threads // max(batch, 1))))
    if out.numel():
        _attention(q.numpy(), k.numpy(), v.numpy(), mask4.numpy(), out.numpy(), heads, group, np.float32(scale),
                   *_attention_scratch(group, head_dim, queries, keys, mask4.shape[3]), kernels._ZERO16)
    return out.view(batch, queries, heads, head_dim)


def _mask_for(mask: torch.Tensor | None, batch: int, heads: int, queries: int, keys: int) -> torch.Tensor:
    """`_padded_mask`, checked to broadcast to (batch, heads, queries, keys)."""
    mask4 = _padded_mask(mask, keys, -(-keys // _KEYS) * _KEYS)
    if mask4.shape[0] not in (1, batch) or mask4.shape[1] not in (1, heads) or mask4.shape[2] not in (1, queries):
        raise ValueError(f"kernel attention: mask of shape {tuple(mask.shape)} does not broadcast to "
                         f"({batch}, {heads}, {queries}, {keys})")
    return mask4


def _attention_scratch(group: int, head_dim: int, queries: int, keys: int, keys_padded: int) -> list[np.ndarray]:
    """Per-thread K^T, Q, V, score and 1/row-sum buffers for items of `group` heads."""
    return [_scratch("kt", group * head_dim * keys_padded), _scratch("q", group * queries * head_dim),
            _scratch("v", group * keys * head_dim), _scratch("p", queries * keys_padded), _scratch("inv", queries)]


def project_attend(hidden: torch.Tensor, query: kernels.SparseKernelWeight, key: kernels.SparseKernelWeight,
                   value: kernels.SparseKernelWeight, heads: int, mask: torch.Tensor | None = None,
                   scale: float | None = None) -> torch.Tensor:
    """Self-attention of `hidden` (batch, seq, in) with its q/k/v projections: `attend` on
    ``hidden @ W^T + b`` for the three weights, returned as (batch, seq, heads * head dim).

    One work item is a batch row and the heads of one kernel row chunk: it projects its tokens
    and attends right away, the projections never leaving its L2 (a BERT attention block at
    MiniLM shapes, 90% sparse: 1.28x over three `matmul` calls and `attend` at 1 thread, 1.38x at 2).
    """
    if not kernels.available()[0]:
        raise RuntimeError(kernels.available()[1])
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
    mask4 = _mask_for(mask, batch, heads, seq, seq)
    # heads per item: one kernel row chunk of them when they tile it, else all
    group = kernels._CHUNK // head_dim if kernels._CHUNK % head_dim == 0 else heads
    x = hidden.detach().reshape(batch * seq, -1).contiguous()
    out = torch.empty(batch, seq, width)
    if out.numel():
        tile = 4 * kernels._LANES
        _project_attend(x.numpy(), seq, query.arrays, key.arrays, value.arrays, mask4.numpy(), out.numpy(), heads, min(group, heads), np.float32(scale),
                        _scratch("x", x.shape[1], tile), *(_scratch(name, seq, width) for name in ("yq", "yk", "yv")),
                        *_attention_scratch(min(group, heads), head_dim, seq, seq, mask4.shape[3]), kernels._ZERO16)
    return out


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
    if not kernels.available()[0]:
        return False
    AttentionInterface.register(NAME, _hf_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    applied = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module._can_set_attn_implementation():
            module.set_attn_implementation(NAME)
            applied = True
    return applied
