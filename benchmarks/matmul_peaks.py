"""The best matrix-multiply rate this process reaches in float32, TF32 and bfloat16, as JSON.

    python benchmarks/matmul_peaks.py --device cuda

The denominators for an MFU: ``profile_matching.py`` divides by the float32 peak (TF32 off); cuDNN's
convolutions may run in TF32 by default, so the TF32 and bfloat16 peaks say how far a faster arithmetic
could go. Square products of size ``--n``, one warm-up, the best of ``--repeats``, timed with CUDA events.
"""

from __future__ import annotations

import json

import click
import torch

from kdd_mlflow.runtime import pick_device


def peak(dev: torch.device, n: int, dtype: torch.dtype, tf32: bool, repeats: int) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            import time
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


@click.command()
@click.option("--device", default="auto", show_default=True)
@click.option("--n", default=8192, show_default=True)
@click.option("--repeats", default=20, show_default=True)
def main(device, n, repeats):
    dev = pick_device(device)
    default = torch.backends.cuda.matmul.allow_tf32
    result = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "torch": torch.__version__, "n": n,
              "fp32_tflops": peak(dev, n, torch.float32, False, repeats) / 1e12,
              "tf32_tflops": peak(dev, n, torch.float32, True, repeats) / 1e12,
              "bf16_tflops": peak(dev, n, torch.bfloat16, False, repeats) / 1e12}
    torch.backends.cuda.matmul.allow_tf32 = default
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
