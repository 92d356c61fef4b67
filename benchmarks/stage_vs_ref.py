"""Time one stage command in this tree and in a git ref, alternately in one run, and print the ratio.

    python benchmarks/stage_vs_ref.py --ref 89b5ea7 --rounds 4 -- teacher --dataset fashion-mnist \
        --budget quick --model convnet-w16 --synthetic-run RUN_ID

The whole stage process is timed (start-up, imports, data, training, logging), which is what a combined
pipeline pays per stage. The ref's ``kdd_mlflow`` and ``entrypoints`` are exported with ``git archive`` into a
temporary directory, and each round runs ``python -m entrypoints.STAGE ARGS`` there and in this tree, in fresh
processes with the same interpreter and tracking store (``MLFLOW_TRACKING_URI``), alternating which goes
first; the ratio is the median of this tree's seconds over the median of the ref's. Alternating in one run lets
the load of a shared machine fall on both sides alike. Each side's runs are new runs in the tracking store.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
from compare_ref import ROOT, export  # this directory is on the path when the script runs


def timed(tree: Path, stage: str, args: tuple[str, ...], timeout: float) -> float:
    """Wall seconds of ``python -m entrypoints.STAGE ARGS`` run in ``tree`` (which it imports the package from)."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", f"entrypoints.{stage}", *args], cwd=tree, capture_output=True,
                          text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise click.ClickException(f"{stage} failed in {tree}: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return seconds


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--ref", required=True, help="the git ref to compare against (e.g. 89b5ea7)")
@click.option("--rounds", default=4, show_default=True, type=click.IntRange(1), help="runs of each side")
@click.option("--timeout", default=1800.0, show_default=True, help="seconds allowed for one stage run")
@click.option("--out", type=click.Path(dir_okay=False), help="also write the figures here as JSON")
@click.argument("stage")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def main(ref: str, rounds: int, timeout: float, out: str | None, stage: str, args: tuple[str, ...]) -> None:
    if not (ROOT / "entrypoints" / f"{stage}.py").is_file():
        raise click.BadParameter(f"no entry point {stage!r} in {ROOT / 'entrypoints'}", param_hint="STAGE")
    with tempfile.TemporaryDirectory() as tmp:
        commit = export(ref, Path(tmp), ("kdd_mlflow", "entrypoints", "MLproject"))
        sides = {"this tree": ROOT, commit[:7]: Path(tmp)}
        seconds: dict[str, list[float]] = {name: [] for name in sides}
        for r in range(rounds):
            order = list(sides) if r % 2 == 0 else list(reversed(sides))
            for name in order:
                seconds[name].append(timed(sides[name], stage, args, timeout))
            click.echo(f"round {r + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f} s" for n in sides),
                       err=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    ours, theirs = medians["this tree"], medians[commit[:7]]
    click.echo(f"{stage}: this tree {ours:.2f} s, {commit[:7]} {theirs:.2f} s (medians of {rounds}); "
               f"ratio {ours / theirs:.3f}")
    if out:
        Path(out).write_text(json.dumps({"stage": stage, "args": list(args), "ref": commit, "seconds": seconds,
                                         "medians": medians, "ratio": ours / theirs}, indent=2))


if __name__ == "__main__":
    main()
