"""Evaluating a small training set: train K fresh networks on it and measure them."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdd_mlflow import models
from kdd_mlflow.augment import DSA
from kdd_mlflow.data import DatasetInfo, Split
from kdd_mlflow.train import SGDRecipe, evaluate, fit


def eval_recipe(lr: float, epochs: int, batch_size: int = 256, precision: str = "fp32") -> SGDRecipe:
    """The MTT evaluation protocol: SGD momentum 0.9, weight decay 5e-4, lr x0.1 at half-time."""
    return SGDRecipe(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4, schedule="step",
                     precision=precision)


def evaluate_set(
    train: Split | Callable[[int], Split], model_name: str, meta: DatasetInfo, measure_on: Split | dict[str, Split],
    lr: float, epochs: int, num_nets: int, seed: int, augment: bool = True, progress: str | bool = False,
    precision: str = "fp32",
) -> list[float] | dict[str, list[float]]:
    """Accuracy on ``measure_on`` of ``num_nets`` fresh ``model_name`` networks trained on ``train``; with
    several named splits to measure on (e.g. validation and test), each network is measured on all of them
    and the accuracies come back by name.

    ``train`` is one set, or a function giving network k its own set (k different random subsets make a
    baseline whose spread includes the luck of the draw). Network k is seeded by (seed, k), so the same
    set always gets the same evaluation.
    """
    named = measure_on if isinstance(measure_on, dict) else {"": measure_on}
    accs: dict[str, list[float]] = {name: [] for name in named}
    for k in range(num_nets):
        torch.manual_seed(seed * 7919 + k)
        generator = torch.Generator().manual_seed(seed * 7919 + k)
        train_k = train(k) if callable(train) else train
        device = train_k.images.device
        model = models.create(model_name, meta.channels, meta.num_classes, meta.image_size).to(device)
        fit(model, train_k, eval_recipe(lr, epochs, precision=precision), generator,
            augment=DSA.for_dataset(meta.name) if augment else None,
            progress=f"{progress} net {k + 1}/{num_nets}" if progress else False)
        for name, split in named.items():
            accs[name].append(evaluate(model, split)["acc"])
    return accs if isinstance(measure_on, dict) else accs[""]


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=False).item() if len(values) > 1 else 0.0)
