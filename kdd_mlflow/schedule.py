"""Run a dependency graph of stage runs, at most ``jobs`` slots of them at a time.

A task is launched once every task it needs has finished; its ``launch`` gets their run ids and returns a
run id (a finished run reused: nothing to wait for) or a handle on a run it started. A task takes ``slots`` of
the ``jobs`` (one unless it says more; a machine's cores, say). Tasks become ready in list order, so the list is
the priority: no task starts ahead of a ready one listed before it that does not fit yet. The first task that
fails stops the graph: the runs still going are cancelled and ``TaskFailed`` names the failed one. An interrupt
cancels them too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


class Handle(Protocol):
    """A started run (``mlflow.projects.SubmittedRun`` is one)."""

    @property
    def run_id(self) -> str: ...

    def get_status(self) -> str: ...  # RUNNING or SCHEDULED while it goes; then FINISHED, FAILED or KILLED

    def cancel(self) -> None: ...


@dataclass(frozen=True)
class Task:
    key: str
    needs: tuple[str, ...]
    launch: Callable[[dict[str, str]], str | Handle]  # the finished run ids by key -> a run id or a handle
    slots: int = 1  # of the jobs it takes while it runs (at most all of them)


class TaskFailed(RuntimeError):
    """A task's run ended FAILED or KILLED."""

    def __init__(self, key: str, run_id: str, status: str):
        super().__init__(f"{key} (run {run_id}) ended {status}")
        self.key, self.run_id, self.status = key, run_id, status


def check(tasks: Sequence[Task]) -> None:
    """Refuse, before anything runs, duplicate keys, needs that name no task and cycles."""
    keys = [t.key for t in tasks]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate tasks: {sorted({k for k in keys if keys.count(k) > 1})}")
    known = set(keys)
    for t in tasks:
        missing = [n for n in t.needs if n not in known]
        if missing:
            raise ValueError(f"task {t.key} needs unknown task(s) {missing}")
    placed: set[str] = set()
    left = list(tasks)
    while left:
        ready = [t for t in left if set(t.needs) <= placed]
        if not ready:
            raise ValueError(f"tasks {sorted(t.key for t in left)} need each other (a cycle)")
        placed.update(t.key for t in ready)
        left = [t for t in left if t.key not in placed]


def run(tasks: Sequence[Task], jobs: int | None, poll_s: float = 2.0,
        on_finished: Callable[[str, str], None] | None = None) -> dict[str, str]:
    """Run every task, at most ``jobs`` slots at a time (None: every ready one, as a cluster that queues them
    wants); return the run id of each by key."""
    if jobs is None:
        jobs = max(len(tasks), 1)
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    check(tasks)
    done: dict[str, str] = {}
    running: dict[str, Handle] = {}
    taken: dict[str, int] = {}  # the slots of each running task
    waiting = list(tasks)

    def finished(key: str, run_id: str) -> None:
        done[key] = run_id
        if on_finished:
            on_finished(key, run_id)

    try:
        while waiting or running:
            moved = False
            for task in list(waiting):
                if not all(n in done for n in task.needs):
                    continue
                slots = min(max(task.slots, 1), jobs)
                if sum(taken.values()) + slots > jobs:
                    break  # the first ready task waits for room, and nothing listed after it goes first
                waiting.remove(task)
                got = task.launch(dict(done))
                if isinstance(got, str):
                    finished(task.key, got)
                else:
                    running[task.key], taken[task.key] = got, slots
                moved = True
            for key, handle in list(running.items()):
                status = handle.get_status()
                if status in ("RUNNING", "SCHEDULED"):
                    continue
                del running[key], taken[key]
                if status != "FINISHED":
                    raise TaskFailed(key, handle.run_id, status)
                finished(key, handle.run_id)
                moved = True
            if not moved:
                time.sleep(poll_s)
    except BaseException:
        for handle in running.values():
            handle.cancel()
        raise
    return done
