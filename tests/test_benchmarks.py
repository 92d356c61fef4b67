"""The benchmark scripts' own logic, where it decides what they run."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from quality_table import budget_of  # noqa: E402


@pytest.mark.parametrize("args, budget", [
    ([], "quick"),
    (["--iterations", "300"], "quick"),
    (["--budget", "long"], "long"),
    (["--budget=long"], "long"),
    (["--budget", "long", "--iterations", "300", "--budget=paper"], "paper"),  # the last one wins, as in click
    (["--budget"], "quick"),  # no value: kdd distill refuses it
])
def test_quality_table_reads_the_budget_in_both_forms(args, budget):
    assert budget_of(args) == budget
