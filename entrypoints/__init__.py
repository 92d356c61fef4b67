"""Thin commands the MLproject calls: each hands its arguments to one ``kdd`` stage command."""

import sys


def run_stage(name: str) -> None:
    from kdd_mlflow.cli import main

    main([name, *sys.argv[1:]], prog_name="kdd")
