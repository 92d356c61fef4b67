"""Evaluating a small training set: train K fresh networks on it and measure them."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from kdd_mlflow import models
from kdd_mlflow.augment import DSA
from kdd_mlflow.data import DatasetInfo, Split
from kdd_mlflow.train import SGDRecipe, evaluate, fit


def eval_recipe(lr: float, epochs: int, batch_size: int = 256, precision: str = "fp32") -> SGDRecipe:
    """The MTT evaluation protocol: SGD momentum 0.9, weight decay 5e-4, lr x0.1 at half-time."""
    return SGDRecipe(epochs=epochs, batch_size=batch_size, lr=lr, momentum=0.9, weight_decay=5e-4, schedule="step",
                     precision=precision)


def train_nets(
    train: Split | Callable[[int], Split], model_name: str, meta: DatasetInfo, lr: float, epochs: int, num_nets: int,
    seed: int, augment: bool = True, progress: str | bool = False, precision: str = "fp32",
) -> Iterator[nn.Module]:
    """``num_nets`` fresh ``model_name`` networks trained on ``train``, one at a time.

    ``train`` is one set, or a function giving network k its own set (k different random subsets make a
    baseline whose spread includes the luck of the draw). Network k is seeded by (seed, k), so the same
    set always gets the same networks.
    """
    for k in range(num_nets):
        torch.manual_seed(seed * 7919 + k)
        generator = torch.Generator().manual_seed(seed * 7919 + k)
        train_k = train(k) if callable(train) else train
        device = train_k.images.device
        model = models.create(model_name, meta.channels, meta.num_classes, meta.image_size).to(device)
        fit(model, train_k, eval_recipe(lr, epochs, precision=precision), generator,
            augment=DSA.for_dataset(meta.name) if augment else None,
            progress=f"{progress} net {k + 1}/{num_nets}" if progress else False)
        yield model


def evaluate_set(
    train: Split | Callable[[int], Split], model_name: str, meta: DatasetInfo, measure_on: Split, lr: float,
    epochs: int, num_nets: int, seed: int, augment: bool = True, progress: str | bool = False,
    precision: str = "fp32",
) -> list[float]:
    """Accuracy on ``measure_on`` of the ``num_nets`` networks ``train_nets`` trains on ``train``."""
    return [evaluate(model, measure_on)["acc"]
            for model in train_nets(train, model_name, meta, lr, epochs, num_nets, seed, augment, progress, precision)]


def accuracies(model_name: str, meta: DatasetInfo, states: list[dict], measure_on: Split) -> list[float]:
    """Accuracy on ``measure_on`` of networks rebuilt from their state dicts."""
    out = []
    for state in states:
        model = models.create(model_name, meta.channels, meta.num_classes, meta.image_size)
        model.load_state_dict(state)
        out.append(evaluate(model.to(measure_on.images.device), measure_on)["acc"])
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std(unbiased=False).item() if len(values) > 1 else 0.0)
