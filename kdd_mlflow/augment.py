"""Differentiable Siamese augmentation (DSA), differentiable with respect to the images.

One group (color, crop, cutout, flip, scale or rotate) is drawn per call, with parameters drawn per
sample, as in the MTT reference. Drawing and applying are separate steps: ``sample`` returns a
``Draw`` of plain tensors and ``apply`` is a deterministic function of the images and that draw, so a
draw can be stored and replayed exactly (trajectory matching with recomputation needs this).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

GROUPS = ("color", "crop", "cutout", "flip", "scale", "rotate")
DEFAULT_STRATEGY = "_".join(GROUPS)
# Per dataset, the groups that keep an image in its class. A mirrored digit is not that digit (or any
# digit: a mirrored 2, 3, 4, 7 or 9), so digit datasets get no flip; clothes and natural images are
# left-right symmetric in meaning, so Fashion-MNIST and CIFAR get every group, as in the DSA and MTT papers.
# Rotation is kept for digits: at most 15 degrees, far from turning a 6 into a 9. Unlisted datasets: every group.
STRATEGIES = {"mnist": "color_crop_cutout_scale_rotate"}


def strategy_for(dataset: str) -> str:
    """The DSA groups used for ``dataset`` by every stage that augments (experts, distill, evaluation, training)."""
    return STRATEGIES.get(dataset, DEFAULT_STRATEGY)


@dataclass(frozen=True)
class DSAParams:
    """Strengths, as in the reference's ParamDiffAug."""

    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5


@dataclass
class Draw:
    """One augmentation call: which group and its per-sample random values (on the CPU)."""

    group: str
    values: dict[str, torch.Tensor]


class DSA:
    """Callable augmentation: ``DSA()(images, generator)``."""

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: DSAParams | None = None):
        self.groups = tuple(g for g in strategy.split("_") if g and g != "none")
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown augmentation group(s) {sorted(unknown)}; choose from {GROUPS}")
        self.params = params or DSAParams()
        self.strategy = "_".join(self.groups) or "none"

    @classmethod
    def for_dataset(cls, dataset: str) -> DSA:
        """The augmentation that makes sense for ``dataset`` (``strategy_for``)."""
        return cls(strategy_for(dataset))

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.groups:
            return x
        return self.apply(x, self.sample(x.shape, generator))

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None) -> Draw:
        """Draw a group and its per-sample values for a batch of ``shape`` (N, C, H, W)."""
        n, _, h, w = shape
        p = self.params
        g = generator

        def rand(*size: int) -> torch.Tensor:
            return torch.rand(size, generator=g)

        group = self.groups[int(torch.randint(len(self.groups), (1,), generator=g))]
        if group == "color":
            values = {"brightness": rand(n), "saturation": rand(n), "contrast": rand(n)}
        elif group == "crop":
            sy, sx = int(h * p.ratio_crop_pad + 0.5), int(w * p.ratio_crop_pad + 0.5)
            values = {
                "dy": torch.randint(-sy, sy + 1, (n,), generator=g),
                "dx": torch.randint(-sx, sx + 1, (n,), generator=g),
            }
        elif group == "cutout":
            ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
            values = {
                "cy": torch.randint(0, h + (1 - ch % 2), (n,), generator=g),
                "cx": torch.randint(0, w + (1 - cw % 2), (n,), generator=g),
            }
        elif group == "flip":
            values = {"flip": rand(n) < p.prob_flip}
        elif group == "scale":
            lo, hi = 1 / p.ratio_scale, p.ratio_scale
            values = {"sx": rand(n) * (hi - lo) + lo, "sy": rand(n) * (hi - lo) + lo}
        else:  # rotate
            values = {"angle": (rand(n) - 0.5) * 2 * p.ratio_rotate * math.pi / 180}
        return Draw(group, values)

    def apply(self, x: torch.Tensor, draw: Draw) -> torch.Tensor:
        """Apply a stored draw; differentiable with respect to ``x``."""
        v = {k: t.to(x.device) for k, t in draw.values.items()}
        p = self.params
        if draw.group == "color":
            x = x + (v["brightness"].to(x.dtype) - 0.5).view(-1, 1, 1, 1) * p.brightness
            mean = x.mean(dim=1, keepdim=True)
            x = (x - mean) * (v["saturation"].to(x.dtype) * p.saturation).view(-1, 1, 1, 1) + mean
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            return (x - mean) * (v["contrast"].to(x.dtype) + p.contrast).view(-1, 1, 1, 1) + mean
        if draw.group == "crop":
            return _translate(x, v["dy"], v["dx"])
        if draw.group == "cutout":
            return _cutout(x, v["cy"], v["cx"], p.ratio_cutout)
        if draw.group == "flip":
            return torch.where(v["flip"].view(-1, 1, 1, 1), x.flip(3), x)
        n = x.shape[0]
        theta = x.new_zeros(n, 2, 3)
        if draw.group == "scale":
            theta[:, 0, 0], theta[:, 1, 1] = v["sx"].to(x.dtype), v["sy"].to(x.dtype)
        else:
            a = v["angle"].to(x.dtype)
            theta[:, 0, 0], theta[:, 0, 1] = a.cos(), -a.sin()
            theta[:, 1, 0], theta[:, 1, 1] = a.sin(), a.cos()
        grid = F.affine_grid(theta, list(x.shape), align_corners=True)
        return F.grid_sample(x, grid, align_corners=True)


def _translate(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Shift each image by whole pixels, filling with zeros (the reference's random crop)."""
    n, c, h, w = x.shape
    pad_y, pad_x = int(dy.abs().max()), int(dx.abs().max())
    padded = F.pad(x, (pad_x, pad_x, pad_y, pad_y))
    rows = torch.arange(h, device=x.device).view(1, 1, h, 1) + pad_y - dy.view(n, 1, 1, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, 1, w) + pad_x - dx.view(n, 1, 1, 1)
    batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
    channels = torch.arange(c, device=x.device).view(1, c, 1, 1)
    # One index per dimension, so the result comes out in the batch's own (contiguous) layout. Indexing the
    # channels-last permutation instead returned a channels-last batch, and every layer of a step on it then ran
    # in that layout, where the instance norm's backward is up to 20x slower on a CPU.
    return padded[batch, channels, rows, cols]


def _cutout(x: torch.Tensor, cy: torch.Tensor, cx: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero a square of side ratio * size centred at (cy, cx) in each image."""
    _, _, h, w = x.shape
    half_h, half_w = int(h * ratio + 0.5) // 2, int(w * ratio + 0.5) // 2
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= (cy - half_h).view(-1, 1, 1)) & (rows < (cy + half_h).view(-1, 1, 1))
        & (cols >= (cx - half_w).view(-1, 1, 1)) & (cols < (cx + half_w).view(-1, 1, 1))
    )
    return x * (~inside).unsqueeze(1).to(x.dtype)
