"""Own CPU kernels for Y = X W^T + b with an unstructured-sparse W and only a few rows of X (1-16):
a token-by-token decoder's matrix-vector products.

With so few rows a Linear reads each weight once and does almost no arithmetic per byte, so its
time should fall with the bytes the weight takes. The large-batch kernel (`spdy.runtime.kernels`)
packs X into 16-row tiles and wastes most of each vector at 1 row, so it is slower than dense
there. Two layouts, each streamed once per call, the few X rows staying in L1:

* ``bitmask`` (density above `csr_density`): per output row, one bit per input column (a uint16
  word per 16 columns, the input padded to 16) and the row's nonzero float32 values, compressed.
  On AVX-512 hosts one `vexpandps` spreads the next popcount(word) values to their lanes, then one
  16-lane FMA per X row; on AVX2 hosts each word is two bytes of 8 columns, a 256-entry table gives
  the `vpermps` that spreads the values and, in its sign bits, the blend that zeroes the others.
  The stored arrays are the same for both: the kernel is the host's choice at run time.
  Bytes: 4 per kept weight + 1 bit per column (50%: 2.1 bytes per column against dense's 4);
  work: the same per column whatever the density.
* ``csr``: per output row, the values and 16-bit column indices (32-bit past 65536 columns),
  one scalar FMA per kept weight and X row: 6 bytes per kept weight, and work only where weights
  are, so it wins when few are left.

Rows are taken four, two, then one at a time against each output row (its weights come from L1
for every pass after the first); output rows are shared out in chunks over numba's threads, except
for products under `THREAD_BYTES`, which run on the calling thread: with the weights cold, waking a
sleeping worker costs tens of microseconds, more than one core's memory bandwidth loses (issue 22).
The kernels are called through their compiled entry point, not numba's dispatcher, whose type
checks cost ~10 us when cold.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from spdy.runtime import cpu

__all__ = ["CSR_DENSITY", "SmallRowWeight", "csr_density", "has_avx2", "host_isa"]

# below these densities csr is used (docs/benchmarks.md, issue 22): AVX2 on Zen 1, csr was faster at
# 90% sparsity; AVX-512 on Zen 5, the bitmask was 1.0-1.35x faster than csr there (lower densities unmeasured)
CSR_DENSITY = {"avx2": 0.25, "avx512": 0.1}
_GROUP = 16  # input columns per mask word (uint16) = float32 lanes of one AVX-512 vector
_HALF = 8  # columns per mask byte = float32 lanes of one AVX2 vector
_ROWS_PER_ITEM = 32  # output rows per work item
THREAD_BYTES = 3 << 20  # below (rows x streamed bytes) one thread: waking numba's costs more than it saves (issue 22)
_GELU, _THREADED, _WIDE = 1, 2, 4  # bits of the kernels' `mode`


@functools.cache  # asked for every layer converted
def has_avx2() -> bool:
    """True only when the host really has AVX2 (the bitmask layout's permutation needs it)."""
    try:
        import llvmlite.binding as llvm

        return "+avx2" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:
        return False


def host_isa() -> str:
    """The bitmask kernel this host runs: "avx512" (one `vexpandps` per 16 columns) or "avx2"."""
    return "avx512" if cpu.cpu_has_avx512f() else "avx2"


def csr_density(isa: str | None = None) -> float:
    """The density below which a weight takes the csr layout on `isa` (default: this host's)."""
    return CSR_DENSITY[isa or host_isa()]


def _expand_table() -> np.ndarray:
    """(256, 8) int32: for mask byte b, the permutation taking the k-th packed value to the lane of
    b's k-th set bit (low 3 bits, all `vpermps` reads), with the sign bit set on those lanes, so
    one `vblendvps` on the same vector zeroes the others (no second table load)."""
    table = np.zeros((256, _HALF), dtype=np.int32)
    for b in range(256):
        k = 0
        for lane in range(_HALF):
            if b >> lane & 1:
                table[b, lane] = k - (1 << 31)
                k += 1
    return table


_TABLE = _expand_table()  # a global: numba compiles it into the AVX2 kernel as a constant

if cpu.numba is not None:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

    from spdy.runtime.vector import JIT, VEC, f32x16, hsum, vadd, vec_ptr, vzero

    _VEC8 = ir.VectorType(ir.FloatType(), _HALF)
    _INT8 = ir.VectorType(ir.IntType(32), _HALF)

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
            return ir.Constant(_VEC8, [0.0] * _HALF)

        return f32x8(), codegen

    @intrinsic
    def _expand8(typingctx, values, entry):
        """The 8 weights of one column half-group: 8 floats loaded at `values` (its packed values
        first), permuted to their lanes by the table entry at `entry`, others zeroed."""
        def codegen(context, builder, sig, args):
            values, entry = args
            packed = builder.load(builder.inttoptr(values, _VEC8.as_pointer()), align=4)
            perm = builder.load(builder.inttoptr(entry, _INT8.as_pointer()), align=4)
            permps = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC8, [_VEC8, _INT8]),
                                                    "llvm.x86.avx2.permps")
            blendv = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_VEC8, [_VEC8] * 3),
                                                    "llvm.x86.avx.blendv.ps.256")
            spread = builder.call(permps, [packed, perm])
            zero = ir.Constant(_VEC8, [0.0] * _HALF)
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
                mask = ir.Constant(_INT8, [(i + step) % _HALF for i in range(_HALF)])
                value = builder.fadd(value, builder.shuffle_vector(value, undef, mask))
            return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))

        return types.float32(f32x8, f32x8), codegen

    @intrinsic
    def _expand16(typingctx, values, mask):
        """The 16 weights of one column group: 16 floats loaded at `values` (its popcount(mask)
        packed values first) spread to the lanes of mask's set bits, others zero: a plain load,
        then `vexpandps` between registers (an arithmetic fence keeps LLVM from folding the load
        into `vexpandps`' memory form, which took ~10 cycles per group on Zen 5)."""
        def codegen(context, builder, sig, args):
            values, mask = args
            bits = builder.bitcast(mask, ir.VectorType(ir.IntType(1), _GROUP))
            expand = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(VEC, [VEC, VEC, bits.type]), "llvm.x86.avx512.mask.expand.v16f32")
            fence = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VEC, [VEC]),
                                                   "llvm.arithmetic.fence.v16f32")
            packed = builder.call(fence, [builder.load(vec_ptr(builder, values), align=4)])
            return builder.call(expand, [packed, ir.Constant(VEC, [0.0] * _GROUP), bits])

        return f32x16(types.uintp, types.uint16), codegen

    @intrinsic
    def _fma16(typingctx, acc, w, addr):
        """acc + w * load16(addr)."""
        def codegen(context, builder, sig, args):
            acc, w, addr = args
            x = builder.load(vec_ptr(builder, addr), align=4)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VEC, [VEC] * 3), "llvm.fma.v16f32")
            return builder.call(fma, [w, x, acc])

        return f32x16(f32x16, f32x16, types.uintp), codegen

    @numba.njit(**JIT)
    def _finish(value, act):
        """value, or its exact (erf) GELU for act 1."""
        if act == 1:
            return np.float32(0.5 * value * (1.0 + math.erf(value * 0.7071067811865476)))
        return value

    @intrinsic
    def _popcount(typingctx, m):
        """Set bits of a mask word, as one popcnt instruction (bit twiddling made the 1-row product
        1.1-1.2x slower, 1 thread)."""
        def codegen(context, builder, sig, args):
            width = sig.args[0].bitwidth
            ctpop = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.IntType(width), [ir.IntType(width)]), f"llvm.ctpop.i{width}")
            return builder.zext(builder.call(ctpop, [args[0]]), ir.IntType(64))

        def typer(m):
            return types.uint64(m) if m in (types.uint8, types.uint16) else None

        return typer(m), codegen

    @numba.njit(**JIT)
    def _rows8(x, t, masks, rowptr, values, bias, y, o, r, act):
        """y[t:t+r, o] from output row o in the bitmask layout, AVX2 (r = 1, 2 or 4 X rows; a
        literal): each 16-column mask word is two bytes of 8 columns, one expanded through the
        table into the even accumulators, the other into the odd (two FMA chains per X row)."""
        numba.literally(r)
        x_addr = x.ctypes.data + np.uintp(t * x.shape[1] * 4)
        x_row = np.uintp(x.shape[1] * 4)
        table_addr = _TABLE.ctypes.data
        p = values.ctypes.data + np.uintp(rowptr[o] * 4)
        a0 = _zero8()
        a1 = _zero8()
        a2 = _zero8()
        a3 = _zero8()
        b0 = _zero8()
        b1 = _zero8()
        b2 = _zero8()
        b3 = _zero8()
        for g in range(masks.shape[1]):
            word = masks[o, g]
            m = np.uint8(word & 255)
            w = _expand8(p, table_addr + np.uintp(m) * np.uintp(32))
            p += np.uintp(4) * _popcount(m)
            q = x_addr + np.uintp(g * 64)
            a0 = _fma8(a0, w, q)
            if r >= 2:
                a1 = _fma8(a1, w, q + x_row)
            if r >= 4:
                a2 = _fma8(a2, w, q + np.uintp(2) * x_row)
                a3 = _fma8(a3, w, q + np.uintp(3) * x_row)
            m = np.uint8(word >> 8)
            w = _expand8(p, table_addr + np.uintp(m) * np.uintp(32))
            p += np.uintp(4) * _popcount(m)
            q += np.uintp(32)
            b0 = _fma8(b0, w, q)
            if r >= 2:
                b1 = _fma8(b1, w, q + x_row)
            if r >= 4:
                b2 = _fma8(b2, w, q + np.uintp(2) * x_row)
                b3 = _fma8(b3, w, q + np.uintp(3) * x_row)
        y[t, o] = _finish(_sum8(a0, b0) + bias[o], act)
        if r >= 2:
            y[t + 1, o] = _finish(_sum8(a1, b1) + bias[o], act)
        if r >= 4:
            y[t + 2, o] = _finish(_sum8(a2, b2) + bias[o], act)
            y[t + 3, o] = _finish(_sum8(a3, b3) + bias[o], act)

    @numba.njit(**JIT)
    def _rows16(x, t, masks, rowptr, values, bias, y, o, r, act):
        """y[t:t+r, o] from output row o in the bitmask layout, AVX-512 (r = 1, 2 or 4 X rows; a
        literal): one `vexpandps` per 16-column mask word; at one X row, even and odd words go
        to separate accumulators (two FMA chains)."""
        numba.literally(r)
        groups = masks.shape[1]
        x_addr = x.ctypes.data + np.uintp(t * x.shape[1] * 4)
        x_row = np.uintp(x.shape[1] * 4)
        p = values.ctypes.data + np.uintp(rowptr[o] * 4)
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        b0 = vzero()
        g = 0
        if r == 1:
            while g + 1 < groups:
                m = masks[o, g]
                w = _expand16(p, m)
                p += np.uintp(4) * _popcount(m)
                a0 = _fma16(a0, w, x_addr + np.uintp(g * 64))
                m = masks[o, g + 1]
                w = _expand16(p, m)
                p += np.uintp(4) * _popcount(m)
                b0 = _fma16(b0, w, x_addr + np.uintp(g * 64 + 64))
                g += 2
        while g < groups:
            m = masks[o, g]
            w = _expand16(p, m)
            p += np.uintp(4) * _popcount(m)
            q = x_addr + np.uintp(g * 64)
            a0 = _fma16(a0, w, q)
            if r >= 2:
                a1 = _fma16(a1, w, q + x_row)
            if r >= 4:
                a2 = _fma16(a2, w, q + np.uintp(2) * x_row)
                a3 = _fma16(a3, w, q + np.uintp(3) * x_row)
            g += 1
        y[t, o] = _finish(hsum(vadd(a0, b0)) + bias[o], act)
        if r >= 2:
            y[t + 1, o] = _finish(hsum(a1) + bias[o], act)
        if r >= 4:
            y[t + 2, o] = _finish(hsum(a2) + bias[o], act)
            y[t + 3, o] = _finish(hsum(a3) + bias[o], act)

    @numba.njit(**JIT)
    def _bitmask_rows(x, t, masks, rowptr, values, bias, y, o, r, act, wide):
        """`_rows16` when the literal `wide` is set (AVX-512), else `_rows8` (AVX2)."""
        numba.literally(wide)
        if wide:
            _rows16(x, t, masks, rowptr, values, bias, y, o, r, act)
        else:
            _rows8(x, t, masks, rowptr, values, bias, y, o, r, act)

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
    def _bitmask_span(x, masks, rowptr, values, bias, y, lo, hi, act, wide):
        """Output rows lo:hi of Y = f(X W^T + b), the bitmask layout: X rows four, two, then one
        at a time (each output row's weights come from L1 for every pass after the first)."""
        n = x.shape[0]
        for o in range(lo, hi):
            t = 0
            while t + 4 <= n:
                _bitmask_rows(x, t, masks, rowptr, values, bias, y, o, 4, act, wide)
                t += 4
            if t + 2 <= n:
                _bitmask_rows(x, t, masks, rowptr, values, bias, y, o, 2, act, wide)
                t += 2
            if t < n:
                _bitmask_rows(x, t, masks, rowptr, values, bias, y, o, 1, act, wide)

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
    def _bitmask_mm(x, masks, rowptr, values, bias, y, act, wide):
        """Y = f(X W^T + b), the bitmask layout, output rows in chunks over numba's threads."""
        numba.literally(act)
        numba.literally(wide)
        m = y.shape[1]
        for item in prange((m + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM):
            _bitmask_span(x, masks, rowptr, values, bias, y, item * _ROWS_PER_ITEM,
                          min(m, (item + 1) * _ROWS_PER_ITEM), act, wide)

    @numba.njit(parallel=True, **JIT)
    def _csr_mm(x, rowptr, indices, values, bias, y, act):
        """Y = f(X W^T + b), the csr layout, output rows in chunks over numba's threads."""
        numba.literally(act)
        m = y.shape[1]
        for item in prange((m + _ROWS_PER_ITEM - 1) // _ROWS_PER_ITEM):
            _csr_span(x, rowptr, indices, values, bias, y, item * _ROWS_PER_ITEM, min(m, (item + 1) * _ROWS_PER_ITEM),
                      act)

    @numba.njit(**JIT)
    def _bitmask(x, masks, rowptr, values, bias, y, mode):
        """The bitmask product; `mode` = GELU | THREADED | WIDE (bits) picks literal variants."""
        m = y.shape[1]
        if mode & _WIDE:
            if mode & _THREADED:
                if mode & _GELU:
                    _bitmask_mm(x, masks, rowptr, values, bias, y, 1, True)
                else:
                    _bitmask_mm(x, masks, rowptr, values, bias, y, 0, True)
            elif mode & _GELU:
                _bitmask_span(x, masks, rowptr, values, bias, y, 0, m, 1, True)
            else:
                _bitmask_span(x, masks, rowptr, values, bias, y, 0, m, 0, True)
        elif mode & _THREADED:
            if mode & _GELU:
                _bitmask_mm(x, masks, rowptr, values, bias, y, 1, False)
            else:
                _bitmask_mm(x, masks, rowptr, values, bias, y, 0, False)
        elif mode & _GELU:
            _bitmask_span(x, masks, rowptr, values, bias, y, 0, m, 1, False)
        else:
            _bitmask_span(x, masks, rowptr, values, bias, y, 0, m, 0, False)

    @numba.njit(**JIT)
    def _csr(x, rowptr, indices, values, bias, y, mode):
        """The csr product; `mode` = GELU | THREADED (bits) picks literal variants."""
        m = y.shape[1]
        if mode & _THREADED:
            if mode & _GELU:
                _csr_mm(x, rowptr, indices, values, bias, y, 1)
            else:
                _csr_mm(x, rowptr, indices, values, bias, y, 0)
        elif mode & _GELU:
            _csr_span(x, rowptr, indices, values, bias, y, 0, m, 1)
        else:
            _csr_span(x, rowptr, indices, values, bias, y, 0, m, 0)


def _entry_point(dispatcher, *args):
    """The compiled variant of `dispatcher` for `args`' types, callable without the dispatcher:
    its per-call type matching cost ~10 us of a 1-row product with cold caches here (issue 22).
    The caller must then pass arguments of exactly these types (arrays: dtype, ndim, layout)."""
    dispatcher(*args)  # compile, or load from numba's cache
    return dispatcher.overloads[tuple(numba.typeof(a) for a in args)].entry_point


class SmallRowWeight:
    """One (out, in) weight stored for products with a few rows of X, in the layout its density
    favours (`csr_density`; csr where the host lacks AVX2). The bitmask layout is the same for
    the AVX-512 and the AVX2 kernel (a 16-column mask word is two 8-column bytes, little-endian);
    which one runs is the host's choice (`isa`). Memory: bitmask 4 bytes per kept weight + in/8
    bytes per output row (in padded to 16); csr 6 (8 past 65536 columns) bytes per kept weight;
    both + 8 bytes per output row."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray, layout: str | None = None,
                 isa: str | None = None) -> None:
        out_features, in_features = weight.shape
        nonzero = weight != 0
        nnz = int(nonzero.sum())
        isa = isa or host_isa()
        if isa not in CSR_DENSITY:
            raise ValueError(f"isa must be 'avx512' or 'avx2', got {isa!r}")
        if layout is None:
            dense_enough = nnz >= csr_density(isa) * max(weight.size, 1)
            layout = "bitmask" if dense_enough and has_avx2() else "csr"
        if layout not in ("bitmask", "csr"):
            raise ValueError(f"layout must be 'bitmask' or 'csr', got {layout!r}")
        self.layout, self.isa = layout, isa
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
            packed = np.packbits(padded.reshape(out_features, groups * 2, _HALF), axis=2, bitorder="little")[..., 0]
            self.masks = np.ascontiguousarray(packed).view("<u2").astype(np.uint16)
            self.values = np.concatenate([kept, np.zeros(_GROUP, np.float32)])  # each group loads 16 floats
            self.width = groups * _GROUP
        else:
            self.indices = cols.astype(np.uint16 if in_features <= 1 << 16 else np.int32)
            self.values = kept
            self.width = in_features
        self._kernel = None  # the compiled entry point, resolved on the first call

    @property
    def nbytes(self) -> int:
        """Bytes the layout streams per call (weights, indices or masks, row pointers)."""
        extra = self.masks.nbytes if self.layout == "bitmask" else self.indices.nbytes
        return self.values.nbytes + extra + self.rowptr.nbytes + self.bias.nbytes

    def threaded(self, rows: int) -> bool:
        """Whether a product with `rows` rows of X is worth waking numba's threads for."""
        return rows * self.nbytes >= THREAD_BYTES

    def matmul(self, x: np.ndarray, y: np.ndarray, gelu: bool) -> None:
        """y (n, out) = f(x (n, in) W^T + b): x and y float32, 2-D, C-contiguous (not checked
        per call); f the identity or exact GELU."""
        if self.width != x.shape[1]:
            padded = np.zeros((x.shape[0], self.width), dtype=np.float32)
            padded[:, :x.shape[1]] = x
            x = padded
        mode = (_GELU if gelu else 0) | (_THREADED if self.threaded(x.shape[0]) else 0)
        if self.layout == "bitmask":
            args = (x, self.masks, self.rowptr, self.values, self.bias, y, mode | (_WIDE if self.isa == "avx512" else 0))
            kernel = _bitmask
        else:
            args, kernel = (x, self.rowptr, self.indices, self.values, self.bias, y, mode), _csr
        if self._kernel is None:
            self._kernel = _entry_point(kernel, *args)
        else:
            self._kernel(*args)
