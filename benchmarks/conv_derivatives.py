"""Time one convolution's backward and double backward: torch's own against ``layers.conv2d``, on the ConvNet's shapes.

    python benchmarks/conv_derivatives.py --batch 100

For each layer shape (the first layer of a one-channel and of a three-channel input, then the 16 x 16 and 8 x 8
layers, at widths 32 and 128): the forward and the backward with a graph (trajectory matching's inner step), then one
vector-Jacobian product of that backward (the Hessian-vector product's part), with respect to the upstream gradient,
the input and the weight. Both forms alternate, each the median of ``--repeats`` after a warm-up; the process sets
malloc up as the stages do. Also checks that both give the same second derivatives (float32 rounding apart). Prints a
table and JSON.
"""

from __future__ import annotations

import json
import statistics
import time

import click
import torch
import torch.nn.functional as F

from kdd_mlflow.layers import conv2d
from kdd_mlflow.runtime import keep_freed_memory

# (input channels, output channels, input side, padding): the ConvNet's layers on 28 x 28 and 32 x 32 images
SHAPES = [(1, 32, 28, 3), (3, 32, 32, 1), (32, 32, 16, 1), (32, 32, 8, 1),
          (1, 128, 28, 3), (3, 128, 32, 1), (128, 128, 16, 1), (128, 128, 8, 1)]


def derivatives(conv, x, weight, bias, padding, dy, v):
    """(seconds for forward + backward with a graph, seconds for the double backward, its result)."""
    t0 = time.perf_counter()
    y = conv(x, weight, bias, padding=padding)
    dx, dweight, dbias = torch.autograd.grad(y, (x, weight, bias), dy, create_graph=True)
    t1 = time.perf_counter()
    second = torch.autograd.grad((dx, dweight, dbias), (dy, x, weight), (v[0], v[1], v[2]))
    return t1 - t0, time.perf_counter() - t1, second


@click.command()
@click.option("--batch", default=100, show_default=True)
@click.option("--repeats", default=10, show_default=True)
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="also write the result here")
def main(batch, repeats, json_out):
    keep_freed_memory()
    gen = torch.Generator().manual_seed(0)
    forms = {"torch": F.conv2d, "written-out": conv2d}
    rows = []
    print(f"batch {batch}, {torch.get_num_threads()} threads; ms, median of {repeats}")
    print("| in -> out channels, side | torch fwd+bwd | written-out fwd+bwd | torch double bwd "
          "| written-out double bwd | ratio (double bwd) |\n|---|---|---|---|---|---|")
    for cin, cout, side, padding in SHAPES:
        x = torch.randn(batch, cin, side, side, generator=gen).requires_grad_(True)
        weight = torch.randn(cout, cin, 3, 3, generator=gen).requires_grad_(True)
        bias = torch.randn(cout, generator=gen).requires_grad_(True)
        out_side = side + 2 * padding - 2
        # dy depends on the parameters through the layers above it, so the double backward also pulls back to it
        dy = torch.randn(batch, cout, out_side, out_side, generator=gen).requires_grad_(True)
        v = (torch.randn(x.shape, generator=gen), torch.randn(weight.shape, generator=gen),
             torch.randn(bias.shape, generator=gen))
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in forms}
        results = {}
        for r in range(repeats + 1):
            for name, conv in forms.items():
                first, second, results[name] = derivatives(conv, x, weight, bias, padding, dy, v)
                if r:  # the first round warms up
                    times[name].append((first, second))
        for got, want in zip(results["written-out"], results["torch"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3 * want.abs().max().item())
        ms = {name: [statistics.median(t[i] for t in ts) * 1e3 for i in (0, 1)] for name, ts in times.items()}
        row = {"in": cin, "out": cout, "side": side, "torch_ms": ms["torch"], "written_out_ms": ms["written-out"],
               "double_backward_ratio": ms["torch"][1] / ms["written-out"][1]}
        rows.append(row)
        print(f"| {cin} -> {cout}, {side} | {ms['torch'][0]:.2f} | {ms['written-out'][0]:.2f} | {ms['torch'][1]:.2f} "
              f"| {ms['written-out'][1]:.2f} | {row['double_backward_ratio']:.2f}x |")
    if json_out:
        with open(json_out, "w") as f:
            json.dump({"batch": batch, "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows},
                      f, indent=2)


if __name__ == "__main__":
    main()
