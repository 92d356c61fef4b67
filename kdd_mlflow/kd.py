"""Knowledge distillation: losses in a registry, forward-hook feature capture, and the KD objective.

Convention: ``alpha`` weighs the distillation term and ``1 - alpha`` the hard-label cross entropy,

    hinton: alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)    (batch mean)
    mse:    alpha * mean((s - t)^2)                            + (1 - alpha) * CE(s, y)
    hint:   hinton + beta * mean((adapter(f_s) - f_t)^2)        (FitNets, features caught by forward hooks)

(Hinton et al. 2015; Romero et al. 2015). The T^2 factor keeps the soft term's gradients on the scale of
the hard term's as T changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kdd_mlflow.augment import DSA
from kdd_mlflow.train import predict_logits

_LOSSES: dict[str, Callable[..., KDLoss]] = {}


def register_loss(name: str):
    def wrap(cls):
        _LOSSES[name] = cls
        return cls

    return wrap


def loss_names() -> list[str]:
    return list(_LOSSES)


def create_loss(name: str, **kwargs) -> KDLoss:
    if name not in _LOSSES:
        raise ValueError(f"unknown KD loss {name!r}; choose from {', '.join(_LOSSES)}")
    return _LOSSES[name](**kwargs)


class KDLoss(nn.Module):
    """Base: ``forward(student_logits, teacher_logits, hard_ce)``; hard_ce is the batch's cross entropy."""

    sees_inside = False  # whether the loss reads the models' inner features (then the teacher runs every batch)

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, **_: object):
        super().__init__()
        if temperature <= 0 or not 0 <= alpha <= 1:
            raise ValueError("temperature must be > 0 and alpha in [0, 1]")
        self.temperature, self.alpha = temperature, alpha

    def attach(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor | None = None
               ) -> contextlib.AbstractContextManager:
        """Context in which the loss can see inside the models (hooks); nothing for logit losses."""
        return contextlib.nullcontext()

    def extra_parameters(self) -> list[nn.Parameter]:
        """Parameters the loss itself learns (a hint adapter), to optimise with the student."""
        return list(self.parameters())


def hinton_term(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch."""
    t = F.log_softmax(teacher_logits / temperature, dim=1)
    s = F.log_softmax(student_logits / temperature, dim=1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * temperature**2


@register_loss("hinton")
class HintonLoss(KDLoss):
    def forward(self, student_logits, teacher_logits, hard_ce):
        return self.alpha * hinton_term(student_logits, teacher_logits, self.temperature) + (1 - self.alpha) * hard_ce


@register_loss("mse")
class LogitMSELoss(KDLoss):
    def forward(self, student_logits, teacher_logits, hard_ce):
        return self.alpha * F.mse_loss(student_logits, teacher_logits) + (1 - self.alpha) * hard_ce


class Features:
    """Catch the outputs of named submodules with forward hooks, without rewriting the model."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(model.named_modules())
        missing = [n for n in names if n not in modules]
        if missing:
            raise ValueError(f"no layer named {missing} in {type(model).__name__}")
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = [modules[n].register_forward_hook(self._catch(n)) for n in names]

    def _catch(self, name: str):
        def hook(module, inputs, output):
            self.outputs[name] = output

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@register_loss("hint")
class FeatureHintLoss(HintonLoss):
    """Hinton loss plus a FitNets hint: a learned 1x1-conv (or linear) adapter maps the student's
    feature map onto the teacher's (pooled to the teacher's spatial size), penalised by MSE."""

    sees_inside = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9, beta: float = 1.0,
                 student_layer: str = "features", teacher_layer: str = "features", **_: object):
        super().__init__(temperature, alpha)
        self.beta, self.student_layer, self.teacher_layer = beta, student_layer, teacher_layer
        self.adapter: nn.Module | None = None
        self._student: Features | None = None
        self._teacher: Features | None = None

    @contextlib.contextmanager
    def attach(self, student: nn.Module, teacher: nn.Module, example: torch.Tensor | None = None) -> Iterator[None]:
        """Hook both layers; with ``example`` the adapter is built now, so an optimiser can see it."""
        self._student = Features(student, [self.student_layer])
        self._teacher = Features(teacher, [self.teacher_layer])
        try:
            if example is not None and self.adapter is None:
                with torch.no_grad():
                    student(example)
                    teacher(example)
                self._build_adapter(example.device)
            yield
        finally:
            self._student.remove()
            self._teacher.remove()

    def _build_adapter(self, device: torch.device) -> None:
        fs = self._student.outputs[self.student_layer]
        ft = self._teacher.outputs[self.teacher_layer]
        if fs.dim() == 4 and ft.dim() == 4:
            self.adapter = nn.Conv2d(fs.shape[1], ft.shape[1], kernel_size=1).to(device)
        else:
            self.adapter = nn.Linear(fs.flatten(1).shape[1], ft.flatten(1).shape[1]).to(device)

    def hint(self) -> torch.Tensor:
        fs = self._student.outputs[self.student_layer]
        ft = self._teacher.outputs[self.teacher_layer].detach()
        if self.adapter is None:
            self._build_adapter(fs.device)
        if fs.dim() == 4 and ft.dim() == 4:
            mapped = self.adapter(fs)
            if mapped.shape[-2:] != ft.shape[-2:]:
                mapped = F.adaptive_avg_pool2d(mapped, ft.shape[-2:])
            return F.mse_loss(mapped.float(), ft.float())
        return F.mse_loss(self.adapter(fs.flatten(1)).float(), ft.flatten(1).float())

    def forward(self, student_logits, teacher_logits, hard_ce):
        return super().forward(student_logits, teacher_logits, hard_ce) + self.beta * self.hint()


def kd_objective(teacher: nn.Module, loss: KDLoss, augment: str = "none", dsa: DSA | None = None,
                 label_once: torch.Tensor | None = None):
    """The training objective for ``train.fit``: augment, let the teacher label the augmented input
    (eval mode, no gradients), then apply ``loss``. ``mixup`` mixes pairs with a uniform weight
    (Beta(1, 1)); its hard-label term mixes the two labels' cross entropies the same way.

    ``label_once``: the transfer images. Without augmentation the teacher sees the same images every epoch, so a
    logit loss takes their logits from one pass over them, made now (under the caller's autocast), instead of a
    teacher forward pass per batch per epoch; they stay available as ``objective.teacher_logits`` (e.g. for
    fidelity on the transfer set). Otherwise ``teacher_logits`` is None.
    """
    if augment not in ("none", "dsa", "mixup"):
        raise ValueError(f"unknown KD augmentation {augment!r}; choose none, dsa or mixup")
    dsa = dsa or DSA()
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    once = None
    if label_once is not None and augment == "none" and not loss.sees_inside:
        once = predict_logits(teacher, label_once).float()

    def objective(student, x, y, generator, idx=None):
        if augment == "dsa":
            x = dsa(x, generator)
        if augment == "mixup":
            lam = float(torch.rand((), generator=generator))
            perm = torch.randperm(len(x), generator=generator).to(x.device)
            x = lam * x + (1 - lam) * x[perm]
        if once is not None and idx is not None:
            teacher_logits = once[idx]
        else:
            with torch.no_grad():
                teacher_logits = teacher(x).float()
        logits = student(x).float()  # losses in float32, also under bf16 autocast
        if augment == "mixup":
            hard = lam * F.cross_entropy(logits, y) + (1 - lam) * F.cross_entropy(logits, y[perm])
        else:
            hard = F.cross_entropy(logits, y)
        return loss(logits, teacher_logits, hard), logits

    objective.teacher_logits = once
    return objective


def init_from_teacher(student: nn.Module, teacher: nn.Module) -> int:
    """Copy every teacher tensor whose name and shape the student shares; return how many were copied."""
    mine = student.state_dict()
    shared = {k: v for k, v in teacher.state_dict().items() if k in mine and mine[k].shape == v.shape}
    if not shared:
        raise ValueError("student and teacher share no parameter of the same name and shape; cannot initialise")
    student.load_state_dict(shared, strict=False)
    return len(shared)
