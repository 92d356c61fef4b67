"""Device choice, seeding and one-line error reasons: what every module needs, in one place."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import random
import sys
from collections.abc import Iterator, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)


@contextlib.contextmanager
def environment(variables: Mapping[str, str] | None) -> Iterator[None]:
    """Set these environment variables while the block runs, then restore each one as it was (or unset)."""
    variables = dict(variables or {})
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


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


@functools.cache
def keep_freed_memory() -> bool:
    """Have glibc's malloc serve large tensors from memory the process already has, instead of mapping fresh pages
    for each one; returns whether it applied (glibc on Linux only).

    By default every allocation above a threshold (at most 32 MiB) is a new mmap, and each of its pages faults and is
    zeroed by the kernel on first touch, then returned on free. Trajectory matching allocates and frees tensors of the
    size of a layer's activations hundreds of times per inner step; on a CPU that paging cost as much as the
    arithmetic (an element-wise pass over a 52 MB activation took 15 ms instead of 2.4 ms). Heap allocation with a
    high trim threshold keeps freed blocks for the next tensor. Every ``kdd`` command calls it once at start; it is
    process-wide and cannot be undone, and the memory a process holds shrinks only when more than 1 GiB lies free at
    the top of its heap.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process already runs on
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    # glibc returns 1 for each accepted setting; other C libraries lack mallopt or accept neither (musl's returns 0)
    applied = [bool(mallopt(m_trim_threshold, 2**30)), bool(mallopt(m_mmap_max, 0))]
    log.debug("malloc keeps freed memory: %s", all(applied))
    return all(applied)


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
