"""512-bit vector intrinsics for the numba kernels: a ``<16 x float>`` numba type and the LLVM
operations on it (loads, stores, FMAs, reductions, the 16x16 transpose, a vectorised GELU
and exp).

Written with explicit LLVM intrinsics because numba's auto-vectoriser keeps per-row
accumulators in memory and scalarises stores. Needs numba: import it only where
`cpu.available()` holds. numba's cache does not track this file for the kernels that inline
these intrinsics: after editing it, delete the ``*.nbi`` and ``*.nbc`` files under ``src/spdy/runtime``.
"""

from __future__ import annotations

import numpy as np

from spdy.runtime.cpu import available

_ok, _why = available()  # cpu also sets numba's vector width, before numba compiles anything
if not _ok:
    raise ImportError(f"spdy.runtime.vector needs numba: {_why}")

from llvmlite import ir  # noqa: E402
from numba import types  # noqa: E402
from numba.core import cgutils  # noqa: E402
from numba.extending import intrinsic, models, register_model  # noqa: E402

LANES = 16  # floats per 512-bit vector
JIT = dict(fastmath=True, boundscheck=False, cache=True, nogil=True)  # how every kernel is compiled
VEC = ir.VectorType(ir.FloatType(), LANES)
_I64 = ir.IntType(64)


class _F32x16(types.Type):
    """numba type for one <16 x float> register value."""

    def __init__(self) -> None:
        super().__init__(name="f32x16")


f32x16 = _F32x16()


@register_model(_F32x16)
class _F32x16Model(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, VEC)


def vec_ptr(builder, addr):
    """An integer address as a <16 x float> pointer."""
    return builder.inttoptr(addr, VEC.as_pointer())


def splat(value: float):
    """A float constant in all 16 lanes."""
    return ir.Constant(VEC, [value] * LANES)


def broadcast(builder, scalar):
    """A float scalar in all 16 lanes."""
    undef = ir.Constant(VEC, ir.Undefined)
    lane0 = builder.insert_element(undef, scalar, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(lane0, undef, ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


def llvm_fn(builder, name, arity):
    """An LLVM vector intrinsic on <16 x float> (e.g. "llvm.fma.v16f32", arity 3)."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(VEC, [VEC] * arity), name)


def _reduce(op):
    """Horizontal reduction of a <16 x float> by a 4-step shuffle tree (`op(builder, a, b)` on vectors)."""
    @intrinsic
    def reduce(typingctx, a):
        def codegen(context, builder, sig, args):
            value, undef = args[0], ir.Constant(VEC, ir.Undefined)
            for step in (8, 4, 2, 1):
                mask = ir.Constant(ir.VectorType(ir.IntType(32), LANES), [(i + step) % LANES for i in range(LANES)])
                value = op(builder, value, builder.shuffle_vector(value, undef, mask))
            return builder.extract_element(value, ir.Constant(ir.IntType(32), 0))

        return types.float32(f32x16), codegen

    return reduce


hsum = _reduce(lambda builder, a, b: builder.fadd(a, b))
hmax = _reduce(lambda builder, a, b: builder.call(llvm_fn(builder, "llvm.maxnum.v16f32", 2), [a, b]))


@intrinsic
def vaxpb(typingctx, v, a, b):
    """v * a + b for float32 scalars a and b."""
    def codegen(context, builder, sig, args):
        v, a, b = args
        return builder.call(llvm_fn(builder, "llvm.fma.v16f32", 3), [v, broadcast(builder, a), broadcast(builder, b)])

    return f32x16(f32x16, types.float32, types.float32), codegen


@intrinsic
def vmax(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.call(llvm_fn(builder, "llvm.maxnum.v16f32", 2), list(args))

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def vscale(typingctx, a, s):
    """a * s for a scalar s."""
    def codegen(context, builder, sig, args):
        return builder.fmul(args[0], broadcast(builder, args[1]))

    return f32x16(f32x16, types.float32), codegen


@intrinsic
def vfmav(typingctx, a, b, c):
    """a * b + c, all vectors."""
    def codegen(context, builder, sig, args):
        return builder.call(llvm_fn(builder, "llvm.fma.v16f32", 3), list(args))

    return f32x16(f32x16, f32x16, f32x16), codegen


@intrinsic
def vzero(typingctx):
    def codegen(context, builder, sig, args):
        return ir.Constant(VEC, [0.0] * LANES)

    return f32x16(), codegen


@intrinsic
def vstore(typingctx, addr, v):
    def codegen(context, builder, sig, args):
        builder.store(args[1], vec_ptr(builder, args[0]), align=4)
        return context.get_dummy_value()

    return types.void(types.uintp, f32x16), codegen


@intrinsic
def vload(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.load(vec_ptr(builder, args[0]), align=4)

    return f32x16(types.uintp), codegen


@intrinsic
def vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])

    return f32x16(f32x16, f32x16), codegen


@intrinsic
def vfma(typingctx, acc, w, addr):
    """acc + w * load16(addr) as one fused multiply-add."""

    def codegen(context, builder, sig, args):
        acc, w, addr = args
        x = builder.load(vec_ptr(builder, addr), align=4)
        wv = broadcast(builder, w)
        fma = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(VEC, [VEC] * 3), "llvm.fma.v16f32"
        )
        return builder.call(fma, [wv, x, acc])

    return f32x16(f32x16, types.float32, types.uintp), codegen


@intrinsic
def stack_f32(typingctx, count):
    """64-byte aligned float32 scratch on the stack (count must be a literal)."""
    if not isinstance(count, types.IntegerLiteral):
        return None
    n = count.literal_value

    def codegen(context, builder, sig, args):
        with builder.goto_entry_block():
            ptr = builder.alloca(ir.FloatType(), size=ir.Constant(_I64, n))
            ptr.align = 64
        return ptr

    return types.CPointer(types.float32)(count), codegen


def _transpose_masks(bit: int) -> tuple[list[int], list[int]]:
    """Shuffle masks that swap row bit `bit` with column bit `bit` for a row pair."""
    lo, hi = [], []
    for j in range(LANES):
        if j >> bit & 1:
            lo.append(LANES + (j ^ (1 << bit)))
            hi.append(LANES + j)
        else:
            lo.append(j)
            hi.append(j | (1 << bit))
    return lo, hi


# erf(u) ~ u P(u^2) / Q(u^2) on |u| <= 4 (clamped; erf(4) = 1 - 1.5e-8): our own
# least-squares rational fit, max error 2.4e-8 in float64, ~3e-7 evaluated in float32.
_ERF_P = (1.1283791065216064, 0.19436879456043243, 0.05321471020579338, 0.003921372815966606,
          0.0002858951920643449, 1.985672497539781e-06)
_ERF_Q = (1.0, 0.5055867433547974, 0.11569499969482422, 0.015280752442777157,
          0.001195811084471643, 3.748038216144778e-05)


def gelu_ir(builder, x):
    """x * (1 + erf(x / sqrt 2)) / 2 on a <16 x float>, without calls (libm's erf is scalar)."""
    fma = llvm_fn(builder, "llvm.fma.v16f32", 3)
    u = builder.fmul(x, splat(0.7071067811865476))
    u = builder.call(llvm_fn(builder, "llvm.minnum.v16f32", 2), [builder.call(llvm_fn(builder, "llvm.maxnum.v16f32", 2),
                                                                              [u, splat(-4.0)]), splat(4.0)])
    t = builder.fmul(u, u)

    def horner(coefficients):
        acc = splat(coefficients[-1])
        for c in coefficients[-2::-1]:
            acc = builder.call(fma, [acc, t, splat(c)])
        return acc

    erf = builder.fdiv(builder.fmul(u, horner(_ERF_P)), horner(_ERF_Q))
    half_x = builder.fmul(x, splat(0.5))
    return builder.call(fma, [half_x, erf, half_x])


@intrinsic
def vact(typingctx, v, b, act):
    """f(v + b) for a scalar b; f the identity, or GELU when the literal `act` is 1."""
    if not isinstance(act, types.IntegerLiteral):
        return None
    gelu = act.literal_value == 1

    def codegen(context, builder, sig, args):
        value = builder.fadd(args[0], broadcast(builder, args[1]))
        return gelu_ir(builder, value) if gelu else value

    return f32x16(f32x16, types.float32, act), codegen


@intrinsic
def transpose16(typingctx, src, src_stride, dst, dst_stride, bias, act):
    """dst[j, i] = f(src[i, j] + bias[i]) for a 16x16 float32 block (strides in floats);
    f is the identity, or GELU when the literal `act` is 1."""
    if not isinstance(act, types.IntegerLiteral):
        return None
    gelu = act.literal_value == 1

    def codegen(context, builder, sig, args):
        src, sst, dst, dstr, bias, _ = args

        def row(base, stride, i):
            offset = builder.mul(stride, ir.Constant(_I64, 4 * i))
            return vec_ptr(builder, builder.add(base, offset))

        rows = [builder.load(row(src, sst, i), align=4) for i in range(LANES)]
        mask_type = ir.VectorType(ir.IntType(32), LANES)
        for bit in range(4):
            lo, hi = (ir.Constant(mask_type, m) for m in _transpose_masks(bit))
            new = list(rows)
            for i in range(LANES):
                if not i >> bit & 1:
                    a, b = rows[i], rows[i | 1 << bit]
                    new[i] = builder.shuffle_vector(a, b, lo)
                    new[i | 1 << bit] = builder.shuffle_vector(a, b, hi)
            rows = new
        bias_vec = builder.load(vec_ptr(builder, bias), align=4)
        for i in range(LANES):
            value = builder.fadd(rows[i], bias_vec)
            builder.store(gelu_ir(builder, value) if gelu else value, row(dst, dstr, i), align=4)
        return context.get_dummy_value()

    sig = types.void(types.uintp, types.intp, types.uintp, types.intp, types.uintp, act)
    return sig, codegen


# 2^f on |f| <= 1/2: Taylor coefficients of exp(f ln 2) to degree 7 (truncation error 5e-9).
_EXP2 = tuple(0.6931471805599453 ** k / float(np.prod(np.arange(1, k + 1))) for k in range(8))


@intrinsic
def vexp_sub(typingctx, a, m):
    """exp(a - m) for a scalar m >= every lane of a (so the result is in (0, 1])."""
    def codegen(context, builder, sig, args):
        x = builder.call(llvm_fn(builder, "llvm.maxnum.v16f32", 2),
                         [builder.fsub(args[0], broadcast(builder, args[1])), splat(-87.0)])
        t = builder.fmul(x, splat(1.4426950408889634))
        n = builder.call(llvm_fn(builder, "llvm.rint.v16f32", 1), [t])
        f = builder.fsub(t, n)
        fma = llvm_fn(builder, "llvm.fma.v16f32", 3)
        p = splat(_EXP2[-1])
        for c in _EXP2[-2::-1]:
            p = builder.call(fma, [p, f, splat(c)])
        i32x16 = ir.VectorType(ir.IntType(32), LANES)
        bits = builder.shl(builder.add(builder.fptosi(n, i32x16), ir.Constant(i32x16, [127] * LANES)),
                           ir.Constant(i32x16, [23] * LANES))
        return builder.fmul(p, builder.bitcast(bits, VEC))

    return f32x16(f32x16, types.float32), codegen
