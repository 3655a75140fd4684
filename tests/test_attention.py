"""Correctness of the own CPU attention against a float64 reference, and its transformers hookup."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from spdy.runtime import attention, kernels

ok, reason = kernels.available()
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
