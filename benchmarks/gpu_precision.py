"""Reduced-precision arithmetic for MTT matching on a GPU: speed, memory and gradient error.

    python benchmarks/gpu_precision.py --device cuda --dataset cifar10 --ipc 10 --syn-steps 20 --matching unrolled

The engine (``kdd_mlflow.distill.mtt``) is used as it is; only the arithmetic around it changes:

- ``fp64``: a float64 copy of the network, images, expert segment and step size (the reference);
- ``fp32``: float32 with TF32 off for matrix multiplies and cuDNN convolutions;
- ``default``: PyTorch's settings as they are (cuDNN convolutions may use TF32, matrix multiplies do not);
- ``tf32``: TF32 on for both;
- ``bf16``: ``torch.autocast(dtype=bfloat16)`` around the iteration: convolutions and matrix multiplies
  (and their backward and double backward) in bfloat16, parameters, images, norms, the loss, the
  gradients' accumulation and the updates in float32.

Gradients: ``matching_gradients`` (what ``mtt_iteration`` applies to the synthetic images and the step
size) from the same inputs and the same generator seed, so every precision replays the same mini-batches
and DSA draws; each is compared with float32 and with float64 as ||g - g_ref|| / ||g_ref||. ``fp32 again``
repeats float32 to show the run-to-run spread of non-deterministic GPU kernels. Speed: ``mtt_iteration``
timed per precision (and with ``torch.backends.cudnn.benchmark``), one warm-up then ``--iterations``, the
precisions alternated over ``--rounds``; the median is reported with the peak CUDA memory.
"""

from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
import time

import click
import torch

from kdd_mlflow import data, models
from kdd_mlflow.augment import DSA
from kdd_mlflow.distill import mtt
from kdd_mlflow.distill.experts import flat_parameters
from kdd_mlflow.runtime import pick_device

GRAD_PRECISIONS = ("fp64", "fp32", "fp32 again", "default", "tf32", "bf16")
DEFAULTS = {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}
SPEED_VARIANTS = ("fp32", "default", "tf32", "bf16", "default+cudnn.benchmark", "bf16+cudnn.benchmark")


def arithmetic(precision: str, dev: torch.device, cudnn_benchmark: bool = False) -> contextlib.AbstractContextManager:
    """Set the TF32 switches for ``precision``; return the context to compute in."""
    if dev.type == "cuda":
        if precision in ("fp64", "fp32", "fp32 again"):
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        elif precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        else:  # default, bf16: PyTorch's own defaults
            torch.backends.cuda.matmul.allow_tf32 = DEFAULTS["matmul"]
            torch.backends.cudnn.allow_tf32 = DEFAULTS["cudnn"]
        torch.backends.cudnn.benchmark = cudnn_benchmark
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()



def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


def cosine(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().flatten(), ref.double().flatten()
    return float(a @ ref / (a.norm() * ref.norm()))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


@click.command()
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--model", default="convnet", show_default=True)
@click.option("--ipc", default=10, show_default=True)
@click.option("--syn-steps", default=20, show_default=True)
@click.option("--batch-syn", default=None, type=int, help="default: the whole set")
@click.option("--matching", type=click.Choice(mtt.MODES), default="unrolled", show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--iterations", default=5, show_default=True, help="timed iterations per variant and round")
@click.option("--rounds", default=2, show_default=True, help="passes over the variants, in alternating order")
@click.option("--speed/--no-speed", default=True, show_default=True, help="time the variants too")
@click.option("--fp64/--no-fp64", default=True, show_default=True, help="compute the float64 reference")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="also write the result here")
def main(dataset, model, ipc, syn_steps, batch_syn, matching, device, iterations, rounds, speed, fp64, json_out):
    meta = data.info(dataset)
    dev = pick_device(device)
    torch.manual_seed(0)
    net = models.create(model, meta.channels, meta.num_classes, meta.image_size).to(dev)
    start = flat_parameters(net).to(dev)
    target = start + 0.01 * torch.randn_like(start)
    n = ipc * meta.num_classes
    images = torch.randn(n, meta.channels, meta.image_size, meta.image_size, device=dev)
    labels = torch.arange(meta.num_classes, device=dev).repeat_interleave(ipc)
    unroll, aug = mtt.Unroll(syn_steps, batch_syn), DSA()
    nets = {torch.float32: net}
    if fp64:
        nets[torch.float64] = copy.deepcopy(net).double()

    def gradients(precision: str) -> dict:
        dtype = torch.float64 if precision == "fp64" else torch.float32
        student = mtt.FlatModel(nets[dtype])
        x = images.to(dtype).clone().requires_grad_(True)
        lr = torch.tensor(0.01, dtype=dtype, device=dev, requires_grad=True)
        gen = torch.Generator().manual_seed(1)  # the same mini-batches and DSA draws for every precision
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t0 = time.perf_counter()
        with arithmetic(precision, dev):
            loss, (gx, ga) = mtt.matching_gradients(matching, student, start.to(dtype), target.to(dtype), x, labels,
                                                    lr, unroll, aug, gen)
        sync(dev)
        out = {"loss": float(loss), "gx": gx.detach(), "ga": ga.detach().reshape(()),
               "seconds": time.perf_counter() - t0}
        if dev.type == "cuda":
            out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return out

    precisions = [p for p in GRAD_PRECISIONS if (fp64 or p != "fp64")
                  and (dev.type == "cuda" or p in ("fp64", "fp32", "fp32 again", "bf16"))]
    grads = {p: gradients(p) for p in precisions}
    refs = [r for r in ("fp32", "fp64") if r in grads]
    errors = {}
    for p, g in grads.items():
        row = {"loss": g["loss"], "grad_images_norm": float(g["gx"].double().norm()), "grad_lr": float(g["ga"]),
               "seconds_one_gradient": round(g["seconds"], 4), "peak_cuda_mib": g.get("peak_cuda_mib")}
        for r in refs:
            ref = grads[r]
            row[f"images_rel_err_vs_{r}"] = rel(g["gx"], ref["gx"])
            row[f"images_cosine_vs_{r}"] = cosine(g["gx"], ref["gx"])
            row[f"lr_rel_err_vs_{r}"] = abs(float(g["ga"]) - float(ref["ga"])) / abs(float(ref["ga"]))
            row[f"loss_rel_err_vs_{r}"] = abs(g["loss"] - ref["loss"]) / abs(ref["loss"])
        errors[p] = row

    timings: dict[str, dict] = {}
    if speed:
        variants = [v for v in SPEED_VARIANTS if dev.type == "cuda" or v in ("fp32", "bf16")]
        runs: dict[str, list[float]] = {v: [] for v in variants}
        peaks: dict[str, float] = {}
        for r in range(rounds):
            for v in (variants if r % 2 == 0 else variants[::-1]):
                precision, _, bench = v.partition("+")
                syn = mtt.SyntheticSet(images, labels, syn_lr=0.01, lr_img=100.0, lr_lr=1e-5)
                student, gen = mtt.FlatModel(net), torch.Generator().manual_seed(0)
                with arithmetic(precision, dev, cudnn_benchmark=bool(bench)):
                    mtt.mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)  # warm-up
                    sync(dev)
                    if dev.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    for _ in range(iterations):
                        t0 = time.perf_counter()
                        mtt.mtt_iteration(syn, student, start, target, unroll, aug, gen, matching)
                        sync(dev)
                        runs[v].append(time.perf_counter() - t0)
                if dev.type == "cuda":
                    peaks[v] = max(peaks.get(v, 0.0), torch.cuda.max_memory_allocated() / 2**20)
        base = statistics.median(runs["fp32"])
        for v in variants:
            med = statistics.median(runs[v])
            timings[v] = {"seconds_median": med, "seconds_min": min(runs[v]), "seconds": [round(t, 5) for t in runs[v]],
                          "speedup_vs_fp32": base / med, "peak_cuda_mib": round(peaks[v], 1) if v in peaks else None}
        arithmetic("default", dev)

    result = {"dataset": dataset, "model": model, "ipc": ipc, "syn_steps": syn_steps, "batch_syn": batch_syn or n,
              "matching": matching, "device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda,
              "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "pytorch_tf32_defaults": DEFAULTS, "iterations": iterations, "rounds": rounds,
              "gradients": errors, "speed": timings}
    print(json.dumps(result, indent=2))
    print(f"\n{dataset} {model} ipc {ipc}, {batch_syn or n} images per step, {syn_steps} steps, {matching}, "
          f"{result['gpu'] or dev}", file=sys.stderr)
    print("| precision | images grad rel. err. vs fp32 | vs fp64 | step-size grad rel. err. vs fp32 | vs fp64 |",
          file=sys.stderr)
    print("|---|---|---|---|---|", file=sys.stderr)
    for p, row in errors.items():
        cells = [f"{row.get(f'{k}_rel_err_vs_{r}', float('nan')):.2e}"
                 for k in ("images", "lr") for r in ("fp32", "fp64")]
        print(f"| {p} | {cells[0]} | {cells[1]} | {cells[2]} | {cells[3]} |", file=sys.stderr)
    if timings:
        print("| arithmetic | s / iteration (median) | speed-up vs fp32 | peak CUDA MiB |\n|---|---|---|---|",
              file=sys.stderr)
        for v, t in timings.items():
            print(f"| {v} | {t['seconds_median']:.4f} | {t['speedup_vs_fp32']:.2f}x | {t['peak_cuda_mib']} |",
                  file=sys.stderr)
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
