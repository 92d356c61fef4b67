"""Matching Training Trajectories (Cazenavette et al., CVPR 2022): the compute core, plain PyTorch.

A student starts from an expert's parameters at epoch k, takes ``syn_steps`` SGD steps on augmented
synthetic mini-batches with the learnable step size, and the loss is how far it ends from the expert's
epoch k+M parameters, relative to how far the start was:

    L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2

The student is run functionally (torch.func.functional_call on a flat parameter vector), so autograd
differentiates through every inner step to the synthetic images and the step size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdd_mlflow.augment import DSA


class FlatModel:
    """Call a module with its parameters given as one flat vector."""

    def __init__(self, model: nn.Module):
        if any(True for _ in model.buffers()):
            raise ValueError("trajectory matching needs a model without buffers (e.g. no batch norm)")
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.num_params = sum(self.sizes)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}
        return functional_call(self.model, params, (x,))


@dataclass
class Unroll:
    """How the student is unrolled on the synthetic set."""

    syn_steps: int
    batch_syn: int | None = None  # None: the whole set every step


def minibatch_schedule(n: int, unroll: Unroll, generator: torch.Generator) -> list[torch.Tensor]:
    """The synthetic indices of every inner step: shuffled passes over the set, as the reference."""
    size = unroll.batch_syn or n
    out: list[torch.Tensor] = []
    while len(out) < unroll.syn_steps:
        out.extend(torch.randperm(n, generator=generator).split(size))
    return out[: unroll.syn_steps]


def student_endpoint(
    student: FlatModel, start: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
    syn_lr: torch.Tensor, unroll: Unroll, augment: DSA | None, generator: torch.Generator,
) -> torch.Tensor:
    """theta_N after ``syn_steps`` differentiable SGD steps from ``start`` on the synthetic set."""
    theta = start.detach().requires_grad_(True)
    for idx in minibatch_schedule(len(images), unroll, generator):
        idx = idx.to(images.device)
        x = images[idx]
        if augment is not None:
            x = augment(x, generator)
        loss = F.cross_entropy(student(theta, x), labels[idx])
        grad = torch.autograd.grad(loss, theta, create_graph=True)[0]
        theta = theta - syn_lr * grad
    return theta


def matching_loss(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||end - target||^2 / ||start - target||^2."""
    return (end - target).pow(2).sum() / (start - target).pow(2).sum()


class SyntheticSet:
    """Learnable images, fixed hard labels and a learnable step size that stays positive."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, syn_lr: float, lr_img: float, lr_lr: float):
        self.images = images.detach().clone().requires_grad_(True)
        self.labels = labels.detach().clone()
        self.syn_lr = torch.tensor(float(syn_lr), device=images.device, requires_grad=True)
        self.lr_floor = float(syn_lr) * 1e-3
        self.opt_img = torch.optim.SGD([self.images], lr=lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=lr_lr, momentum=0.5)

    def update(self, loss: torch.Tensor) -> bool:
        """One optimiser step from ``loss``; a non-finite loss or gradient skips it. Returns whether it applied."""
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return False
        loss.backward()
        grads = (self.images.grad, self.syn_lr.grad)
        if any(g is None or not torch.isfinite(g).all() for g in grads):
            self.opt_img.zero_grad(set_to_none=True)
            self.opt_lr.zero_grad(set_to_none=True)
            return False
        self.opt_img.step()
        self.opt_lr.step()
        with torch.no_grad():  # projected step: the step size never reaches zero or below
            self.syn_lr.clamp_(min=self.lr_floor)
        return True

    def state_dict(self) -> dict:
        return {
            "images": self.images.detach().cpu(), "labels": self.labels.cpu(),
            "syn_lr": self.syn_lr.detach().cpu(), "opt_img": self.opt_img.state_dict(),
            "opt_lr": self.opt_lr.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.syn_lr.copy_(state["syn_lr"])
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])


def mtt_iteration(
    syn: SyntheticSet, student: FlatModel, start: torch.Tensor, target: torch.Tensor,
    unroll: Unroll, augment: DSA | None, generator: torch.Generator,
) -> tuple[float, bool]:
    """One distillation iteration from an expert segment; returns (matching loss, applied)."""
    end = student_endpoint(student, start, syn.images, syn.labels, syn.syn_lr, unroll, augment, generator)
    loss = matching_loss(end, start, target)
    applied = syn.update(loss)
    value = loss.item()
    return (value if math.isfinite(value) else float("nan")), applied
