"""The dependency-graph runner of the combined pipeline, with fake runs: order, the jobs bound, failures."""

from __future__ import annotations

import pytest
import torch

from kdd_mlflow import arms, budgets, pipeline, schedule
from kdd_mlflow.config import CombinedConfig


class FakeRun:
    """A run that finishes (or fails) after ``polls`` status checks."""

    def __init__(self, key: str, log: list, polls: int = 2, status: str = "FINISHED"):
        self.key, self.log, self.polls, self.final = key, log, polls, status
        self.cancelled = False

    @property
    def run_id(self) -> str:
        return f"run-{self.key}"

    def get_status(self) -> str:
        if self.cancelled:
            return "KILLED"
        self.polls -= 1
        if self.polls > 0:
            return "RUNNING"
        self.log.append(("end", self.key))
        return self.final

    def cancel(self) -> None:
        self.cancelled = True
        self.log.append(("cancel", self.key))


def graph(log: list, running: list, fail: str = "", reused: tuple = ()) -> list[schedule.Task]:
    """a -> b -> d, c -> d, e alone; ``running`` records how many runs were going at each start."""
    live: dict[str, FakeRun] = {}

    def launcher(key: str):
        def launch(done: dict[str, str]):
            log.append(("start", key, sorted(done)))
            if key in reused:
                return f"old-{key}"
            status = "FAILED" if key == fail else "FINISHED"
            live[key] = FakeRun(key, log, polls={"c": 3, "e": 10}.get(key, 2), status=status)
            running.append(sum(1 for r in live.values() if r.polls > 0 and not r.cancelled))
            return live[key]
        return launch

    needs = {"a": (), "b": ("a",), "c": (), "d": ("b", "c"), "e": ()}
    return [schedule.Task(k, n, launcher(k)) for k, n in needs.items()]


@pytest.mark.parametrize("jobs", [1, 2, 3])
def test_every_task_starts_after_what_it_needs_and_at_most_jobs_run_at_once(jobs):
    log, running = [], []
    done = schedule.run(graph(log, running), jobs, poll_s=0)
    assert done == {k: f"run-{k}" for k in "abcde"}
    starts = {e[1]: e[2] for e in log if e[0] == "start"}
    assert set(starts["b"]) >= {"a"} and set(starts["d"]) >= {"b", "c"}
    for key, before in (("b", "a"), ("d", "b"), ("d", "c")):
        assert log.index(("end", before)) < next(i for i, e in enumerate(log) if e[:2] == ("start", key))
    assert max(running) <= jobs
    if jobs > 1:
        assert max(running) > 1  # independent tasks did run side by side


def test_a_reused_run_takes_no_slot_and_unblocks_at_once():
    log, running = [], []
    done = schedule.run(graph(log, running, reused=("a", "c")), 1, poll_s=0)
    assert done["a"] == "old-a" and done["c"] == "old-c" and done["d"] == "run-d"
    # b (needs a) started before anything had to finish: a was reused
    first_end = next(i for i, e in enumerate(log) if e[0] == "end")
    assert log.index(("start", "b", ["a"])) < first_end


def test_a_failed_task_stops_the_graph_and_cancels_the_runs_still_going():
    log, running = [], []
    with pytest.raises(schedule.TaskFailed, match=r"^c \(run run-c\) ended FAILED") as failed:
        schedule.run(graph(log, running, fail="c"), 3, poll_s=0)
    assert failed.value.run_id == "run-c"
    started = {e[1] for e in log if e[0] == "start"}
    assert "d" not in started  # it needed c
    assert ("cancel", "e") in log and ("end", "e") not in log  # still going when c failed: cancelled


def test_a_task_takes_its_slots_and_nothing_overtakes_a_ready_one_waiting_for_room():
    """Two slots: ``a`` (one) runs; ``big`` (two) is ready but must wait for ``a``; ``c`` (one) would fit beside
    ``a`` but is listed after ``big``, so it waits too; ``d`` and ``e`` then run side by side."""
    log, live = [], {}

    def launcher(key: str):
        def launch(done):
            log.append(("start", key, sum(1 for r in live.values() if r.polls > 0)))
            live[key] = FakeRun(key, log, polls=3)
            return live[key]
        return launch

    spec = {"a": ((), 1), "big": ((), 2), "c": ((), 1), "d": (("big",), 1), "e": (("big",), 1)}
    tasks = [schedule.Task(k, needs, launcher(k), slots) for k, (needs, slots) in spec.items()]
    schedule.run(tasks, 2, poll_s=0)
    order = [e[1] for e in log if e[0] == "start"]
    assert order == ["a", "big", "c", "d", "e"]
    at = {e[1]: i for i, e in enumerate(log) if e[0] == "start"}
    assert log.index(("end", "a")) < at["big"] < at["c"] and log.index(("end", "big")) < at["c"]
    assert next(e[2] for e in log if e[:2] == ("start", "big")) == 0  # alone: it takes both slots
    assert max(e[2] for e in log if e[0] == "start") == 1  # two one-slot runs side by side, never three


@pytest.mark.parametrize("jobs, cores, want", [
    (None, 2, (2, pipeline.Share(2, None), pipeline.Share(1, 1))),  # the chain alone, then arms in pairs
    (None, 8, (8, pipeline.Share(8, None), pipeline.Share(4, 4))),
    (None, 1, (1, pipeline.Share(1, None), pipeline.Share(1, 1))),
    (1, 2, (1, pipeline.Share(1, None), pipeline.Share(1, None))),  # one at a time, every thread
    (2, 2, (2, pipeline.Share(1, 1), pipeline.Share(1, 1))),  # two at a time, a core each
])
def test_local_stages_share_the_cores(jobs, cores, want):
    assert pipeline.shares(jobs, cores) == want
    chain = want[1]
    assert chain.env is None if chain.threads is None else chain.env["OMP_NUM_THREADS"] == str(chain.threads)


@pytest.mark.parametrize("needs, message", [
    ({"a": ("b",), "b": ("a",)}, "need each other"),
    ({"a": ("z",)}, "unknown task"),
])
def test_a_bad_graph_is_refused_before_anything_starts(needs, message):
    started = []
    tasks = [schedule.Task(k, n, lambda done, k=k: started.append(k) or "x") for k, n in needs.items()]
    with pytest.raises(ValueError, match=message):
        schedule.run(tasks, 2, poll_s=0)
    assert started == []


class PlanRunner:
    """What ``pipeline.plan`` asks of a runner, launching nothing."""

    overrides: dict = {}

    def merged(self, stage, params, arm=None):
        return {**params, **self.overrides.get(stage, {})}


@pytest.mark.parametrize("zca", [False, True])
def test_the_combined_graph_follows_the_arm_table(zca):
    cfg = CombinedConfig(dataset="fashion-mnist", seeds="0,1", budget="quick",
                         overrides="experts.zca=true" if zca else "")
    runner = PlanRunner()
    runner.overrides = cfg.override_map
    resolved = budgets.resolve(cfg, "cpu")
    selected = pipeline.selected_with_needs(cfg.arm_list)
    _, chain, arm_share = pipeline.shares(None, 4)
    tasks = pipeline.plan(cfg, runner, resolved, torch.device("cpu"), {}, selected, chain, arm_share)
    needs = {t.key: set(t.needs) for t in tasks}
    schedule.check(tasks)
    assert list(needs)[:2] == ["experts", "distill"] and needs["distill"] == {"experts"}
    assert [t.slots for t in tasks[:2]] == [4, 4] and {t.slots for t in tasks[2:]} == {2}
    assert len(tasks) == 2 + 2 * len(arms.ARMS)
    for seed in (0, 1):
        for name, arm in arms.ARMS.items():
            want = {f"{n}/seed{seed}" for n in arm.needs}
            if arm.synthetic:
                want.add("distill")
            elif zca:
                want.add("experts")  # it trains in the experts' whitened space
            assert needs[f"{name}/seed{seed}"] == want, name
