"""Held-out quality in the model's own terms, beside the loss the search minimised.

A KL of 0.3 or a cosine loss of 0.05 means little to someone deciding whether to ship; the
share of images whose top class is unchanged, how close the embeddings stay, and how often a
search over them finds the same neighbour, or the perplexity, do. Every metric compares the
pruned model with the dense one on the same held-out batches.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from spdy.search.evaluate import next_token_labels
from spdy.units import call_model


@torch.no_grad()
def outputs(model: nn.Module, batches: Sequence[Any]) -> list[torch.Tensor]:
    """The model's output tensor on each batch (the reference for `quality`)."""
    result = []
    for batch in batches:
        out = call_model(model, batch)
        result.append(out if isinstance(out, torch.Tensor) else out[0])
    return result


def _top1(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> float:
    same = sum(int((p.argmax(-1) == d.argmax(-1)).sum()) for p, d in zip(pruned, dense))
    return same / sum(d[..., 0].numel() for d in dense)


def _embeddings(pruned: list[torch.Tensor], dense: list[torch.Tensor]) -> dict[str, float]:
    p = F.normalize(torch.cat([x.flatten(1) for x in pruned]).double(), dim=-1)
    d = F.normalize(torch.cat([x.flatten(1) for x in dense]).double(), dim=-1)
    result = {"mean_cosine": float((p * d).sum(-1).mean())}
    if len(d) > 2:
        # each held-out text as a query against all others: is its nearest neighbour the dense model's?
        eye = torch.eye(len(d), dtype=torch.bool)
        near_p = (p @ p.T).masked_fill(eye, -2).argmax(-1)
        near_d = (d @ d.T).masked_fill(eye, -2).argmax(-1)
        result["neighbour_agreement"] = float((near_p == near_d).double().mean())
    return result


def _perplexity(out: list[torch.Tensor], batches: Sequence[Any]) -> float:
    total, count = 0.0, 0
    for logits, batch in zip(out, batches):
        labels = next_token_labels(batch)
        total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).double(), labels.flatten(), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return math.exp(total / max(count, 1))


def quality(model: nn.Module, batches: Sequence[Any], dense: Sequence[torch.Tensor], loss: str,
            labels: Sequence[torch.Tensor] | None = None) -> dict[str, float]:
    """Metrics of ``model`` (as it stands) against the dense model's ``dense`` outputs on ``batches``.

    Classifiers (losses kl, ce, mse with one logit vector per sample): ``top1_agreement``, and
    ``accuracy`` / ``dense_accuracy`` with labels. Sentence encoders (cosine): ``mean_cosine``
    and ``neighbour_agreement``. Causal LMs (next-token): ``perplexity``, ``dense_perplexity``
    and the next token's ``top1_agreement``.
    """
    pruned = outputs(model, batches)
    if loss == "cosine":
        return _embeddings(pruned, list(dense))
    result = {"top1_agreement": _top1(pruned, list(dense))}
    if loss == "next-token":
        result.update(perplexity=_perplexity(pruned, batches), dense_perplexity=_perplexity(list(dense), batches))
    elif labels is not None:
        total = sum(len(y) for y in labels)
        result["accuracy"] = sum(int((p.argmax(-1) == y).sum()) for p, y in zip(pruned, labels)) / total
        result["dense_accuracy"] = sum(int((d.argmax(-1) == y).sum()) for d, y in zip(dense, labels)) / total
    return result


def _family(loss: str) -> str:
    return loss if loss in ("cosine", "next-token") else "classifier"


# one number per profile for ``--max-loss``, in each family's own terms: what it is, and how much a deployable model may lose
QUALITY_LOSS = {"cosine": "1 - held-out mean cosine to the dense embeddings", "next-token": "relative held-out perplexity increase",
                "classifier": "1 - held-out top-1 agreement with the dense model"}
DEFAULT_MAX_LOSS = {"cosine": 0.05, "next-token": 0.10, "classifier": 0.01}


def quality_loss(metrics: dict[str, float], loss: str) -> float:
    """The `quality` metrics of a profile as its ``QUALITY_LOSS`` (0 for the dense model)."""
    family = _family(loss)
    if family == "cosine":
        return 1.0 - metrics["mean_cosine"]
    if family == "next-token":
        return metrics["perplexity"] / metrics["dense_perplexity"] - 1.0
    return 1.0 - metrics["top1_agreement"]


def quality_loss_name(loss: str) -> str:
    return QUALITY_LOSS[_family(loss)]


def default_max_loss(loss: str) -> float:
    return DEFAULT_MAX_LOSS[_family(loss)]
