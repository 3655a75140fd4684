"""Weight formats: the ways one pruned (out, in) weight can be multiplied on a CPU.

Each format offers two products: ``linear(x, activation)`` for row-major inputs (N, in) ->
(N, out), optionally followed by GELU (fused into the store by the kernel format),
and ``mm_t(xt)`` for inputs already laid out as columns (in, N) -> (out, N). The sparse
torch formats are only fast as ``W_sparse @ X^T`` (``X @ W_sparse.T`` is 5-7x slower), so
their ``linear`` copies the input to columns (free when it already is, e.g. the output of
a previous sparse layer) and returns a transposed view; the copy is part of every time we
measure, so the table and the deployed model pay the same.

* ``dense``: ``F.linear`` (MKL/oneDNN); the reference every other format must beat.
* ``csr``: torch sparse CSR; pays off at high unstructured sparsity (~95%).
* ``bsr``: torch sparse BSR; only offered when the zeros really come in square blocks.
* ``kernel``: the numba kernel of :mod:`spdy.runtime.kernels`, when it imports and runs;
  creating one sets glibc to keep freed memory (`cpu.keep_freed_memory`, process-wide).
  A Conv2d in this format runs the direct sparse convolution of
  :mod:`spdy.runtime.conv_kernels` instead (`conv_kernel`), on channels-last activations.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from typing import ClassVar

import torch
import torch.nn.functional as F

FORMATS = ("dense", "csr", "bsr", "kernel")
BLOCK_SIZES = (32, 16, 8)
# A mask counts as block-structured when its non-zero blocks are at least this full.
BLOCK_FILL = 0.9


def block_size(weight: torch.Tensor) -> tuple[int, int] | None:
    """The largest square block (32, 16 or 8) whose non-zero blocks are >= 90% full, if any."""
    nonzero = weight != 0
    nnz = int(nonzero.sum())
    rows, cols = weight.shape
    if nnz == 0 or nnz == weight.numel():
        return None
    for b in BLOCK_SIZES:
        if rows % b or cols % b:
            continue
        blocks = int(nonzero.reshape(rows // b, b, cols // b, b).any(dim=(1, 3)).sum())
        if nnz >= BLOCK_FILL * blocks * b * b:
            return (b, b)
    return None


@functools.lru_cache(maxsize=1)
def kernel_status() -> tuple[bool, str]:
    """Whether the numba kernel can be used here, and why not (imported lazily, once)."""
    try:
        from spdy.runtime import cpu

        for module in ("spdy.runtime.kernels", "spdy.runtime.conv_kernels"):  # what the kernel format runs must load too
            importlib.import_module(module)
    except ImportError as e:
        return False, f"{module} does not import: {e}"
    try:
        ok, reason = cpu.available()
    except Exception as e:  # a broken optional kernel must not break the runtime
        return False, f"spdy.runtime.cpu.available() failed: {e!r}"
    return bool(ok), str(reason)


def set_threads(n: int) -> None:
    """Threads for everything the runtime runs: torch's pool and, where the kernel works, numba's too."""
    if kernel_status()[0]:
        from spdy.runtime import cpu

        cpu.set_num_threads(n)
    else:
        torch.set_num_threads(n)


class WeightFormat:
    """A weight (and bias) stored for one way of multiplying; subclasses fill in the products."""

    name: ClassVar[str]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        if weight.dim() != 2:
            raise ValueError(f"format {self.name!r} needs an (out, in) weight matrix, got shape {tuple(weight.shape)}")
        self.shape = tuple(weight.shape)
        self.bias = None if bias is None else bias.detach().contiguous()

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        return True

    def linear(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        # The result stays a transposed view: elementwise ops keep that layout, so the next
        # sparse layer gets its X^T for free, and an op that needs rows copies only then.
        return _activate(self.mm_t(x.t().contiguous()).t(), activation)

    def mm_t(self, xt: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_dense(self) -> torch.Tensor:
        raise NotImplementedError


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return y
    if activation == "gelu":
        return F.gelu(y)
    raise ValueError(f"unknown activation {activation!r}; activations are None and 'gelu'")


class DenseFormat(WeightFormat):
    name = "dense"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        self.weight = weight.detach().contiguous()

    def linear(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        return _activate(F.linear(x, self.weight, self.bias), activation)

    def mm_t(self, xt: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.mm(self.weight, xt)
        return torch.addmm(self.bias[:, None], self.weight, xt)

    def to_dense(self) -> torch.Tensor:
        return self.weight


class _TorchSparseFormat(WeightFormat):
    """CSR and BSR share the product ``addmm(bias, W_sparse, X^T)``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse (CSR|BSR) tensor support is in beta.*")
            self.sparse = self._convert(weight.detach())
        self.bias_col = None if self.bias is None else self.bias[:, None].contiguous()

    def _convert(self, weight: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def mm_t(self, xt: torch.Tensor) -> torch.Tensor:
        if self.bias_col is None:
            return torch.mm(self.sparse, xt)
        return torch.addmm(self.bias_col, self.sparse, xt)

    def to_dense(self) -> torch.Tensor:
        return self.sparse.to_dense()


class CsrFormat(_TorchSparseFormat):
    name = "csr"

    def _convert(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.to_sparse_csr()


class BsrFormat(_TorchSparseFormat):
    name = "bsr"

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        return block_size(weight) is not None

    def _convert(self, weight: torch.Tensor) -> torch.Tensor:
        blocks = block_size(weight)
        if blocks is None:
            raise ValueError(f"format 'bsr': the {tuple(weight.shape)} weight's zeros are not in 32/16/8 square blocks; use 'csr'")
        self.blocksize = blocks
        return weight.to_sparse_bsr(blocks)


class KernelFormat(WeightFormat):
    name = "kernel"

    @classmethod
    def supports(cls, weight: torch.Tensor) -> bool:
        return kernel_status()[0]

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__(weight, bias)
        ok, reason = kernel_status()
        if not ok:
            raise RuntimeError(f"format 'kernel' is unavailable: {reason}")
        from spdy.runtime.cpu import keep_freed_memory
        from spdy.runtime.kernels import SparseKernelWeight

        keep_freed_memory()  # fresh output pages would cost as much as the sparse product
        self.kernel = SparseKernelWeight.from_dense(weight.detach(), self.bias)

    def linear(self, x: torch.Tensor, activation: str | None = None) -> torch.Tensor:
        return self.kernel.matmul(x, activation)

    def mm_t(self, xt: torch.Tensor) -> torch.Tensor:
        return self.kernel.matmul(xt.t()).t()

    def to_dense(self) -> torch.Tensor:
        return self.kernel.to_dense()


def conv_kernel(weight: torch.Tensor, bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int]):
    """Format ``kernel`` for a Conv2d weight (out, in, kh, kw): a `conv_kernels.SparseConvWeight`.
    A conv is not a product of one (out, in) matrix, so this is not a `WeightFormat`."""
    ok, reason = kernel_status()
    if not ok:
        raise RuntimeError(f"format 'kernel' is unavailable: {reason}")
    from spdy.runtime.conv_kernels import SparseConvWeight
    from spdy.runtime.cpu import keep_freed_memory

    keep_freed_memory()  # fresh output pages would cost as much as the sparse product
    return SparseConvWeight(weight.detach(), bias, stride, padding, dilation)


_CLASSES: dict[str, type[WeightFormat]] = {c.name: c for c in (DenseFormat, CsrFormat, BsrFormat, KernelFormat)}


def make_format(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> WeightFormat:
    """Store ``weight`` (out, in) and ``bias`` in format ``name``; raises naming the formats."""
    try:
        cls = _CLASSES[name]
    except KeyError:
        raise ValueError(f"unknown weight format {name!r}; formats are {', '.join(FORMATS)}") from None
    return cls(weight, bias)


def supported_formats(weight: torch.Tensor, candidates: tuple[str, ...] | list[str] = FORMATS) -> list[str]:
    """The candidate formats that can hold this weight here (bsr needs blocks, kernel numba)."""
    unknown = [c for c in candidates if c not in _CLASSES]
    if unknown:
        raise ValueError(f"unknown weight formats {unknown}; formats are {', '.join(FORMATS)}")
    return [c for c in candidates if _CLASSES[c].supports(weight)]
