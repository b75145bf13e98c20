"""The metrics a trial is judged by (name, direction, unit, format, range), each derived from a
trial's stored attributes by `metric_values` alone, and what each is (a rate over the test set,
with a per-image record, the complement of another: readers ask the metric, never its name);
accuracy and error convert into each other by `complement` alone; a final evaluation's
per-image outcomes packed as a trial attribute."""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .keys import TrialKey

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
    # A rate over the test set's images: its intervals take the test set's own sampling into
    # account (bounded by its size where no per-image record is kept).
    test_set_rate: bool = False
    # The final evaluation keeps its per-image record (the test error, and its complement).
    per_image_record: bool = False
    # The metric this one is 1 minus (accuracy: the test error), whose statistics it takes.
    complement_of: str | None = None

    def format(self, value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
            else self.show(value)


# The top-1 and top-5 errors each test-time view (recipe.test_views: 10-crop and multi-scale
# testing) records, as fields of the last epoch's EpochRecord: one list of them for every reader.
VIEW_METRIC_NAMES: Mapping[str, tuple[str, str]] = {
    "ten_crop": ("test_error_10crop", "test_top5_error_10crop"),
    "multi_scale": ("test_error_multiscale", "test_top5_error_multiscale"),
}
VIEW_METRICS = tuple(name for names in VIEW_METRIC_NAMES.values() for name in names)
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("test_error", "minimize", "test_error", _percent, True, high=1.0, test_set_rate=True,
           per_image_record=True),
    Metric("test_accuracy", "maximize", "test_accuracy", _percent, True, high=1.0,
           test_set_rate=True, per_image_record=True, complement_of="test_error"),
    Metric("train_error", "minimize", "train_error", _percent, True, high=1.0),
    Metric("best_test_error", "minimize", "best_test_error", _percent, False, high=1.0,
           test_set_rate=True),
    # Streamed (ImageNet-style) data sets only: the final epoch's top-5 error.
    Metric("test_top5_error", "minimize", "test_top5_error", _percent, False, high=1.0,
           test_set_rate=True),
    *(Metric(name, "minimize", name, _percent, False, high=1.0, test_set_rate=True)
      for name in VIEW_METRICS),
    # Four significant digits: a digits-sized net's 0.0007566 GFLOPs are not all "0.0008".
    Metric("flops", "minimize", "GFLOPs", lambda v: f"{v / 1e9:.4g}", True),
    Metric("params", "minimize", "params (M)", lambda v: f"{v / 1e6:.3f}", True),
    Metric("wall_seconds", "minimize", "wall (s)", lambda v: f"{v:.1f}", True),
    Metric("images_per_second", "maximize", "images/s", lambda v: f"{v:.0f}", False),
)}

# The metrics with a per-image record of their final evaluation (accuracy: error's complement),
# and every rate over the test set's images.
ERROR_RATES = tuple(name for name, m in METRICS.items() if m.per_image_record)
TEST_SET_RATES = tuple(name for name, m in METRICS.items() if m.test_set_rate)
# The rates: fractions from 0 to 1, which tables show in % (a filter compares the fractions).
PERCENT_RATES = tuple(name for name, m in METRICS.items() if m.show is _percent)


def is_complement(metric: str) -> bool:
    """Whether `metric` is 1 minus another (accuracy), whose statistics it takes, complemented."""
    return metric in METRICS and METRICS[metric].complement_of is not None


# What a spec may name in `objectives`, each with its one sensible direction.
OBJECTIVES: dict[str, Direction] = {n: m.direction for n, m in METRICS.items() if m.objective}
# Every metric with a direction: what a Pareto front can be taken over.
DIRECTIONS: dict[str, Direction] = {n: m.direction for n, m in METRICS.items()}


def complement(rate: float | None) -> float | None:
    """Accuracy from error, or error from accuracy: the toolkit's one conversion between them."""
    return None if rate is None else 1.0 - rate


def metric_values(attrs: Mapping[str, Any]) -> dict[str, float | None]:
    """Every metric of one trial from its attributes (None where it did not record one).

    Errors are read from the per-epoch curves, as training measured them, so that a stored
    objective is the measured float and never `1 - (1 - error)`; the stored accuracies answer for
    records without curves."""
    curves = attrs.get(TrialKey.CURVES) or []
    test_errors = [c["test_error"] for c in curves if c.get("test_error") is not None]
    last = curves[-1] if curves else {}
    return {
        "test_error": last.get("test_error", complement(attrs.get(TrialKey.FINAL_TEST_ACCURACY))),
        "test_accuracy": attrs.get(TrialKey.FINAL_TEST_ACCURACY),
        "train_error": last.get("train_error",
                                complement(attrs.get(TrialKey.FINAL_TRAIN_ACCURACY))),
        "best_test_error": min(test_errors) if test_errors
        else complement(attrs.get(TrialKey.BEST_TEST_ACCURACY)),
        "test_top5_error": last.get("test_top5_error"),
        **{name: last.get(name) for name in VIEW_METRICS},
        "flops": attrs.get(TrialKey.FLOPS),
        "params": attrs.get(TrialKey.PARAMS),
        "wall_seconds": attrs.get(TrialKey.WALL_SECONDS),
        "images_per_second": attrs.get(TrialKey.IMAGES_PER_SECOND),
    }


def pack_outcomes(wrong: Any) -> str:
    """A 0/1 vector (one entry per test image, in evaluation order) as a trial attribute's
    text: bits, zlib, base64. 10,000 images take about 1.7 KB."""
    import numpy as np  # here: the description layer loads numpy only where a record is packed

    bits = np.packbits(np.asarray(wrong, dtype=bool))
    return base64.b64encode(zlib.compress(bits.tobytes(), 9)).decode("ascii")


def unpack_outcomes(text: str, images: int) -> Any:
    """The vector `pack_outcomes` wrote, as a float array of 0.0/1.0 of length `images`."""
    import numpy as np

    bits = np.frombuffer(zlib.decompress(base64.b64decode(text)), dtype=np.uint8)
    return np.unpackbits(bits)[:images].astype(float)
