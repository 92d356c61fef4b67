"""Where one MTT iteration's time goes, and how much of the machine's arithmetic it uses.

    python benchmarks/profile_matching.py --model convnet --ipc 10 --syn-steps 20 --matching unrolled

Same inputs as ``distill_iteration.py`` (a fresh network, a perturbed copy as the target, random images, DSA).
One warm-up iteration, then ``--iterations`` under torch.profiler. Every operator's own time is charged to
one category: a backward operator to the autograd node that ran it (a convolution's backward, its
double backward, ...), a forward operator to the layer or step it ran in. FLOPs are counted by
``torch.utils.flop_counter`` over one iteration; the peak is the best float32 matrix multiply this
process reaches with the same threads, so MFU = achieved FLOP/s / that peak. Prints a table and JSON.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from contextlib import contextmanager

import click
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from kdd_mlflow import data, layers, models
from kdd_mlflow.augment import DSA
from kdd_mlflow.distill import mtt
from kdd_mlflow.distill.experts import flat_parameters
from kdd_mlflow.runtime import keep_freed_memory, pick_device

# Autograd nodes -> category (a name ending in BackwardBackward0 is the double backward of that layer).
NODE_KINDS = {"Convolution": "convolution", "_Conv2d": "convolution",
              "NativeGroupNorm": "instance norm", "InstanceNorm": "instance norm",
              "_InstanceNorm": "instance norm", "_NormReluPool": "norm, ReLU and pool (fused)",
              "_Pool2": "relu / pool / linear / loss",
              "_Spread2": "relu / pool / linear / loss", "_ReLU": "relu / pool / linear / loss",
              "Relu": "relu / pool / linear / loss", "Threshold": "relu / pool / linear / loss",
              "AvgPool2D": "relu / pool / linear / loss", "Addmm": "relu / pool / linear / loss",
              "Mm": "relu / pool / linear / loss", "LogSoftmax": "relu / pool / linear / loss",
              "NllLoss": "relu / pool / linear / loss", "GridSampler2D": "DSA", "AffineGridGenerator": "DSA",
              "Flip": "DSA", "Where": "DSA", "Index": "DSA and batch indexing",
              "SplitWithSizes": "functional call and flattening", "View": "functional call and flattening",
              "Reshape": "functional call and flattening", "Unsafe": "functional call and flattening",
              "T": "functional call and flattening", "Transpose": "functional call and flattening"}
LABELS = ("DSA", "functional call and flattening", "convolution", "instance norm", "norm, ReLU and pool (fused)",
          "relu / pool / linear / loss")


def node_category(node: str) -> str:
    """``autograd::engine::evaluate_function: ConvolutionBackwardBackward0`` -> ``convolution double backward``."""
    name = node.split(": ", 1)[1]
    double = "BackwardBackward" in name
    base = name.split("Backward")[0]
    kind = NODE_KINDS.get(base, "elementwise and other")
    return f"{kind} {'double backward' if double else 'backward'}"


@contextmanager
def labelled_forward():
    """Label the forward computations of the layers, DSA and the flat-parameter call, for the profiler."""
    patched = []

    def wrap(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def labelled(*args, **kwargs):
            with record_function(label):
                return original(*args, **kwargs)

        patched.append((owner, attr, original))
        setattr(owner, attr, labelled)

    wrap(DSA, "apply", "DSA")
    wrap(nn.Conv2d, "forward", "convolution")
    wrap(nn.GroupNorm, "forward", "instance norm")
    package_layers = {"Conv2d": "convolution", "InstanceNorm": "instance norm",
                      "AvgPool2": "relu / pool / linear / loss", "ReLU": "relu / pool / linear / loss"}
    for layer, label in package_layers.items():  # the package's own layers, where it has them
        if hasattr(models, layer):
            wrap(getattr(models, layer), "forward", label)
    for layer in (nn.ReLU, nn.AvgPool2d, nn.Linear):
        wrap(layer, "forward", "relu / pool / linear / loss")
    wrap(torch.nn.functional, "cross_entropy", "relu / pool / linear / loss")
    wrap(mtt.FlatModel, "__call__", "functional call and flattening")
    if hasattr(models, "norm_relu_pool"):  # the fused blocks, where the package has them
        wrap(models, "norm_relu_pool", "norm, ReLU and pool (fused)")
        # a C++ kernel is no torch operator: give the profiler an event for each call, charged by its parent
        kernel = layers._kernel

        def recorded_kernel(name, dtype):
            function = kernel(name, dtype)

            def call(*args):
                with record_function(f"{name} kernel"):
                    return function(*args)

            return call

        patched.append((layers, "_kernel", kernel))
        layers._kernel = recorded_kernel
    try:
        yield
    finally:
        for owner, attr, original in patched:
            setattr(owner, attr, original)


def categorise(events) -> dict[str, float]:
    """Self CPU seconds per category: nearest autograd node, else nearest label (innermost wins)."""
    totals: dict[str, float] = defaultdict(float)
    for e in events:
        if e.name.startswith("autograd::engine::evaluate_function") or e.name in LABELS:
            continue
        category, parent = None, e.cpu_parent
        while parent is not None and category is None:
            if parent.name.startswith("autograd::engine::evaluate_function"):
                category = node_category(parent.name)
            elif parent.name in LABELS:
                category = f"{parent.name} forward"
            parent = parent.cpu_parent
        totals[category or "optimiser, loss and the rest"] += e.self_cpu_time_total / 1e6
    return dict(totals)


class FlopCount(TorchDispatchMode):
    """Total FLOPs of the operators torch.utils.flop_counter knows. Its FlopCounterMode also tracks modules with
    backward hooks, which autograd.grad refuses inside the adjoint sweep (``recompute``); this counts the same
    operators without them."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        count = flop_registry.get(func._overloadpacket)
        if count is not None:
            self.total += count(*args, **kwargs, out_val=out)
        return out


def matmul_peak(device: torch.device, n: int = 2048, repeats: int = 10) -> float:
    """The best float32 FLOP/s of an n x n matrix multiply: a practical peak for this process."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@click.command()
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--model", default="convnet", show_default=True)
@click.option("--ipc", default=10, show_default=True)
@click.option("--syn-steps", default=20, show_default=True)
@click.option("--iterations", default=1, show_default=True, help="profiled iterations (after one warm-up)")
@click.option("--matching", type=click.Choice(mtt.MODES), default="unrolled", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="also write the result here")
def main(dataset, model, ipc, syn_steps, iterations, matching, device, json_out):
    meta = data.info(dataset)
    dev = pick_device(device)
    keep_freed_memory()  # as the stages do
    torch.manual_seed(0)
    net = models.create(model, meta.channels, meta.num_classes, meta.image_size).to(dev)
    student = mtt.FlatModel(net)
    start = flat_parameters(net).to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = ipc * meta.num_classes
    images = torch.randn(n, meta.channels, meta.image_size, meta.image_size, device=dev)
    labels = torch.arange(meta.num_classes, device=dev).repeat_interleave(ipc)
    syn = mtt.SyntheticSet(images, labels, syn_lr=0.01, lr_img=100.0, lr_lr=1e-5)
    unroll, gen, aug = mtt.Unroll(syn_steps), torch.Generator().manual_seed(0), DSA()

    def iteration() -> None:
        mtt.mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)

    peak = matmul_peak(dev)  # first, before the iterations heat anything up
    iteration()  # warm-up
    t0 = time.perf_counter()
    iteration()
    seconds = time.perf_counter() - t0
    with FlopCount() as counter:
        iteration()
    flops = counter.total
    with labelled_forward(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            iteration()
    totals = {k: v / iterations for k, v in categorise(prof.events()).items()}
    profiled = sum(totals.values())
    result = {
        "dataset": dataset, "model": model, "ipc": ipc, "syn_steps": syn_steps, "matching": matching,
        "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "seconds_per_iteration": seconds, "profiled_seconds_per_iteration": profiled,
        "gflop_per_iteration": flops / 1e9, "achieved_gflops": flops / seconds / 1e9,
        "matmul_peak_gflops": peak / 1e9, "mfu": flops / seconds / peak,
        "categories": dict(sorted(totals.items(), key=lambda kv: -kv[1])),
    }
    print(f"{model} on {dataset}-shaped images, ipc {ipc}, {syn_steps} steps, {matching}, {result['threads']} threads")
    print(f"{seconds:.2f} s / iteration unprofiled; {flops / 1e9:.1f} GFLOP -> {flops / seconds / 1e9:.1f} GFLOP/s "
          f"against a {peak / 1e9:.1f} GFLOP/s matmul peak: MFU {result['mfu']:.1%}")
    print("| where | s / iteration | share |\n|---|---|---|")
    for name, s in result["categories"].items():
        print(f"| {name} | {s:.3f} | {s / profiled:.1%} |")
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
