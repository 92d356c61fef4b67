"""Expert trajectories: train a network on real data and record its parameters every epoch.

How a trajectory is stored is the experts buffer's business (``kdd_mlflow.artifacts.experts``).
"""

from __future__ import annotations

import torch
from torch import nn

from kdd_mlflow.augment import DSA
from kdd_mlflow.data import Split
from kdd_mlflow.train import SGDRecipe, evaluate, fit


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """A copy of all parameters as one flat float32 CPU vector.

    ``clone`` matters: on the CPU, ``p.detach().cpu()`` is the live tensor, and a list of such
    "snapshots" would all end up equal to the final weights.
    """
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).to("cpu", torch.float32).clone()


def train_expert(
    model: nn.Module, train: Split, test: Split, recipe: SGDRecipe, generator: torch.Generator,
    augment: DSA | None, progress: str | bool = True,
) -> tuple[torch.Tensor, float]:
    """Train ``model`` in place; return its trajectory (epochs + 1, P) and its test accuracy."""
    snapshots = [flat_parameters(model)]
    fit(model, train, recipe, generator, augment=augment,
        on_epoch=lambda epoch, metrics: snapshots.append(flat_parameters(model)), progress=progress)
    return torch.stack(snapshots), evaluate(model, test)["acc"]
