"""Runtime modules compute what the masked dense layer computes, in every format.

Tolerance: max |y - y_ref| <= 1e-4 * max |y_ref| (float32 sums in a different order).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from spdy.levels import Option
from spdy.runtime import (
    FORMATS,
    FeedForwardOutput,
    FusedEncoderLayer,
    ProjectedSelfAttention,
    ResidualNormOutput,
    SparseConv2d,
    SparseLinear,
    block_size,
    convert,
    fastest_format,
    formats_of,
    fuse_activations,
    heuristic_format,
    kernel_status,
    magnitude_mask,
    make_format,
    supported_formats,
)

from spdy.runtime.cpu import last_level_cache_bytes
from spdy.runtime.select import COLD_CACHES, MAX_COPIES, cold_copies, format_stats, memory_bound

RTOL = 1e-4
KERNEL_OK, KERNEL_WHY = kernel_status()


def close(y: torch.Tensor, ref: torch.Tensor) -> bool:
    y, ref = y.detach(), ref.detach()
    return y.shape == ref.shape and float((y - ref).abs().max()) <= RTOL * float(ref.abs().max())


def masked_linear(in_f: int, out_f: int, option: str, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(magnitude_mask(lin.weight, option))
    return lin


def formats_for(option: str) -> list[str]:
    fmts = ["dense", "csr"]
    if "x" in option:
        fmts.append("bsr")
    if KERNEL_OK:
        fmts.append("kernel")
    return fmts


@pytest.mark.parametrize("option", ["0.9000", "0.5000", "16x16@0.8000", "32x32@0.9500"])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_masked_dense(option: str, bias: bool) -> None:
    lin = masked_linear(96, 64, option, bias)
    x = torch.randn(3, 5, 96)
    ref = lin(x).detach()
    for fmt in formats_for(option):
        y = SparseLinear.from_module(lin, fmt)(x)
        assert close(y, ref), (fmt, option, bias)
        assert torch.equal(SparseLinear.from_module(lin, fmt).dense_weight(), lin.weight.detach())


def test_non_contiguous_and_2d_inputs() -> None:
    lin = masked_linear(32, 48, "0.9500")
    x = torch.randn(32, 10).t()  # (10, 32) non-contiguous
    for fmt in ("dense", "csr"):
        assert close(SparseLinear.from_module(lin, fmt)(x), lin(x).detach())


def test_bsr_only_for_block_masks() -> None:
    random = masked_linear(64, 64, "0.9000").weight.detach()
    blocks = masked_linear(64, 64, "16x16@0.9000").weight.detach()
    assert block_size(random) is None
    assert block_size(blocks) in ((16, 16), (32, 32))
    assert "bsr" not in supported_formats(random)
    assert "bsr" in supported_formats(blocks)
    with pytest.raises(ValueError, match="not in 32/16/8 square blocks"):
        make_format("bsr", random)
    with pytest.raises(ValueError, match="unknown weight format"):
        make_format("coo", random)


@pytest.mark.skipif(KERNEL_OK, reason="kernel available here")
def test_kernel_unavailable_is_explained() -> None:
    with pytest.raises(RuntimeError, match="unavailable"):
        make_format("kernel", torch.eye(4))
    assert "kernel" not in supported_formats(torch.eye(4))


def test_hf_conv1d() -> None:
    Conv1D = pytest.importorskip("transformers.pytorch_utils").Conv1D
    torch.manual_seed(0)
    conv = Conv1D(48, 32)  # nf=48 outputs, nx=32 inputs, weight (32, 48)
    with torch.no_grad():
        conv.weight.mul_(magnitude_mask(conv.weight.t(), "0.9000").t())
        conv.bias.normal_()
    x = torch.randn(2, 7, 32)
    for fmt in ("dense", "csr"):
        assert close(SparseLinear.from_module(conv, fmt)(x), conv(x).detach())


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0)])
def test_sparse_conv2d(stride: int, padding: int) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 32, 3, stride=stride, padding=padding)
    with torch.no_grad():
        conv.weight.mul_(magnitude_mask(conv.weight.reshape(32, -1), "0.9000").reshape(conv.weight.shape))
    x = torch.randn(2, 16, 13, 11)
    for fmt in ("dense", "csr"):
        assert close(SparseConv2d(conv, fmt)(x), conv(x).detach()), fmt
    with pytest.raises(ValueError, match="groups=1"):
        SparseConv2d(nn.Conv2d(4, 4, 3, groups=2), "csr")


def test_magnitude_masks() -> None:
    w = torch.randn(64, 32)
    m = magnitude_mask(w, "0.9000")
    assert int(m.sum()) == round(0.1 * w.numel())
    assert w.abs()[m].min() >= w.abs()[~m].max()
    b = magnitude_mask(w, Option(0.75, "16x16"))
    assert int(b.sum()) == round(0.25 * 8) * 256
    nm = magnitude_mask(w, "2:4@0.5000")
    assert (nm.reshape(64, -1, 4).sum(-1) == 2).all()
    assert magnitude_mask(w, "0.0000").all()


def test_fastest_format_measures_candidates() -> None:
    lin = masked_linear(128, 128, "0.9900")
    fmt, times = fastest_format(lin, (64, 128), candidates=("dense", "csr"))
    assert fmt in ("dense", "csr") and set(times) == {"dense", "csr"}
    assert all(t > 0 for t in times.values())


def test_few_rows_are_timed_cold_on_copies_that_outgrow_the_cache() -> None:
    lin = masked_linear(256, 128, "0.5000")
    before = lin.weight.detach().clone()
    assert memory_bound(lin, (1, 1, 256)) and memory_bound(lin, (16, 256))
    assert not memory_bound(lin, (8, 128, 256)) and not memory_bound(nn.Conv2d(3, 8, 3), (1, 3, 4, 4))
    copies = cold_copies(lin)
    assert copies == min(MAX_COPIES, -(-COLD_CACHES * last_level_cache_bytes() // (256 * 128 * 4)))
    stats = format_stats(lin, (1, 256), candidates=("dense", "csr"), rounds=3, cold=True)
    assert set(stats) == {"dense", "csr"} and all(s.median > 0 for s in stats.values())
    assert torch.equal(lin.weight, before)  # the copies are the timer's own, the layer is untouched


def mlp(sparsity: str) -> nn.Sequential:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                m.weight.mul_(magnitude_mask(m.weight, sparsity))
    return model


def test_convert_measured_choice_matches_output() -> None:
    model = mlp("0.9500")
    x = torch.randn(32, 64)
    ref = model(x).detach()
    convert(model, example=x, candidates=("dense", "csr"))
    assert set(formats_of(model)) <= {"0", "2", "4"}  # which wins depends on the machine
    assert set(formats_of(model).values()) <= {"csr"}
    assert close(model(x), ref)
    only_csr = mlp("0.9500")
    convert(only_csr, example=x, candidates=("csr",))
    assert formats_of(only_csr) == {"0": "csr", "2": "csr", "4": "csr"}
    assert close(only_csr(x), ref)


def test_convert_explicit_formats_and_errors() -> None:
    model = mlp("0.9000")
    x = torch.randn(4, 9, 64)
    ref = model(x).detach()
    convert(model, {"0": "csr", "2": "dense", "4": "csr"})
    assert formats_of(model) == {"0": "csr", "4": "csr"}
    assert isinstance(model[2], nn.Linear)
    assert close(model(x), ref)
    with pytest.raises(ValueError, match="unknown format"):
        convert(mlp("0.9000"), {"0": "coo"})
    with pytest.raises(ValueError, match="no module"):
        convert(mlp("0.9000"), {"nope": "csr"})


def test_heuristic_without_shapes() -> None:
    model = mlp("0.9900")
    model[2].weight.data = torch.randn(256, 256)  # dense layer: not converted
    x = torch.randn(5, 64)
    ref = model(x).detach()
    convert(model)
    assert set(formats_of(model)) == {"0", "4"}
    assert heuristic_format(torch.randn(8, 8)) == "dense"
    assert close(model(x), ref)


def test_every_format_multiplies_like_the_masked_dense_layer() -> None:
    """Every name in FORMATS holds a block-pruned weight here (only the kernel may be missing, when
    numba is) and gives the masked dense layer's output both ways, with and without the GELU, and
    the weight back; an unknown name is refused with the valid ones listed."""
    lin = masked_linear(64, 48, "16x16@0.8000")
    w, b = lin.weight.detach(), lin.bias.detach()
    x = torch.randn(10, 64)
    ref = lin(x).detach()
    offered = supported_formats(w)
    assert set(FORMATS) - set(offered) == (set() if KERNEL_OK else {"kernel"})
    for name in offered:
        store = make_format(name, w, b)
        assert close(store.linear(x), ref), name
        assert close(store.linear(x, "gelu"), nn.functional.gelu(ref)), name
        assert close(store.mm_t(x.t().contiguous()).t(), ref), name
        assert torch.equal(store.to_dense(), w), name
    with pytest.raises(ValueError, match="unknown weight format 'coo'") as refused:
        make_format("coo", w)
    assert str(refused.value).split("formats are ")[1].split(", ") == list(FORMATS)


def test_minilm_converted_output_matches() -> None:
    from conftest import magnitude_pruned_minilm

    bundle, units = magnitude_pruned_minilm("0.9000", samples=2, heldout=2, seq_len=32, batch_size=2)
    with torch.no_grad():
        batch = bundle.calibration[0]
        ref = bundle.model(**batch)
        fmts = ["csr", "kernel"] if KERNEL_OK else ["csr"]
        model = copy.deepcopy(bundle.model)
        convert(model, {name: fmts[i % len(fmts)] for i, name in enumerate(units)})
        assert len(formats_of(model)) == 36
        assert close(model(**batch), ref)
        if KERNEL_OK:  # all in the kernel format: the 6 intermediate GELUs are fused
            convert(bundle.model, {name: "kernel" for name in units})
            assert sum(m.activation == "gelu" for m in bundle.model.modules() if isinstance(m, SparseLinear)) == 6
            # and the 12 output blocks take their residual add + LayerNorm into the kernel call,
            # the 6 feed-forward blocks running whole in one call each
            assert sum(isinstance(m, ResidualNormOutput) for m in bundle.model.modules()) == 12
            assert sum(isinstance(m, FeedForwardOutput) for m in bundle.model.modules()) == 6
            # and the 6 self-attention blocks project q/k/v and attend in one call each
            assert sum(isinstance(m, ProjectedSelfAttention) for m in bundle.model.modules()) == 6
            assert sum(isinstance(m, FusedEncoderLayer) for m in bundle.model.modules()) == 6  # whole layers
            assert len(formats_of(bundle.model)) == 36
            assert close(bundle.model(**batch), ref)


class ToyIntermediate(nn.Module):
    """The BERT block shape `fuse_activations` looks for: act(dense(x))."""

    def __init__(self, act: nn.Module):
        super().__init__()
        self.dense = nn.Linear(40, 96)
        self.intermediate_act_fn = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.intermediate_act_fn(self.dense(x))


@pytest.mark.skipif(not KERNEL_OK, reason=f"kernel unavailable: {KERNEL_WHY}")
@pytest.mark.parametrize("fmt,act,fused", [("kernel", nn.GELU(), True), ("kernel", nn.GELU(approximate="tanh"), False),
                                           ("kernel", nn.ReLU(), False), ("csr", nn.GELU(), False)])
def test_gelu_fused_into_kernel_linear(fmt: str, act: nn.Module, fused: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(ToyIntermediate(act))
    with torch.no_grad():
        model[0].dense.weight.mul_(magnitude_mask(model[0].dense.weight, "0.9000"))
        x = torch.randn(3, 50, 40)
        ref = model(x)
        convert(model, {"0.dense": fmt})
        assert isinstance(model[0].intermediate_act_fn, nn.Identity) == fused
        assert model[0].dense.activation == ("gelu" if fused else None)
        assert close(model(x), ref)
        assert fuse_activations(model) == []  # idempotent
