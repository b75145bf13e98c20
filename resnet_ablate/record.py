"""The trial record, defined once: what a study stores for each trial and for itself, and the
metrics a trial is judged by (name, direction, unit, format, range).

Optuna keeps a trial's swept parameters and objective values; everything else a trial records is
one of its user attributes, named by `TrialKey`. The driver writes them (study/recorder.py);
results, the report and the command line read them, and every metric is derived from them by
`metric_values` alone. Accuracy and error convert into each other by `complement` alone. Torch-free:
the spec, the driver and every reader import it.

A trial's round trip is typed end to end: the driver sends a `TrialTask` to a worker, and the
worker sends back a frozen `TrialOutcome`, whose `attributes()` is the one mapping from an outcome
to stored keys.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
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
    # Where and how it ran, and what it measured: from the worker's TrialOutcome.
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


class StudyKey:
    """A study's user attributes."""

    SPEC = "spec"  # the spec sections that define the study, as written (see study/opening.py)
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
    # Its data set's folder or a shard is missing or unreachable, found when the trial started:
    # the same input fails again, so it is not retried, nor settled (a rerun after the fix runs it).
    DATA_UNAVAILABLE = "data_unavailable"

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


# 10-crop and multi-scale testing (recipe.test_views), in the curves' last record.
VIEW_METRICS = ("test_error_10crop", "test_top5_error_10crop", "test_error_multiscale",
                "test_top5_error_multiscale")
METRICS: dict[str, Metric] = {m.name: m for m in (
    Metric("test_error", "minimize", "test_error", _percent, True, high=1.0),
    Metric("test_accuracy", "maximize", "test_accuracy", _percent, True, high=1.0),
    Metric("train_error", "minimize", "train_error", _percent, True, high=1.0),
    Metric("best_test_error", "minimize", "best_test_error", _percent, False, high=1.0),
    # Streamed (ImageNet-style) data sets only: the final epoch's top-5 error.
    Metric("test_top5_error", "minimize", "test_top5_error", _percent, False, high=1.0),
    *(Metric(name, "minimize", name, _percent, False, high=1.0) for name in VIEW_METRICS),
    Metric("flops", "minimize", "GFLOPs", lambda v: f"{v / 1e9:.4f}", True),
    Metric("params", "minimize", "params (M)", lambda v: f"{v / 1e6:.3f}", True),
    Metric("wall_seconds", "minimize", "wall (s)", lambda v: f"{v:.1f}", True),
    Metric("images_per_second", "maximize", "images/s", lambda v: f"{v:.0f}", False),
)}

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


def epoch_objective(record: Mapping[str, Any], objective: str) -> float:
    """One epoch's value of a single accuracy-type objective (what a pruner compares)."""
    error = record["test_error"]
    return complement(error) if objective == "test_accuracy" else error


# The single objectives a per-epoch record can report, so that a pruner can act on them.
PRUNABLE_OBJECTIVES = ("test_error", "test_accuracy")


# ----------------------------------------------------------------------------------------------
# The trial's round trip: the task a worker is sent, the outcome it sends back


@dataclass(frozen=True)
class TrialTask:
    """Everything a worker needs for one trial, in plain values (cheap to ship)."""

    trial_number: int
    arch: dict[str, Any]
    seed: int
    dataset: dict[str, Any]  # load_dataset keyword arguments
    recipe: dict[str, Any]
    threads: int
    use_gpu: bool
    keep_weights: bool
    # With a pruner, each epoch waits for the driver's verdict on it, so that whether a trial is
    # pruned depends on the study's results, not on how fast the driver happened to read them.
    await_pruner: bool = False
    # Data-parallel trials (replicas > 1): the CPUs each replica holds, where their per-epoch
    # checkpoints go (a folder every node sees, or a URI), and how many times lost replicas are
    # replaced before the trial counts as lost.
    replicas: int = 1
    cpus_per_replica: float = 1
    checkpoints: str | None = None
    max_restarts: int = 2


class Status:
    """How a trial's run ended, as its worker says: the one vocabulary of outcomes."""

    COMPLETED = "completed"  # trained to its last epoch: its metrics are a result
    PRUNED = "pruned"  # the driver's pruner stopped it after an epoch
    DIVERGED = FailureKind.DIVERGED  # its loss blew up (train.py says how that is judged)
    FAILED = "failed"  # an exception in the trial's code
    UNAVAILABLE = FailureKind.DATA_UNAVAILABLE  # its data could not be read when it started

    ALL = (COMPLETED, PRUNED, DIVERGED, FAILED, UNAVAILABLE)
    # What a run's tally counts besides these: the failure kinds (FailureKind) of the trials
    # that did not end as a result or pruned.
    NOT_FAILURES = (COMPLETED, PRUNED)


@dataclass(frozen=True)
class Placement:
    """Where a trial ran."""

    device: str  # "cpu: AMD EPYC 9654", "cuda: NVIDIA H100 80GB HBM3"
    host: str
    pid: int
    node_id: str | None  # the Ray node's id, None outside Ray


@dataclass(frozen=True)
class Timings:
    """How long training took: wall seconds, training images a second (training alone), and
    the seconds torch.compile took before training (0 without it)."""

    wall_seconds: float
    images_per_second: float
    compile_seconds: float


@dataclass(frozen=True)
class FinalEvaluation:
    """The final evaluation, for honest statistics: the test set's size, the images it got
    wrong, and which ones (`pack_outcomes`; None where the data set cannot say)."""

    images: int | None = None
    wrong: int | None = None
    outcomes: str | None = None


@dataclass(frozen=True)
class DataParallelRecord:
    """A data-parallel trial's run: its replicas, their backend, whether batch norm synced, and
    the epochs each restart resumed after."""

    replicas: int
    backend: str
    sync_bn: bool
    resumed_after_epochs: tuple[int, ...] = ()


@dataclass(frozen=True)
class TrialOutcome:
    """What a worker sends back for one trial, its failures included: a frozen record that Ray
    pickles as it is. `attributes()` is the one mapping to the trial's stored keys.

    A run that trained to its end (completed or diverged) has every field; a pruned or failed
    one has what was known when it stopped (placement, versions, the epochs it finished)."""

    trial_number: int
    status: str  # one of Status
    reason: str | None = None  # why it was pruned, failed or diverged: one line
    traceback: str | None = None
    placement: Placement | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    curves: tuple[Mapping[str, Any], ...] = ()  # one dict per epoch (train.EpochRecord)
    epochs_completed: int | None = None
    timings: Timings | None = None
    execution: Mapping[str, Any] | None = None  # Execution.to_dict(): how the run executed
    warmup_steps: int | None = None
    eval_split: str | None = None
    test: FinalEvaluation | None = None
    data_parallel: DataParallelRecord | None = None
    weights: bytes | None = None  # the trained weights (torch.save of a state_dict), when kept

    def __post_init__(self) -> None:
        if self.status not in Status.ALL:
            raise ValueError(f"a trial's status is one of {', '.join(Status.ALL)}, "
                             f"got {self.status!r}")

    @property
    def failure_kind(self) -> str | None:
        """The FailureKind of a trial that failed or diverged; None for a completed or pruned
        one."""
        return {Status.DIVERGED: FailureKind.DIVERGED, Status.FAILED: FailureKind.ERROR,
                Status.UNAVAILABLE: FailureKind.DATA_UNAVAILABLE}.get(self.status)

    def attributes(self) -> dict[str, Any]:
        """The trial's stored attributes this outcome gives (weights aside: the driver stores
        them as a file): the one mapping from an outcome to `TrialKey`s. A run that trained to
        its end stores every key, None where it measured nothing (no epoch, no per-image
        record); one that stopped early, where it ran and the epochs it finished."""
        values: dict[str, Any] = {}
        if self.placement is not None:
            values.update({TrialKey.DEVICE: self.placement.device,
                           TrialKey.HOST: self.placement.host, TrialKey.PID: self.placement.pid,
                           TrialKey.NODE_ID: self.placement.node_id,
                           TrialKey.VERSIONS: dict(self.versions)})
        if self.placement is not None or self.curves:
            values[TrialKey.CURVES] = [dict(c) for c in self.curves]
        if self.epochs_completed is not None:  # a run that trained to its end
            last = self.curves[-1] if self.curves else None
            timings = self.timings or Timings(0.0, 0.0, 0.0)
            test = self.test or FinalEvaluation()
            values.update({
                TrialKey.EPOCHS_COMPLETED: self.epochs_completed,
                TrialKey.FINAL_TEST_ACCURACY: None if last is None
                else complement(last["test_error"]),
                TrialKey.BEST_TEST_ACCURACY: None if last is None
                else complement(min(c["test_error"] for c in self.curves)),
                TrialKey.FINAL_TRAIN_ACCURACY: None if last is None
                else complement(last["train_error"]),
                TrialKey.WALL_SECONDS: timings.wall_seconds,
                TrialKey.IMAGES_PER_SECOND: timings.images_per_second,
                TrialKey.COMPILE_SECONDS: timings.compile_seconds,
                TrialKey.EXECUTION: None if self.execution is None else dict(self.execution),
                TrialKey.WARMUP_STEPS: self.warmup_steps,
                TrialKey.EVAL_SPLIT: self.eval_split,
                TrialKey.TEST_IMAGES: test.images,
                TrialKey.TEST_WRONG: test.wrong,
                TrialKey.TEST_OUTCOMES: test.outcomes,
            })
        if self.data_parallel is not None:
            record = self.data_parallel
            values[TrialKey.DATA_PARALLEL] = {
                "replicas": record.replicas, "backend": record.backend, "sync_bn": record.sync_bn,
                "resumed_after_epochs": list(record.resumed_after_epochs)}
        return values

    def to_json(self) -> dict[str, Any]:
        """Plain values for a JSON file (a data-parallel run's last checkpoint), weights aside;
        `from_json` reads them back."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        for name in ("placement", "timings", "test", "data_parallel"):
            part = values[name]
            values[name] = None if part is None else \
                {f.name: getattr(part, f.name) for f in fields(part)}
        values["versions"] = dict(self.versions)
        values["curves"] = [dict(c) for c in self.curves]
        values["execution"] = None if self.execution is None else dict(self.execution)
        if values["data_parallel"] is not None:
            values["data_parallel"]["resumed_after_epochs"] = \
                list(values["data_parallel"]["resumed_after_epochs"])
        return values

    @classmethod
    def from_json(cls, values: Mapping[str, Any], weights: bytes | None = None) -> TrialOutcome:
        values = dict(values)
        for name, part in (("placement", Placement), ("timings", Timings),
                           ("test", FinalEvaluation), ("data_parallel", DataParallelRecord)):
            if values.get(name) is not None:
                values[name] = part(**values[name])
        if values.get("data_parallel") is not None:
            values["data_parallel"] = dataclasses.replace(
                values["data_parallel"],
                resumed_after_epochs=tuple(values["data_parallel"].resumed_after_epochs))
        values["curves"] = tuple(values.get("curves") or ())
        return cls(**values, weights=weights)
