"""The metrics a trial is judged by, defined once: name, direction, how a table shows it, and
whether a study can optimize it. Torch-free: the spec, the driver, results, report and CLI read it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Direction = Literal["minimize", "maximize"]


def _percent(value: float) -> str:
    return f"{100 * value:.2f}%"


@dataclass(frozen=True)
class Metric:
    name: str
    direction: Direction
    label: str  # a table's column header, with the unit
    show: Callable[[float], str]  # the value as a table shows it
    objective: bool  # whether a spec may name it in `objectives` (the driver computes it)
    low: float = 0.0  # the range a value can take: intervals are clipped to it
    high: float = math.inf

    def format(self, value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else self.show(value)


METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("test_error", "minimize", "test_error", _percent, True, high=1.0),
    Metric("test_accuracy", "maximize", "test_accuracy", _percent, True, high=1.0),
    Metric("train_error", "minimize", "train_error", _percent, True, high=1.0),
    Metric("best_test_error", "minimize", "best_test_error", _percent, False, high=1.0),
    Metric("flops", "minimize", "GFLOPs", lambda v: f"{v / 1e9:.4f}", True),
    Metric("params", "minimize", "params (M)", lambda v: f"{v / 1e6:.3f}", True),
    Metric("wall_seconds", "minimize", "wall (s)", lambda v: f"{v:.1f}", True),
    Metric("images_per_second", "maximize", "images/s", lambda v: f"{v:.0f}", False),
)}

# What a spec may name in `objectives`, each with its one sensible direction.
OBJECTIVES: dict[str, Direction] = {n: m.direction for n, m in METRICS.items() if m.objective}
# Every metric with a direction: what a Pareto front can be taken over.
DIRECTIONS: dict[str, Direction] = {n: m.direction for n, m in METRICS.items()}
