"""Own CPU kernels for Y = X W^T + b with an unstructured-sparse W and only a few rows of X (1-16):
a token-by-token decoder's matrix-vector products.

With so few rows a Linear reads each weight once and does almost no arithmetic per byte, so its
time should fall with the bytes the weight takes. The large-batch kernel (`spdy.runtime.kernels`)
packs X into 16-row tiles and wastes most of each vector at 1 row, so it is slower than dense
there. Two layouts, each streamed once per call, the few X rows staying in L1:

* ``bitmask`` (density above `CSR_DENSITY`): per output row, one bit per input column and the
  row's nonzero float32 values, compressed. Each 8 columns are one mask byte; a 256-entry table
  gives the AVX2 permutation that spreads the next popcount(mask) values to their lanes (its
  sign bits select them in a blend that zeroes the others), then one 8-lane FMA per X row.
  Bytes: 4 per kept weight + 1 bit per column (50%: 2.1 bytes per column against dense's 4);
  work: the same per column whatever the density.
* ``csr``: per output row, the values and 16-bit column indices (32-bit past 65536 columns),
  one scalar FMA per kept weight and X row: 6 bytes per kept weight, and work only where weights
  are, so it wins when few are left.

Rows are taken four, two, then one at a time against each output row (its weights come from L1
for every pass after the first); output rows are shared out in chunks over numba's threads, except
for products under `THREAD_BYTES`, which run on the calling thread: waking a sleeping worker costs
tens of microseconds here (a VM), more than half of such a product.
"""

from __future__ import annotations

import math

import numpy as np

from spdy.runtime import cpu

__all__ = ["CSR_DENSITY", "SmallRowWeight", "has_avx2"]

CSR_DENSITY = 0.25  # below this density (above 75% sparsity) csr was faster at 1 row (docs/benchmarks.md, issue 22)
_GROUP = 8  # input columns per mask byte = float32 lanes of one AVX2 vector
_ROWS_PER_ITEM = 32  # output rows per work item
THREAD_BYTES = 128 << 10  # below (rows x streamed bytes) one thread: waking numba's costs more than it saves (issue 22)


def has_avx2() -> bool:
    """True only when the host really has AVX2 (the bitmask layout's permutation needs it)."""
    try:
        import llvmlite.binding as llvm

        return "+avx2" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:
        return False


def _expand_table() -> np.ndarray:
    """(256, 8) int32: for mask byte b, the permutation taking the k-th packed value to the lane of
    b's k-th set bit (low 3 bits, all `vpermps` reads), with the sign bit set on those lanes, so
    one `vblendvps` on the same vector zeroes the others (no second table load)."""
    table = np.zeros((256, _GROUP), dtype=np.int32)
    for b in range(256):
        k = 0
        for lane in range(_GROUP):
            if b >> lane & 1:
                table[b, lane] = k - (1 << 31)
                k += 1
    return table


if cpu.numba is not None:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

    from spdy.runtime.vector import JIT

    _VEC8 = ir.VectorType(ir.FloatType(), _GROUP)
    _INT8 = ir.VectorType(ir.IntType(32), _GROUP)

    class _F32x8(types.Type):
        """numba type for one <8 x float> register value."""

        def __init__(self) -> None:
            super().__init__(name="f32x8")

    f32x8 = _F32x8()

    @register_model(_F32x8)
    class _F32x8Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, _VEC8)

    @intrinsic
    def _zero8(typingctx):
        def codegen(context, builder, sig, args):
            return ir.Constant(_VEC8, [0.0] * _GROUP)

        return f32x8(), codegen

    @intrinsic
    def _expand8(typingctx, values, entry):
        """The 8 weights of one column group: 8 floats loaded at `values` (the group's packed
        values first), permuted to their lanes by the table entry at `entry`, others zeroed."""
        def codegen(context, builder, sig, args):
            values, entry = args
            packed = builder.load(builder.inttoptr(values, _VEC8.as_pointer()), align=4)
            perm = builder.load(builder.inttoptr(entry, _INT8.as_pointer()), align=4)
            permps = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC8, [_VEC8, _INT8]),
                                                    "llvm.x86.avx2.permps")
            blendv = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC8, [_VEC8] * 3),
                                                    "llvm.x86.avx.blendv.ps.256")
            spread = builder.call(permps, [packed, perm])
            zero = ir.Constant(_VEC8, [0.0] * _GROUP)
            return builder.call(blendv, [zero, spread, builder.bitcast(perm, _VEC8)])

        return f32x8(types.uintp, types.uintp), codegen

    @intrinsic
    def _fma8(typingctx, acc, w, addr):
        """acc + w * load8(addr)."""
        def codegen(context, builder, sig, args):
            acc, w, addr = args
            x = builder.load(builder.inttoptr(addr, _VEC8.as_pointer()), align=4)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC8, [_VEC8] * 3), "llvm.fma.v8f32")
            return builder.call(fma, [w, x, acc])

        return f32x8(f32x8, f32x8, types.uintp), codegen

    @intrinsic
    def _sum8(typingctx, a, b):
        """Sum of all 16 lanes of a and b."""
        def codegen(context, builder, sig, args):
            value, undef = builder.fadd(args[0], args[1]), ir.Constant(_VEC8, ir.Undefined)
            for step in (4, 2, 1):
                mask = ir.Constant(_INT8, [(i + step) % _GROUP for i in range(_GROUP)])
                value = builder.fadd(value, builder.shuffle_vector(value, undef, mask))
            return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))

        return types.float32(f32x8, f32x8), codegen

    @numba.njit(**JIT)
    def _finish(value, act):
        """value, or its exact (erf) GELU for act 1."""
        if act == 1:
            return np.float32(0.5 * value * (1.0 + math.erf(value * 0.7071067811865476)))
        return value

    @intrinsic
    def _popcount8(typingctx, m):
        """Set bits of a mask byte, as one popcnt instruction (bit twiddling made the 1-row product
        1.1-1.2x slower, 1 thread)."""
        def codegen(context, builder, sig, args):
            ctpop = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(8), [ir.IntType(8)]),
                                                   "llvm.ctpop.i8")
            return builder.zext(builder.call(ctpop, [args[0]]), ir.IntType(64))

        return types.uint64(types.uint8), codegen

    @numba.njit(**JIT)
    def _bitmask_rows(x, t, masks, rowptr, values, table, bias, y, o, r, act):
        """y[t:t+r, o] from output row o in the bitmask layout (r = 1, 2 or 4 X rows; a literal).
        Even and odd column groups go to separate accumulators (two FMA chains per X row)."""
        numba.literally(r)
        groups = masks.shape[1]
        x_addr = x.ctypes.data + np.uintp(t * x.shape[1] * 4)
        x_row = np.uintp(x.shape[1] * 4)
        table_addr = table.ctypes.data
        p = values.ctypes.data + np.uintp(rowptr[o] * 4)
        a0 = _zero8()
        a1 = _zero8()
        a2 = _zero8()
        a3 = _zero8()
        b0 = _zero8()
        b1 = _zero8()
        b2 = _zero8()
        b3 = _zero8()
        g = 0
        while g < groups:
            m = masks[o, g]
            w = _expand8(p, table_addr + np.uintp(m) * np.uintp(32))
            p += np.uintp(4) * _popcount8(m)
            q = x_addr + np.uintp(g * 32)
            a0 = _fma8(a0, w, q)
            if r >= 2:
                a1 = _fma8(a1, w, q + x_row)
            if r >= 4:
                a2 = _fma8(a2, w, q + np.uintp(2) * x_row)
                a3 = _fma8(a3, w, q + np.uintp(3) * x_row)
            if g + 1 < groups:
                m = masks[o, g + 1]
                w = _expand8(p, table_addr + np.uintp(m) * np.uintp(32))
                p += np.uintp(4) * _popcount8(m)
                q += np.uintp(32)
                b0 = _fma8(b0, w, q)
                if r >= 2:
                    b1 = _fma8(b1, w, q + x_row)
                if r >= 4:
                    b2 = _fma8(b2, w, q + np.uintp(2) * x_row)
                    b3 = _fma8(b3, w, q + np.uintp(3) * x_row)
            g += 2
        y[t, o] = _finish(_sum8(a0, b0) + bias[o], act)
        if r >= 2:
            y[t + 1, o] = _finish(_sum8(a1, b1) + bias[o], act)
        if r >= 4:
            y[t + 2, o] = _finish(_sum8(a2, b2) + bias[o], act)
            y[t + 3, o] = _finish(_sum8(a3, b3) + bias[o], act)

    @numba.njit(**JIT)
    def _csr_rows(x, t, rowptr, indices, values, bias, y, o, r, act):
        """y[t:t+r, o] from output row o in the csr layout (r = 1, 2 or 4 X rows; a literal);
        at one X row, alternate weights go to two accumulators."""
        numba.literally(r)
        s0 = np.float32(0.0)
        s1 = np.float32(0.0)
        s2 = np.float32(0.0)
        s3 = np.float32(0.0)
        u0 = np.float32(0.0)
        j = rowptr[o]
        end = rowptr[o + 1]
        if r == 1:
            while j + 1 < end:
                s0 += values[j] * x[t, indices[j]]
                u0 += values[j + 1] * x[t, indices[j + 1]]
                j += 2
        while j < end:
            w = values[j]
            c = indices[j]
            s0 += w * x[t, c]
            if r >= 2:
                s1 += w * x[t + 1, c]
            if r >= 4:
                s2 += w * x[t + 2, c]
                s3 += w * x[t + 3, c]
            j += 1
        y[t, o] = _finish(s0 + u0 + bias[o], act)
        if r >= 2:
            y[t + 1, o] = _finish(s1 + bias[o], act)
        if r >= 4:
            y[t + 2, o] = _finish(s2 + bias[o], act)
            y[t + 3, o] = _finish(s3 + bias[o], act)

    @numba.njit(**JIT)
    def _bitmask_span(x, masks, rowptr, values, table, bias, y, lo, hi, act):
        """Output rows lo:hi of Y = f(X W^T + b), the bitmask layout: X rows four, two, then one
        at a time (each output row's weights come from L1 for every pass after the first)."""
        n = x.shape[0]
        for o in range(lo, hi):
            t = 0
            while t + 4 <= n:
                _bitmask_rows(x, t, masks, rowptr, values, table, bias, y, o, 4, act)
                t += 4
            if t + 2 <= n:
                _bitmask_rows(x, t, masks, rowptr, values, table, bias, y, o, 2, act)
                t += 2
            if t < n:
                _bitmask_rows(x, t, masks, rowptr, values, table, bias, y, o, 1, act)

    @numba.njit(**JIT)
    def _csr_span(x, rowptr, indices, values, bias, y, lo, hi, act):
        """Output rows lo:hi of Y = f(X W^T + b), the csr layout."""
        n = x.shape[0]
        for o in range(lo, hi):
            t = 0
            while t + 4 <= n:
                _csr_rows(x, t, rowptr, indices, values, bias, y, o, 4, act)
                t += 4
            if t + 2 <= n:
                _csr_rows(x, t, rowptr, indices, values, bias, y, o, 2, act)
                t += 2
            if t < n:
                _csr_rows(x, t, rowptr, indices, values, bias, y, o, 1, act)

    @numba.njit(parallel=True, **JIT)
    def _bitmask_mm(x, masks, rowptr, values, table, bias, y, act):
        """Y = f(X W^T + b), the bitmask layout, output rows in chunks over numba's threads."""
        numba.literally(act)
        m = y.shape[1]
        for item in prange((m + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM):
            _bitmask_span(x, masks, rowptr, values, table, bias, y, item * _ROWS_PER_ITEM,
                          min(m, (item + 1) * _ROWS_PER_ITEM), act)

    @numba.njit(parallel=True, **JIT)
    def _csr_mm(x, rowptr, indices, values, bias, y, act):
        """Y = f(X W^T + b), the csr layout, output rows in chunks over numba's threads."""
        numba.literally(act)
        m = y.shape[1]
        for item in prange((m + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM):
            _csr_span(x, rowptr, indices, values, bias, y, item * _ROWS_PER_ITEM, min(m, (item + 1) * _ROWS_PER_ITEM),
                      act)

    @numba.njit(**JIT)
    def _bitmask(x, masks, rowptr, values, table, bias, y, gelu, threaded):
        """The bitmask product with a literal activation, on numba's threads or this one only."""
        m = y.shape[1]
        if threaded:
            if gelu:
                _bitmask_mm(x, masks, rowptr, values, table, bias, y, 1)
            else:
                _bitmask_mm(x, masks, rowptr, values, table, bias, y, 0)
        elif gelu:
            _bitmask_span(x, masks, rowptr, values, table, bias, y, 0, m, 1)
        else:
            _bitmask_span(x, masks, rowptr, values, table, bias, y, 0, m, 0)

    @numba.njit(**JIT)
    def _csr(x, rowptr, indices, values, bias, y, gelu, threaded):
        """The csr product with a literal activation, on numba's threads or this one only."""
        m = y.shape[1]
        if threaded:
            if gelu:
                _csr_mm(x, rowptr, indices, values, bias, y, 1)
            else:
                _csr_mm(x, rowptr, indices, values, bias, y, 0)
        elif gelu:
            _csr_span(x, rowptr, indices, values, bias, y, 0, m, 1)
        else:
            _csr_span(x, rowptr, indices, values, bias, y, 0, m, 0)

    _TABLE = _expand_table()


class SmallRowWeight:
    """One (out, in) weight stored for products with a few rows of X, in the layout its density
    favours (`CSR_DENSITY`; csr where the host lacks AVX2). Memory: bitmask 4 bytes per kept
    weight + in/8 bytes per output row; csr 6 (8 past 65536 columns) bytes per kept weight;
    both + 8 bytes per output row."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, layout: str | None = None) -> None:
        out_features, in_features = weight.shape
        nonzero = weight != 0
        nnz = int(nonzero.sum())
        if layout is None:
            dense_enough = nnz >= CSR_DENSITY * max(weight.size, 1)
            layout = "bitmask" if dense_enough and has_avx2() else "csr"
        if layout not in ("bitmask", "csr"):
            raise ValueError(f"layout must be 'bitmask' or 'csr', got {layout!r}")
        self.layout = layout
        self.shape = (out_features, in_features)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.rowptr = np.zeros(out_features + 1, dtype=np.int64)
        np.cumsum(nonzero.sum(axis=1), out=self.rowptr[1:])
        rows, cols = np.nonzero(weight)
        kept = weight[rows, cols].astype(np.float32)
        if layout == "bitmask":
            groups = -(-in_features // _GROUP)
            padded = np.zeros((out_features, groups * _GROUP), dtype=bool)
            padded[:, :in_features] = nonzero
            self.masks = np.packbits(padded.reshape(out_features, groups, _GROUP), axis=2, bitorder="little")[..., 0]
            self.values = np.concatenate([kept, np.zeros(_GROUP, np.float32)])  # the last group loads 8 floats
            self.width = groups * _GROUP
        else:
            self.indices = cols.astype(np.uint16 if in_features <= 1 << 16 else np.int32)
            self.values = kept
            self.width = in_features

    @property
    def nbytes(self) -> int:
        """Bytes the layout streams per call (weights, indices or masks, row pointers)."""
        extra = self.masks.nbytes if self.layout == "bitmask" else self.indices.nbytes
        return self.values.nbytes + extra + self.rowptr.nbytes + self.bias.nbytes

    def threaded(self, rows: int) -> bool:
        """Whether a product with `rows` rows of X is worth waking numba's threads for."""
        return rows * self.nbytes >= THREAD_BYTES

    def matmul(self, x: np.ndarray, y: np.ndarray, gelu: bool) -> None:
        """y (n, out) = f(x (n, in) W^T + b): x float32, C-contiguous; f the identity or exact GELU."""
        if self.layout == "bitmask":
            if self.width != x.shape[1]:
                padded = np.zeros((x.shape[0], self.width), dtype=np.float32)
                padded[:, :x.shape[1]] = x
                x = padded
            _bitmask(x, self.masks, self.rowptr, self.values, _TABLE, self.bias, y, gelu, self.threaded(x.shape[0]))
        else:
            _csr(x, self.rowptr, self.indices, self.values, self.bias, y, gelu, self.threaded(x.shape[0]))
