"""Soft labels for a synthetic set (DATM, Guo et al., ICLR 2024): an expert's logits on the initial images.

The initial real images are drawn only among those the expert classifies correctly, so that no image starts
with a label that contradicts its class; the expert's logits on them become the set's soft labels (the
inner loop's targets are their softmax). Fixed (``soft``) or learned through the matching loss (``learned``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdd_mlflow import data


@torch.no_grad()
def expert_labelled_subset(real: data.RealData, ipc: int, expert: Callable[[torch.Tensor], torch.Tensor],
                           generator: torch.Generator, pool: int = 10) -> tuple[data.Split, torch.Tensor, int]:
    """``ipc`` real images per class that ``expert`` classifies correctly, drawn from a random pool of
    ``pool * ipc`` per class, with the expert's logits on them. Returns (images with hard labels, logits,
    how many images had to be taken although the expert misclassifies them: 0 unless a pool runs short)."""
    images, logits, short = [], [], 0
    for c in range(real.info.num_classes):
        available = len(real.class_indices[c])
        candidates = real.sample_class(c, min(available, pool * ipc), generator)
        out = torch.cat([expert(chunk) for chunk in candidates.split(512)]).float().cpu()
        right = (out.argmax(1) == c).nonzero().flatten()
        wrong = (out.argmax(1) != c).nonzero().flatten()
        chosen = torch.cat([right, wrong])[:ipc]
        short += max(0, ipc - len(right))
        images.append(candidates[chosen])
        logits.append(out[chosen])
    labels = torch.arange(real.info.num_classes).repeat_interleave(ipc)
    subset = data.Split(torch.cat(images), labels, f"{real.info.name}-subset-ipc{ipc}", real.train.source)
    return subset, torch.cat(logits), short


def targets(labels: torch.Tensor) -> torch.Tensor:
    """Training targets: hard labels as they are, soft ones (logits) as their softmax."""
    return labels.softmax(1) if labels.is_floating_point() else labels
