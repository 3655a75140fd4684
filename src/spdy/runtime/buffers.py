"""Cache-line aligned float32 buffers, kept per thread between kernel calls.

A fresh multi-MB array per call costs page faults (glibc hands large freed blocks back to the
OS) that rival the sparse product, and a 512-bit load that straddles two cache lines costs two.
"""

from __future__ import annotations

import math
import threading

import numpy as np

from spdy.runtime import cpu

_SCRATCH = threading.local()


def aligned_empty(size: int) -> np.ndarray:
    """An uninitialised float32 array starting on a 64-byte cache line. numpy only promises 16
    bytes, and a 512-bit load that straddles two lines costs two: packing X into a misaligned
    buffer made the 384x1536 kernel 1.3-1.5x slower at 90% (Zen 4, 1 and 2 threads)."""
    raw = np.empty(size + 15, dtype=np.float32)
    start = (-raw.ctypes.data % 64) // 4
    return raw[start:start + size]


def buffer(name: str, *shape: int) -> np.ndarray:
    """A cache-line aligned float32 array of `shape`, kept between calls under `name` per Python
    thread (two threads may run kernels at once). Contents are left over from the last use."""
    size = math.prod(shape)
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.size < size:
        buf = aligned_empty(size)
        setattr(_SCRATCH, name, buf)
    return buf[:size].reshape(shape)


def thread_slots(name: str, *shape: int) -> np.ndarray:
    """A `buffer` of (numba threads, *shape): one slot per numba thread, each starting on a
    cache line (a 1-D slot is rounded up to 16 floats). Needs numba."""
    if len(shape) == 1:
        shape = (-(-shape[0] // 16) * 16,)
    return buffer(name, cpu.numba.config.NUMBA_NUM_THREADS, *shape)
