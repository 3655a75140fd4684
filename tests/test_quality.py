"""Held-out quality in the model's own terms: exact for the dense model, lower for a damaged one."""

from __future__ import annotations

import copy

import pytest
import torch

from spdy.models import load_model
from spdy.quality import outputs, quality


def _damage(model: torch.nn.Module, keep: float) -> torch.nn.Module:
    damaged = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in damaged.parameters():
            if p.dim() >= 2:
                p.mul_((torch.rand(p.shape, generator=gen) < keep).to(p.dtype))
    return damaged


def _training_labels() -> list:
    from spdy.models.digits import CNN_SPLITS, digits_data

    return digits_data(0, 128, sizes=CNN_SPLITS)[0][1]


def test_classifier_agreement_and_accuracy() -> None:
    bundle = load_model("digits-cnn")
    # trained on its database (statistics) digits only: its calibration, validation and held-out digits are unseen
    sizes = [sum(len(x) for x in b) for b in (bundle.database, bundle.calibration, bundle.validation, bundle.heldout)]
    assert sizes == [719, 359, 180, 539] and len(bundle.validation_labels) == len(bundle.validation)
    with torch.no_grad():
        fitted, unseen = (torch.nn.functional.cross_entropy(bundle.model(torch.cat(x)), torch.cat(y))
                          for x, y in ((bundle.database, _training_labels()), (bundle.calibration, bundle.calibration_labels)))
    assert fitted < 0.5 * unseen
    dense = outputs(bundle.model, bundle.heldout)
    same = quality(bundle.model, bundle.heldout, dense, "ce", bundle.heldout_labels)
    assert same["top1_agreement"] == 1.0 and same["accuracy"] == same["dense_accuracy"] > 0.9
    worse = quality(_damage(bundle.model, 0.05), bundle.heldout, dense, "ce", bundle.heldout_labels)
    assert worse["top1_agreement"] < 0.9 and worse["accuracy"] < same["accuracy"]
    assert quality(bundle.model, bundle.heldout, dense, "kl") == {"top1_agreement": 1.0}


def test_embedding_cosine_and_neighbours() -> None:
    gen = torch.Generator().manual_seed(1)
    dense = [torch.randn(8, 32, generator=gen) for _ in range(3)]
    identity = torch.nn.Identity()
    same = quality(identity, dense, dense, "cosine")
    assert abs(same["mean_cosine"] - 1.0) < 1e-12 and same["neighbour_agreement"] == 1.0
    noisy = [d + 2.0 * torch.randn(d.shape, generator=gen) for d in dense]
    worse = quality(identity, noisy, dense, "cosine")
    assert worse["mean_cosine"] < 0.6 and worse["neighbour_agreement"] < 1.0


def test_perplexity_of_a_language_model_batch() -> None:
    ids = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    class Uniform(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return torch.zeros(*input_ids.shape, 10)

    dense = [torch.nn.functional.one_hot(torch.roll(ids, -1, 1), 10).float() * 20]
    result = quality(Uniform(), [batch], dense, "next-token")
    assert abs(result["perplexity"] - 10.0) < 1e-9 and result["dense_perplexity"] < 1.01
    assert result["top1_agreement"] < 1.0


def test_quality_loss_is_in_each_family_own_terms_with_its_default_limit():
    from spdy.quality import default_max_loss, quality_loss, quality_loss_name

    assert quality_loss({"mean_cosine": 0.96, "neighbour_agreement": 0.5}, "cosine") == pytest.approx(0.04)
    assert quality_loss({"perplexity": 11.0, "dense_perplexity": 10.0, "top1_agreement": 0.7}, "next-token") == pytest.approx(0.1)
    for loss in ("kl", "ce", "mse"):
        assert quality_loss({"top1_agreement": 0.995}, loss) == pytest.approx(0.005) and default_max_loss(loss) == 0.01
        assert "top-1 agreement" in quality_loss_name(loss)
    assert (default_max_loss("cosine"), default_max_loss("next-token")) == (0.05, 0.10)
    assert "cosine" in quality_loss_name("cosine") and "perplexity" in quality_loss_name("next-token")
