"""Time and peak memory of the three matching modes against syn_steps: JSON, a plotly figure, a table.

    python benchmarks/matching_modes.py --syn-steps 20,40,80 --out benchmarks/results

Each (mode, syn_steps) point runs ``distill_iteration.py`` in its own process, so every peak (RSS on the
CPU, CUDA memory on a GPU) is that configuration's alone. A point that runs out of memory is recorded
as such. The table printed at the end is the README's Performance table.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from kdd_mlflow.distill.mtt import MODES

HERE = Path(__file__).resolve().parent


def measure(mode: str, steps: int, args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, str(HERE / "distill_iteration.py"), "--matching", mode, "--syn-steps", str(steps), *args]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"matching": mode, "syn_steps": steps, "error": f"over {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        return {"matching": mode, "syn_steps": steps, "error": tail[:200]}
    return json.loads(done.stdout)


def memory(r: dict) -> float | None:
    return r.get("peak_cuda_mib", r.get("rss_growth_mib"))


@click.command()
@click.option("--syn-steps", default="20,40,80", show_default=True)
@click.option("--modes", default=",".join(MODES), show_default=True)
@click.option("--dataset", default="cifar10", show_default=True)
@click.option("--model", default="convnet", show_default=True)
@click.option("--ipc", default=10, show_default=True)
@click.option("--iterations", default=2, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--timeout", default=1800.0, show_default=True, help="seconds per point")
@click.option("--memory-limit-gib", type=float, default=None,
              help="CPU: a point needing more fails as out of memory (passed to distill_iteration.py)")
@click.option("--out", default=str(HERE / "results"), show_default=True)
@click.option("--from-json", type=click.Path(exists=True, dir_okay=False), default=None,
              help="measure nothing: redraw the figure and table of an earlier run's JSON")
def main(syn_steps, modes, dataset, model, ipc, iterations, device, timeout, memory_limit_gib, out, from_json):
    if from_json:
        saved = json.loads(Path(from_json).read_text())
        results, memory_limit_gib = saved["points"], saved.get("memory_limit_gib")
        dataset, model, ipc = saved["dataset"], saved["model"], saved["ipc"]
        modes = ",".join(dict.fromkeys(r["matching"] for r in results))
    else:
        args = ["--dataset", dataset, "--model", model, "--ipc", str(ipc), "--iterations", str(iterations),
                "--device", device]
        if memory_limit_gib is not None:
            args += ["--memory-limit-gib", str(memory_limit_gib)]
        results = []
        for steps in [int(s) for s in syn_steps.split(",")]:
            for mode in modes.split(","):
                r = measure(mode, steps, args, timeout)
                results.append(r)
                print(json.dumps({k: r.get(k) for k in ("matching", "syn_steps", "seconds_per_iteration",
                                                         "rss_growth_mib", "peak_cuda_mib", "error")}), flush=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device_name = next((r["device"] for r in results if "device" in r), device)
    stem = f"matching_{dataset}_{model}_ipc{ipc}_{device_name.split(':')[0]}"
    (out / f"{stem}.json").write_text(json.dumps({"dataset": dataset, "model": model, "ipc": ipc,
                                                  "memory_limit_gib": memory_limit_gib, "points": results}, indent=2))

    mem_name = "peak CUDA MiB" if any("peak_cuda_mib" in r for r in results) else "peak RSS growth MiB"
    fig = make_subplots(rows=1, cols=2, subplot_titles=("seconds per iteration", mem_name))
    for mode in modes.split(","):
        ok = [r for r in results if r["matching"] == mode and "error" not in r]
        xs = [r["syn_steps"] for r in ok]
        fig.add_trace(go.Scatter(x=xs, y=[r["seconds_per_iteration"] for r in ok], name=mode, legendgroup=mode),
                      row=1, col=1)
        fig.add_trace(go.Scatter(x=xs, y=[memory(r) for r in ok], name=mode, legendgroup=mode, showlegend=False),
                      row=1, col=2)
    fig.update_xaxes(title_text="syn_steps")
    fig.update_layout(title=f"MTT matching modes: {model} on {dataset}, ipc {ipc}, {device_name}")
    fig.write_html(str(out / f"{stem}.html"), include_plotlyjs=True, full_html=True)

    print(f"\n| syn_steps | mode | s / iteration | {mem_name} | time vs unrolled | memory vs unrolled |")
    print("|---|---|---|---|---|---|")
    for steps in sorted({r["syn_steps"] for r in results}):
        row = {r["matching"]: r for r in results if r["syn_steps"] == steps}
        base = row.get("unrolled", {})
        for mode, r in row.items():
            if "error" in r:
                print(f"| {steps} | {mode} | {r['error']} | | | |")
                continue
            t_ratio = (f"{r['seconds_per_iteration'] / base['seconds_per_iteration']:.2f}"
                       if "seconds_per_iteration" in base else "-")
            if memory(base):
                m_ratio = f"{memory(r) / memory(base):.2f}"
            elif "out of memory" in base.get("error", "") and memory_limit_gib:
                m_ratio = f"< {memory(r) / (memory_limit_gib * 1024):.3f}"  # unrolled needs more than the limit
            else:
                m_ratio = "-"
            print(f"| {steps} | {mode} | {r['seconds_per_iteration']:.2f} | {memory(r):.0f} | {t_ratio} | {m_ratio} |")


if __name__ == "__main__":
    main()
