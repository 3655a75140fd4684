"""Correctness of the own CPU attention against a float64 reference, and its transformers hookup."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spdy.runtime import attention, cpu, kernels
from spdy.runtime.modeling import bert

ok, reason = cpu.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"kernel runtime unavailable: {reason}")


def _reference(q, k, v, mask, scale=None):
    """float64 softmax(q k^T scale + mask) v as (batch, seq, heads, head dim)."""
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    out = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                         attn_mask=None if mask is None else mask.double(), scale=scale)
    return out.transpose(1, 2)


def _projections(batch, heads, seq, head_dim, seed):
    """q/k/v as transformers hands them over: (batch, heads, seq, dim) views of (batch, seq, heads * dim)."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, seq, heads * head_dim, generator=g).view(batch, seq, heads, head_dim).transpose(1, 2)
            for _ in range(3)]


def _check(q, k, v, mask=None, scale=None):
    out = attention.attend(q, k, v, mask, scale)
    ref = _reference(q, k, v, mask, scale)
    assert out.shape == ref.shape and out.dtype == torch.float32
    err = (out.double() - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item(), err


@pytest.mark.parametrize("batch,heads,seq,head_dim", [(8, 12, 128, 32), (1, 1, 1, 16), (2, 3, 7, 16), (3, 2, 129, 64),
                                                      (2, 4, 300, 32), (1, 2, 16, 48)])
def test_matches_reference_without_mask(batch, heads, seq, head_dim):
    _check(*_projections(batch, heads, seq, head_dim, seed=seq))


def test_key_padding_and_full_masks():
    q, k, v = _projections(4, 3, 50, 32, seed=1)
    lengths = torch.tensor([50, 31, 1, 17])
    padding = torch.arange(50)[None, :] < lengths[:, None]  # (batch, keys)
    _check(q, k, v, padding[:, None, None, :])  # boolean, one row for all queries
    _check(q, k, v, padding[:, None, None, :].expand(4, 1, 50, 50))  # expanded over queries (stride 0)
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    _check(q, k, v, causal[None, None] & padding[:, None, None, :] | torch.eye(50, dtype=torch.bool))
    g = torch.Generator().manual_seed(2)
    additive = torch.randn(4, 3, 50, 50, generator=g)  # float, per head and query
    _check(q, k, v, additive, scale=0.3)


def test_views_of_a_fused_projection():
    """q/k/v sliced out of one (batch, seq, 3 * heads * dim) output: rows spaced 3x wider, read in place."""
    g = torch.Generator().manual_seed(4)
    qkv = torch.randn(2, 33, 3 * 4 * 16, generator=g)
    q, k, v = (qkv[..., i * 64:(i + 1) * 64].view(2, 33, 4, 16).transpose(1, 2) for i in range(3))
    assert attention._heads_last(q).data_ptr() == q.data_ptr()  # no copy
    _check(q, k, v)


def test_contiguous_inputs_and_scale():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 40, 16, generator=g) for _ in range(3))
    _check(q, k, v, scale=1.7)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), heads=st.integers(1, 4), seq=st.integers(1, 160), dims=st.integers(1, 4),
       padded=st.booleans(), seed=st.integers(0, 2**16))
def test_random_shapes(batch, heads, seq, dims, padded, seed):
    q, k, v = _projections(batch, heads, seq, 16 * dims, seed)
    mask = None
    if padded:
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(1, seq + 1, (batch,), generator=g)
        mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
    _check(q, k, v, mask)


def test_two_python_threads_at_once():
    """Scratch buffers are per Python thread: concurrent calls do not trample each other."""
    from concurrent.futures import ThreadPoolExecutor

    cases = [_projections(2, 3, 70, 32, seed=s) for s in range(6)]
    with ThreadPoolExecutor(3) as pool:
        outs = list(pool.map(lambda c: attention.attend(*c), cases))
    for case, out in zip(cases, outs):
        ref = _reference(*case, None)
        assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_unsupported_inputs_name_the_reason():
    q, k, v = _projections(1, 2, 8, 24, seed=0)
    assert "head dim 24" in attention.supported(q, k, v)
    with pytest.raises(ValueError, match="head dim 24"):
        attention.attend(q, k, v)
    q, k, v = _projections(1, 2, 8, 16, seed=0)
    assert "float32" in attention.supported(q.double(), k, v)
    with pytest.raises(ValueError, match="does not broadcast"):
        attention.attend(q, k, v, torch.ones(3, 1, 1, 8, dtype=torch.bool))


def test_transformers_model_matches_sdpa():
    """The real MiniLM, a padded batch: the kernel attention gives SDPA's embeddings."""
    from spdy.models import load_model
    from spdy.units import call_model

    bundle = load_model("minilm", samples=4, heldout=0, seq_len=48, batch_size=4)
    batch = dict(bundle.calibration[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1, 20:] = 0
    batch["attention_mask"][3, 5:] = 0
    with torch.no_grad():
        reference = call_model(bundle.model, batch)
        assert attention.use_kernel_attention(bundle.model)
        calls = []
        original = attention.attend
        attention.attend = lambda *args: calls.append(args) or original(*args)
        try:
            out = call_model(bundle.model, batch)
        finally:
            attention.attend = original
    assert len(calls) == 6, "every layer should run the kernel attention"
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()


def _weights(hidden, width, sparsity, seed):
    """Masked (width, hidden) q/k/v weights and biases, and their kernel-format packs."""
    g = torch.Generator().manual_seed(seed)
    dense = [torch.randn(width, hidden, generator=g) * (torch.rand(width, hidden, generator=g) >= sparsity) * 0.2
             for _ in range(3)]
    biases = [torch.randn(width, generator=g) for _ in range(3)]
    return dense, biases, [kernels.SparseKernelWeight.from_dense(w, b) for w, b in zip(dense, biases)]


@pytest.mark.parametrize("batch,seq,heads,head_dim,sparsity,padded", [
    (8, 128, 12, 32, 0.9, False),   # MiniLM: items of 6 heads (one row chunk)
    (1, 128, 12, 32, 0.9, True),    # one batch row: items are head groups
    (3, 100, 12, 64, 0.7, True),    # BERT-base heads, seq not a multiple of the 64-token tile
    (2, 7, 4, 16, 0.5, False),      # shorter than a tile
    (2, 200, 2, 48, 0.0, True),     # dense, head dim 48, keys padded past one 128-key chunk
    (2, 33, 5, 80, 0.8, False),     # head dim 80 does not tile a row chunk: all heads per item
])
def test_project_attend_matches_reference(batch, seq, heads, head_dim, sparsity, padded):
    """q/k/v projected and attended in one call give float64 attention of the float64 projections."""
    width = heads * head_dim
    dense, biases, packs = _weights(width, width, sparsity, seed=seq + heads)
    x = torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seq))
    mask = None
    if padded:
        lengths = torch.randint(1, seq + 1, (batch,), generator=torch.Generator().manual_seed(batch))
        mask = (torch.arange(seq)[None, :] < lengths[:, None])[:, None, None, :]
    q, k, v = (F.linear(x.double(), w.double(), b.double()).view(batch, seq, heads, head_dim).transpose(1, 2)
               for w, b in zip(dense, biases))
    ref = _reference(q, k, v, mask).reshape(batch, seq, width)
    out = bert.project_attend(x, *packs, heads, mask)
    assert out.shape == (batch, seq, width) and out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 1e-5 * ref.abs().max().item()


def test_project_attend_rejects_bad_inputs():
    _, _, packs = _weights(64, 64, 0.5, seed=0)
    x = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match="heads of a multiple of 16"):
        bert.project_attend(x, *packs, 3)
    with pytest.raises(ValueError, match="float32"):
        bert.project_attend(x.double(), *packs, 4)
    with pytest.raises(ValueError, match="one shape"):
        bert.project_attend(x, packs[0], packs[1], _weights(64, 32, 0.5, seed=1)[2][0], 4)
    with pytest.raises(ValueError, match="does not broadcast"):
        bert.project_attend(x, *packs, 4, torch.ones(3, 1, 1, 8, dtype=torch.bool))


def test_fused_self_attention_in_minilm():
    """convert() swaps MiniLM's 6 self-attention blocks (all q/k/v in the kernel format) for
    ProjectedSelfAttention: same embeddings on a padded batch; requests it cannot serve (attention
    weights, training mode) go to the original block."""
    from spdy.models import load_model
    from spdy.runtime import ProjectedSelfAttention, convert
    from spdy.units import call_model

    bundle = load_model("minilm", samples=4, heldout=0, seq_len=48, batch_size=4)
    batch = dict(bundle.calibration[0])
    batch["attention_mask"] = batch["attention_mask"].clone()
    batch["attention_mask"][1, 20:] = 0
    layers = [n for n, m in bundle.model.named_modules() if isinstance(m, torch.nn.Linear) and ".attention.self." in n]
    with torch.no_grad():
        reference = call_model(bundle.model, batch)
        convert(bundle.model, {name: "kernel" for name in layers})
        fused = [m for m in bundle.model.modules() if isinstance(m, ProjectedSelfAttention)]
        assert len(fused) == 6 and not any(m.training for m in fused)
        calls = []
        original = bert.project_attend
        bert.project_attend = lambda *args: calls.append(args) or original(*args)
        try:
            out = call_model(bundle.model, batch)
            assert len(calls) == 6
            bundle.model.bert.set_attn_implementation("eager")  # SDPA returns no attention weights
            weights = bundle.model.bert(**batch, output_attentions=True).attentions
            assert len(calls) == 6 and len(weights) == 6 and weights[0].shape == (4, 12, 48, 48)
            bundle.model.train()
            call_model(bundle.model, batch)
            assert len(calls) == 6
        finally:
            bert.project_attend = original
    assert (out - reference).abs().max() <= 1e-5 * reference.abs().max()
