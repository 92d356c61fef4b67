"""Build and load the package's C++ kernels (``cpu_kernels.cpp``: the fused norm-ReLU-pool and the one-channel
convolution) for the CPU, once per machine.

The source has no PyTorch headers: it builds with the system's C++ compiler in about a second, into a cache keyed by
the source, the compiler and the CPU (it is built for the CPU it runs on), and is called through ctypes on the data
pointers of contiguous tensors. It is built with OpenMP and so shares PyTorch's OpenMP runtime (the dynamic loader
gives its ``libgomp.so.1`` the copy PyTorch has loaded) and its thread count.

Where there is no compiler, the build fails, or ``KDD_NATIVE=0`` is set, ``library()`` is None and the layers use
their PyTorch forms: the same values and derivatives, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def cache_dir() -> Path:
    """``$KDD_NATIVE_CACHE``, else ``$XDG_CACHE_HOME/kdd-mlflow/native``, else ``~/.cache/kdd-mlflow/native``."""
    if os.environ.get("KDD_NATIVE_CACHE"):
        return Path(os.environ["KDD_NATIVE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdd-mlflow" / "native"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_key() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags (one line of /proc/cpuinfo each)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [line for line in lines if line.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(dict.fromkeys(keep)) + platform.machine()


def build(compiler: str, destination: Path) -> Path:
    """Compile the source into ``destination`` (a directory) unless a build of the same inputs is there; returns the
    library's path. Written under a temporary name and renamed, so concurrent processes never load half a file."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_key()]).encode())
    target = destination / f"cpu_kernels-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    destination.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True,
                              timeout=300)
        if done.returncode:
            raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


_SIGNATURES = {
    "nrp_forward": ["p"] * 6 + ["i"] * 4 + ["d"],
    "nrp_backward": ["p"] * 9 + ["i"] * 4,
    "nrp_double_backward": ["p"] * 14 + ["i"] * 4,
    "conv1_forward": ["p"] * 4 + ["i"] * 4,
    "conv1_weight_grad": ["p"] * 4 + ["i"] * 4,
}
_CTYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int64, "d": ctypes.c_double}


@functools.cache
def library() -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot be had (the reason is logged once)."""
    if os.environ.get("KDD_NATIVE", "1") == "0":
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C++ compiler found: the ConvNet's layers run as PyTorch's")
        return None
    try:
        path = build(compiler, cache_dir())
        lib = ctypes.CDLL(str(path))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        log.warning("the ConvNet's CPU kernels could not be built (%s); using the PyTorch layers", e)
        return None
    for name, kinds in _SIGNATURES.items():
        for suffix in ("f32", "f64"):
            function = getattr(lib, f"{name}_{suffix}")
            function.argtypes = [_CTYPES[k] for k in kinds]
            function.restype = None
    return lib
