"""Seconds per MTT distillation iteration and peak memory, as JSON.

    python benchmarks/distill_iteration.py --model convnet --ipc 10 --syn-steps 20 --iterations 5 --matching recompute

Needs no dataset or experts: the expert segment is a fresh network's parameters and a perturbed copy,
which costs the same as a real one. Peak memory is the process's peak RSS on the CPU (and its growth
over the baseline before the first iteration), or peak CUDA memory on a GPU.

On a GPU, ``--precision`` picks the arithmetic: ``default`` leaves PyTorch's settings (cuDNN convolutions may
use TF32, matrix multiplies stay float32), ``fp32`` turns TF32 off everywhere, ``tf32`` turns it on for
convolutions and matrix multiplies, ``bf16`` runs the iteration under ``torch.autocast(dtype=bfloat16)``
(convolutions and matrix multiplies in bfloat16; parameters, images, norms, the loss and the updates stay
float32). A point that runs out of CUDA memory exits with one line naming it and what it asked for, and
prints a JSON record with ``"error": "out of memory"`` on stdout.

``--engine`` picks the inner-step derivatives: ``eager`` (autograd), ``compiled`` (torch.func under
torch.compile), or ``best`` (compiled where the package has it: a side-by-side run against an older commit
times each tree's best). The warm-up iteration, which compiles, is reported apart (``first_iteration_s``).

The process sets up its memory allocator as the package's stages do (``runtime.keep_freed_memory``, where the package
has it; ``--default-allocator`` leaves glibc's defaults, to measure what that setting alone buys).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import click
import torch

import kdd_mlflow
from kdd_mlflow import data, models, runtime
from kdd_mlflow.augment import DSA
from kdd_mlflow.distill.experts import flat_parameters
from kdd_mlflow.distill.mtt import MODES, FlatModel, SyntheticSet, Unroll, mtt_iteration
from kdd_mlflow.runtime import pick_device

PRECISIONS = ("default", "fp32", "tf32", "bf16")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def set_precision(precision: str, cudnn_benchmark: bool) -> contextlib.AbstractContextManager:
    """Apply ``precision``'s TF32 switches; return the context to run iterations in (autocast for bf16)."""
    if precision in ("fp32", "tf32"):
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.benchmark = cudnn_benchmark
    if precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def out_of_memory(exc: BaseException, point: str, dev: torch.device) -> dict:
    """What a CUDA out-of-memory error says: the allocation that failed and what was held when it did."""
    text = str(exc)
    asked = re.search(r"Tried to allocate ([\d.]+) (GiB|MiB|KiB)", text)
    record = {"error": "out of memory", "point": point, "message": text.strip().splitlines()[0][:300]}
    if asked:
        unit = {"GiB": 1024, "MiB": 1, "KiB": 1 / 1024}[asked.group(2)]
        record["tried_to_allocate_mib"] = float(asked.group(1)) * unit
    if dev.type == "cuda":
        record["peak_cuda_mib_at_failure"] = round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)
        record["device_total_mib"] = round(torch.cuda.get_device_properties(dev).total_memory / 2**20, 1)
    return record


def fused_kernels() -> bool:
    """Whether the measured package ran its ConvNet blocks through its C++ kernels (False for commits without them)."""
    try:
        from kdd_mlflow import native
    except ImportError:
        return False
    return native.library() is not None


@click.command()
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--model", default="convnet", show_default=True)
@click.option("--ipc", default=10, show_default=True)
@click.option("--syn-steps", default=20, show_default=True)
@click.option("--batch-syn", default=None, type=int, help="default: the whole set")
@click.option("--iterations", default=5, show_default=True, help="timed iterations (after one warm-up)")
@click.option("--device", default="auto", show_default=True)
@click.option("--augment/--no-augment", default=True, show_default=True)
@click.option("--matching", type=click.Choice(MODES), default="unrolled", show_default=True)
@click.option("--memory-limit-gib", type=float, default=None,
              help="CPU: cap the process's data segment (RLIMIT_DATA), so that a point too big for the machine "
                   "fails with an allocation error instead of waking the kernel's OOM killer")
@click.option("--precision", type=click.Choice(PRECISIONS), default="default", show_default=True,
              help="GPU arithmetic: PyTorch's defaults, float32 without TF32, TF32, or bfloat16 autocast")
@click.option("--cudnn-benchmark/--no-cudnn-benchmark", default=False, show_default=True,
              help="let cuDNN time its convolution algorithms and keep the fastest")
@click.option("--engine", type=click.Choice(["eager", "compiled", "best"]), default="eager", show_default=True,
              help="inner-step derivatives: autograd, torch.compile, or compiled where the package has it")
@click.option("--stage-allocator/--default-allocator", default=True, show_default=True,
              help="set up malloc as the package's stages do (where the package does), or leave glibc's defaults")
def main(dataset, model, ipc, syn_steps, batch_syn, iterations, device, augment, matching, memory_limit_gib,
         precision, cudnn_benchmark, engine, stage_allocator):
    allocator = "default"
    if stage_allocator and hasattr(runtime, "keep_freed_memory"):
        allocator = "keep freed memory" if runtime.keep_freed_memory() else "default"
    if memory_limit_gib is not None:
        cap = int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    meta = data.info(dataset)
    dev = pick_device(device)
    if precision != "default" and dev.type != "cuda":
        raise click.BadParameter("only on a CUDA device", param_hint="--precision")
    arithmetic = set_precision(precision, cudnn_benchmark) if dev.type == "cuda" else contextlib.nullcontext()
    torch.manual_seed(0)
    net = models.create(model, meta.channels, meta.num_classes, meta.image_size).to(dev)
    can_compile = "compile" in inspect.signature(FlatModel.__init__).parameters
    if engine == "compiled" and not can_compile:
        raise click.BadParameter(f"the package at {Path(kdd_mlflow.__file__).parent} has no compiled engine",
                                 param_hint="--engine")
    compiled = engine == "compiled" or (engine == "best" and can_compile)
    student = FlatModel(net, compile=True) if compiled else FlatModel(net)
    start = flat_parameters(net).to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = ipc * meta.num_classes
    images = torch.randn(n, meta.channels, meta.image_size, meta.image_size, device=dev)
    labels = torch.arange(meta.num_classes, device=dev).repeat_interleave(ipc)
    syn = SyntheticSet(images, labels, syn_lr=0.01, lr_img=100.0, lr_lr=1e-5)
    unroll = Unroll(syn_steps, batch_syn)
    gen = torch.Generator().manual_seed(0)
    aug = DSA() if augment else None

    point = (f"{dataset} {model} ipc {ipc}, {batch_syn or n} images per step, {syn_steps} steps, {matching}, "
             f"{precision}")
    baseline = peak_rss_mib()
    times = []
    try:
        with arithmetic:
            t0 = time.perf_counter()
            try:
                mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)  # warm-up (compiles)
            except (RuntimeError, MemoryError) as exc:
                if isinstance(exc, torch.OutOfMemoryError) or memory_limit_gib is None or (
                        "allocate" not in str(exc) and not isinstance(exc, MemoryError)):
                    raise
                raise SystemExit(f"out of memory: needs more than the {memory_limit_gib:g} GiB limit") from None
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            first_iteration = time.perf_counter() - t0
            for _ in range(iterations):
                t0 = time.perf_counter()
                mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError as exc:
        record = out_of_memory(exc, point, dev)
        print(json.dumps(record, indent=2))
        asked = record.get("tried_to_allocate_mib")
        raise SystemExit(f"out of CUDA memory at {point}: tried to allocate "
                         f"{asked / 1024 if asked is not None else float('nan'):.2f} GiB with "
                         f"{record.get('peak_cuda_mib_at_failure', 0) / 1024:.2f} GiB already held") from None
    result = {
        "dataset": dataset, "model": model, "ipc": ipc, "syn_steps": syn_steps, "batch_syn": batch_syn or n,
        "augment": augment, "matching": matching, "engine": "compiled" if compiled else "eager",
        "first_iteration_s": round(first_iteration, 3), "device": str(dev), "iterations": iterations,
        "seconds_per_iteration": sum(times) / len(times), "seconds_min": min(times),
        "seconds_median": statistics.median(times), "seconds": [round(t, 5) for t in times],
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_growth_mib": round(peak_rss_mib() - baseline, 1),
        "parameters": student.num_params, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "package": str(Path(kdd_mlflow.__file__).parent),
        "precision": precision, "cudnn_benchmark": cudnn_benchmark, "allocator": allocator,
        "python": sys.version.split()[0], "fused_kernels": fused_kernels(),
    }
    if dev.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["gpu"] = torch.cuda.get_device_name(dev)
        result["cuda"] = torch.version.cuda
        result["tf32"] = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
