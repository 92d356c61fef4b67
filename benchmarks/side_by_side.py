"""What running trainings side by side costs on this machine, as JSON: milliseconds per step of a small-set
training (``kdd_mlflow.train.fit`` on ipc images per class), alone and in N processes at once, with T
compute threads each.

    python benchmarks/side_by_side.py --processes 2 --threads 2,1

Why it matters: the combined pipeline's ``--jobs`` runs stages side by side (each given cores / jobs
threads), and a Slurm job's threads default to the CPUs it was given; PyTorch left alone starts one
thread per core in every process, and processes that together ask for more threads than there are cores
spin against each other.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import click


def one(model: str, ipc: int, steps: int) -> float:
    """Milliseconds per step of ``fit`` on a random real subset of Fashion-MNIST (one warm-up epoch first)."""
    import torch

    from kdd_mlflow import data, models
    from kdd_mlflow.train import SGDRecipe, fit

    real = data.load("fashion-mnist", None, 5000, None)
    subset = real.random_subset(ipc, torch.Generator().manual_seed(0))
    net = models.create(model, real.info.channels, real.info.num_classes, real.info.image_size)
    generator = torch.Generator().manual_seed(0)
    batch = len(subset)  # one step per epoch
    fit(net, subset, SGDRecipe(3, batch, 0.01, 0.9, 5e-4, "step"), generator, progress=False)
    started = time.perf_counter()
    fit(net, subset, SGDRecipe(steps, batch, 0.01, 0.9, 5e-4, "step"), generator, progress=False)
    return (time.perf_counter() - started) / steps * 1000


@click.command()
@click.option("--model", default="convnet-w32", show_default=True)
@click.option("--ipc", default=10, show_default=True, help="images per class of the training set")
@click.option("--steps", default=50, show_default=True)
@click.option("--processes", default=2, show_default=True, help="processes side by side")
@click.option("--threads", default="2,1", show_default=True, help="compute threads per process, comma-separated")
@click.option("--worker", is_flag=True, hidden=True)
def main(model: str, ipc: int, steps: int, processes: int, threads: str, worker: bool) -> None:
    if worker:
        print(json.dumps(one(model, ipc, steps)), flush=True)
        return
    rows = []
    for t in (int(v) for v in threads.split(",")):
        env = {**os.environ, "OMP_NUM_THREADS": str(t), "MKL_NUM_THREADS": str(t)}
        command = [sys.executable, __file__, "--worker", "--model", model, "--ipc", str(ipc), "--steps", str(steps)]
        for n in (1, processes):
            started = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(n)]
            ms = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in started]
            rows.append({"threads": t, "processes": n, "ms_per_step": [round(v, 1) for v in ms]})
    print(json.dumps({"model": model, "ipc": ipc, "steps": steps, "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
