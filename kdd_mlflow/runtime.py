"""Device choice, seeding and one-line error reasons: what every module needs, in one place."""

from __future__ import annotations

import logging
import random

import numpy as np
import torch

log = logging.getLogger(__name__)


def pick_device(preference: str = "auto") -> torch.device:
    """cuda, then mps, then cpu; or exactly what ``preference`` names."""
    if preference != "auto":
        device = torch.device(preference)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but no CUDA device is available")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError("device 'mps' was asked for but MPS is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch; return a CPU generator for explicit sampling."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): a one-line reason."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
