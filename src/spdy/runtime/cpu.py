"""What the host offers the kernels: AVX-512, numba, thread counts, and glibc's malloc.

Kept apart from the kernels so that importing it never needs numba: without numba (the
DeepSparse venv has none) `available` says why, and the kernel modules are not loaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch


@functools.cache  # asked for every small-row weight built
def cpu_has_avx512f() -> bool:
    """True only when the host really has AVX-512F (never assumed)."""
    try:
        import llvmlite.binding as llvm

        return "+avx512f" in llvm.get_host_cpu_features().flatten().split(",")
    except Exception:
        try:
            with open("/proc/cpuinfo") as f:
                return any(line.startswith("flags") and " avx512f" in line for line in f)
        except OSError:
            return False


@functools.cache  # read once: every cold layer timing asks
def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache (Linux sysfs), else ``default``: what a layer's weights must exceed to come from memory."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return max(sizes, default=default)


def prefer_512_bit_vectors() -> None:
    """LLVM tunes some AVX-512 CPUs to 256-bit vectors; ask for 512 unless the user chose.

    Takes effect if set before the first numba compilation in the process (numba fixes
    its target machine then).
    """
    if "NUMBA_CPU_NAME" in os.environ or "NUMBA_CPU_FEATURES" in os.environ:
        return
    if not cpu_has_avx512f():
        return
    try:
        import llvmlite.binding as llvm
    except ImportError:  # no numba here: the kernel is unavailable anyway
        return

    features = llvm.get_host_cpu_features().flatten()
    os.environ["NUMBA_CPU_FEATURES"] = features + ",-prefer-256-bit"


prefer_512_bit_vectors()

try:
    import numba

    IMPORT_ERROR = ""
except ImportError as exc:  # numba is optional at import time; available() says why
    numba = None
    IMPORT_ERROR = f"numba not importable: {exc}"


def available() -> tuple[bool, str]:
    """(True, "") when the kernels can run here, else (False, reason)."""
    if numba is None:
        return False, IMPORT_ERROR
    return True, ""


def set_num_threads(n: int) -> None:
    """Set numba's and torch's thread counts together: their pools compete in one process."""
    n = max(1, int(n))
    torch.set_num_threads(n)
    if numba is not None:
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory for reuse instead of handing it back to the OS.

    By default glibc returns large freed blocks (mmap'd ones, and the heap top above 128 KiB
    or a threshold that adapts) to the OS, so the next multi-MB activation starts on fresh
    pages and pays a page fault per 4 KiB. For a sparse Linear those faults on its output
    cost as much as the product (MiniLM-L6 at 90%: 181 -> 140 ms per batch on 1 thread, dense
    410 -> 374 ms). Process-wide; True when applied (glibc only).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum; larger blocks still get their own mapping
    return bool(ok and mallopt(m_trim_threshold, 1 << 30))
