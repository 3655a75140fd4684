"""Own CPU kernel for Y = X @ W^T + b with an unstructured-sparse W.

torch's CSR matmul only beats dense at ~95% sparsity; this kernel is meant to win
from ~70-80%. Layout (chosen by measurement on AVX-512 machines):

* W is CSR over output rows, split into blocks of input columns (built once,
  ``SparseKernelWeight.from_dense``).
* X is packed per call into tiles of ``16 * V`` rows stored transposed, (in, 16 * V),
  so one weight times one contiguous packed row is ``V`` 512-bit FMAs into
  accumulators that stay in registers; alternate weights of a row go to two sets of
  accumulators, so 8 FMA chains hide the load and FMA latencies (1.0-1.2x over one set).
  Each (row, block) slice is padded to an even length with a zero weight, so the loop has
  no odd-remainder branch to mispredict (1.0-1.4x).
* Each thread packs one X tile at a time into its own L2-resident slot and runs every
  output row on it (no packed copy of all of X goes through memory).
* A work item is one X tile times a chunk of 192 output rows, walked block by block:
  the block's slice of the tile stays in L1 while all the chunk's rows use it (unblocked, each
  weight's X row came from L2, which bounded the kernel at 70% sparsity); the rows'
  accumulators wait in a stack buffer between blocks.
* Finished rows are written to Y (N, out) with 16x16 shuffle transposes that also add
  the bias, so no scalar epilogue or extra copy.

The vector code (`spdy.runtime.vector`) is written with explicit ``<16 x float>`` LLVM
intrinsics; `spdy.runtime.cpu` probes the host and `spdy.runtime.buffers` keeps the packed
tiles' per-thread buffers.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from spdy.runtime import cpu
from spdy.runtime.buffers import buffer
from spdy.runtime.gemv import SmallRowWeight

if cpu.numba is not None:
    import numba
    from numba import prange

    from spdy.runtime.vector import (JIT, LANES, hsum, stack_f32, transpose16, vact, vadd, vaxpb, vfma, vfmav, vload,
                                     vstore, vzero)

__all__ = ["ACTIVATIONS", "SparseKernelWeight", "feed_forward", "warmup"]

_ROWS = 16  # output rows per 16x16 transpose
CHUNK = 192  # output rows per work item: 128-256 measured 1.1-1.4x faster than 64, 192 best (1 thread)
_NNZ_PER_BLOCK = 19.2  # target weights per (output row, input block)
ACTIVATIONS = (None, "gelu")
_SMALL_N = 16  # up to this many rows a 1-vector tile wastes less than a 4-vector one
SMALL_ROWS = 8  # up to this many rows `matmul` runs the small-row kernels of `spdy.runtime.gemv` (measured, issue 22)

if cpu.numba is not None:
    _CHUNK_FLOATS = CHUNK * 4 * LANES
    ZERO16 = np.zeros(LANES, dtype=np.float32)  # the zero bias `pack_tile`'s transposes add

    @numba.njit(**JIT)
    def pack_tile(x, n0, xp, zero16):
        """xp[k, t] = x[n0 + t, k] for one tile, zero-padded past the last row of x."""
        n, k_dim = x.shape
        tile = xp.shape[1]
        nv = min(tile, n - n0)
        t16 = nv - nv % LANES
        k16 = k_dim - k_dim % LANES
        x_addr = x.ctypes.data
        xp_addr = xp.ctypes.data
        for t0 in range(0, t16, LANES):
            for k0 in range(0, k16, LANES):
                src = x_addr + np.uintp(((n0 + t0) * k_dim + k0) * 4)
                dst = xp_addr + np.uintp((k0 * tile + t0) * 4)
                transpose16(src, k_dim, dst, tile, zero16.ctypes.data, 0)
        for k in range(k16, k_dim):
            for t in range(t16):
                xp[k, t] = x[n0 + t, k]
        for k in range(k_dim):
            for t in range(t16, nv):
                xp[k, t] = x[n0 + t, k]
            for t in range(nv, tile):
                xp[k, t] = 0.0

    @numba.njit(**JIT)
    def _store_rows(buf, tile, nr, bias, y, n0, o0, act):
        """Y[n0:n0+tile, o0:o0+nr] = f(buf[r, t] + bias) (buf rows of `tile` floats; f: identity,
        or GELU for act 1), 16x16 blocks by shuffle transpose, the ragged rest by scalars."""
        numba.literally(act)
        n, m = y.shape
        nv = min(tile, n - n0)
        t16 = nv - nv % LANES
        r16 = nr - nr % _ROWS
        buf_addr = buf.ctypes.data
        y_addr = y.ctypes.data
        for r0 in range(0, r16, _ROWS):
            bias_addr = bias.ctypes.data + np.uintp((o0 + r0) * 4)
            for t0 in range(0, t16, LANES):
                dst = y_addr + np.uintp(((n0 + t0) * m + o0 + r0) * 4)
                transpose16(buf_addr + np.uintp((r0 * tile + t0) * 4), tile, dst, m, bias_addr, act)
        for t in range(n0, n0 + nv):
            for r in range(0 if t - n0 >= t16 else r16, nr):
                value = buf[r * tile + t - n0] + bias[o0 + r]
                if act == 1:
                    value = 0.5 * value * (1.0 + math.erf(value * 0.7071067811865476))
                y[t, o0 + r] = value

    @numba.njit(**JIT)
    def _store_packed(buf, tile, nr, bias, xq, o0, act):
        """xq[o0 + r, :] = f(buf[r, :] + bias[o0 + r]): the output rows are already the next layer's
        packed (in, tile) layout, so no transpose and no trip through memory."""
        numba.literally(act)
        buf_addr = buf.ctypes.data
        xq_addr = xq.ctypes.data
        for r in range(nr):
            b = bias[o0 + r]
            for t0 in range(0, tile, LANES):
                vec = vload(buf_addr + np.uintp((r * tile + t0) * 4))
                vstore(xq_addr + np.uintp(((o0 + r) * tile + t0) * 4), vact(vec, b, act))

    @numba.njit(**JIT)
    def row_chunk(xp, bptr, indices, data, bias, y, n0, o0, v, act, packed=False):
        """Y[n0:n0+tile, o0:o0+CHUNK] from one packed X tile; v vectors (16 rows each) per tile.
        With `packed`, y is instead the next layer's packed tile (out, tile), written row by row.

        The input dimension is walked in blocks (one CSR slice per block, see `bptr`) so the
        slice of the X tile being read stays in L1 while every row of the chunk uses it; the
        chunk's accumulators live in a stack buffer between blocks.
        """
        numba.literally(v)
        numba.literally(act)
        m = bias.shape[0]
        blocks = (bptr.shape[0] - 1) // m
        tile = LANES * v
        row_bytes = np.uintp(tile * 4)
        xp_addr = xp.ctypes.data
        buf = numba.carray(stack_f32(_CHUNK_FLOATS), (_CHUNK_FLOATS,))
        buf_addr = buf.ctypes.data
        nr = min(CHUNK, m - o0)
        for kb in range(blocks):
            for r in range(nr):
                i = kb * m + o0 + r
                start, end = bptr[i], bptr[i + 1]
                q = buf_addr + np.uintp(r) * row_bytes
                if kb == 0:
                    a0 = vzero()
                    a1 = vzero()
                    a2 = vzero()
                    a3 = vzero()
                elif start == end:
                    continue
                else:
                    a0 = vload(q)
                    a1 = vload(q + np.uintp(64)) if v >= 2 else vzero()
                    a2 = vload(q + np.uintp(128)) if v >= 4 else vzero()
                    a3 = vload(q + np.uintp(192)) if v >= 4 else vzero()
                b0 = vzero()
                b1 = vzero()
                b2 = vzero()
                b3 = vzero()
                j = start
                while j < end:
                    p = xp_addr + np.uintp(indices[j]) * row_bytes
                    w = data[j]
                    p2 = xp_addr + np.uintp(indices[j + np.uint64(1)]) * row_bytes
                    w2 = data[j + np.uint64(1)]
                    a0 = vfma(a0, w, p)
                    b0 = vfma(b0, w2, p2)
                    if v >= 2:
                        a1 = vfma(a1, w, p + np.uintp(64))
                        b1 = vfma(b1, w2, p2 + np.uintp(64))
                    if v >= 4:
                        a2 = vfma(a2, w, p + np.uintp(128))
                        b2 = vfma(b2, w2, p2 + np.uintp(128))
                        a3 = vfma(a3, w, p + np.uintp(192))
                        b3 = vfma(b3, w2, p2 + np.uintp(192))
                    j += np.uint64(2)
                a0 = vadd(a0, b0)
                a1 = vadd(a1, b1)
                a2 = vadd(a2, b2)
                a3 = vadd(a3, b3)
                vstore(q, a0)
                if v >= 2:
                    vstore(q + np.uintp(64), a1)
                if v >= 4:
                    vstore(q + np.uintp(128), a2)
                    vstore(q + np.uintp(192), a3)
        if packed:
            _store_packed(buf, tile, nr, bias, y, o0, act)
        else:
            _store_rows(buf, tile, nr, bias, y, n0, o0, act)

    @numba.njit(**JIT)
    def _add_sum(y_addr, r_addr, m16):
        """y += r over m16 floats (a multiple of 16); returns sum(y). Four accumulators: one add
        chain per row made the LayerNorm latency-bound."""
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        m64 = m16 - m16 % 64
        for j in range(0, m64, 64):
            p = np.uintp(4 * j)
            z0 = vadd(vload(y_addr + p), vload(r_addr + p))
            z1 = vadd(vload(y_addr + p + np.uintp(64)), vload(r_addr + p + np.uintp(64)))
            z2 = vadd(vload(y_addr + p + np.uintp(128)), vload(r_addr + p + np.uintp(128)))
            z3 = vadd(vload(y_addr + p + np.uintp(192)), vload(r_addr + p + np.uintp(192)))
            vstore(y_addr + p, z0)
            vstore(y_addr + p + np.uintp(64), z1)
            vstore(y_addr + p + np.uintp(128), z2)
            vstore(y_addr + p + np.uintp(192), z3)
            a0 = vadd(a0, z0)
            a1 = vadd(a1, z1)
            a2 = vadd(a2, z2)
            a3 = vadd(a3, z3)
        for j in range(m64, m16, LANES):
            z0 = vadd(vload(y_addr + np.uintp(4 * j)), vload(r_addr + np.uintp(4 * j)))
            vstore(y_addr + np.uintp(4 * j), z0)
            a0 = vadd(a0, z0)
        return hsum(vadd(vadd(a0, a1), vadd(a2, a3)))

    @numba.njit(**JIT)
    def _square_sum(y_addr, mean, m16):
        """sum((y - mean)^2) over m16 floats (a multiple of 16), four accumulators."""
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        m64 = m16 - m16 % 64
        one = np.float32(1.0)
        for j in range(0, m64, 64):
            p = y_addr + np.uintp(4 * j)
            d0 = vaxpb(vload(p), one, -mean)
            d1 = vaxpb(vload(p + np.uintp(64)), one, -mean)
            d2 = vaxpb(vload(p + np.uintp(128)), one, -mean)
            d3 = vaxpb(vload(p + np.uintp(192)), one, -mean)
            a0 = vfmav(d0, d0, a0)
            a1 = vfmav(d1, d1, a1)
            a2 = vfmav(d2, d2, a2)
            a3 = vfmav(d3, d3, a3)
        for j in range(m64, m16, LANES):
            d0 = vaxpb(vload(y_addr + np.uintp(4 * j)), one, -mean)
            a0 = vfmav(d0, d0, a0)
        return hsum(vadd(vadd(a0, a1), vadd(a2, a3)))

    @numba.njit(**JIT)
    def residual_norm(y, residual, gamma, beta, eps, n0, n1):
        """y[t] = LayerNorm(y[t] + residual[t]) * gamma + beta for rows n0 .. n1-1, 16 lanes at a time
        while the row is in L1: sum, squared deviations from the mean, then scale."""
        m = y.shape[1]
        m16 = m - m % LANES
        gamma_addr = gamma.ctypes.data
        beta_addr = beta.ctypes.data
        for t in range(n0, n1):
            y_addr = y.ctypes.data + np.uintp(4 * t * m)
            total = _add_sum(y_addr, residual.ctypes.data + np.uintp(4 * t * m), m16)
            for j in range(m16, m):
                z = y[t, j] + residual[t, j]
                y[t, j] = z
                total += z
            mean = np.float32(total / m)
            square = _square_sum(y_addr, mean, m16)
            for j in range(m16, m):
                d = y[t, j] - mean
                square += d * d
            rstd = np.float32(1.0 / math.sqrt(square / m + eps))
            shift = np.float32(-mean * rstd)
            for j in range(0, m16, LANES):
                normed = vaxpb(vload(y_addr + np.uintp(4 * j)), rstd, shift)
                vstore(y_addr + np.uintp(4 * j),
                        vfmav(normed, vload(gamma_addr + np.uintp(4 * j)), vload(beta_addr + np.uintp(4 * j))))
            for j in range(m16, m):
                y[t, j] = (y[t, j] * rstd + shift) * gamma[j] + beta[j]

    @numba.njit(parallel=True, **JIT)
    def _spmm(x, bptr, indices, data, bias, y, xp, zero16, v, per_thread, act, residual, gamma, beta, eps, norm):
        """Y = X W^T + b (then GELU for act 1; then, when `norm`, LayerNorm(Y + residual), each tile's
        rows right after they are written). `per_thread`: each of xp.shape[0] threads packs its X
        tiles one at a time into its own slot and runs every row chunk on it while the tile is in
        L2; else (too few tiles to share evenly) all tiles are packed first and (tile, chunk) items
        shared out."""
        numba.literally(v)
        numba.literally(act)
        n, m = y.shape
        tile = LANES * v
        ntiles = (n + tile - 1) // tile
        chunks = (m + CHUNK - 1) // CHUNK
        if per_thread:
            slots = xp.shape[0]
            for s in prange(slots):
                for it in range(s, ntiles, slots):
                    pack_tile(x, it * tile, xp[s], zero16)
                    for c in range(chunks):
                        row_chunk(xp[s], bptr, indices, data, bias, y, it * tile, c * CHUNK, v, act)
                    if norm:
                        residual_norm(y, residual, gamma, beta, eps, it * tile, min(n, (it + 1) * tile))
        else:
            for it in prange(ntiles):
                pack_tile(x, it * tile, xp[it], zero16)
            for item in prange(ntiles * chunks):
                it = item // chunks
                c = item - it * chunks
                row_chunk(xp[it], bptr, indices, data, bias, y, it * tile, c * CHUNK, v, act)
            if norm:
                for it in prange(ntiles):
                    residual_norm(y, residual, gamma, beta, eps, it * tile, min(n, (it + 1) * tile))

    @numba.njit(**JIT)
    def _spmm_v1(x, bptr, indices, data, bias, y, xp, zero16, per_thread, gelu, residual, gamma, beta, eps, norm):
        if gelu:
            _spmm(x, bptr, indices, data, bias, y, xp, zero16, 1, per_thread, 1, residual, gamma, beta, eps, norm)
        else:
            _spmm(x, bptr, indices, data, bias, y, xp, zero16, 1, per_thread, 0, residual, gamma, beta, eps, norm)

    @numba.njit(**JIT)
    def _spmm_v4(x, bptr, indices, data, bias, y, xp, zero16, per_thread, gelu, residual, gamma, beta, eps, norm):
        if gelu:
            _spmm(x, bptr, indices, data, bias, y, xp, zero16, 4, per_thread, 1, residual, gamma, beta, eps, norm)
        else:
            _spmm(x, bptr, indices, data, bias, y, xp, zero16, 4, per_thread, 0, residual, gamma, beta, eps, norm)

    @numba.njit(parallel=True, **JIT)
    def _ffn(x, up_bptr, up_indices, up_data, up_bias, bptr, indices, data, bias, y, xp, hp, zero16, residual, gamma,
             beta, eps):
        """Y = LayerNorm(GELU(X U^T + c) W^T + b + residual), one 64-row tile of X at a time per thread:
        the up projection's rows land, GELU applied, in the thread's packed tile for the down
        projection (L2), so the wide intermediate is never transposed, stored or packed again."""
        n, m = y.shape
        tile = 4 * LANES
        ntiles = (n + tile - 1) // tile
        slots = xp.shape[0]
        for s in prange(slots):
            for it in range(s, ntiles, slots):
                pack_tile(x, it * tile, xp[s], zero16)
                for c in range((up_bias.shape[0] + CHUNK - 1) // CHUNK):
                    row_chunk(xp[s], up_bptr, up_indices, up_data, up_bias, hp[s], it * tile, c * CHUNK, 4, 1, True)
                for c in range((m + CHUNK - 1) // CHUNK):
                    row_chunk(hp[s], bptr, indices, data, bias, y, it * tile, c * CHUNK, 4, 0)
                residual_norm(y, residual, gamma, beta, eps, it * tile, min(n, (it + 1) * tile))


def block_columns(density: float) -> int:
    """Input columns per block: about 19 weights per (row, block) amortise the accumulator
    reload, and at least 128 (a 32 KiB slice of the X tile, L1-sized). Measured on the MiniLM
    and BERT shapes (AVX-512 Zen 4, 1 thread, 64 to 256 and unblocked): 128 best at 70%,
    192-256 at 90%, 256-unblocked at 95%."""
    return max(128, 64 * round(_NNZ_PER_BLOCK / max(density, 1e-9) / 64))


class SparseKernelWeight:
    """One weight matrix packed once for the sparse kernel: CSR over output rows, one slice
    per block of input columns (entries ordered by block, row, column)."""

    def __init__(self, bptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                 bias: torch.Tensor | None, shape: tuple[int, int]) -> None:
        self.bptr = bptr  # entries of (block kb, row r): bptr[kb * out + r] : bptr[kb * out + r + 1]
        self.indices = indices
        self.data = data
        self.bias = bias
        self.shape = shape
        self.nnz = int(data.shape[0])  # from_dense sets the count without the padding
        self._bias_np = (bias.detach().to(torch.float32).contiguous().numpy() if bias is not None
                         else np.zeros(shape[0], dtype=np.float32))
        self._small: SmallRowWeight | None = None

    @property
    def small(self) -> SmallRowWeight:
        """The weight in the small-row layout, built on the first call with few rows: a model only
        ever run on large batches does not hold it. It costs what `SmallRowWeight` says (bitmask:
        about 4 bytes per kept weight + 1 bit per weight) on top of this CSR (about 8 bytes per
        kept weight), built once."""
        if self._small is None:
            self._small = SmallRowWeight(self.to_dense().numpy(), self._bias_np)
        return self._small

    @property
    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(bptr, indices, data, bias): the weight as the compiled kernels take it."""
        return self.bptr, self.indices, self.data, self._bias_np

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   block: int | None = None) -> SparseKernelWeight:
        """Zeros in `weight` are the mask; everything else is kept exactly (as float32).

        `block`: input columns per block (default `block_columns` of the density).
        """
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
        w = weight.detach().to(torch.float32).cpu().contiguous().numpy()
        out_features, in_features = w.shape
        rows, cols = np.nonzero(w)
        if block is None:
            block = block_columns(len(rows) / max(w.size, 1))
        blocks = max(1, -(-in_features // block))
        slot = cols // block * out_features + rows
        order = np.argsort(slot, kind="stable")  # nonzero() is row-major, so columns stay sorted
        slot, cols, rows = slot[order], cols[order], rows[order]
        counts = np.bincount(slot, minlength=blocks * out_features)
        # an odd slot gets a zero weight on its last column: the loop takes weights in pairs
        last = np.cumsum(counts)[counts % 2 == 1] - 1
        slot = np.concatenate([slot, slot[last]])
        cols = np.concatenate([cols, cols[last]])
        values = np.concatenate([w[rows, cols[:len(rows)]], np.zeros(len(last), np.float32)])
        order = np.argsort(slot, kind="stable")
        bptr = np.zeros(blocks * out_features + 1, dtype=np.uint64)  # unsigned: no wraparound checks
        np.cumsum(counts + counts % 2, out=bptr[1:])
        b = None if bias is None else bias.detach().to(torch.float32).cpu().clone()
        packed = cls(bptr, cols[order].astype(np.int32), np.ascontiguousarray(values[order]), b, w.shape)
        packed.nnz = len(rows)
        return packed

    def to_dense(self) -> torch.Tensor:
        """The masked weight back as a dense (out, in) float32 tensor."""
        out = np.zeros(self.shape, dtype=np.float32)
        blocks = (self.bptr.shape[0] - 1) // max(self.shape[0], 1)
        rows = np.repeat(np.tile(np.arange(self.shape[0]), blocks), np.diff(self.bptr.astype(np.int64)))
        np.add.at(out, (rows, self.indices), self.data)  # padding zeros share a column with a weight
        return torch.from_numpy(out)

    def matmul(self, x: torch.Tensor, activation: str | None = None, residual: torch.Tensor | None = None,
               norm: tuple[torch.Tensor, torch.Tensor, float] | None = None) -> torch.Tensor:
        """x (..., in) float32 -> x @ W^T + b, shape (..., out). Inference only (no autograd).

        ``activation="gelu"`` applies the exact (erf) GELU in the store, where the values are
        still in registers, instead of a separate pass over the output. ``norm=(weight, bias,
        eps)`` returns LayerNorm(x W^T + b + residual) instead (a BERT output block), each tile
        normalised while it is still in cache rather than in two more passes over the output.
        Up to `SMALL_ROWS` rows run the small-row kernels (`small`) instead, the LayerNorm then
        by torch.
        """
        ok, reason = cpu.available()
        if not ok:
            raise RuntimeError(reason)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        out_features, in_features = self.shape
        if x.shape[-1] != in_features:
            raise ValueError(f"expected last dim {in_features}, got {tuple(x.shape)}")
        if x.dtype != torch.float32:
            raise TypeError(f"expected float32 input, got {x.dtype}")
        lead = x.shape[:-1]
        x2 = x.detach().reshape(-1, in_features).contiguous()
        n = x2.shape[0]
        res, gamma, beta, eps = _norm_arrays(norm, residual, (*lead, out_features))
        y = torch.empty((n, out_features), dtype=torch.float32)
        if 0 < n <= SMALL_ROWS and out_features > 0:
            self.small.matmul(x2.numpy(), y.numpy(), activation == "gelu")
            if norm is not None:
                y = torch.nn.functional.layer_norm(y + torch.from_numpy(res), (out_features,), torch.from_numpy(gamma),
                                                   torch.from_numpy(beta), eps)
        elif n > 0 and out_features > 0:
            v = 1 if n <= _SMALL_N else 4
            tile = LANES * v
            ntiles = (n + tile - 1) // tile
            threads = numba.get_num_threads()
            per_thread = ntiles % threads == 0 or ntiles >= 4 * threads
            slots = threads if per_thread else ntiles
            xp = buffer("xp", slots, in_features, tile)
            kernel = _spmm_v1 if v == 1 else _spmm_v4
            kernel(x2.numpy(), *self.arrays, y.numpy(), xp, ZERO16, per_thread,
                   activation == "gelu", res, gamma, beta, eps, norm is not None)
        return y.reshape(*lead, out_features)


_NO_NORM = (np.zeros((1, 1), np.float32), np.zeros(1, np.float32), np.zeros(1, np.float32), 0.0)


def _norm_arrays(norm, residual, shape) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """(residual as (rows, out), LayerNorm weight, bias, eps) as the kernel takes them, checked."""
    if norm is None:
        if residual is not None:
            raise ValueError("residual is only added together with norm=(weight, bias, eps)")
        return _NO_NORM
    weight, bias, eps = norm
    out_features = shape[-1]
    if residual is None or tuple(residual.shape) != tuple(shape) or residual.dtype != torch.float32:
        got = None if residual is None else (tuple(residual.shape), residual.dtype)
        raise ValueError(f"norm needs a float32 residual of the output's shape {tuple(shape)}, got {got}")
    if tuple(weight.shape) != (out_features,) or tuple(bias.shape) != (out_features,):
        raise ValueError(f"norm weight and bias must have shape ({out_features},), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")
    res = residual.detach().reshape(-1, out_features).contiguous().numpy()
    return (res, *layer_norm_arrays(weight, bias, eps))


def layer_norm_arrays(weight: torch.Tensor, bias: torch.Tensor, eps: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A LayerNorm's (weight, bias, eps) as the kernels' epilogue takes them."""
    return (*(t.detach().to(torch.float32).contiguous().numpy() for t in (weight, bias)), float(eps))


def feed_forward(x: torch.Tensor, up: SparseKernelWeight, down: SparseKernelWeight, residual: torch.Tensor,
                 norm: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    """LayerNorm(GELU(x U^T + c) W^T + b + residual): a BERT feed-forward block in one call.

    Each thread runs a 64-row tile of x through both projections while it is in its L2, the
    GELU'd intermediate written straight into the down projection's packed layout. Falls back
    to two `matmul` calls when x has too few rows to give every thread whole tiles.
    """
    if up.shape[0] != down.shape[1]:
        raise ValueError(f"up projection gives {up.shape[0]} features, down projection takes {down.shape[1]}")
    in_features = up.shape[1]
    if x.shape[-1] != in_features or x.dtype != torch.float32:
        raise ValueError(f"expected float32 input with last dim {in_features}, got {tuple(x.shape)} {x.dtype}")
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, in_features).contiguous()
    n, threads, tile = x2.shape[0], numba.get_num_threads(), 4 * LANES
    ntiles = -(-n // tile)
    if n <= _SMALL_N or not (ntiles % threads == 0 or ntiles >= 4 * threads):
        return down.matmul(up.matmul(x, "gelu"), residual=residual, norm=norm)
    res, gamma, beta, eps = _norm_arrays(norm, residual, (*lead, down.shape[0]))
    y = torch.empty((n, down.shape[0]), dtype=torch.float32)
    xp, hp = buffer("xp", threads, in_features, tile), buffer("hp", threads, up.shape[0], tile)
    _ffn(x2.numpy(), *up.arrays, *down.arrays, y.numpy(), xp, hp, ZERO16, res, gamma, beta, eps)
    return y.reshape(*lead, down.shape[0])


def warmup() -> None:
    """Compile (or load from numba's disk cache) every specialisation matmul can use."""
    if not cpu.available()[0]:
        return
    dense = SparseKernelWeight.from_dense(torch.ones(_ROWS, LANES))
    sparse = SparseKernelWeight.from_dense(torch.eye(_ROWS, LANES))  # below `gemv.csr_density()`: the other small-row layout
    for weight, sizes in ((dense, (1, SMALL_ROWS + 1, _SMALL_N + 1)), (sparse, (1,))):
        for n in sizes:
            for activation in ACTIVATIONS:
                weight.matmul(torch.zeros(n, LANES), activation)
