"""Time an MTT iteration in this tree and in a git ref, alternately in one run, and print the speed-up.

    python benchmarks/compare_ref.py --ref d5c93dd --rounds 3 -- --model convnet --syn-steps 20 --matching recompute

The ref's package is exported with ``git archive`` into a temporary directory. Each round runs
``distill_iteration.py`` (this tree's copy, so both sides get the same inputs and timing code) once
against the ref's package and once against this tree's, in fresh processes, alternating which goes
first; the speed-up is the median of the ref's seconds per iteration over the median of this tree's.
Alternating in one run lets the load of a shared machine fall on both sides alike. Arguments after
``--`` go to ``distill_iteration.py``.

Where the tree travels without its git history (a GPU machine given a copy of the working tree), export
the ref beforehand and point ``--ref-dir`` at it; a ``COMMIT`` file there names the commit:

    mkdir -p .ref/d5c93dd && git archive d5c93dd kdd_mlflow | tar -x -C .ref/d5c93dd
    git rev-parse d5c93dd > .ref/d5c93dd/COMMIT
    python benchmarks/compare_ref.py --ref-dir .ref/d5c93dd -- --device cuda --syn-steps 20
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def export(ref: str, directory: Path, paths: tuple[str, ...] = ("kdd_mlflow",)) -> str:
    """Unpack ``paths`` (by default the package) of ``ref`` into ``directory``; return the commit it resolved to."""
    commit = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, capture_output=True,
                            text=True)
    if commit.returncode != 0:
        raise click.BadParameter(f"{ref!r} is not a commit of {ROOT}", param_hint="--ref")
    archive = directory / "ref.tar"
    subprocess.run(["git", "archive", "--format=tar", "-o", str(archive), commit.stdout.strip(), *paths],
                   cwd=ROOT, check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(directory, filter="data")
    return commit.stdout.strip()


def measure(package_root: Path, args: list[str], timeout: float) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{package_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(HERE / "distill_iteration.py"), *args], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise click.ClickException(f"distill_iteration.py failed against {package_root}: "
                                   f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(done.stdout)
    if not result["package"].startswith(str(package_root)):
        raise click.ClickException(f"measured {result['package']}, not the package in {package_root}")
    return result


@click.command(context_settings={"ignore_unknown_options": True})
@click.option("--ref", default="d5c93dd", show_default=True, help="the git ref to compare against")
@click.option("--ref-dir", type=click.Path(file_okay=False, exists=True, path_type=Path), default=None,
              help="a directory holding the ref's kdd_mlflow package, exported beforehand: no git needed")
@click.option("--rounds", default=3, show_default=True, help="ref/current pairs, alternating which goes first")
@click.option("--timeout", default=3600.0, show_default=True, help="seconds per measurement")
@click.option("--json-out", type=click.Path(dir_okay=False), default=None, help="also write the result here")
@click.argument("benchmark_args", nargs=-1, type=click.UNPROCESSED)
def main(ref, ref_dir, rounds, timeout, json_out, benchmark_args):
    args = list(benchmark_args)
    with tempfile.TemporaryDirectory() as tmp:
        if ref_dir is None:
            commit, ref_root = export(ref, Path(tmp)), Path(tmp)
        else:
            ref_root = ref_dir.resolve()
            if not (ref_root / "kdd_mlflow" / "__init__.py").is_file():
                raise click.BadParameter(f"{ref_dir} holds no kdd_mlflow package", param_hint="--ref-dir")
            marker = ref_root / "COMMIT"
            commit = marker.read_text().strip() if marker.is_file() else ref
        sides = {"ref": ref_root, "current": ROOT}
        times: dict[str, list[float]] = {"ref": [], "current": []}
        engines: dict[str, str] = {}
        for r in range(rounds):
            order = ("ref", "current") if r % 2 == 0 else ("current", "ref")
            for side in order:
                result = measure(sides[side], args, timeout)
                times[side].append(result["seconds_per_iteration"])
                engines[side] = result.get("engine", "eager")
                print(f"round {r + 1} {side:>7}: {result['seconds_per_iteration']:.3f} s / iteration", file=sys.stderr)
    ref_s, cur_s = statistics.median(times["ref"]), statistics.median(times["current"])
    summary = {"ref": ref, "ref_commit": commit, "benchmark_args": args, "rounds": rounds,
               "ref_seconds": times["ref"], "current_seconds": times["current"],
               "ref_median_s": ref_s, "current_median_s": cur_s, "speedup": ref_s / cur_s, "engines": engines,
               "config": {k: result.get(k) for k in ("dataset", "model", "ipc", "syn_steps", "batch_syn", "matching",
                                                     "device", "threads", "torch", "gpu", "precision")}}
    print(json.dumps(summary, indent=2))
    print(f"speed-up against {ref}: {ref_s / cur_s:.2f}x ({ref_s:.3f} s -> {cur_s:.3f} s per iteration, "
          f"medians of {rounds})", file=sys.stderr)
    if json_out:
        Path(json_out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
