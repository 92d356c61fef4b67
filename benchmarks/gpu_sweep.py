"""Seconds per MTT iteration and peak CUDA memory over a grid of points, each in a fresh process.

    python benchmarks/gpu_sweep.py --device cuda --json-out benchmarks/results/gpu-sweep.json

The grid is every matching mode x syn_steps x dataset x ipc, with the whole synthetic set in every
inner step, plus the published MTT rows (syn_steps and synthetic batch of ``budgets.PAPER_DISTILL``)
for the same datasets. Each point runs ``distill_iteration.py`` in its own process with a timeout, so a
point that runs out of GPU memory, fails or hangs is recorded as such and the sweep goes on; the JSON
list is rewritten after every point. An out-of-memory point keeps what it asked for: the allocation
that failed, what it held when it did, and (unrolled points) an estimate of what it would need, by
scaling the largest unrolled point that fitted by images per step x syn_steps. The markdown table
printed at the end is the README's GPU table.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (dataset, ipc) -> (syn_steps, batch_syn): a copy of the published rows of kdd_mlflow.budgets.PAPER_DISTILL,
# for machines without that module's dependencies (pydantic, MLflow); checked against it where it imports.
PUBLISHED = {
    ("cifar10", 1): (50, None), ("cifar10", 10): (30, None), ("cifar10", 50): (30, None),
    ("cifar100", 1): (20, None), ("cifar100", 10): (20, None), ("cifar100", 50): (80, 125),
    ("mnist", 1): (50, None), ("mnist", 10): (30, None), ("mnist", 50): (30, None),
    ("fashion-mnist", 1): (50, None), ("fashion-mnist", 10): (30, None), ("fashion-mnist", 50): (30, None),
}


def published_rows() -> dict[tuple[str, int], tuple[int, int | None]]:
    try:
        from kdd_mlflow.budgets import PAPER_DISTILL
    except ImportError:
        return PUBLISHED
    table = {key: (row["syn_steps"], row["batch_syn"]) for key, row in PAPER_DISTILL.items()}
    if any(table.get(key) != value for key, value in PUBLISHED.items()):
        raise click.ClickException("gpu_sweep.PUBLISHED no longer matches kdd_mlflow.budgets.PAPER_DISTILL")
    return table


def num_classes(dataset: str) -> int:
    return {"cifar100": 100}.get(dataset, 10)


def plan(datasets, ipcs, steps, modes, published: bool) -> list[dict]:
    """Every point once: the published rows first, then the grid by size; a grid point that is also a
    published row is marked as both."""
    points: dict[tuple, dict] = {}
    if published:
        rows = published_rows()
        for dataset in datasets:
            for ipc in (1, 10, 50):
                if (dataset, ipc) not in rows:
                    continue
                s, batch = rows[(dataset, ipc)]
                n = ipc * num_classes(dataset)
                for mode in modes:
                    points[(dataset, ipc, s, batch or n, mode)] = dict(
                        dataset=dataset, ipc=ipc, syn_steps=s, batch_syn=batch, images=n, matching=mode,
                        row="published")
    grid = []
    for dataset in datasets:
        for ipc in ipcs:
            n = ipc * num_classes(dataset)
            for s in steps:
                for mode in modes:
                    key = (dataset, ipc, s, n, mode)
                    if key in points:
                        points[key]["row"] = "published, grid"
                    else:
                        grid.append(dict(dataset=dataset, ipc=ipc, syn_steps=s, batch_syn=None, images=n,
                                         matching=mode, row="grid"))
    grid.sort(key=lambda p: (p["images"] * p["syn_steps"], p["dataset"], p["matching"]))
    return [*points.values(), *grid]


def run_point(point: dict, model: str, device: str, iterations: int, timeout: float, extra: list[str]) -> dict:
    cmd = [sys.executable, str(HERE / "distill_iteration.py"), "--dataset", point["dataset"], "--model", model,
           "--ipc", str(point["ipc"]), "--syn-steps", str(point["syn_steps"]), "--matching", point["matching"],
           "--iterations", str(iterations), "--device", device, *extra]
    if point["batch_syn"] is not None:
        cmd += ["--batch-syn", str(point["batch_syn"])]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {**point, "error": f"over the {timeout:.0f} s timeout", "wall_s": round(time.perf_counter() - t0, 1)}
    wall = round(time.perf_counter() - t0, 1)
    try:
        record = json.loads(done.stdout)
    except json.JSONDecodeError:
        record = None
    if done.returncode == 0 and record is not None:
        return {**point, **record, "wall_s": wall}
    if record is not None and record.get("error") == "out of memory":
        return {**point, **record, "wall_s": wall}
    tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
    return {**point, "error": tail[:300], "wall_s": wall}


def estimate_needs(results: list[dict]) -> None:
    """Out-of-memory unrolled points: scale the largest unrolled point that fitted (same model family)."""
    fitted = [r for r in results if r["matching"] == "unrolled" and "peak_cuda_mib" in r]
    if not fitted:
        return
    base = max(fitted, key=lambda r: (r["batch_syn"] or r["images"]) * r["syn_steps"])
    per = base["peak_cuda_mib"] / ((base["batch_syn"] or base["images"]) * base["syn_steps"])
    for r in results:
        if r.get("error") == "out of memory" and r["matching"] == "unrolled":
            per_step = r["batch_syn"] or r["images"]
            r["estimated_need_mib"] = round(per * per_step * r["syn_steps"], 0)
            r["estimated_from"] = (f"{base['dataset']} ipc {base['ipc']} {base['syn_steps']} steps: "
                                   f"{per:.3f} MiB per image-step")


def table(results: list[dict]) -> str:
    lines = ["| dataset | ipc | images per step | syn_steps | matching | s / iteration | peak CUDA GiB | row |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        per_step = r.get("batch_syn") or r["images"]
        head = f"| {r['dataset']} | {r['ipc']} | {per_step} | {r['syn_steps']} | {r['matching']} |"
        if "seconds_per_iteration" in r:
            body = f" {r['seconds_per_iteration']:.3f} | {r['peak_cuda_mib'] / 1024:.2f} |" if "peak_cuda_mib" in r \
                else f" {r['seconds_per_iteration']:.3f} | (RSS growth {r.get('rss_growth_mib', 0) / 1024:.2f}) |"
        elif r.get("error") == "out of memory":
            held = r.get("peak_cuda_mib_at_failure", 0) / 1024
            asked = r.get("tried_to_allocate_mib", 0) / 1024
            need = f"; needs about {r['estimated_need_mib'] / 1024:.0f}" if "estimated_need_mib" in r else ""
            body = f" out of memory | {held:.1f} held + {asked:.2f} asked{need} |"
        else:
            body = f" {r.get('error', '?')} | |"
        lines.append(f"{head}{body} {r['row']} |")
    return "\n".join(lines)


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--datasets", default="cifar10,cifar100", show_default=True)
@click.option("--ipcs", default="10,50", show_default=True, help="the grid's images per class")
@click.option("--syn-steps", default="20,40,80", show_default=True)
@click.option("--modes", default="unrolled,recompute", show_default=True)
@click.option("--published/--no-published", default=True, show_default=True,
              help="add the published rows (ipc 1, 10, 50) of each dataset")
@click.option("--model", default="convnet", show_default=True)
@click.option("--device", default="cuda", show_default=True)
@click.option("--iterations", default=3, show_default=True, help="timed iterations of a large point")
@click.option("--small-iterations", default=10, show_default=True,
              help="timed iterations of a point of at most --small-image-steps images x syn_steps")
@click.option("--small-image-steps", default=10000, show_default=True)
@click.option("--timeout", default=300.0, show_default=True, help="seconds per point")
@click.option("--deadline", default=None, type=float,
              help="seconds for the whole sweep: later points get what is left, then are skipped")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None,
              help="the JSON list, rewritten after every point")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
def main(datasets, ipcs, syn_steps, modes, published, model, device, iterations, small_iterations,
         small_image_steps, timeout, deadline, json_out, extra):
    """EXTRA arguments go to distill_iteration.py (e.g. -- --precision tf32)."""
    points = plan(datasets.split(","), [int(i) for i in ipcs.split(",")], [int(s) for s in syn_steps.split(",")],
                  modes.split(","), published)
    t_start = time.perf_counter()
    results: list[dict] = []
    for i, point in enumerate(points):
        elapsed = time.perf_counter() - t_start
        left = None if deadline is None else deadline - elapsed
        if left is not None and left < 15:
            results.append({**point, "error": "skipped: sweep deadline"})
        else:
            small = (point["batch_syn"] or point["images"]) * point["syn_steps"] <= small_image_steps
            results.append(run_point(point, model, device, small_iterations if small else iterations,
                                     timeout if left is None else min(timeout, left), list(extra)))
        r = results[-1]
        status = (f"{r['seconds_per_iteration']:.3f} s, {r.get('peak_cuda_mib', 0) / 1024:.2f} GiB"
                  if "seconds_per_iteration" in r else r.get("error"))
        print(f"[{i + 1}/{len(points)} {time.perf_counter() - t_start:.0f}s] {point['dataset']} ipc {point['ipc']} "
              f"{point['batch_syn'] or point['images']}/step {point['syn_steps']} steps {point['matching']}: {status}",
              file=sys.stderr, flush=True)
        if json_out:
            estimate_needs(results)
            Path(json_out).write_text(json.dumps(results, indent=2))
    estimate_needs(results)
    if json_out:
        Path(json_out).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
