"""Accuracy, calibration and fidelity metrics on logits (plain PyTorch; ECE from torchmetrics).

Fidelity follows Stanton et al., "Does Knowledge Distillation Really Work?" (NeurIPS 2021): top-1
agreement between teacher and student, and the predictive KL(teacher || student) at temperature 1,
averaged over inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.classification import multiclass_calibration_error


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels."""
    return F.cross_entropy(logits.double(), labels).item()


def ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error, ``bins`` equal-width confidence bins, weighted by bin size."""
    probs = logits.double().softmax(1)
    return multiclass_calibration_error(probs, labels, num_classes=logits.shape[1], n_bins=bins, norm="l1").item()


def agreement(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Fraction of inputs on which teacher and student predict the same class."""
    return (teacher_logits.argmax(1) == student_logits.argmax(1)).float().mean().item()


def predictive_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """Mean over inputs of KL(p_teacher || p_student), both at temperature 1."""
    t = teacher_logits.double().log_softmax(1)
    s = student_logits.double().log_softmax(1)
    return (t.exp() * (t - s)).sum(1).mean().item()


def classification(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {"acc": accuracy(logits, labels), "nll": nll(logits, labels), "ece": ece(logits, labels)}


def fidelity(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> dict[str, float]:
    return {"agreement": agreement(teacher_logits, student_logits), "kl": predictive_kl(teacher_logits, student_logits)}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compression(teacher_params: int, student_params: int, full_images: int, transfer_images: int) -> dict[str, float]:
    """Parameter compression (teacher / student) and data compression (full / transfer images)."""
    return {"param_compression": teacher_params / student_params, "data_compression": full_images / transfer_images}
