"""Model registry: every network is created by name with one signature.

    models.create("convnet-w128-d3", channels=1, num_classes=10, image_size=28)

Families register a builder with ``@register(pattern)``; the pattern's named groups become keyword
arguments, so ``convnet-w64-d4`` and ``convnet-d4`` need no separate entries.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from kdd_mlflow.layers import AvgPool2, Conv2d, InstanceNorm, ReLU, fusable, norm_relu_pool, row_major

Builder = Callable[..., nn.Module]
_REGISTRY: list[tuple[re.Pattern[str], Builder, str]] = []


def register(pattern: str, example: str):
    """Register a builder for names matching ``pattern`` (full match); ``example`` is shown in help."""

    def wrap(builder: Builder) -> Builder:
        _REGISTRY.append((re.compile(pattern), builder, example))
        return builder

    return wrap


def available() -> list[str]:
    """Example names, one per family."""
    return [example for _, _, example in _REGISTRY]


def _lookup(name: str) -> tuple[Builder, dict[str, int]]:
    for pattern, builder, _ in _REGISTRY:
        match = pattern.fullmatch(name)
        if match:
            return builder, {k: int(v) for k, v in match.groupdict().items() if v is not None}
    raise ValueError(f"unknown model {name!r}; known families: {', '.join(available())}")


def check_name(name: str) -> str:
    """Raise ValueError for a name no family accepts."""
    _lookup(name)
    return name


def create(name: str, channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Build a freshly initialised model by registry name."""
    builder, kwargs = _lookup(name)
    return builder(channels=channels, num_classes=num_classes, image_size=image_size, **kwargs)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ConvNet(nn.Module):
    """The ConvNet of the dataset-distillation literature.

    ``depth`` blocks of conv3x3 (``width`` channels) -> instance norm (GroupNorm with one group per channel,
    affine) -> ReLU -> 2x2 average pool, then a linear classifier; the convolution, the norm, the ReLU and the pool
    are ``layers``' versions, whose derivatives are cheaper on a CPU where trajectory matching differentiates them
    twice, and on a CPU each block's norm, ReLU and pool run as one fused function (``layers.norm_relu_pool``).
    Images smaller than 32 pixels get extra padding on the first convolution so the feature map follows the 32x32
    path (28x28 MNIST: padding 3, as in the MTT reference), keeping experts and synthetic sets comparable.
    """

    def __init__(self, channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        size = image_size
        first_pad = 1 + max(0, (32 - image_size) // 2) if image_size < 32 else 1
        in_ch = channels
        for d in range(depth):
            pad = first_pad if d == 0 else 1
            layers += [
                Conv2d(in_ch, width, kernel_size=3, padding=pad),
                InstanceNorm(width),
                ReLU(),  # not in place: trajectory matching differentiates through it twice
                AvgPool2(),
            ]
            size = (size + 2 * pad - 2) // 2
            in_ch = width
        if size < 1:
            raise ValueError(f"convnet depth {depth} is too deep for {image_size}px images")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width * size * size, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():
            x = row_major(x)  # a channels-last input would run every instance norm about 20x slower
        if torch.compiler.is_compiling() or _hooked(self.features, *self.features):
            return self.classifier(self.features(x).flatten(1))
        # each block's norm, ReLU and pool as one fused function where its kernels run (layers.norm_relu_pool)
        for conv, norm, act, pool in zip(*[iter(self.features)] * 4, strict=True):
            z = conv(x)
            x = norm_relu_pool(z, norm.weight, norm.bias, norm.eps) if fusable(z, norm.weight) else pool(act(norm(z)))
        return self.classifier(x.flatten(1))


def _hooked(*modules: nn.Module) -> bool:
    """Whether a forward hook watches any of these modules (then each must run as itself)."""
    module = nn.modules.module
    return bool(module._global_forward_hooks or module._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


@register(r"convnet(?:-w(?P<width>\d+))?(?:-d(?P<depth>\d+))?", "convnet[-wW][-dD] (default W128 D3)")
def convnet(channels: int, num_classes: int, image_size: int, width: int = 128, depth: int = 3) -> nn.Module:
    if width < 1 or depth < 1:
        raise ValueError("convnet width and depth must be positive")
    return ConvNet(channels, num_classes, image_size, width=width, depth=depth)


@register(r"resnet18", "resnet18")
def resnet18(channels: int, num_classes: int, image_size: int) -> nn.Module:
    """ResNet-18 for small images: 3x3 stride-1 stem, no max-pool, any channel count."""
    import torchvision  # here, not at the top: torchvision's import (with torch._dynamo) costs every stage a second

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


@register(r"mlp(?:-h(?P<hidden>\d+))?", "mlp[-hH] (default H256)")
def mlp(channels: int, num_classes: int, image_size: int, hidden: int = 256) -> nn.Module:
    """A two-hidden-layer perceptron: the smallest student."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(channels * image_size * image_size, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
