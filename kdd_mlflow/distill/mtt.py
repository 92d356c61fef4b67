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
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from kdd_mlflow.augment import DSA, Draw
from kdd_mlflow.distill.labels import targets


class FlatModel:
    """Call a module with its parameters given as one flat vector, and take the two derivatives trajectory
    matching needs of one inner step's loss ``CE(f(theta, x), y)``:

    - ``step_grad(theta, x, y)``: g = dCE/dtheta, itself differentiable when theta or x carry a graph;
    - ``step_pullback(theta, x, y)``: g, and (H lam, (dg/dx)^T lam) as a function of lam to call later, one
      vector-Jacobian product of g.

    ``compile=True`` builds both, where no graph is asked for (the ``recompute`` and ``first-order`` sweeps), with
    torch.func (grad, vjp) under torch.compile: each becomes one traced graph whose element-wise and
    normalisation work the compiler fuses, with the same arithmetic (equal to the eager path to rounding; the
    tests check it in float64). The first call of each input shape compiles (tens of seconds on a CPU; later
    processes reuse the on-disk cache). The unrolled loop stays eager: compiled, its steps measured slower.
    """

    def __init__(self, model: nn.Module, compile: bool = False):
        if any(True for _ in model.buffers()):
            raise ValueError("trajectory matching needs a model without buffers (e.g. no batch norm)")
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [p.shape for _, p in model.named_parameters()]
        self.sizes = [p.numel() for _, p in model.named_parameters()]
        self.num_params = sum(self.sizes)
        self.compiled = compile
        if compile:
            self._grad = torch.compile(torch.func.grad(self.loss), dynamic=False)
            self._adjoint = torch.compile(self._functional_adjoint, dynamic=False)

    def __call__(self, flat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        params = {n: t.view(s) for n, t, s in zip(self.names, flat.split(self.sizes), self.shapes, strict=True)}
        return functional_call(self.model, params, (x,))

    def loss(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Cross entropy against hard labels (int64) or against soft ones (float logits, through softmax)."""
        return soft_cross_entropy(self(theta, x), y)

    def _functional_adjoint(self, theta, x, y, lam, wrt_labels: bool):
        if wrt_labels:
            g, pullback = torch.func.vjp(torch.func.grad(self.loss), theta, x, y)
            return g, *pullback(lam)
        g, pullback = torch.func.vjp(lambda t, xx: torch.func.grad(self.loss)(t, xx, y), theta, x)
        return g, *pullback(lam), None

    def step_grad(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """dCE/dtheta; with a graph back to theta and x when either requires grad (the unrolled loop)."""
        differentiable = torch.is_grad_enabled() and (theta.requires_grad or x.requires_grad)
        if self.compiled and not differentiable:
            return self._grad(theta, x, y)
        with torch.enable_grad():
            leaf = theta if theta.requires_grad else theta.detach().requires_grad_(True)
            return torch.autograd.grad(self.loss(leaf, x, y), leaf, create_graph=differentiable)[0]

    def step_pullback(self, theta: torch.Tensor, x: torch.Tensor, y: torch.Tensor, wrt_labels: bool = False):
        """(g, pullback) at (theta, x, y): g detached, and ``pullback(lam)`` = (H lam, (dg/dx)^T lam, (dg/dy)^T lam),
        all detached, the last only for learned (float) labels when ``wrt_labels``, else None; to be called once.
        Eager, g's graph is built now and kept until then; compiled, the pullback computes anew."""
        theta, x, y = theta.detach(), x.detach(), y.detach()
        if self.compiled:
            def compiled_pullback(lam):
                with torch.no_grad():
                    return self._adjoint(theta, x, y, lam, wrt_labels)[1:]

            return self._grad(theta, x, y), compiled_pullback
        theta, x = theta.requires_grad_(True), x.requires_grad_(True)  # new leaves on the same storage
        inputs = (theta, x, y.requires_grad_(True)) if wrt_labels else (theta, x)
        with torch.enable_grad():
            g = torch.autograd.grad(self.loss(theta, x, y), theta, create_graph=True)[0]

        def pullback(lam):
            pulled = torch.autograd.grad(g, inputs, grad_outputs=lam)
            return pulled[0], pulled[1], pulled[2] if wrt_labels else None

        return g.detach(), pullback


def soft_cross_entropy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy against hard labels (int64 classes) or soft ones (float logits: softmax(y) as the
    target distribution, as in DATM's learned labels)."""
    return F.cross_entropy(logits, targets(y))


ENGINES = ("eager", "compiled")


def use_compiler(engine: str, device_type: str) -> bool:
    """Whether ``engine`` means the compiled step functions; refused with one line where they cannot build
    (torch.compile's CPU code generation needs a C++ compiler)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose from {', '.join(ENGINES)}")
    if engine == "compiled" and device_type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "c++", "clang++") if c):
        raise ValueError("engine 'compiled' needs a C++ compiler on a CPU (g++ or clang++, or $CXX); none found")
    return engine == "compiled"


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


def step_inputs(images: torch.Tensor, step: Step, augment: DSA | None) -> torch.Tensor:
    """The (augmented) mini-batch of one inner step, differentiable with respect to ``images``."""
    x = images[step.idx]
    return augment.apply(x, step.draw) if step.draw is not None else x


def student_endpoint(
    student: FlatModel, start: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
    syn_lr: torch.Tensor, unroll: Unroll, augment: DSA | None, generator: torch.Generator,
    steps: list[Step] | None = None,
) -> torch.Tensor:
    """theta_N after ``syn_steps`` differentiable SGD steps from ``start`` on the synthetic set."""
    theta = start.detach().requires_grad_(True)
    for step in steps if steps is not None else plan_steps(images, unroll, augment, generator):
        theta = theta - syn_lr * student.step_grad(theta, step_inputs(images, step, augment), labels[step.idx])
    return theta


def adjoint_gradients(
    student: FlatModel, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
    syn_lr: torch.Tensor, steps: list[Step], augment: DSA | None, exact: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(matching loss, dL/dimages, dL/dsyn_lr, dL/dlabels or None) without keeping the unrolled graph;
    the label gradient for learned (float, requires_grad) labels.

    ``exact``: the adjoint recursion (``recompute``); otherwise lambda stays lambda_N (``first-order``).
    Each step's augmentation is re-applied going backwards and (dg_i/dx)^T lambda pulled back through it
    to the images, so memory stays that of one step.
    """
    alpha = syn_lr.detach()
    x_leaf = images.detach()
    learned = labels.requires_grad

    def build(i: int):
        """Step i's augmented batch as a function of a fresh leaf x, g_i and its pullback."""
        with torch.enable_grad():
            x = x_leaf.detach().requires_grad_(True)
            x_step = step_inputs(x, steps[i], augment)
        return x, x_step, *student.step_pullback(thetas[i], x_step, labels[steps[i].idx], wrt_labels=learned)

    thetas = [start.detach()]
    with torch.no_grad():
        for step in steps[:-1]:  # forward: parameters only
            g = student.step_grad(thetas[-1], step_inputs(x_leaf, step, augment), labels[step.idx].detach())
            thetas.append(thetas[-1] - alpha * g.detach())
    # The last step keeps its graph: the backward sweep starts with it, so it is built once instead of twice, and
    # no more is held at a time than when the sweep builds it.
    last = build(len(steps) - 1)
    _, _, g_last, _ = last
    thetas.append(thetas[-1] - alpha * g_last)
    denom = (thetas[0] - target).pow(2).sum()
    loss = (thetas[-1] - target).pow(2).sum() / denom
    lam = 2 * (thetas[-1] - target) / denom
    grad_x = torch.zeros_like(x_leaf)
    grad_alpha = torch.zeros((), dtype=alpha.dtype, device=alpha.device)
    grad_y = torch.zeros_like(labels.detach()) if learned else None
    for i in range(len(steps) - 1, -1, -1):  # backward: one step's graph at a time
        x, x_step, g, pullback = last if i == len(steps) - 1 else build(i)
        last = None
        idx = steps[i].idx
        h_lam, gx_lam, gy_lam = pullback(lam)
        grad_alpha -= (g * lam).sum()
        grad_x -= alpha * torch.autograd.grad(x_step, x, grad_outputs=gx_lam)[0]
        if learned:
            grad_y.index_add_(0, idx, -alpha * gy_lam)
        if exact:
            lam = lam - alpha * h_lam
    return loss, grad_x, grad_alpha, grad_y


def matching_loss(end: torch.Tensor, start: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||end - target||^2 / ||start - target||^2."""
    return (end - target).pow(2).sum() / (start - target).pow(2).sum()


# An update is skipped as a spike when its step-size gradient exceeds this many times the running mean magnitude
# (decay SPIKE_DECAY) of the updates applied before it. Unrolled through many steps near the edge of stability, the
# derivative of the end point jumps by orders of magnitude in one iteration while the matching loss stays ordinary: on
# Fashion-MNIST at ipc 10, 20 steps at 0.1, iteration 117's step-size update was about 10,000 times the mean of the
# 20 before it; applied, it took the step size from 0.098 to 0.016 (the next one to its floor), and with only the step
# size held back the images' update of the same iteration sent the matching loss from 0.4-0.9 to 3-8. In the step sizes
# logged by the runs measured before (Fashion-MNIST and CIFAR-10, ipc 1 and 10, up to 300 iterations) no update exceeded
# about 5 times that mean; the CIFAR-10 ipc 1 quick set, whose step size moves by up to 24% in one update, comes out
# bit for bit the same with this guard.
# The mean is that of the applied updates until it covers SPIKE_WARMUP of them, which are not judged; a spike still
# feeds it, capped at the threshold, so a lasting change of scale is accepted after two skipped updates.
SPIKE_RATIO = 100.0
SPIKE_DECAY = 0.9
SPIKE_WARMUP = 10


class SyntheticSet:
    """Learnable images, their labels and a learnable step size that stays positive.

    Labels are hard (int64 classes) or soft (float logits per class: the inner loop's targets are their
    softmax); ``learn_labels`` makes soft labels learnable through the matching loss (DATM), with their own
    SGD (``lr_label``, momentum 0.9). An update whose gradients are not finite, or whose step-size gradient is a
    spike (``spike_ratio`` times the running mean of the applied ones, after SPIKE_WARMUP of them), is skipped;
    ``skip_reason`` says why the last one was.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, syn_lr: float, lr_img: float, lr_lr: float,
                 learn_labels: bool = False, lr_label: float = 2.0, spike_ratio: float = SPIKE_RATIO):
        if learn_labels and not labels.is_floating_point():
            raise ValueError("only soft (float logit) labels can be learned")
        self.images = images.detach().clone().requires_grad_(True)
        self.labels = labels.detach().clone().requires_grad_(learn_labels)
        self.syn_lr = torch.tensor(float(syn_lr), device=images.device, requires_grad=True)
        self.lr_floor = float(syn_lr) * 1e-3
        self.opt_img = torch.optim.SGD([self.images], lr=lr_img, momentum=0.5)
        self.opt_lr = torch.optim.SGD([self.syn_lr], lr=lr_lr, momentum=0.5)
        self.opt_label = torch.optim.SGD([self.labels], lr=lr_label, momentum=0.9) if learn_labels else None
        self.spike_ratio = spike_ratio
        self.lr_grad_scale = 0.0  # running mean |d loss / d syn_lr| of the applied updates
        self.lr_grad_count = 0  # how many it covers
        self.skip_reason: str | None = None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.opt_img, self.opt_lr, self.opt_label) if o is not None]

    @property
    def learnable(self) -> list[torch.Tensor]:
        return [self.images, self.syn_lr, *([self.labels] if self.opt_label is not None else [])]

    def update(self, loss: torch.Tensor, grads: tuple[torch.Tensor, ...] | None = None) -> bool:
        """One optimiser step from ``loss`` (or from ``grads`` for the images, the step size and, when learned,
        the labels, computed elsewhere); a non-finite loss or gradient, or a spike, skips it. Returns whether it
        applied."""
        self.skip_reason = None
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            return self.skip("non-finite")
        if grads is None:
            loss.backward()
        else:
            for tensor, grad in zip(self.learnable, grads, strict=True):
                tensor.grad = grad.reshape(tensor.shape)
        if any(t.grad is None or not torch.isfinite(t.grad).all() for t in self.learnable):
            return self.skip("non-finite")
        if self.spiked(self.syn_lr.grad.abs().item()):
            return self.skip("spike")
        for opt in self.optimizers:
            opt.step()
        with torch.no_grad():  # projected step: the step size never reaches zero or below
            self.syn_lr.clamp_(min=self.lr_floor)
        return True

    def spiked(self, size: float) -> bool:
        """Whether a step-size gradient of magnitude ``size`` is a spike; the running mean takes it in either way
        (a spike capped at the threshold)."""
        threshold = self.spike_ratio * self.lr_grad_scale
        spike = self.lr_grad_count >= SPIKE_WARMUP and size > threshold
        decay = min(SPIKE_DECAY, self.lr_grad_count / (self.lr_grad_count + 1))
        self.lr_grad_scale = decay * self.lr_grad_scale + (1 - decay) * (min(size, threshold) if spike else size)
        self.lr_grad_count += not spike
        return spike

    def skip(self, reason: str) -> bool:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.skip_reason = reason
        return False

    def state_dict(self) -> dict:
        state = {"images": self.images.detach().cpu(), "labels": self.labels.detach().cpu(),
                 "syn_lr": self.syn_lr.detach().cpu(), "opt_img": self.opt_img.state_dict(),
                 "opt_lr": self.opt_lr.state_dict(), "lr_grad_scale": self.lr_grad_scale,
                 "lr_grad_count": self.lr_grad_count}
        if self.opt_label is not None:
            state["opt_label"] = self.opt_label.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            self.images.copy_(state["images"])
            self.syn_lr.copy_(state["syn_lr"])
            self.labels.copy_(state["labels"])
        self.opt_img.load_state_dict(state["opt_img"])
        self.opt_lr.load_state_dict(state["opt_lr"])
        # absent from checkpoints of older versions: the mean starts again, with its warm-up
        self.lr_grad_scale, self.lr_grad_count = state.get("lr_grad_scale", 0.0), state.get("lr_grad_count", 0)
        if self.opt_label is not None:
            self.opt_label.load_state_dict(state["opt_label"])


def matching_gradients(
    mode: str, student: FlatModel, start: torch.Tensor, target: torch.Tensor, images: torch.Tensor,
    labels: torch.Tensor, syn_lr: torch.Tensor, unroll: Unroll, augment: DSA | None, generator: torch.Generator,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """The matching loss and its gradients with respect to the images and the step size (and the labels,
    when they require grad: learned soft labels), by ``mode``."""
    if mode not in MODES:
        raise ValueError(f"unknown matching mode {mode!r}; choose from {', '.join(MODES)}")
    steps = plan_steps(images, unroll, augment, generator)
    learned = labels.requires_grad
    if mode == "unrolled":
        end = student_endpoint(student, start, images, labels, syn_lr, unroll, augment, generator, steps)
        loss = matching_loss(end, start, target)
        wrt = (images, syn_lr, labels) if learned else (images, syn_lr)
        if not torch.isfinite(loss):
            return loss.detach(), tuple(torch.zeros_like(t) for t in wrt)
        return loss.detach(), torch.autograd.grad(loss, wrt)
    loss, gx, ga, gy = adjoint_gradients(student, start, target, images, labels, syn_lr, steps, augment,
                                         exact=mode == "recompute")
    return loss, ((gx, ga, gy) if learned else (gx, ga))


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
