"""The small-row sparse kernels (`spdy.runtime.gemv`) against a float64 masked dense product, and
`SparseKernelWeight.matmul`'s dispatch to them.

How the grid covers the kernel's paths with few cases (compilation, not the products, is the cost):
- `test_layouts`, one case per kernel (csr, bitmask on AVX2, bitmask on AVX-512; each skipped
  where the host lacks it) x row count x thread split (3 x 5 x 2 = 30):
  * rows 1, 2, 3, 4, 7 take the X-row passes 1; 2; 2+1; 4; 4+2+1 (every `r` of `_*_rows`);
  * threaded (numba's threads, chunks of 32 output rows) and single-thread (`THREAD_BYTES`);
  * inside each case, both activations (identity, GELU), sparsities 0 / 0.5 / 0.9 / 1 (full,
    partly and completely empty rows and mask bytes), with and without bias, on two shapes:
    577 x 205 (an output chunk of 1 row; 205 = 12 16-column mask words + 13 columns, so x is
    zero-padded to whole words, and 13 words = 6 pairs + a tail word at 1 row) and 33 x 128
    (no padding, no tail); each product runs twice, the second through the compiled entry point.
- `test_matmul_dispatch`: through `SparseKernelWeight.matmul` just below, at and past
  `SMALL_ROWS`, with and without bias and GELU.
- one test each for the layout choice, 32-bit csr indices, a 3-D non-contiguous input through
  `SparseLinear`, and the LayerNorm epilogue at few rows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import masked_weight
from spdy.runtime import SparseLinear, cpu, gemv, kernels
from spdy.runtime.gemv import SmallRowWeight, csr_density, has_avx2

ok, reason = cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"sparse kernel unavailable: {reason}")
KERNELS = [("csr", None),
           pytest.param("bitmask", "avx2", marks=pytest.mark.skipif(not has_avx2(), reason="host lacks AVX2")),
           pytest.param("bitmask", "avx512", marks=pytest.mark.skipif(not cpu.cpu_has_avx512f(), reason="host lacks AVX-512F"))]
SMALL = kernels.SMALL_ROWS


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    kernels.warmup()


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, gelu: bool) -> tuple[torch.Tensor, float]:
    """The float64 product (GELU'd if asked) and the magnitude its float32 sums round at."""
    bd = None if b is None else b.double()
    ref = F.linear(x.double(), w.double(), bd)
    magnitude = F.linear(x.double().abs(), w.double().abs(), None if b is None else bd.abs())
    return (F.gelu(ref) if gelu else ref), (magnitude.max().item() if magnitude.numel() else 0.0)


def _assert_close(y: torch.Tensor, ref: torch.Tensor, scale: float) -> None:
    assert y.shape == ref.shape and y.dtype == torch.float32
    err = (y.double() - ref).abs().max().item() if ref.numel() else 0.0
    assert err <= 1e-5 * max(scale, 1e-30), (err, scale)


@pytest.mark.parametrize("layout,isa", KERNELS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("threaded", [True, False])
def test_layouts(layout: str, isa: str | None, n: int, threaded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gemv, "THREAD_BYTES", 0 if threaded else 1 << 62)
    for out_f, in_f in ((577, 205), (33, 128)):
        for sparsity in (0.0, 0.5, 0.9, 1.0):
            for gelu in (False, True):
                seed = n + out_f + int(100 * sparsity) + gelu
                w = masked_weight(out_f, in_f, sparsity, seed)
                b = torch.randn(out_f) if gelu else None  # the bias is a zero array when absent
                x = torch.randn(n, in_f)
                weight = SmallRowWeight(w.numpy(), np.zeros(out_f, np.float32) if b is None else b.numpy(), layout,
                                        isa)
                assert weight.layout == layout and weight.threaded(n) == threaded
                for _ in range(2):  # the first call resolves the compiled entry point, the second uses it
                    y = np.full((n, out_f), np.nan, dtype=np.float32)
                    weight.matmul(x.numpy(), y, gelu)
                    _assert_close(torch.from_numpy(y), *_reference(x, w, b, gelu))


@pytest.mark.parametrize("n,with_bias,gelu", [(1, True, False), (3, False, True), (SMALL, True, True),
                                              (SMALL + 1, False, False), (SMALL + 1, True, True)])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_matmul_dispatch(n: int, with_bias: bool, gelu: bool, sparsity: float) -> None:
    w = masked_weight(577, 193, sparsity, seed=7 * n + int(100 * sparsity))
    b = torch.randn(577) if with_bias else None
    x = torch.randn(n, 193)
    weight = kernels.SparseKernelWeight.from_dense(w, b)
    y = weight.matmul(x, "gelu" if gelu else None)
    _assert_close(y, *_reference(x, w, b, gelu))
    assert (weight._small is not None) == (n <= SMALL), "rows up to SMALL_ROWS take the small-row path, others not"


def test_layout_follows_density() -> None:
    dense_enough = SmallRowWeight(masked_weight(64, 64, 1 - 2 * csr_density(), 0).numpy(), np.zeros(64, np.float32))
    sparse = SmallRowWeight(masked_weight(64, 64, 1 - csr_density() / 2, 0).numpy(), np.zeros(64, np.float32))
    assert sparse.layout == "csr"
    assert dense_enough.layout == ("bitmask" if has_avx2() else "csr")
    assert dense_enough.nbytes < 4 * 64 * 64  # fewer bytes than the dense weight


def test_wide_input_uses_32_bit_indices() -> None:
    w = masked_weight(3, 70_000, 0.999, seed=1)
    x = torch.randn(2, 70_000)
    weight = SmallRowWeight(w.numpy(), np.zeros(3, np.float32), "csr")
    assert weight.indices.dtype == np.int32
    y = np.empty((2, 3), np.float32)
    weight.matmul(x.numpy(), y, False)
    _assert_close(torch.from_numpy(y), *_reference(x, w, None, False))


@pytest.mark.parametrize("gelu", [False, True])
def test_sparse_linear_3d_and_non_contiguous(gelu: bool) -> None:
    w, b = masked_weight(96, 80, 0.7, seed=3), torch.randn(96)
    layer = SparseLinear(w, b, format="kernel", activation="gelu" if gelu else None)
    x = torch.randn(80, 1, 3).permute(1, 2, 0)  # (1, 3, 80), not contiguous: 3 rows
    assert not x.is_contiguous()
    y = layer(x)
    ref, scale = _reference(x.reshape(-1, 80), w, b, gelu)
    _assert_close(y.reshape(-1, 96), ref, scale)
    assert y.shape == (1, 3, 96)
    assert layer.store.kernel._small is not None


def test_norm_epilogue_at_few_rows() -> None:
    w, b = masked_weight(48, 40, 0.5, seed=4), torch.randn(48)
    x, residual = torch.randn(2, 40), torch.randn(2, 48)
    gamma, beta = torch.randn(48), torch.randn(48)
    y = kernels.SparseKernelWeight.from_dense(w, b).matmul(x, residual=residual, norm=(gamma, beta, 1e-5))
    ref = F.layer_norm(F.linear(x.double(), w.double(), b.double()) + residual.double(), (48,), gamma.double(),
                       beta.double(), 1e-5)
    assert (y.double() - ref).abs().max().item() < 1e-4
