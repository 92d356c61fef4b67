"""Matching Training Trajectories (Cazenavette et al., CVPR 2022): the compute core, plain PyTorch.

A student starts from an expert's parameters at epoch k, takes ``syn_steps`` SGD steps on augmented
synthetic mini-batches with the learnable step size, and the loss is how far it ends from the expert's
epoch k+M parameters, relative to how far the start was:

    L = ||theta_N - theta*||^2 / ||theta_0 - theta*||^2

The student is run functionally (torch.func.functional_call on a flat parameter vector). Three ways to
get dL/dX (images) and dL/dalpha (step size), all replaying the same mini-batches and augmentation draws:

- ``unrolled``: autograd through every inner step (the reference); memory grows with syn_steps.
- ``recompute``: the same gradients, exactly, by the adjoint method. The forward pass keeps only the
  parameters theta_i; going backwards from lambda_N = dL/dtheta_N, each step's gradient
  g_i = grad_theta CE(theta_i, aug_i(X[b_i])) is rebuilt with a graph, and one vector-Jacobian product
  gives both H_i lambda and (dg_i/dX)^T lambda:
      dL/dX += -alpha (dg_i/dX)^T lambda_{i+1},  dL/dalpha += -g_i . lambda_{i+1},
      lambda_i = lambda_{i+1} - alpha H_i lambda_{i+1}.
  Activation memory is that of one step, whatever syn_steps is.
- ``first-order``: the TESLA approximation (Cui et al., ICML 2023): theta_i is held fixed when
  differentiating step i, so lambda_i = lambda_N for every step (no Hessian terms); one step's memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdd_mlflow.augment import DSA, Draw


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


MODES = ("unrolled", "recompute", "first-order")


@dataclass
class Step:
    """One inner step's mini-batch indices and augmentation draw, drawn once and replayed exactly."""

    idx: torch.Tensor
    draw: Draw | None


def plan_steps(images: torch.Tensor, unroll: Unroll, augment: DSA | None, generator: torch.Generator) -> list[Step]:
    """Every inner step's batch and draw, in the order the unrolled loop has always drawn them."""
    steps = []
    for idx in minibatch_schedule(len(images), unroll, generator):
        idx = idx.to(images.device)
        shape = (len(idx), *images.shape[1:])
        steps.append(Step(idx, augment.sample(shape, generator) if augment is not None and augment.groups else None))
    return steps


def step_loss(student: FlatModel, theta: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, step: Step,
              augment: DSA | None) -> torch.Tensor:
    x = images[step.idx]
    if step.draw is not None:
        x = augment.apply(x, step.draw)
    return F.cross_entropy(student(theta, x), labels[step.idx])


def student_endpoint(
    student: FlatModel, start: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
    syn_lr: torch.Tensor, unroll: Unroll, augment: DSA | None, generator: torch.Generator,
    steps: list[Step] | None = None,
) -> torch.Tensor:
    """theta_N after ``syn_steps`` differentiable SGD steps from ``start`` on the synthetic set."""
    theta = start.detach().requires_grad_(True)
    for step in steps if steps is not None else plan_steps(images, unroll, augment, generator):
        grad = torch.autograd.grad(step_loss(student, theta, images, labels, step, augment), theta,
                                   create_graph=True)[0]
        theta = theta - syn_lr * grad
    return theta


def adjoint_gradients(
    student: FlatModel, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
    syn_lr: torch.Tensor, steps: list[Step], augment: DSA | None, exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(matching loss, dL/dimages, dL/dsyn_lr) without keeping the unrolled graph.

    ``exact``: the adjoint recursion (``recompute``); otherwise lambda stays lambda_N (``first-order``).
    """
    alpha = syn_lr.detach()
    x_leaf = images.detach()
    thetas = [start.detach()]
    for step in steps:  # forward: parameters only
        theta = thetas[-1].detach().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(step_loss(student, theta, x_leaf, labels, step, augment), theta)[0]
        thetas.append((thetas[-1] - alpha * g).detach())
    denom = (thetas[0] - target).pow(2).sum()
    loss = (thetas[-1] - target).pow(2).sum() / denom
    lam = 2 * (thetas[-1] - target) / denom
    grad_x = torch.zeros_like(x_leaf)
    grad_alpha = torch.zeros((), dtype=alpha.dtype, device=alpha.device)
    for i in range(len(steps) - 1, -1, -1):  # backward: one step's graph at a time
        theta = thetas[i].detach().requires_grad_(True)  # a new leaf on the same storage, no copy
        x = x_leaf.detach().requires_grad_(True)
        with torch.enable_grad():
            g = torch.autograd.grad(step_loss(student, theta, x, labels, steps[i], augment), theta,
                                    create_graph=True)[0]
            h_lam, gx_lam = torch.autograd.grad(g, (theta, x), grad_outputs=lam, allow_unused=True)
        grad_alpha -= (g.detach() * lam).sum()
        if gx_lam is not None:
            grad_x -= alpha * gx_lam
        if exact:
            lam = lam - alpha * h_lam
    return loss, grad_x, grad_alpha


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

    def update(self, loss: torch.Tensor, grads: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
        """One optimiser step from ``loss`` (or from ``grads`` for the images and step size, computed
        elsewhere); a non-finite loss or gradient skips it. Returns whether it applied."""
        self.opt_img.zero_grad(set_to_none=True)
        self.opt_lr.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return False
        if grads is None:
            loss.backward()
        else:
            self.images.grad, self.syn_lr.grad = grads[0], grads[1].reshape(self.syn_lr.shape)
        if any(g is None or not torch.isfinite(g).all() for g in (self.images.grad, self.syn_lr.grad)):
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


def matching_gradients(
    mode: str, student: FlatModel, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
    labels: torch.Tensor, syn_lr: torch.Tensor, unroll: Unroll, augment: DSA | None, generator: torch.Generator,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The matching loss and its gradients with respect to the images and the step size, by ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; choose from {', '.join(MODES)}")
    steps = plan_steps(images, unroll, augment, generator)
    if mode == "unrolled":
        end = student_endpoint(student, start, images, labels, syn_lr, unroll, augment, generator, steps)
        loss = matching_loss(end, start, target)
        if not torch.isfinite(loss):
            return loss.detach(), (torch.zeros_like(images), torch.zeros_like(syn_lr))
        gx, ga = torch.autograd.grad(loss, (images, syn_lr))
        return loss.detach(), (gx, ga)
    loss, gx, ga = adjoint_gradients(student, start, target, images, labels, syn_lr, steps, augment,
                                     exact=mode == "recompute")
    return loss, (gx, ga)


def mtt_iteration(
    syn: SyntheticSet, student: FlatModel, start: torch.Tensor, target: torch.Tensor,
    unroll: Unroll, augment: DSA | None, generator: torch.Generator, mode: str = "unrolled",
) -> tuple[float, bool]:
    """One distillation iteration from an expert segment; returns (matching loss, applied)."""
    loss, grads = matching_gradients(mode, student, start, target, syn.images, syn.labels, syn.syn_lr, unroll,
                                     augment, generator)
    applied = syn.update(loss, grads)
    value = loss.item()
    return (value if math.isfinite(value) else float("nan")), applied
