"""What ``tune`` searches: the tunable parameters and the grammar of their ranges, checked at the edge."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

# What ``tune`` can search: name -> (stage it sets, whole numbers?, log scale for ranges?, allowed values).
TUNABLE = {
    "lr_teacher": ("distill", False, True, "> 0"),
    "lr_lr": ("distill", False, True, "> 0"),
    "ipc": ("distill", True, True, ">= 1"),
    "temperature": ("kd", False, True, "> 0"),
    "alpha": ("kd", False, False, "in [0, 1]"),
}
_ALLOWED = {"> 0": lambda v: v > 0, ">= 1": lambda v: v >= 1, "in [0, 1]": lambda v: 0 <= v <= 1}


class Dimension(BaseModel):
    """One search-space entry: a fixed value, a range LOW:HIGH, or a list of choices A,B,C."""

    name: str
    kind: Literal["fixed", "range", "choice"]
    values: tuple[float, ...]

    @property
    def integer(self) -> bool:
        return TUNABLE[self.name][1]

    @property
    def log(self) -> bool:
        return TUNABLE[self.name][2]

    def cast(self, v: float) -> float | int:
        return int(v) if self.integer else v

    def whole_values(self) -> list[int]:
        """Every value a whole-number dimension can take."""
        if self.kind == "range":
            return list(range(int(self.values[0]), int(self.values[1]) + 1))
        return [int(v) for v in self.values]


def parse_dimension(name: str, text: str) -> Dimension:
    """``LOW:HIGH`` (a range, log-scaled for learning rates, ipc and temperature), ``A,B,C`` or ``V``."""
    if name not in TUNABLE:
        raise ValueError(f"unknown search parameter {name!r}; choose from {', '.join(TUNABLE)}")
    _, integer, _, allowed = TUNABLE[name]
    text = text.strip()
    kind = "range" if ":" in text else "choice" if "," in text else "fixed"
    parts = [p.strip() for p in text.replace(":", ",").split(",")]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError(f"{name}: {text!r} must be a number, LOW:HIGH or A,B,C") from None
    if integer and any(v != int(v) for v in values):
        raise ValueError(f"{name}: {text!r} must be whole numbers")
    if kind == "range" and (len(values) != 2 or not values[0] < values[1]):
        raise ValueError(f"{name}: range {text!r} must be LOW:HIGH with LOW < HIGH")
    if kind == "choice" and len(set(values)) != len(values):
        raise ValueError(f"{name}: choices {text!r} repeat a value")
    if not all(_ALLOWED[allowed](v) for v in values):  # NaN fails every comparison, inf is caught below
        raise ValueError(f"{name}: {text!r} must be {allowed}")
    if any(abs(v) == float("inf") for v in values):
        raise ValueError(f"{name}: {text!r} must be finite")
    return Dimension(name=name, kind=kind, values=values)
