"""Supervised training and evaluation on tensors already on the device (plain PyTorch, no MLflow)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from kdd_mlflow.augment import DSA
from kdd_mlflow.data import Split

EpochCallback = Callable[[int, dict[str, float]], None]
# objective(model, images, labels, generator, idx=None) -> (loss, logits); augmentation happens inside. ``idx``
# are the batch's positions in the training set (fit passes them), for objectives that precomputed per-image values.
Objective = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def supervised(augment: DSA | None = None) -> Objective:
    """Cross-entropy on (optionally DSA-augmented) images, against class labels or class probabilities."""

    def objective(model, x, y, generator, idx=None):
        if augment is not None:
            x = augment(x, generator)
        logits = model(x).float()  # the loss in float32, also under bf16 autocast
        return F.cross_entropy(logits, y), logits

    return objective


@dataclass
class SGDRecipe:
    """How a network is trained: SGD with momentum, weight decay and a learning-rate schedule."""

    epochs: int
    batch_size: int = 256
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # cosine | step (x0.1 at half-time, as the MTT evaluation) | constant
    precision: str = "fp32"  # fp32 | bf16: forward passes under bf16 autocast; weights and SGD stay float32

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def scheduler(self, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
        total = self.epochs * steps_per_epoch
        if self.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total, 1))
        if self.schedule == "step":
            return torch.optim.lr_scheduler.MultiStepLR(optimizer, [(self.epochs // 2) * steps_per_epoch], 0.1)
        if self.schedule == "constant":
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        raise ValueError(f"unknown schedule {self.schedule!r}")


def batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """A shuffled epoch of index batches, on the device."""
    order = torch.randperm(n, generator=generator).to(device)
    return list(order.split(batch_size))


def fit(
    model: nn.Module,
    train: Split,
    recipe: SGDRecipe,
    generator: torch.Generator,
    augment: DSA | None = None,
    val: Split | None = None,
    on_epoch: EpochCallback | None = None,
    progress: bool | str = True,
    objective: Objective | None = None,
    extra_parameters: list[torch.nn.Parameter] | None = None,
) -> dict[str, float]:
    """Train ``model`` in place on ``train`` (already on the model's device); return the last epoch's metrics.

    ``objective`` defaults to cross-entropy with ``augment``; ``extra_parameters`` (e.g. a hint adapter)
    are optimised alongside the model. Per-batch statistics stay on the device and are read once per
    epoch, so the loop never waits on the host between steps.
    """
    device = next(model.parameters()).device
    objective = objective or supervised(augment)
    optimizer = torch.optim.SGD(
        [*model.parameters(), *(extra_parameters or [])],
        lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay,
    )
    steps = -(-len(train) // recipe.batch_size)
    scheduler = recipe.scheduler(optimizer, steps)
    desc = progress if isinstance(progress, str) else "train"
    metrics: dict[str, float] = {}
    bar = tqdm(range(recipe.epochs), desc=desc, disable=progress is False, leave=False)
    for epoch in bar:
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        for idx in batches(len(train), recipe.batch_size, generator, device):
            x, y = train.images[idx], train.labels[idx]
            with recipe.autocast(device):
                loss, logits = objective(model, x, y, generator, idx=idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == (y.argmax(1) if y.is_floating_point() else y)).sum()
        metrics = {"train_loss": loss_sum.item() / len(train), "train_acc": correct.item() / len(train)}
        if not torch.isfinite(torch.tensor(metrics["train_loss"])):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1}: loss is {metrics['train_loss']}")
        # Validation about five times per run (every epoch of a shorter one): on a tiny set an epoch is one step, and
        # measuring thousands of validation images even ten times cost a 100-image arm a third of its training.
        if val is not None and ((epoch + 1) % max(1, recipe.epochs // 5) == 0 or epoch + 1 == recipe.epochs):
            metrics["val_acc"] = evaluate(model, val)["acc"]
        bar.set_postfix({k: round(v, 4) for k, v in metrics.items()})
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return metrics


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Logits for ``images`` in eval mode, batched."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(chunk.to(device)) for chunk in images.split(batch_size)])
    model.train(was_training)
    return out


def evaluate(model: nn.Module, split: Split, batch_size: int = 1024) -> dict[str, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``split``."""
    logits = predict_logits(model, split.images, batch_size)
    labels = split.labels.to(logits.device)
    return {
        "acc": (logits.argmax(1) == labels).float().mean().item(),
        "loss": F.cross_entropy(logits, labels).item(),
    }
