"""The distilled set against random real images, over seeds, ipc and label kinds, beside the published figures.

    MLFLOW_TRACKING_URI=sqlite:///quality.db python benchmarks/quality_table.py --dataset fashion-mnist \
        --ipc 1,10 --labels hard,learned --seeds 0,1,2 --out benchmarks/results/quality_fashion-mnist_cpu.json

One experts run per dataset (``kdd experts``, the budget's settings, with the learning rate a pipeline would give
them for that ipc: one more experts run where that differs, e.g. a grayscale set at one image per class; or
``--experts-run`` for every ipc), then one ``kdd distill`` per (ipc, labels, seed) on those experts, each a fresh
process, one after another. Each distill run tests its set on 3 networks and measures random real subsets of the same
size under the same protocol (on whitened experts, also without the whitening; for soft or learned labels, the same
subsets labelled by the expert that labelled the set); a cell of the table is the mean +- std over seeds of those
per-run means. Options after ``--`` go to every ``kdd distill`` (e.g. ``-- --iterations 300``).

Resumable: every finished distill run is tagged with its cell (``kdd.quality_cell``) and the experts run with its
dataset, budget (other than quick) and learning rate (``kdd.quality_experts``); run the same command again after a
crash and only the missing cells run.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click
import mlflow
from mlflow.tracking import MlflowClient

from kdd_mlflow import budgets, cli
from kdd_mlflow.distill.evaluate import mean_std

ROOT = Path(__file__).resolve().parents[1]

# Published test accuracy (%), ConvNet, ipc 1 / 10 / 50. Random real, DC and DSA: Zhao et al. (ICLR 2021) and Zhao &
# Bilen (ICML 2021); MTT: Cazenavette et al. (CVPR 2022); DATM: Guo et al. (ICLR 2024). MTT and DATM did not report
# Fashion-MNIST.
PUBLISHED = {
    "fashion-mnist": {"random": (51.4, 73.8, 82.5), "DC": (70.5, 82.3, 83.6), "DSA": (70.6, 84.6, 88.7)},
    "cifar10": {"random": (14.4, 26.0, 43.4), "DC": (28.3, 44.9, 53.9), "DSA": (28.8, 52.1, 60.6),
                "MTT": (46.3, 65.3, 71.6), "DATM": (46.9, 66.8, 76.1)},
}
PUBLISHED_IPC = (1, 10, 50)
TABLE_KEYS = ("test_acc_mean", "random_subset_test_acc_mean", "random_subset_unwhitened_test_acc_mean",
              "random_subset_soft_test_acc_mean", "ior")
METRICS = (*TABLE_KEYS, "best_val_acc")


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of whole numbers") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise click.BadParameter(f"{text!r}: give distinct non-negative whole numbers")
    return values


def kdd(args: list[str], log: Path) -> str:
    """Run ``kdd ARGS`` (stderr appended to ``log``) and return the run id it prints."""
    with log.open("a") as err:
        done = subprocess.run([sys.executable, "-m", "kdd_mlflow.cli", *args], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=err, text=True)
    found = re.search(r"run_id: ([0-9a-f]+)", done.stdout)
    if done.returncode != 0 or not found:
        raise click.ClickException(f"kdd {' '.join(args)} failed (exit {done.returncode}); see {log}")
    return found.group(1)


def tagged(key: str, value: str) -> str | None:
    """The newest finished run carrying tag ``key=value``, if any."""
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.`{key}` = '{value}'",
                              order_by=["attributes.start_time DESC"], output_format="list")
    return next((r.info.run_id for r in runs if r.info.status == "FINISHED"), None)


def wall_s(client: MlflowClient, run_id: str) -> float:
    info = client.get_run(run_id).info
    return (info.end_time - info.start_time) / 1000


def cell_text(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{100 * mean:.1f} +- {100 * std:.1f}"


def budget_of(args: list[str]) -> str:
    """The budget the distill options ask for, read by ``kdd distill``'s own parser (``--budget X``, ``--budget=X``,
    the last one given wins); quick when none is."""
    ctx = cli.main.commands["distill"].make_context("distill", list(args), resilient_parsing=True)
    return ctx.params.get("budget") or "quick"


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--dataset", required=True, type=click.Choice(["mnist", "fashion-mnist", "cifar10", "cifar100"]))
@click.option("--data-dir", type=click.Path(file_okay=False), help="passed to kdd experts and kdd distill")
@click.option("--ipc", "ipcs", default="1,10", show_default=True, help="images per class, comma-separated")
@click.option("--labels", "label_kinds", default="hard,learned", show_default=True,
              help="label kinds (hard, soft, learned), comma-separated")
@click.option("--seeds", default="0,1,2", show_default=True, help="distill seeds, comma-separated")
@click.option("--experts-run", help="use this experts run instead of training one")
@click.option("--out", type=click.Path(dir_okay=False), help="also write every run's figures here as JSON")
@click.argument("distill_args", nargs=-1, type=click.UNPROCESSED)
def main(dataset: str, data_dir: str | None, ipcs: str, label_kinds: str, seeds: str, experts_run: str | None,
         out: str | None, distill_args: tuple[str, ...]) -> None:
    ipc_list, seed_list = int_list(ipcs), int_list(seeds)
    kinds = [k.strip() for k in label_kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - {"hard", "soft", "learned"}:
        raise click.BadParameter(f"{label_kinds!r}: choose among hard, soft, learned", param_hint="--labels")
    if "MLFLOW_TRACKING_URI" not in os.environ:
        raise click.UsageError("set MLFLOW_TRACKING_URI to the store the runs go to (e.g. sqlite:///quality.db)")
    client = MlflowClient()
    data_args = ["--data-dir", data_dir] if data_dir else []
    log = Path(out).with_suffix(".log") if out else ROOT / f"quality_{dataset}.log"
    suffix = " ".join(distill_args)
    started = time.perf_counter()

    args = list(distill_args)
    budget = budget_of(args)
    runs_by_key: dict[str, str] = {}
    experts_runs: dict[int, str] = {}
    experts_s: dict[str, float] = {}
    for ipc in ipc_list:  # as a pipeline would train them for this ipc
        lr = budgets.experts_lr_for_ipc(budget, dataset, ipc)
        # what the experts train with: a run trained under another budget or rate is not reused (quick keys as before)
        key = dataset + ("" if budget == "quick" else f"/budget={budget}") + ("" if lr is None else f"/lr_teacher={lr}")
        if key not in runs_by_key:  # ipcs whose experts train alike share one run, looked up once
            run = experts_run or tagged("kdd.quality_experts", key)
            if run is None:
                click.echo(f"{key}: training experts", err=True)
                given = ["--budget", budget] if budget != "quick" else []
                given += [] if lr is None else ["--lr-teacher", str(lr)]
                run = kdd(["experts", "--dataset", dataset, *data_args, *given], log)
                client.set_tag(run, "kdd.quality_experts", key)
            runs_by_key[key] = run
        run = experts_runs[ipc] = runs_by_key[key]
        if run not in experts_s:
            experts_s[run] = wall_s(client, run)
            click.echo(f"{key}: experts run {run} ({experts_s[run]:.0f} s)", err=True)

    rows = []
    cells = [(ipc, kind, seed) for ipc in ipc_list for kind in kinds for seed in seed_list]
    for n, (ipc, kind, seed) in enumerate(cells, 1):
        experts_run = experts_runs[ipc]
        name = f"{dataset}/ipc{ipc}/{kind}/seed{seed}/{experts_run}/{suffix}"
        run_id = tagged("kdd.quality_cell", name)
        if run_id is None:
            click.echo(f"[{n}/{len(cells)}] {dataset} ipc {ipc}, {kind} labels, seed {seed}: distilling", err=True)
            run_id = kdd(["distill", "--experts-run", experts_run, "--dataset", dataset, *data_args, "--ipc",
                          str(ipc), "--labels", kind, "--seed", str(seed), *distill_args], log)
            client.set_tag(run_id, "kdd.quality_cell", name)
        metrics = client.get_run(run_id).data.metrics
        row = {"ipc": ipc, "labels": kind, "seed": seed, "run_id": run_id, "experts_run": experts_run,
               "wall_s": wall_s(client, run_id),
               **{k: metrics[k] for k in METRICS if k in metrics}}
        rows.append(row)
        click.echo(f"[{n}/{len(cells)}] {dataset} ipc {ipc}, {kind}, seed {seed}: set {row['test_acc_mean']:.4f}, "
                   f"random {row['random_subset_test_acc_mean']:.4f} ({row['wall_s']:.0f} s)", err=True)

    published = PUBLISHED.get(dataset, {})
    head = ["ipc", "labels", "distilled set", "random real", "random real, unwhitened",
            "random real, expert's soft labels", "IOR", "distill s (mean)", *[f"{k} (published)" for k in published]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for ipc in ipc_list:
        for kind in kinds:
            runs = [r for r in rows if r["ipc"] == ipc and r["labels"] == kind]
            pub = [f"{v[PUBLISHED_IPC.index(ipc)]:.1f}" if ipc in PUBLISHED_IPC else "-" for v in published.values()]
            lines.append("| " + " | ".join([
                str(ipc), kind,
                *(cell_text([r[key] for r in runs if key in r])
                  for key in TABLE_KEYS),
                f"{statistics.fmean(r['wall_s'] for r in runs):.0f}", *pub]) + " |")
    table = "\n".join(lines)
    spent = ", ".join(f"{run} {sec:.0f} s" for run, sec in experts_s.items())
    click.echo(f"{dataset}: experts {spent} (ipc -> run: {experts_runs}); seeds {seed_list}; "
               f"test accuracy (%), mean +- std over seeds of each run's 3-network mean\n{table}")
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps({
            "dataset": dataset, "experts_runs": experts_runs, "experts_s": experts_s, "distill_args": args,
            "seeds": seed_list, "runs": rows, "published_percent": published, "table": table,
            "this_invocation_s": time.perf_counter() - started}, indent=1) + "\n")


if __name__ == "__main__":
    main()
