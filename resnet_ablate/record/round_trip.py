"""A trial's round trip, typed end to end: the driver sends a `TrialTask` to a worker; the worker
reports each finished epoch as an `EpochRecord` to the driver's board (board.py) and sends back a
frozen `TrialOutcome`, whose `attributes()` is the one mapping from an outcome to stored keys.
Plain records, no torch: the driver reads them without loading the trial's code."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .keys import FailureKind, TrialKey
from .metrics import ERROR_RATES, complement, is_complement


@dataclass(frozen=True)
class EpochRecord:
    """One finished epoch. Train loss/error run over the epoch (train mode, augmented batches);
    test loss/error are on the whole evaluation set in eval mode after the epoch. `lr` is the
    rate of the epoch's last step; `seconds` covers training and evaluation, `train_seconds`
    training alone (None in records before 0.4.3). Its field names are the stored keys of each
    epoch in a trial's curves (`TrialKey.CURVES`)."""

    epoch: int
    lr: float
    train_loss: float
    train_error: float
    test_loss: float
    test_error: float
    seconds: float
    # Streamed data sets only: top-5 error (a 1000-class task's second measure) and the images
    # left out because they could not be decoded (training and evaluation together).
    test_top5_error: float | None = None
    skipped_images: int = 0
    # The last epoch only, where the recipe asks for test-time views (recipe.test_views): the
    # errors of 10-crop testing and of multi-scale fully-convolutional testing.
    test_error_10crop: float | None = None
    test_top5_error_10crop: float | None = None
    test_error_multiscale: float | None = None
    test_top5_error_multiscale: float | None = None
    # Training alone: a run's rate once its first epoch's one-off costs (warm-up steps, a CUDA
    # graph's capture) are behind it is the images of later epochs over their train_seconds.
    train_seconds: float | None = None


def epoch_objective(record: EpochRecord, objective: str) -> float:
    """One epoch's value of a single accuracy-type objective (what a pruner compares)."""
    error = record.test_error
    return complement(error) if is_complement(objective) else error


# The single objectives a per-epoch record can report, so that a pruner can act on them: the
# test error, and its complement.
PRUNABLE_OBJECTIVES = ERROR_RATES


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
    # Seeds of one grid point trained at once as one stacked model (train_seeds), each recorded
    # as a trial of its own: (trial number, seed) each, the first being `trial_number` and
    # `seed`. Empty: the task is the one trial.
    stack: tuple[tuple[int, int], ...] = ()


class Status:
    """How a trial's run ended, as its worker says: the one vocabulary of outcomes."""

    COMPLETED = "completed"  # trained to its last epoch: its metrics are a result
    PRUNED = "pruned"  # the driver's pruner stopped it after an epoch
    DIVERGED = FailureKind.DIVERGED  # its loss blew up (train/divergence.py: how it is judged)
    FAILED = "failed"  # an exception in the trial's code
    # Its data could not be read (missing, unreachable, wrong bytes, no image): input that fails
    # again the same way, so not retried.
    UNAVAILABLE = FailureKind.DATA_UNAVAILABLE

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
class ExecutionRecord:
    """How a run executed (execution.py's `Execution`, "auto" resolved): its device, precision
    and memory format, whether it was compiled and replayed from CUDA graphs, where its training
    crops were decoded ("none": an in-memory data set), and how many seeds trained together as
    one stacked model (train_seeds; 1: alone). Stored as a plain mapping (`TrialKey.EXECUTION`);
    `from_stored` reads any store's back."""

    device: str
    precision: str  # fp32 | bf16 | fp16
    memory_format: str  # channels_last | nchw
    compile: bool
    cuda_graphs: bool
    decode: str = "none"  # cpu | gpu | none
    stacked_seeds: int = 1

    def stored(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_stored(cls, values: Mapping[str, Any]) -> ExecutionRecord:
        """A stored mapping's record: keys a store written before a field existed take its
        default (`decode`, `stacked_seeds`), keys this version does not know are left out."""
        known = {f.name for f in fields(cls)}
        return cls(**{name: value for name, value in values.items() if name in known})


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
    one has what was known when it stopped (placement, versions, the epochs it finished, how it
    executed where that was known: a pruned stacked seed's)."""

    trial_number: int
    status: str  # one of Status
    reason: str | None = None  # why it was pruned, failed or diverged: one line
    traceback: str | None = None
    placement: Placement | None = None
    versions: Mapping[str, str] = field(default_factory=dict)
    curves: tuple[Mapping[str, Any], ...] = ()  # one dict per epoch (EpochRecord's fields)
    epochs_completed: int | None = None
    timings: Timings | None = None
    execution: ExecutionRecord | None = None  # how the run executed
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
                TrialKey.WARMUP_STEPS: self.warmup_steps,
                TrialKey.EVAL_SPLIT: self.eval_split,
                TrialKey.TEST_IMAGES: test.images,
                TrialKey.TEST_WRONG: test.wrong,
                TrialKey.TEST_OUTCOMES: test.outcomes,
            })
        if self.execution is not None or self.epochs_completed is not None:
            # How it ran, where it is known: a pruned stacked seed's says it was stacked.
            values[TrialKey.EXECUTION] = None if self.execution is None else self.execution.stored()
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
        values["execution"] = None if self.execution is None else self.execution.stored()
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
        if values.get("execution") is not None:
            values["execution"] = ExecutionRecord.from_stored(values["execution"])
        if values.get("data_parallel") is not None:
            values["data_parallel"] = dataclasses.replace(
                values["data_parallel"],
                resumed_after_epochs=tuple(values["data_parallel"].resumed_after_epochs))
        values["curves"] = tuple(values.get("curves") or ())
        return cls(**values, weights=weights)
