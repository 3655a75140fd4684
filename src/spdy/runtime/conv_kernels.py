"""Own CPU kernel for a Conv2d (groups=1) with an unstructured-sparse weight: a direct sparse
convolution on channels-last activations, with bias, residual add and ReLU/ReLU6 in its store.

oneDNN's dense convolution beats unfold + sparse matmul almost everywhere (the unfold writes
every input value kh*kw times). This kernel vectorises over output pixels and broadcasts one
weight at a time, like `spdy.runtime.kernels`, but reads the input in place:

* The input is packed into zero-padded planes, one per (channel, row phase, column phase) of
  the stride: padded pixel (ih, iw) of channel c goes to plane (c, ih % sh, iw % sw) at
  (ih // sh, iw // sw). Output pixel (oh, ow) then reads tap (c, dy, dx) at plane position
  (oh + dy*dh // sh, ow + dx*dw // sw): a fixed offset from a base linear in (oh, ow). So 32
  consecutive plane positions u = oh * Wq + ow times one weight are two contiguous 16-float loads
  and FMAs whatever the stride, padding or dilation, and every weight is stored once, as its
  offset. Positions with ow >= Wo are computed and dropped (Wo / Wq of the work is kept: 7/9 at
  ResNet's 7x7 stage, 56/58 at 56x56), far less waste than padding each output row to whole
  vectors (7/16). A pointwise conv (1x1, stride 1, no padding) is one row of H*W positions.
* Packing is 16x16 transposes, each input value written once per band that reads it (only the
  phases some tap reads), not kh*kw times as by unfold. A band is a run of whole 32-position
  tiles whose planes fit a thread's L2 slot (`_BAND_BYTES`); a thread packs a band and runs all
  its items at once, so packed values never go to memory (ResNet-50's 1024->256 1x1 at 14x14,
  90%: 1.4 -> 0.9 ms against packing whole images first). Too few bands to share evenly (batch 1
  on small maps): each thread packs every band and runs its share of the output channels.
* A work item is (32 positions of a band, 64 output channels). Input channels are walked in
  blocks (the weights of one (block, output channel) are contiguous), so the block's part of the
  planes stays in L1 while all 64 channels use it; accumulators wait in a stack buffer between
  blocks, as in `spdy.runtime.kernels` (whose block size rule this reuses).
* The store transposes 16 channels x 16 pixels with the bias (`transpose16`) into a stack tile,
  then adds the residual and applies the activation while the values are in L1, and writes
  each valid pixel's 16 channels to the NHWC output: conv + folded BN + add + ReLU in one call.
"""

from __future__ import annotations

import numpy as np
import torch

from spdy.runtime import cpu
from spdy.runtime.buffers import buffer
from spdy.runtime.kernels import block_columns

if cpu.numba is not None:
    import numba
    from numba import prange

    from spdy.runtime.vector import (JIT, LANES, stack_f32, transpose16, vadd, vaxpb, vfma, vload, vmax, vscale, vstore,
                                     vzero)

__all__ = ["ACTIVATIONS", "SparseConvWeight", "warmup"]

ACTIVATIONS = (None, "relu", "relu6")
_TILE = 32  # plane positions per work item: two 16-float vectors per weight, 4 FMA chains in 8 AVX2 registers
_CHUNK = 64  # output channels per work item
_PIX = 16  # pixels per store transpose
_BUF = _CHUNK * _TILE  # floats of an item's accumulators
_BAND_BYTES = 192 << 10  # a thread's packed planes: L2-resident next to the weights streaming through
_BLOCK = 256  # floats of a 16x16 tile (stack sizes must be plain constants)

if cpu.numba is not None:
    _ZERO16 = np.zeros(LANES, dtype=np.float32)  # the zero bias of the packing transposes

    @numba.njit(**JIT)
    def _zero(xq, start, stop):
        for q in range(start, stop):
            xq[q] = 0.0

    @numba.njit(**JIT)
    def _pack_row(x, xq, zero16, n, ph_h, u0, r, g, phases_w):
        """Row r of the band of image n that starts at plane position u0, for row phase ph_h, every
        channel and used column phase: the part of plane row u0 // wq + r within the band's span
        (positions u0 .. u0+span-1), from the input row (zero outside it, and for rows of padding),
        by 16x16 transposes; scalar copies only for channels past a multiple of 16.

        A ragged last block is gathered into a stack tile and transposed whole: its spare columns
        land in the next row's positions (packed after this one) or the 16 floats of slack after
        each plane, so no scalar loop is needed (each one multiplied numba's compile time)."""
        c_in, h, w, sh, sw, pad_h, pad_w = g[0], g[1], g[2], g[3], g[4], g[5], g[6]
        wq, plane, span = g[7], g[8], g[17]
        qh = u0 // wq + r
        col0 = max(0, u0 - qh * wq)
        col1 = min(wq, u0 + span - qh * wq)
        if col1 <= col0:
            return
        cstride = sh * sw * plane  # from a channel's plane to the next channel's
        ih = qh * sh + ph_h - pad_h
        x_addr = x.ctypes.data
        xq_addr = xq.ctypes.data
        c16 = c_in - c_in % LANES
        tile = numba.carray(stack_f32(_BLOCK), (_BLOCK,))
        tile_addr = tile.ctypes.data
        for ph_w in range(sw):
            if not phases_w[ph_w]:
                continue
            row0 = (ph_h * sw + ph_w) * plane + qh * wq - u0  # where column 0 of channel 0's row would be
            lo, hi = col1, col1  # a row of padding: all zeros
            if 0 <= ih < h:
                lo = max(col0, -((ph_w - pad_w) // sw))  # columns qw*sw + ph_w - pad_w >= 0 ...
                hi = min(col1, max(lo, (w - 1 + pad_w - ph_w) // sw + 1))  # ... and < w
            src_row = (n * h + ih) * w + ph_w - pad_w  # + qw * sw: the input pixel of plane column qw
            for q0 in range(lo, hi, LANES):
                m = min(LANES, hi - q0)
                for c0 in range(0, c16, LANES):
                    src = x_addr + np.uintp(((src_row + q0 * sw) * c_in + c0) * 4)
                    if m < LANES:  # rows past the input's end must not be read: gather the m rows
                        for i in range(m):
                            vstore(tile_addr + np.uintp(i * 64), vload(src + np.uintp(i * sw * c_in * 4)))
                        src = tile_addr
                    transpose16(src, sw * c_in if m == LANES else LANES,
                                xq_addr + np.uintp((row0 + c0 * cstride + q0) * 4), cstride, zero16.ctypes.data, 0)
                for c in range(c16, c_in):
                    for i in range(m):
                        xq[row0 + c * cstride + q0 + i] = x[(src_row + (q0 + i) * sw) * c_in + c]
            for c in range(c_in):  # after the data: a ragged block's spare columns may have covered these
                _zero(xq, row0 + c * cstride + col0, row0 + c * cstride + lo)
                _zero(xq, row0 + c * cstride + hi, row0 + c * cstride + col1)

    @numba.njit(**JIT)
    def _store(buf, nr, bias, y, residual, has_residual, act, n, u0, o0, g):
        """y[pixel, o0:o0+nr] = act(buf[r, t] + bias + residual) for the item's valid pixels
        (plane position u0 + t with ow < Wo, oh < Ho), 16 channels x 16 pixels per transpose.
        Positions are walked, not divided out (an integer division per pixel cost more than the store)."""
        wq, h_out, w_out, c_out = g[7], g[9], g[10], g[11]
        scratch = numba.carray(stack_f32(_BLOCK), (_BLOCK,))
        s_addr = scratch.ctypes.data
        buf_addr = buf.ctypes.data
        y_addr = y.ctypes.data
        r_addr = residual.ctypes.data
        zero = vzero()
        minus6 = vaxpb(zero, np.float32(0.0), np.float32(-6.0))
        r16 = nr - nr % LANES
        oh0 = u0 // wq
        ow0 = u0 - oh0 * wq
        for t0 in range(0, _TILE, _PIX):
            for r0 in range(0, r16, LANES):
                transpose16(buf_addr + np.uintp((r0 * _TILE + t0) * 4), _TILE, s_addr, LANES,
                            bias.ctypes.data + np.uintp((o0 + r0) * 4), 0)
                oh, ow = oh0, ow0
                for t in range(_PIX):
                    if oh < h_out and ow < w_out:
                        at = np.uintp((((n * h_out + oh) * w_out + ow) * c_out + o0 + r0) * 4)
                        v = vload(s_addr + np.uintp(t * 64))
                        if has_residual:
                            v = vadd(v, vload(r_addr + at))
                        if act == 1:
                            v = vmax(v, zero)
                        elif act == 2:
                            v = vmax(v, zero)
                            v = vscale(vmax(vscale(v, np.float32(-1.0)), minus6), np.float32(-1.0))
                        vstore(y_addr + at, v)
                    ow += 1
                    if ow == wq:
                        ow = 0
                        oh += 1
            for r in range(r16, nr):
                oh, ow = oh0, ow0
                for t in range(t0, t0 + _PIX):
                    if oh < h_out and ow < w_out:
                        pixel = ((n * h_out + oh) * w_out + ow) * c_out + o0 + r
                        value = buf[r * _TILE + t] + bias[o0 + r]
                        if has_residual:
                            value += residual[pixel]
                        if act >= 1:
                            value = max(value, np.float32(0.0))
                        if act == 2:
                            value = min(value, np.float32(6.0))
                        y[pixel] = value
                    ow += 1
                    if ow == wq:
                        ow = 0
                        oh += 1
            ow0 += _PIX
            while ow0 >= wq:
                ow0 -= wq
                oh0 += 1

    @numba.njit(**JIT)
    def _item(xq, bptr, offsets, data, bias, y, residual, has_residual, act, n, ul, u0, o0, g):
        """One work item: output channels o0 .. o0+63 at the 32 positions from ul of the band's planes
        in xq, which are image n's positions from u0.

        Input-channel blocks outermost (see `bptr`), so a block's plane rows stay in L1 while
        every channel of the item uses them; weights come in pairs onto two accumulator sets.
        """
        c_out = g[11]
        blocks = (bptr.shape[0] - 1) // c_out
        base = xq.ctypes.data + np.uintp(ul * 4)
        buf = numba.carray(stack_f32(_BUF), (_BUF,))
        buf_addr = buf.ctypes.data
        nr = min(_CHUNK, c_out - o0)
        for kb in range(blocks):
            for r in range(nr):
                i = kb * c_out + o0 + r
                start, end = bptr[i], bptr[i + 1]
                q = buf_addr + np.uintp(r * _TILE * 4)
                if kb == 0:
                    a0 = vzero()
                    a1 = vzero()
                elif start == end:
                    continue
                else:
                    a0 = vload(q)
                    a1 = vload(q + np.uintp(64))
                b0 = vzero()
                b1 = vzero()
                j = start
                while j < end:
                    p = base + np.uintp(offsets[j]) * np.uintp(4)
                    w = data[j]
                    p2 = base + np.uintp(offsets[j + np.uint64(1)]) * np.uintp(4)
                    w2 = data[j + np.uint64(1)]
                    a0 = vfma(a0, w, p)
                    a1 = vfma(a1, w, p + np.uintp(64))
                    b0 = vfma(b0, w2, p2)
                    b1 = vfma(b1, w2, p2 + np.uintp(64))
                    j += np.uint64(2)
                vstore(q, vadd(a0, b0))
                vstore(q + np.uintp(64), vadd(a1, b1))
        _store(buf, nr, bias, y, residual, has_residual, act, n, u0, o0, g)

    @numba.njit(**JIT)
    def _pack_band(x, xq, zero16, band, g, phases_h, phases_w):
        """The planes of band `band` into xq: positions u0 .. u0+span-1 of its image, every used phase."""
        sh, rows, tiles, bands = g[3], g[13], g[14], g[15]
        for ph_h in range(sh):
            if phases_h[ph_h]:
                for r in range(rows):
                    _pack_row(x, xq, zero16, band // bands, ph_h, (band % bands) * tiles * _TILE, r, g, phases_w)

    @numba.njit(parallel=True, **JIT)
    def _conv(x, xq, zero16, bptr, offsets, data, bias, y, residual, has_residual, act, g, phases_h, phases_w):
        """Every (band, tile, channel chunk) item: each of xq.shape[0] threads takes its share of the
        (band, channel group) units, packs the unit's band into its own L2-sized slot and runs the
        unit's items on it, so packed values stay in L2 and there is one parallel region. With too
        few bands to share evenly the channel chunks are split into one group per thread (each
        thread then packs every band). One call site per kernel part: numba compiles the parallel
        body with everything inlined, and each extra site cost a minute of compile time."""
        batch, tiles, bands, groups, c_out = g[12], g[14], g[15], g[16], g[11]
        chunks = (c_out + _CHUNK - 1) // _CHUNK
        per_group = (chunks + groups - 1) // groups
        slots = xq.shape[0]
        for s in prange(slots):
            for unit in range(s, batch * bands * groups, slots):
                band = unit // groups
                first = unit % groups * per_group
                _pack_band(x, xq[s], zero16, band, g, phases_h, phases_w)
                u0 = (band % bands) * tiles * _TILE
                for t in range(tiles):
                    for c in range(first, min(chunks, first + per_group)):
                        _item(xq[s], bptr, offsets, data, bias, y, residual, has_residual, act, band // bands,
                              t * _TILE, u0 + t * _TILE, c * _CHUNK, g)


def _pair(value: int | tuple[int, ...]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


class SparseConvWeight:
    """A Conv2d weight (out, in, kh, kw) packed once for the sparse convolution kernel: its taps
    ordered by (input-channel block, output channel, channel, dy, dx), each slice padded to an
    even length with a zero weight (the loop takes weights in pairs). Tap offsets into the packed
    planes depend on the input's height and width and are computed once per input size."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int | tuple[int, int] = 1,
                 padding: int | tuple[int, int] = 0, dilation: int | tuple[int, int] = 1,
                 block: int | None = None) -> None:
        """Zeros in `weight` are the mask; everything else is kept exactly (as float32).
        `block`: input channels per block (default: `kernels.block_columns` of the density over kh*kw)."""
        if weight.dim() != 4:
            raise ValueError(f"weight must be 4-D (out, in, kh, kw), got shape {tuple(weight.shape)}")
        self.stride, self.padding, self.dilation = _pair(stride), _pair(padding), _pair(dilation)
        if min(self.stride) < 1 or min(self.dilation) < 1 or min(self.padding) < 0:
            raise ValueError(f"need stride, dilation >= 1 and padding >= 0, got {self.stride}, {self.dilation}, "
                             f"{self.padding}")
        w = weight.detach().to(torch.float32).cpu().contiguous().numpy()
        self.shape = w.shape
        c_out, c_in, kh, kw = w.shape
        co, ci, dy, dx = np.nonzero(w)  # row-major: taps of one output channel in (ci, dy, dx) order
        self.nnz = len(co)
        if block is None:
            block = max(1, block_columns(self.nnz / max(w.size, 1)) // (kh * kw))
        blocks = max(1, -(-c_in // block))
        slot = ci // block * c_out + co
        order = np.argsort(slot, kind="stable")
        slot, co, ci, dy, dx = slot[order], co[order], ci[order], dy[order], dx[order]
        values = w[co, ci, dy, dx]
        counts = np.bincount(slot, minlength=blocks * c_out)
        last = np.cumsum(counts)[counts % 2 == 1] - 1  # odd slots repeat their last tap with weight 0
        order = np.argsort(np.concatenate([slot, slot[last]]), kind="stable")
        self.taps = tuple(np.concatenate([t, t[last]])[order].astype(np.int64) for t in (ci, dy, dx))
        self.data = np.ascontiguousarray(np.concatenate([values, np.zeros(len(last), np.float32)])[order])
        self.bptr = np.zeros(blocks * c_out + 1, dtype=np.uint64)  # slice (block kb, out o): kb * c_out + o
        np.cumsum(counts + counts % 2, out=self.bptr[1:])
        self.bias = None if bias is None else bias.detach().to(torch.float32).cpu().clone()
        self._bias_np = (self.bias.numpy() if self.bias is not None else np.zeros(c_out, dtype=np.float32))
        self._phases = tuple(np.isin(np.arange(s), np.arange(k) * d % s)
                             for s, k, d in zip(self.stride, (kh, kw), self.dilation))
        self._pointwise = (kh, kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)
        self._plans: dict[tuple[int, int, int, int], tuple] = {}

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """(Ho, Wo) for an input of h x w, as F.conv2d computes it."""
        kh, kw = self.shape[2:]
        return tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in
                     zip((h, w), self.padding, self.dilation, (kh, kw), self.stride))

    def _plan(self, batch: int, h: int, w: int, threads: int) -> tuple:
        """(geometry the kernel takes, tap offsets into a band's packed planes, floats per thread
        slot, (Ho, Wo)) for this input size and thread count, made once.

        An image's plane positions are cut into bands of whole tiles whose planes (the positions
        the tiles read, `_BAND_BYTES`) fit in L2, as few as fit rounded up to a multiple of the
        threads; when the bands still cannot be shared evenly (batch 1 on small maps), each band's
        channel chunks are split into one group per thread."""
        key = (batch, h, w, threads)
        if key not in self._plans:
            out_size = self.output_size(h, w)
            if min(out_size) < 1:
                raise ValueError(f"input {h}x{w} is smaller than the {tuple(self.shape[2:])} kernel's dilated extent")
            if self._pointwise:  # a product over channels: pixels as one row, so no column is ever padding
                h, w = 1, h * w
            (sh, sw), (pad_h, pad_w), (dh, dw) = self.stride, self.padding, self.dilation
            c_out, c_in, kh, kw = self.shape
            h_out, w_out = self.output_size(h, w)
            wq = -(-(w + 2 * pad_w) // sw)
            reach = (kh - 1) * dh // sh * wq + (kw - 1) * dw // sw  # furthest tap from a position, in a plane
            tiles_img = -(-(h_out * wq) // _TILE)
            fit = _BAND_BYTES // (4 * c_in * sh * sw)  # plane positions a band may hold
            bands = -(-tiles_img // min(tiles_img, max(1, (fit - reach) // _TILE)))
            bands = -(-bands // threads) * threads  # as many as fit, rounded up to share evenly
            tiles = -(-tiles_img // bands)
            bands = -(-tiles_img // tiles)
            groups = 1 if batch * bands >= 4 * threads or batch * bands % threads == 0 else threads
            span = tiles * _TILE + reach  # positions a band's tiles read
            plane = span + LANES  # a plane and the slack a ragged pack block may spill into
            rows = span // wq + 2  # plane rows a span can touch
            ci, dy, dx = self.taps
            offsets = (((ci * sh + dy * dh % sh) * sw + dx * dw % sw) * plane + dy * dh // sh * wq + dx * dw // sw)
            if offsets.size and offsets.max() >= 2**31:
                raise ValueError(f"input {h}x{w} with {c_in} channels is too large for 32-bit tap offsets")
            g = np.array([c_in, h, w, sh, sw, pad_h, pad_w, wq, plane, h_out, w_out, c_out, batch, rows, tiles,
                          bands, groups, span], dtype=np.int64)
            if len(self._plans) >= 8:
                self._plans.clear()
            self._plans[key] = (g, offsets.astype(np.int32), c_in * sh * sw * plane, out_size)
        return self._plans[key]

    def to_dense(self) -> torch.Tensor:
        """The masked weight back as a dense (out, in, kh, kw) float32 tensor."""
        out = np.zeros(self.shape, dtype=np.float32)
        blocks = (self.bptr.shape[0] - 1) // max(self.shape[0], 1)
        co = np.repeat(np.tile(np.arange(self.shape[0]), blocks), np.diff(self.bptr.astype(np.int64)))
        np.add.at(out, (co, *self.taps), self.data)  # padding zeros share a tap with a weight
        return torch.from_numpy(out)

    def conv(self, x: torch.Tensor, residual: torch.Tensor | None = None,
             activation: str | None = None) -> torch.Tensor:
        """act(conv2d(x, W) + b + residual) as a channels-last (N, out, Ho, Wo) tensor. Inference only.

        x is (N, in, H, W) float32, best in torch's channels_last memory format (any other layout
        is converted first, a copy); so is `residual` (the output's shape), when given.
        """
        if cpu.numba is None:
            raise RuntimeError(cpu.available()[1])
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        c_out, c_in = self.shape[:2]
        if x.dim() != 4 or x.shape[1] != c_in or x.dtype != torch.float32:
            raise ValueError(f"expected a float32 (N, {c_in}, H, W) input, got {tuple(x.shape)} {x.dtype}")
        batch, _, h, w = x.shape
        threads = numba.get_num_threads()
        g, offsets, slot_floats, (h_out, w_out) = self._plan(batch, h, w, threads)
        y_nhwc = torch.empty((batch, h_out, w_out, c_out), dtype=torch.float32)
        y = y_nhwc.permute(0, 3, 1, 2)  # channels_last (N, out, Ho, Wo)
        if residual is not None and (residual.shape != y.shape or residual.dtype != torch.float32):
            raise ValueError(f"residual must be float32 of the output's shape {tuple(y.shape)}, got "
                             f"{tuple(residual.shape)} {residual.dtype}")
        if batch == 0:
            return y
        res = _nhwc(residual) if residual is not None else _ZERO16
        _conv(_nhwc(x), buffer("conv_xq", threads, slot_floats), _ZERO16, self.bptr, offsets, self.data,
              self._bias_np, y_nhwc.numpy().reshape(-1), res, residual is not None, ACTIVATIONS.index(activation), g,
              *self._phases)
        return y


def _nhwc(t: torch.Tensor) -> np.ndarray:
    """A (N, C, H, W) tensor's values as a flat NHWC float32 array: a view when it is channels_last
    (numpy's views cost a fraction of torch's; this runs on every call)."""
    if t.requires_grad:
        t = t.detach()
    if not t.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return t.numpy().transpose(0, 2, 3, 1).reshape(-1)


def warmup() -> None:
    """Compile (or load from numba's disk cache) the kernel."""
    if cpu.available()[0]:
        SparseConvWeight(torch.ones(1, 1, 1, 1)).conv(torch.zeros(1, 1, 1, 1))
