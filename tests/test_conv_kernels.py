"""Correctness of the direct sparse convolution kernel against a float64 F.conv2d reference,
and of `SparseConv2d`'s fused residual add and activation in every format."""

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spdy.runtime import cpu

ok, reason = cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"sparse kernel unavailable: {reason}")

if ok:
    from spdy.runtime import conv_kernels
    from spdy.runtime.conv_kernels import SparseConvWeight
from spdy.runtime.modules import SparseConv2d


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    if ok:
        conv_kernels.warmup()


def _masked(c_out: int, c_in: int, kh: int, kw: int, sparsity: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(c_out, c_in, kh, kw, generator=g)
    return w * (torch.rand(w.shape, generator=g) >= sparsity)


def _reference(x, w, b, residual, activation, stride, padding, dilation, absolute=False):
    """act(conv2d + b + residual) in float64; with `absolute`, the same on |x|, |w|, |b|, |residual|
    without the activation: the magnitude the float32 sums round at."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    y = F.conv2d(f(x), f(w), None if b is None else f(b), stride, padding, dilation)
    if residual is not None:
        y = y + f(residual)
    if absolute or activation is None:
        return y
    return y.clamp(min=0) if activation == "relu" else y.clamp(0, 6)


def _error(y: torch.Tensor, x, w, b, residual, activation, stride, padding, dilation) -> float:
    """Max abs error over the largest magnitude (so an output that cancels to ~0 does not
    demand more than float32 can give)."""
    ref = _reference(x, w, b, residual, activation, stride, padding, dilation)
    assert y.shape == ref.shape and y.dtype == torch.float32
    scale = _reference(x, w, b, residual, activation, stride, padding, dilation, absolute=True).max().item()
    return (y.double() - ref).abs().max().item() / max(scale, 1e-30)


def _run(c_out, c_in, k, h, w_in, batch=1, stride=1, padding=0, dilation=1, sparsity=0.9, seed=0, bias=True,
         residual=False, activation=None, channels_last=True):
    """Kernel output and its error; k and the geometry are ints or (h, w) pairs."""
    kh, kw = (k, k) if isinstance(k, int) else k
    w = _masked(c_out, c_in, kh, kw, sparsity, seed)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(c_out, generator=g) if bias else None
    x = torch.randn(batch, c_in, h, w_in, generator=g)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    packed = SparseConvWeight(w, b, stride, padding, dilation)
    res = None
    if residual:
        res = torch.randn(packed.conv(x).shape, generator=g)
    y = packed.conv(x, res, activation)
    return y, _error(y, x, w, b, res, activation, stride, padding, dilation)


TOL = 1e-5


@pytest.mark.parametrize("case", [
    dict(c_out=64, c_in=3, k=7, h=40, w_in=36, stride=2, padding=3),  # ResNet's first conv
    dict(c_out=32, c_in=16, k=1, h=9, w_in=9),  # 1x1, no padding: positions are pixels
    dict(c_out=24, c_in=40, k=1, h=14, w_in=14, stride=2),  # ResNet's downsample
    dict(c_out=48, c_in=32, k=3, h=14, w_in=14, padding=1),
    dict(c_out=48, c_in=32, k=3, h=15, w_in=14, stride=2, padding=1),
    dict(c_out=20, c_in=12, k=5, h=11, w_in=13, padding=2),
    dict(c_out=17, c_in=9, k=3, h=12, w_in=12, padding=2, dilation=2),
    dict(c_out=19, c_in=7, k=(3, 1), h=8, w_in=10, stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
    dict(c_out=130, c_in=70, k=3, h=7, w_in=7, padding=1),  # ResNet's last stage: 7x7 maps, ragged chunks
    dict(c_out=5, c_in=1, k=3, h=1, w_in=40, padding=1),  # a single row
    dict(c_out=16, c_in=16, k=3, h=3, w_in=3),  # a single output pixel
    dict(c_out=3, c_in=2, k=2, h=50, w_in=3, stride=3, padding=1),  # stride larger than the kernel
])
@pytest.mark.parametrize("batch", [1, 3])
def test_shapes(case: dict, batch: int) -> None:
    _, err = _run(**case, batch=batch, seed=batch)
    assert err <= TOL, err


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99, 1.0])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_store(sparsity: float, activation: str | None, residual: bool) -> None:
    y, err = _run(33, 21, 3, 10, 9, batch=2, padding=1, sparsity=sparsity, residual=residual, activation=activation)
    assert err <= TOL, err
    if activation == "relu6":
        assert float(y.max()) <= 6.0 and float(y.min()) >= 0.0


def test_all_zero_weight_is_bias_plus_residual() -> None:
    w = torch.zeros(18, 5, 3, 3)
    b = torch.randn(18)
    x = torch.randn(2, 5, 6, 6)
    res = torch.randn(2, 18, 6, 6)
    y = SparseConvWeight(w, b, padding=1).conv(x, res, "relu")
    assert torch.equal(y, (res + b[:, None, None]).relu())


def test_layouts() -> None:
    """channels_last and contiguous inputs (and residuals) give the same channels_last output."""
    w = _masked(40, 24, 3, 3, 0.8, 3)
    x = torch.randn(3, 24, 12, 11)
    res = torch.randn(3, 40, 12, 11)
    packed = SparseConvWeight(w, torch.randn(40), padding=1)
    y = packed.conv(x, res, "relu")
    assert y.is_contiguous(memory_format=torch.channels_last)
    x_cl, res_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, res))
    assert torch.equal(packed.conv(x_cl, res_cl, "relu"), y)
    assert torch.equal(packed.conv(x[:, :, :, :], res.transpose(2, 3).contiguous().transpose(2, 3), "relu"), y)


def test_batch_64_and_no_bias() -> None:
    _, err = _run(32, 16, 3, 7, 7, batch=64, padding=1, bias=False)
    assert err <= TOL, err


def test_random_draws() -> None:
    """Seeded random geometries: kernel 1-7, stride 1-3, padding 0-3, dilation 1-2, batch 1-8,
    odd channel counts, any sparsity, layouts, residual and activation."""
    rng = random.Random(17)
    for _ in range(50):
        kh, kw = rng.choice([1, 3, 5, 7]), rng.choice([1, 2, 3])
        dh, dw = rng.choice([1, 1, 2]), rng.choice([1, 2])
        case = dict(
            c_out=rng.randint(1, 70), c_in=rng.randint(1, 40), k=(kh, kw),
            stride=(rng.randint(1, 3), rng.randint(1, 2)), padding=(rng.randint(0, 3), rng.randint(0, 2)),
            dilation=(dh, dw), batch=rng.choice([1, 3, 8]), sparsity=rng.choice([0.0, 0.5, 0.9, 0.99, rng.random()]),
            seed=rng.randint(0, 2**16), bias=rng.random() < 0.8, residual=rng.random() < 0.5,
            activation=rng.choice([None, "relu", "relu6"]), channels_last=rng.random() < 0.7)
        case["h"] = rng.randint(max(1, dh * (kh - 1) + 1 - 2 * case["padding"][0]), 20)
        case["w_in"] = rng.randint(max(1, dw * (kw - 1) + 1 - 2 * case["padding"][1]), 20)
        _, err = _run(**case)
        assert err <= TOL, (err, case)


@pytest.mark.parametrize("threads", [1, 2])
def test_bands(monkeypatch, threads: int) -> None:
    """Positions cut into bands of one or two tiles (small `_BAND_BYTES`), each packed with its halo
    by the thread that runs it; and odd band counts, where each thread runs a share of the channels."""
    monkeypatch.setattr(conv_kernels, "_BAND_BYTES", 3000)
    previous = cpu.numba.get_num_threads()
    cpu.numba.set_num_threads(min(threads, cpu.numba.config.NUMBA_NUM_THREADS))
    try:
        for case in (dict(c_out=20, c_in=8, k=3, h=23, w_in=17, padding=1, batch=2),
                     dict(c_out=20, c_in=8, k=3, h=23, w_in=17, padding=1, batch=1),
                     dict(c_out=9, c_in=5, k=5, h=30, w_in=9, stride=2, padding=2, dilation=1, batch=3),
                     dict(c_out=40, c_in=16, k=1, h=11, w_in=13, batch=4),
                     dict(c_out=7, c_in=6, k=3, h=19, w_in=8, dilation=2, padding=1, batch=1)):
            _, err = _run(**case, residual=True, activation="relu")
            assert err <= TOL, (err, case)
    finally:
        cpu.numba.set_num_threads(previous)


def test_error_detects_a_wrong_tap() -> None:
    """The tolerance is tight enough to catch a kernel that reads one tap one pixel off."""
    w = _masked(16, 8, 3, 3, 0.9, 5)
    x = torch.randn(1, 8, 10, 10)
    y = SparseConvWeight(w, None, padding=1).conv(x)
    assert _error(y, x, w, None, None, None, 1, 1, 1) <= TOL
    moved = w.clone()
    co, ci, dy, dx = (int(i[0]) for i in torch.nonzero(w[:, :, :, :2], as_tuple=True))
    moved[co, ci, dy, dx + 1], moved[co, ci, dy, dx] = w[co, ci, dy, dx], 0.0
    assert _error(y, x, moved, None, None, None, 1, 1, 1) > 100 * TOL


def test_to_dense_round_trip() -> None:
    w = _masked(21, 13, 3, 5, 0.7, 9)
    assert torch.equal(SparseConvWeight(w, stride=2, padding=1).to_dense(), w)


def test_bad_inputs() -> None:
    packed = SparseConvWeight(torch.randn(4, 3, 3, 3))
    with pytest.raises(ValueError, match="expected a float32"):
        packed.conv(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="activation"):
        packed.conv(torch.randn(1, 3, 8, 8), activation="gelu")
    with pytest.raises(ValueError, match="residual"):
        packed.conv(torch.randn(1, 3, 8, 8), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="smaller"):
        packed.conv(torch.randn(1, 3, 2, 8))


@pytest.mark.parametrize("fmt", ["kernel", "dense", "csr"])
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_sparse_conv2d_fused(fmt: str, activation: str | None) -> None:
    """conv + folded BN + add + ReLU as one SparseConv2d in every format."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) >= 0.9)
    x = torch.randn(2, 24, 13, 11).contiguous(memory_format=torch.channels_last)
    ref = conv(x).detach()
    residual = torch.randn(ref.shape)
    module = SparseConv2d(conv, fmt, activation=activation)
    y = module(x, residual)
    expected = _reference(x, conv.weight.detach(), conv.bias.detach(), residual, activation, 2, 1, 1)
    assert (y.double() - expected).abs().max() <= 1e-4 * expected.abs().max()
    if activation is None:
        assert torch.allclose(module(x), ref, atol=1e-4, rtol=1e-4)
    assert torch.equal(module.dense_weight(), conv.weight.detach().reshape(40, -1))
    assert module.activation == activation and (activation or "") in repr(module)


def test_sparse_conv2d_kernel_plain() -> None:
    torch.manual_seed(1)
    conv = nn.Conv2d(16, 32, 1)
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape) >= 0.7)
    x = torch.randn(3, 16, 9, 9)
    y = SparseConv2d.from_module(conv, "kernel")(x)
    assert torch.allclose(y, conv(x).detach(), atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="activation"):
        SparseConv2d(conv, "kernel", activation="gelu")
