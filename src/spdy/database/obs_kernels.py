"""numba kernels for the OBS pruner's two hot loops, with torch's way where numba is missing.

**The sweep's column loop.** 
Within a mask block SparseGPT prunes column by column, pushing each column's error onto
the block's later columns. In torch that is five small ops per column (~60k per MiniLM
unit over its 41 levels), dominated by dispatch and by two torch threads waiting for each
other when the second core is busy. The kernel works on the block transposed, so each
update is one contiguous run over all rows (vectorised; 5x faster than walking row by
row, which skips unpruned weights but runs short unaligned loops), single-threaded.

**The conjugate-gradient products** ``P @ H``: ``P`` is zero off each row's mask, so only
its kept entries need a row of ``H``: at density ``d`` the work is ``d`` of the dense
product. Each thread takes 64 columns of ``H`` (L2-resident: 384 KiB for 1536 inputs) and
sums each row's kept rows of that tile in four ``<16 x float>`` registers.
"""

from __future__ import annotations

import numpy as np
import torch

from spdy.runtime import cpu

if cpu.numba is not None:
    import numba

    from spdy.runtime.vector import JIT, LANES, vfma, vstore, vzero

    _TILE = 4 * LANES  # columns of H per work item

    @numba.njit(boundscheck=False, cache=True, nogil=True)
    def _prune_block_t(WT, U1, maskT, errorsT):
        """The block's column loop on ``W1^T``: row ``i`` of ``WT`` is column ``i`` of the block."""
        width, rows = WT.shape
        for i in range(width):
            d = U1[i, i]
            w, m, e = WT[i], maskT[i], errorsT[i]
            for r in range(rows):
                if m[r]:
                    e[r] = w[r] / d
                    w[r] = 0.0
            for j in range(i + 1, width):
                u, wj = U1[i, j], WT[j]
                for r in range(rows):
                    wj[r] -= e[r] * u


    @numba.njit(parallel=True, **JIT)
    def _sparse_rows_times(P, ptr, idx, H, out):
        """``out = P @ H`` from the entries ``idx[ptr[r]:ptr[r + 1]]`` of each row ``r`` of ``P``."""
        rows, n = out.shape
        h, o = H.ctypes.data, out.ctypes.data
        step = np.uintp(LANES * 4)
        for t in numba.prange(n // _TILE):
            c0 = t * _TILE
            for r in range(rows):
                a0, a1, a2, a3 = vzero(), vzero(), vzero(), vzero()
                for k in range(ptr[r], ptr[r + 1]):
                    j = idx[k]
                    v = P[r, j]
                    src = h + np.uintp((j * n + c0) * 4)
                    a0 = vfma(a0, v, src)
                    a1 = vfma(a1, v, src + step)
                    a2 = vfma(a2, v, src + 2 * step)
                    a3 = vfma(a3, v, src + 3 * step)
                dst = o + np.uintp((r * n + c0) * 4)
                vstore(dst, a0)
                vstore(dst + step, a1)
                vstore(dst + 2 * step, a2)
                vstore(dst + 3 * step, a3)


def prune_block(W1: torch.Tensor, U1: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Prune ``mask`` (True = prune) of one block of weights in place, column by column,
    each column's error pushed onto the block's later columns; returns the errors (for the later blocks)."""
    if cpu.numba is not None:
        WT, errorsT = W1.t().contiguous(), torch.zeros(W1.shape[1], W1.shape[0], dtype=W1.dtype)
        _prune_block_t(WT.numpy(), U1.contiguous().numpy(), mask.t().contiguous().numpy(), errorsT.numpy())
        W1.copy_(WT.t())
        return errorsT.t()
    errors = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        q = W1[:, i].masked_fill(mask[:, i], 0.0)
        errors[:, i] = (W1[:, i] - q) / U1[i, i]
        W1[:, i:] -= errors[:, i : i + 1] * U1[i : i + 1, i:]
        W1[:, i] = q
    return errors


class MaskedRows:
    """``P @ H`` for every ``P`` that is zero off ``keep``: by the kernel where that is sparse enough to pay."""

    DENSITY = 0.2  # kept fraction below which the kernel beats the dense product for 1536 inputs
    SMALL = 512  # up to this many inputs H stays in cache and the kernel wins at any MiniLM density

    def __init__(self, keep: torch.Tensor, H: torch.Tensor) -> None:
        self.H = H.contiguous()
        self.sparse = cpu.numba is not None and H.shape[1] % _TILE == 0 and (H.shape[1] <= self.SMALL or float(keep.float().mean()) < self.DENSITY)
        if self.sparse:
            counts = keep.sum(1)
            self.ptr = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).numpy()
            self.idx = keep.nonzero()[:, 1].numpy()

    def __call__(self, P: torch.Tensor) -> torch.Tensor:
        if not self.sparse:
            return P @ self.H
        out = torch.empty(P.shape[0], self.H.shape[1], dtype=torch.float32)
        _sparse_rows_times(P.contiguous().numpy(), self.ptr, self.idx, self.H.numpy(), out.numpy())
        return out
