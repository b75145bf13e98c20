"""The trial record, defined once: what a study stores for each trial and for itself, and the
metrics a trial is judged by (name, direction, unit, format, range).

Optuna keeps a trial's swept parameters and objective values; everything else a trial records is
one of its user attributes, named by `TrialKey`. The driver writes them (study/recorder.py);
results, the report and the command line read them, and every metric is derived from them by
`metric_values` alone, so accuracy becomes error in exactly one place. Torch-free: the spec, the
driver and every reader import it.
"""

from __future__ import annotations

import base64
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

# ----------------------------------------------------------------------------------------------
# Stored names


class TrialKey:
    """A trial's user attributes."""

    SEED = "seed"
    # What was trained: set by the driver when the trial is launched.
    ARCH = "arch"  # the full architecture description (ResNetArch.to_dict())
    ARCH_NAME = "arch_name"
    ARCH_DIGEST = "arch_digest"
    PARAMS = "params"
    FLOPS = "flops"  # forward multiply-adds of one image (see FLOPS_CONVENTION)
    FLOPS_CONVENTION = "flops_convention"
    RECIPE = "recipe"  # TrainRecipe.to_dict() as this architecture was trained
    # Where and how it ran, and what it measured: copied from the worker's outcome.
    DEVICE = "device"
    HOST = "host"
    PID = "pid"
    NODE_ID = "node_id"
    VERSIONS = "versions"
    CURVES = "curves"  # one dict per epoch (train.EpochRecord)
    WALL_SECONDS = "wall_seconds"
    IMAGES_PER_SECOND = "images_per_second"
    COMPILE_SECONDS = "compile_seconds"
    EXECUTION = "execution"  # precision, memory format, compilation, CUDA graphs as run
    EPOCHS_COMPLETED = "epochs_completed"
    FINAL_TEST_ACCURACY = "final_test_accuracy"
    BEST_TEST_ACCURACY = "best_test_accuracy"
    FINAL_TRAIN_ACCURACY = "final_train_accuracy"
    WARMUP_STEPS = "warmup_steps"
    EVAL_SPLIT = "eval_split"
    # The final evaluation, for honest statistics (resnet_ablate/stats.py): the test set's size,
    # the images it got wrong, and which ones (`pack_outcomes`; in-memory data sets in one
    # process only). Stores written before these were kept lack them; analyses say so.
    TEST_IMAGES = "test_images"
    TEST_WRONG = "test_wrong"
    TEST_OUTCOMES = "test_outcomes"
    # Data-parallel trials only: replicas, backend, sync_bn, and the epochs it resumed after.
    DATA_PARALLEL = "data_parallel"
    # How it ended.
    FAILURE_KIND = "failure_kind"  # one of FailureKind
    FAILURE = "failure"  # one line, for people
    TRACEBACK = "traceback"
    PRUNED = "pruned"  # why the pruner stopped it
    WEIGHTS = "weights"  # kept weights: a path relative to the study's runs folder, or why not


# The worker outcome's fields that the driver copies into the trial's attributes as they are.
OUTCOME_KEYS: tuple[str, ...] = (
    TrialKey.DEVICE, TrialKey.HOST, TrialKey.PID, TrialKey.NODE_ID, TrialKey.VERSIONS,
    TrialKey.CURVES, TrialKey.WALL_SECONDS, TrialKey.IMAGES_PER_SECOND, TrialKey.COMPILE_SECONDS,
    TrialKey.EXECUTION, TrialKey.EPOCHS_COMPLETED, TrialKey.FINAL_TEST_ACCURACY,
    TrialKey.BEST_TEST_ACCURACY, TrialKey.FINAL_TRAIN_ACCURACY, TrialKey.WARMUP_STEPS,
    TrialKey.EVAL_SPLIT, TrialKey.DATA_PARALLEL, TrialKey.TEST_IMAGES, TrialKey.TEST_WRONG,
    TrialKey.TEST_OUTCOMES,
)


class StudyKey:
    """A study's user attributes."""

    SPEC = "spec"  # the spec sections that define the study, as written (see study/store.py)
    SPEC_SOURCE = "spec_source"
    QUESTION = "question"
    OBJECTIVES = "objectives"
    SEEDS = "seeds"
    # The adaptive-seed rule as the spec writes it (spec.AdaptiveSeeds), set by every run so
    # that readers judge by the rule the trials were run under.
    SEED_RULE = "seed_rule"
    DRIVER = "driver"  # the live driver's lease: host, pid, renewed


class FailureKind:
    """Why a failed trial failed; it decides whether its grid point is tried again."""

    ERROR = "error"  # an exception in the trial
    WORKER_LOST = "worker_lost"  # the worker process or its node died
    DIVERGED = "diverged"  # the loss blew up (train.py says how that is judged)
    OVER_BUDGET = "over_budget"  # its FLOPs exceed the spec's budget.max_gflops
    INTERRUPTED = "interrupted"  # the driver stopped (Ctrl-C, SIGTERM, killed) before it ended

    RETRYABLE = (ERROR, WORKER_LOST)  # count as an attempt of the grid point
    FINAL = (DIVERGED, OVER_BUDGET)  # settle the grid point


# ----------------------------------------------------------------------------------------------
# Metrics

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
    # Streamed (ImageNet-style) data sets only: the final epoch's top-5 error.
    Metric("test_top5_error", "minimize", "test_top5_error", _percent, False, high=1.0),
    Metric("flops", "minimize", "GFLOPs", lambda v: f"{v / 1e9:.4f}", True),
    Metric("params", "minimize", "params (M)", lambda v: f"{v / 1e6:.3f}", True),
    Metric("wall_seconds", "minimize", "wall (s)", lambda v: f"{v:.1f}", True),
    Metric("images_per_second", "maximize", "images/s", lambda v: f"{v:.0f}", False),
)}

# What a spec may name in `objectives`, each with its one sensible direction.
OBJECTIVES: dict[str, Direction] = {n: m.direction for n, m in METRICS.items() if m.objective}
# Every metric with a direction: what a Pareto front can be taken over.
DIRECTIONS: dict[str, Direction] = {n: m.direction for n, m in METRICS.items()}


def _error(accuracy: float | None) -> float | None:
    return None if accuracy is None else 1.0 - accuracy


def metric_values(attrs: Mapping[str, Any]) -> dict[str, float | None]:
    """Every metric of one trial from its attributes (None where it did not record one)."""
    return {
        "test_error": _error(attrs.get(TrialKey.FINAL_TEST_ACCURACY)),
        "test_accuracy": attrs.get(TrialKey.FINAL_TEST_ACCURACY),
        "train_error": _error(attrs.get(TrialKey.FINAL_TRAIN_ACCURACY)),
        "best_test_error": _error(attrs.get(TrialKey.BEST_TEST_ACCURACY)),
        "test_top5_error": (attrs.get(TrialKey.CURVES) or [{}])[-1].get("test_top5_error"),
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


def epoch_objective(record: Mapping[str, Any], objective: str) -> float:
    """One epoch's value of a single accuracy-type objective (what a pruner compares)."""
    error = record["test_error"]
    return 1.0 - error if objective == "test_accuracy" else error


# The single objectives a per-epoch record can report, so that a pruner can act on them.
PRUNABLE_OBJECTIVES = ("test_error", "test_accuracy")
