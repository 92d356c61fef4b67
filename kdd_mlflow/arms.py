"""The arms of the comparison: one table, one entry per arm.

An arm is one model, trained once per seed by one stage run. Its entry says which architecture it trains
(the pipeline's teacher or student, or the distillation ConvNet of the synthetic set), on what data (the
full real training set, the synthetic set, or a random real subset of the same size), and, for KD, which
arm teaches it. The rest follows: its stage (teacher, or kd when taught), what it needs first (its
teacher's arm; experts -> distill for the synthetic set), its stage parameters, and the order arms run
and are reported in (the table's: every arm comes after the arms it needs).

    experts -> distill --------------------------------> convnet-synthetic, student-synthetic
                 |                                         teacher-synthetic --kd--> proposal
    teacher-full (real) --kd--> kd-full, kd-subset, kd-full-teacher-synthetic
    student-full, student-subset
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal


@dataclass
class Context:
    """What the arms' stage parameters are derived from (one seed)."""

    teacher_model: str
    student_model: str
    ipc: int  # images per class of the synthetic set, and so of the random real subset
    synthetic_run: str | None = None  # the distill run, when an arm uses the synthetic set
    eval_model: str | None = None  # that run's evaluation architecture (the distillation ConvNet)
    runs: dict[str, str] = field(default_factory=dict)  # run id of each arm already trained


@dataclass(frozen=True)
class Arm:
    """One arm: what it trains, on what, and (for KD) from which arm's model."""

    name: str
    description: str
    trains: Literal["teacher", "student", "eval"]
    data: Literal["real", "synthetic", "subset"]
    teacher: str | None = None  # the arm whose model it is distilled from; None: hard labels only

    @property
    def stage(self) -> str:
        return "kd" if self.teacher else "teacher"

    @property
    def needs(self) -> tuple[str, ...]:
        return (self.teacher,) if self.teacher else ()

    @property
    def synthetic(self) -> bool:
        """Whether it needs the synthetic set (experts -> distill)."""
        return self.data == "synthetic"

    def params(self, ctx: Context) -> dict[str, object]:
        """Its stage's parameters, besides those every stage run of the pipeline shares."""
        model = {"teacher": ctx.teacher_model, "student": ctx.student_model, "eval": ctx.eval_model}[self.trains]
        source = {"real": {}, "synthetic": {"synthetic_run": ctx.synthetic_run}, "subset": {"ipc": ctx.ipc}}[self.data]
        if self.teacher is None:
            return {"model": model, **source}
        return {"student": model, "teacher_run": ctx.runs[self.teacher], "transfer": self.data, **source}


ARMS: dict[str, Arm] = {arm.name: arm for arm in (
    Arm("teacher-full", "teacher trained on the full real training set (the reference for fidelity)",
        "teacher", "real"),
    Arm("student-full", "student trained on the full real training set (hard labels)", "student", "real"),
    Arm("kd-full", "Hinton KD from the full-data teacher into the student on the full real data",
        "student", "real", teacher="teacher-full"),
    Arm("convnet-synthetic", "the distillation ConvNet trained on the synthetic set (the MTT baseline)",
        "eval", "synthetic"),
    Arm("student-synthetic", "student trained on the synthetic set with its hard labels", "student", "synthetic"),
    Arm("student-subset", "student trained on a random real subset of the same size (hard labels)",
        "student", "subset"),
    Arm("kd-subset", "KD from the full-data teacher into the student on that random real subset",
        "student", "subset", teacher="teacher-full"),
    Arm("teacher-synthetic", "teacher trained on the synthetic set", "teacher", "synthetic"),
    Arm("proposal", "teacher trained on the synthetic set, then KD into the student on the synthetic set",
        "student", "synthetic", teacher="teacher-synthetic"),
    Arm("kd-full-teacher-synthetic", "KD from the full-data teacher into the student on the synthetic set",
        "student", "synthetic", teacher="teacher-full"),
)}
REFERENCE = "teacher-full"  # fidelity (agreement, KL) is measured against this arm's model
TUNED = "proposal"  # the arm a tuning trial trains and is scored by


def with_needs(names: Iterable[str]) -> list[str]:
    """These arms and every arm they need, in table order."""
    wanted = set(names)
    for arm in reversed(ARMS.values()):  # needs come earlier in the table, so one backward pass closes them
        if arm.name in wanted:
            wanted.update(arm.needs)
    return [name for name in ARMS if name in wanted]
