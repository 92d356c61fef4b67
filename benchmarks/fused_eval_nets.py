"""Whether the K evaluation networks of a distill evaluation train faster fused into one network, as JSON.

    python benchmarks/fused_eval_nets.py --model convnet-w32 --dataset fashion-mnist --ipc 10 --nets 3

A distill evaluation trains K fresh ConvNets on the same small set, one after another (``distill.evaluate``). Three
ways to run one training step of all K (forward, cross entropy, backward, SGD with momentum) are timed alternately,
on the same batches:

- ``sequential``: the K networks one after another, as the stage does;
- ``grouped``: the K networks as one network whose convolutions are grouped (group k holds network k's channels),
  whose instance norm, ReLU and pooling act per channel anyway, and whose classifier is one batched product: what
  ``torch.func.vmap`` over the K networks' parameters lowers the convolutions to (vmap itself does not apply: the
  package's layers have hand-written derivatives). The grouped network computes the same function, checked here;
- ``processes``: the K networks split between ``--processes`` worker processes of one thread each, started once
  and stepped together (the wall time of a step of all K).

Each figure is the median over ``--rounds`` of ``--steps`` steps per way, the ways taking turns within a round.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import statistics
import time

import click
import torch
import torch.nn.functional as F
from torch import nn

from kdd_mlflow import data, models
from kdd_mlflow.layers import InstanceNorm
from kdd_mlflow.runtime import keep_freed_memory


class Grouped(nn.Module):
    """K ConvNets of one shape as one network: input (N, K*C, H, W), the batch of network k in channels k*C..;
    output (N, K, classes)."""

    def __init__(self, nets: list[models.ConvNet]):
        super().__init__()
        k = len(nets)
        layers: list[nn.Module] = []
        for i, layer in enumerate(nets[0].features):
            if isinstance(layer, nn.Conv2d):
                fused = nn.Conv2d(k * layer.in_channels, k * layer.out_channels, layer.kernel_size,
                                  padding=layer.padding, groups=k)
            elif isinstance(layer, nn.GroupNorm):
                fused = InstanceNorm(k * layer.num_channels, eps=layer.eps)
            else:  # ReLU, pooling: no parameters
                layers.append(type(layer)())
                continue
            with torch.no_grad():  # network k's parameters in group k
                fused.weight.copy_(torch.cat([n.features[i].weight for n in nets]))
                fused.bias.copy_(torch.cat([n.features[i].bias for n in nets]))
            layers.append(fused)
        self.features = nn.Sequential(*layers)
        self.k = k
        self.weight = nn.Parameter(torch.stack([n.classifier.weight.detach() for n in nets]))  # K, classes, F
        self.bias = nn.Parameter(torch.stack([n.classifier.bias.detach() for n in nets]))  # K, classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).flatten(1).unflatten(1, (self.k, -1))  # N, K, F
        return torch.einsum("nkf,kcf->nkc", h, self.weight) + self.bias


def sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def sequential_step(nets, opts, x, y) -> None:
    for net, opt, xk, yk in zip(nets, opts, x, y, strict=True):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(net(xk), yk).backward()
        opt.step()


def grouped_step(net, opt, x, y) -> None:
    k, n = y.shape
    logits = net(x.transpose(0, 1).flatten(1, 2))  # N, K*C, H, W
    opt.zero_grad(set_to_none=True)
    # the sum of the K networks' mean losses: each network's gradient is its own loss's
    (F.cross_entropy(logits.reshape(n * k, -1), y.t().reshape(-1), reduction="sum") / n).backward()
    opt.step()


def worker(conn, model, meta, count, batch, seed) -> None:
    torch.set_num_threads(1)
    keep_freed_memory()
    torch.manual_seed(seed)
    nets = [models.create(model, meta.channels, meta.num_classes, meta.image_size) for _ in range(count)]
    opts = [sgd(n.parameters()) for n in nets]
    x = torch.randn(count, batch, meta.channels, meta.image_size, meta.image_size)
    y = torch.randint(0, meta.num_classes, (count, batch))
    while (steps := conn.recv()) > 0:
        for _ in range(steps):
            sequential_step(nets, opts, x, y)
        conn.send(True)


@click.command()
@click.option("--model", default="convnet-w32", show_default=True)
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--ipc", default=10, show_default=True, help="the set's size is ipc x classes, one batch per step")
@click.option("--nets", default=3, show_default=True, help="K, evaluation networks per set")
@click.option("--steps", default=20, show_default=True, help="timed steps per way and round")
@click.option("--rounds", default=3, show_default=True)
@click.option("--processes", default=2, show_default=True, help="worker processes of the 'processes' way")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None)
def main(model, dataset, ipc, nets, steps, rounds, processes, json_out):
    if not model.startswith("convnet"):
        raise click.BadParameter("only ConvNets can be grouped", param_hint="--model")
    if not 1 <= processes <= nets:
        raise click.BadParameter(f"between 1 and --nets ({nets})", param_hint="--processes")
    meta = data.info(dataset)
    keep_freed_memory()
    torch.manual_seed(0)
    n = ipc * meta.num_classes
    members = [models.create(model, meta.channels, meta.num_classes, meta.image_size) for _ in range(nets)]
    grouped = Grouped(members)
    x = torch.randn(nets, n, meta.channels, meta.image_size, meta.image_size)
    y = torch.randint(0, meta.num_classes, (nets, n))
    with torch.no_grad():  # the grouped network is the K networks
        apart = torch.stack([m(x[k]) for k, m in enumerate(members)], 1)
        error = (grouped(x.transpose(0, 1).flatten(1, 2)) - apart).abs().max().item()
    if error > 1e-4:
        raise SystemExit(f"the grouped network differs from the K networks by {error:.2e}")
    member_opts, grouped_opt = [sgd(m.parameters()) for m in members], sgd(grouped.parameters())

    ctx = mp.get_context("spawn")
    share = [nets // processes + (i < nets % processes) for i in range(processes)]
    pipes, workers = [], []
    for i, count in enumerate(share):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(child, model, meta, count, n, i), daemon=True)
        proc.start()
        pipes.append(parent)
        workers.append(proc)

    def run_workers(k: int) -> None:
        for pipe in pipes:
            pipe.send(k)
        for pipe in pipes:
            pipe.recv()

    ways = {"sequential": lambda k: [sequential_step(members, member_opts, x, y) for _ in range(k)],
            "grouped": lambda k: [grouped_step(grouped, grouped_opt, x, y) for _ in range(k)],
            "processes": run_workers}
    for run in ways.values():  # warm-up
        run(2)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, run in ways.items():
            t0 = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - t0) / steps)
    for pipe in pipes:
        pipe.send(0)
    for proc in workers:
        proc.join()
    medians = {name: statistics.median(v) for name, v in times.items()}
    result = {"model": model, "dataset": dataset, "images": n, "nets": nets, "steps": steps, "rounds": rounds,
              "processes": processes, "threads": torch.get_num_threads(), "torch": torch.__version__,
              "grouped_max_abs_error": error, "seconds_per_step_of_all_nets": times, "median": medians,
              "speedup_vs_sequential": {k: medians["sequential"] / v for k, v in medians.items()}}
    print(f"{nets} x {model} on {n} {dataset}-shaped images, one SGD step each (median of {rounds} x {steps}):")
    for name, s in medians.items():
        print(f"  {name:<11} {s * 1e3:8.1f} ms   {medians['sequential'] / s:.2f}x")
    print(json.dumps(result, indent=2))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
