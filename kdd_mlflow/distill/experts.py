"""Expert trajectories: train a network on real data and record its parameters every epoch.

A trajectory is stored as one safetensors file: a float32 tensor ``trajectory`` of shape
(epochs + 1, num_params) — the flattened parameters at initialisation and after each epoch — and
metadata naming the dataset, model and parameter layout, checked on every load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
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


def layout(model: nn.Module) -> list[list]:
    """[[name, shape], ...] of the parameters, in flattening order (JSON-ready)."""
    return [[name, list(p.shape)] for name, p in model.named_parameters()]


def train_expert(
    model: nn.Module, train: Split, test: Split, recipe: SGDRecipe, generator: torch.Generator,
    augment: DSA | None, progress: str | bool = True,
) -> tuple[torch.Tensor, float]:
    """Train ``model`` in place; return its trajectory (epochs + 1, P) and its test accuracy."""
    snapshots = [flat_parameters(model)]
    fit(model, train, recipe, generator, augment=augment,
        on_epoch=lambda epoch, metrics: snapshots.append(flat_parameters(model)), progress=progress)
    return torch.stack(snapshots), evaluate(model, test)["acc"]


@dataclass
class TrajectoryMeta:
    dataset: str
    model: str
    epochs: int
    zca: bool
    layout: list[list]
    index: int
    test_acc: float

    @property
    def num_params(self) -> int:
        return sum(int(torch.tensor(shape).prod()) for _, shape in self.layout)


def save_trajectory(path: str | Path, trajectory: torch.Tensor, meta: TrajectoryMeta) -> None:
    save_file({"trajectory": trajectory.contiguous()}, str(path), metadata={"kdd": json.dumps(meta.__dict__)})


class Trajectory:
    """A stored trajectory, read lazily: only the epochs asked for are loaded."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        try:
            with safe_open(str(self.path), framework="pt") as f:
                raw = f.metadata() or {}
                self.shape = tuple(f.get_slice("trajectory").get_shape())
                dtype = f.get_slice("trajectory").get_dtype()
            self.meta = TrajectoryMeta(**json.loads(raw["kdd"]))
        except Exception as exc:
            raise ValueError(f"{self.path.name}: not a readable trajectory file ({exc})") from None
        if dtype != "F32" or self.shape != (self.meta.epochs + 1, self.meta.num_params):
            raise ValueError(
                f"{self.path.name}: trajectory is {dtype} {self.shape}, expected F32 "
                f"({self.meta.epochs + 1}, {self.meta.num_params})"
            )
        for key, want in (expect or {}).items():
            have = getattr(self.meta, key)
            if have != want:
                raise ValueError(f"{self.path.name}: {key} is {have!r}, expected {want!r}")

    def epoch(self, e: int) -> torch.Tensor:
        """Flat parameters after epoch ``e`` (0 = initialisation)."""
        if not 0 <= e <= self.meta.epochs:
            raise IndexError(f"{self.path.name} has epochs 0..{self.meta.epochs}, asked for {e}")
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_slice("trajectory")[e]
