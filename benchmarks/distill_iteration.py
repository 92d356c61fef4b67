"""Seconds per MTT distillation iteration and peak memory, as JSON.

    python benchmarks/distill_iteration.py --model convnet --ipc 10 --syn-steps 20 --iterations 5 --matching recompute

Needs no dataset or experts: the expert segment is a fresh network's parameters and a perturbed copy,
which costs the same as a real one. Peak memory is the process's peak RSS on the CPU (and its growth
over the baseline before the first iteration), or peak CUDA memory on a GPU.
"""

from __future__ import annotations

import json
import platform
import resource
import time
from pathlib import Path

import click
import torch

import kdd_mlflow
from kdd_mlflow import data, models
from kdd_mlflow.augment import DSA
from kdd_mlflow.distill.experts import flat_parameters
from kdd_mlflow.distill.mtt import MODES, FlatModel, SyntheticSet, Unroll, mtt_iteration
from kdd_mlflow.runtime import pick_device


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
def main(dataset, model, ipc, syn_steps, batch_syn, iterations, device, augment, matching, memory_limit_gib):
    if memory_limit_gib is not None:
        cap = int(memory_limit_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    meta = data.info(dataset)
    dev = pick_device(device)
    torch.manual_seed(0)
    net = models.create(model, meta.channels, meta.num_classes, meta.image_size).to(dev)
    student = FlatModel(net)
    start = flat_parameters(net).to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = ipc * meta.num_classes
    images = torch.randn(n, meta.channels, meta.image_size, meta.image_size, device=dev)
    labels = torch.arange(meta.num_classes, device=dev).repeat_interleave(ipc)
    syn = SyntheticSet(images, labels, syn_lr=0.01, lr_img=100.0, lr_lr=1e-5)
    unroll = Unroll(syn_steps, batch_syn)
    gen = torch.Generator().manual_seed(0)
    aug = DSA() if augment else None

    baseline = peak_rss_mib()
    try:
        mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)  # warm-up
    except (RuntimeError, MemoryError) as exc:
        if memory_limit_gib is None or "allocate" not in str(exc) and not isinstance(exc, MemoryError):
            raise
        raise SystemExit(f"out of memory: needs more than the {memory_limit_gib:g} GiB limit") from None
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    result = {
        "dataset": dataset, "model": model, "ipc": ipc, "syn_steps": syn_steps, "batch_syn": batch_syn or n,
        "augment": augment, "matching": matching, "device": str(dev), "iterations": iterations,
        "seconds_per_iteration": sum(times) / len(times), "seconds_min": min(times),
        "peak_rss_mib": round(peak_rss_mib(), 1), "rss_growth_mib": round(peak_rss_mib() - baseline, 1),
        "parameters": student.num_params, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "machine": platform.machine(), "package": str(Path(kdd_mlflow.__file__).parent),
    }
    if dev.type == "cuda":
        result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
