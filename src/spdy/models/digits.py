"""Small classifiers trained in-process on scikit-learn's 8x8 digits: labelled accuracy in seconds.

The MLP is the quickest real model for tests; the CNN gives gradual pruning a convolutional
model with a real task metric (the MiniLM encoder has none), and its convolutions exercise
the conv2d units the way ResNets do in the paper.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from spdy.models.bundle import ModelBundle

CNN_SPLITS = (719, 359, 180)  # the CNN's training, calibration and validation digits (40, 20, 10%); the other 539 are held out


def digits_data(seed: int = 0, batch_size: int = 128, images: bool = True,
                sizes: tuple[int, ...] | None = None) -> list[tuple[list, list]]:
    """(batches, labels) per split of the shuffled digits in [0, 1]: one split of each size (default: 70% of
    them), then the rest; images (B, 1, 8, 8) or rows (B, 64)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(x, dtype=torch.float32)[order] / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    y = torch.tensor(y)[order]
    ends = [*itertools.accumulate(sizes or (int(0.7 * len(x)),)), len(x)]
    return [(list(x[a:b].split(batch_size)), list(y[a:b].split(batch_size))) for a, b in zip([0, *ends], ends)]


def digits_mlp(hidden: int = 512, depth: int = 2, epochs: int = 40, batch_size: int = 128, seed: int = 0) -> ModelBundle:
    """An MLP on the flattened images; LayerNorm + GELU give it real time outside the prunable layers, like a transformer block."""
    (train, train_labels), (test, test_labels) = digits_data(seed, batch_size, images=False)
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers += [nn.Linear(64 if i == 0 else hidden, hidden), nn.LayerNorm(hidden), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(hidden, 10))
    _fit(model, train, train_labels, epochs, seed)
    return ModelBundle("digits", model.eval(), train, test, "ce", meta={"batch_size": batch_size, "hidden": hidden, "depth": depth},
                       calibration_labels=train_labels, heldout_labels=test_labels)


def _fit(model: nn.Module, batches: list, labels: list, epochs: int, seed: int) -> None:
    """Adam on one thread: float sums split over threads round differently, and the weights (so the
    model's fingerprint, which databases and profiles are checked against) must not depend on it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(epochs):
            for i in torch.randperm(len(batches), generator=gen).tolist():
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(batches[i]), labels[i]).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)


def digits_cnn(width: int = 8, hidden: int = 2048, epochs: int = 15, batch_size: int = 128, seed: int = 0) -> ModelBundle:
    """Two 3x3 convolutions and a three-layer MLP head, trained with Adam; loss ``ce`` with labels.

    The head holds most of the weights and time, as in classifiers whose dense layers are
    worth pruning; the convolutions are the layers a speedup-aware profile should leave alone
    on an engine that has no sparse convolution.

    It is trained on 40% of the digits only, so that, as for a deployed model, its calibration
    (20%), validation (10%) and held-out (30%) digits are ones it never saw: a search scored on
    the digits the model was fitted to is told that pruning costs almost nothing. The database's
    statistics come from the training digits, apart from the calibration ones.
    """
    (train, train_labels), (calibration, calibration_labels), (validation, validation_labels), (test, test_labels) = \
        digits_data(seed, batch_size, sizes=CNN_SPLITS)
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(2 * width * 16, hidden), nn.ReLU(),
        nn.Linear(hidden, hidden), nn.ReLU(),
        nn.Linear(hidden, 10),
    )
    _fit(model, train, train_labels, epochs, seed)
    # "kl" to the dense model's own predictions: needs no labels, and tells how far pruning moves the model
    # on digits it already classifies right, where the labels hardly do
    return ModelBundle("digits-cnn", model.eval(), calibration, test, "ce", meta={"batch_size": batch_size, "width": width, "hidden": hidden},
                       calibration_labels=calibration_labels, heldout_labels=test_labels, validation=validation,
                       validation_labels=validation_labels, database=train, signals={"kl": model})


def accuracy(model: nn.Module, batches: list, labels: list) -> float:
    """Top-1 accuracy of ``model`` over labelled batches."""
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(batches, labels))
    return correct / sum(len(y) for y in labels)
