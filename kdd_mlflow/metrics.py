"""Accuracy, calibration and fidelity metrics on logits (plain PyTorch).

Fidelity follows Stanton et al., "Does Knowledge Distillation Really Work?" (NeurIPS 2021): top-1
agreement between teacher and student, and the predictive KL(teacher || student) at temperature 1,
averaged over inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item()


def nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean negative log-likelihood of the labels."""
    return F.cross_entropy(logits.double(), labels).item()


def ece(logits: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> float:
    """Expected calibration error (l1), ``bins`` equal-width confidence bins [lo, hi), weighted by bin size; a
    confidence of exactly 1 has a bin of its own. The binning of torchmetrics' ``multiclass_calibration_error``
    (the tests compare the two), written out because importing torchmetrics cost every stage two seconds."""
    confidence, predicted = logits.double().softmax(1).max(1)
    confidence = confidence.float()  # binned in float32, as torchmetrics does
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype, device=confidence.device)
    bin_of = torch.bucketize(confidence, edges, right=True) - 1
    # sum over a bin of (confidence - correct) = its size * (mean confidence - accuracy)
    gap = torch.zeros(bins + 1, dtype=confidence.dtype, device=confidence.device)
    gap.scatter_add_(0, bin_of, confidence - (predicted == labels).to(confidence.dtype))
    return (gap.abs().sum() / len(confidence)).item()


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
