"""One trial's body, whichever engine runs it: build the architecture, train it, and turn the
training loop's result into the trial's typed outcome (record.TrialOutcome).

A plain Ray task (worker.py) runs it in one process; a Ray Train run (data_parallel.py) runs it in
each replica. Neither engine is imported here: the driver picks which remote function to launch
(study/cluster.py). A trial never touches the study's storage: it reads its data set once per
process (`load_dataset` caches), streams per-epoch records to the driver's board (board.py), and
returns its outcome, its exceptions included.
"""

from __future__ import annotations

import dataclasses
import io
import os
import platform
import socket
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from .arch import ResNetArch
from .board import PrunedByDriver, report_end, report_epoch
from .data import (CorruptShard, DataBundle, DataUnavailable, SizeMisstated, Streamed,
                   load_dataset)
from .models import build
from .recipe import TrainRecipe
from .record import (TOOLKIT, DataParallelRecord, EpochRecord, FinalEvaluation, Placement,
                     Status, Timings, TrialOutcome, TrialTask)
from .replicas import Replicas
from .train import NoImages, TrainResult, train, train_seeds


def library_versions() -> dict[str, str]:
    import optuna
    import triton

    from . import __version__

    return {
        TOOLKIT: __version__,
        "python": platform.python_version(), "torch": torch.__version__,
        "triton": triton.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
    }


def _cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 9654"): platform.processor() is empty on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def placement(device: torch.device) -> Placement:
    """Where this process trains: its device, host, process and Ray node."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return Placement(f"{device.type}: {name}", socket.gethostname(), os.getpid(), node)


@dataclass
class TrialInputs:
    """What a trial trains: its data set, and a model factory that keeps what it built."""

    data: DataBundle | Streamed
    arch: ResNetArch
    recipe: TrainRecipe
    built: list[torch.nn.Module]

    @classmethod
    def of(cls, task: TrialTask) -> TrialInputs:
        return cls(load_dataset(**task.dataset), ResNetArch.from_dict(task.arch),
                   TrainRecipe.from_dict(task.recipe), [])

    def model(self) -> torch.nn.Module:
        """The trial's model, built by train() under the trial's seed."""
        self.built.append(build(self.arch, num_classes=self.data.num_classes,
                                in_channels=self.data.in_channels))
        return self.built[-1]


def outcome_of(result: TrainResult, *, trial_number: int, where: Placement,
               weights: bytes | None = None,
               data_parallel: DataParallelRecord | None = None) -> TrialOutcome:
    """The trial's outcome of a training run that ended by itself (completed or diverged): the
    one conversion from the training loop's result to the trial's record."""
    return TrialOutcome(
        trial_number=trial_number,
        status=Status.COMPLETED if result.ok else Status.DIVERGED,
        reason=result.reason, placement=where, versions=library_versions(),
        curves=tuple(asdict(record) for record in result.history),
        epochs_completed=result.epochs_completed,
        timings=Timings(result.wall_seconds, result.images_per_second, result.compile_seconds),
        execution=result.execution, warmup_steps=result.warmup_steps,
        eval_split=result.eval_split,
        test=FinalEvaluation(result.test_images, result.test_wrong, result.test_outcomes),
        data_parallel=data_parallel, weights=weights,
    )


def weights_of(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.to("cpu").state_dict(), buffer)  # with its metadata (versions)
    return buffer.getvalue()


def run_trial_body(task: TrialTask, board: Any | None, device: torch.device, *,
                   replicas: Replicas | None = None, resume: Mapping[str, Any] | None = None,
                   on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                   resumed_after: tuple[int, ...] = ()) -> TrialOutcome:
    """Train one trial in this process and return its outcome. With `replicas` (one replica of
    a data-parallel run) the leader reports epochs, the replicas agree on pruning, and an
    exception propagates, so that Ray Train restarts the run; alone, an exception is the failed
    outcome (the driver records it and the study goes on)."""
    where = placement(device)
    epochs: list[dict[str, Any]] = [] if resume is None else list(resume["history"])
    leader = replicas is None or replicas.leader

    def on_epoch(record: EpochRecord) -> None:
        epochs.append(asdict(record))
        stop = report_epoch(task, board, record) if leader else False
        if replicas.agree(stop) if replicas is not None else stop:
            raise PrunedByDriver(f"pruned after epoch {record.epoch}")

    def stopped(status: str, reason: str, trace: str | None = None) -> TrialOutcome:
        return TrialOutcome(task.trial_number, status, reason, trace, where, library_versions(),
                            tuple(epochs), data_parallel=data_parallel)

    data_parallel = None
    training = False  # a replica's error in training must reach the others (Ray Train)
    try:
        inputs = TrialInputs.of(task)
        if replicas is not None:  # recorded with a failure before training too
            data_parallel = DataParallelRecord(replicas.world, _backend(), inputs.recipe.sync_bn,
                                               resumed_after)
        inputs.data.check_available()  # a missing shard named now, not at the epoch reading it
        training = True
        result = train(inputs.model, inputs.data, inputs.recipe, seed=task.seed, device=device,
                       threads=task.threads, on_epoch=on_epoch, replicas=replicas,
                       on_checkpoint=on_checkpoint, resume=resume)
    except PrunedByDriver as pruned:
        return stopped(Status.PRUNED, str(pruned))
    except DataUnavailable as missing:
        # Before training, and the same on every replica: an outcome, not an exception that Ray
        # Train would restart the run for. Not retried: the same input fails again.
        return stopped(Status.UNAVAILABLE, str(missing))
    except (NoImages, SizeMisstated) as counted:
        # A split with no decodable image, or not the size stated: as deterministic (its count
        # is every replica's total), so as unavailable, and not retried either: a retry would
        # train again first.
        return stopped(Status.UNAVAILABLE, f"{type(counted).__name__}: {counted}")
    except CorruptShard as corrupt:
        # Wrong bytes fail again: not retried. Found as the data set loads, every replica finds
        # it; in training, a replica's own shard: the others must hear of it, so Ray Train fails
        # the group, as for any replica's error (and data_parallel.py records it unavailable).
        if replicas is not None and training:
            raise
        return stopped(Status.UNAVAILABLE, str(corrupt))
    except Exception as error:
        if replicas is not None:
            raise
        return stopped(Status.FAILED, f"{type(error).__name__}: {error}", traceback.format_exc())
    weights = weights_of(inputs.built[-1]) if task.keep_weights and result.ok else None
    return outcome_of(result, trial_number=task.trial_number, where=where, weights=weights,
                      data_parallel=data_parallel)


def run_stacked_body(task: TrialTask, board: Any | None, device: torch.device
                     ) -> list[TrialOutcome]:
    """Train the seeds of `task.stack` at once, stacked into one model (train_seeds), in this
    process; one outcome per seed, in the stack's order, each with its own trial number, curves,
    status (a seed that diverges, or that the driver's pruner stops, is recorded so while the
    others train on) and weights. Each epoch of each seed is reported under its own trial
    number. An exception fails every seed of the stack still training with it (data sets that
    cannot be read as unavailable); a seed that had diverged or been pruned keeps that outcome,
    so it is not retried."""
    stack = _Stack(task, board, placement(device))
    try:
        inputs = TrialInputs.of(task)
        stack.built = inputs.built
        inputs.data.check_available()
        train_seeds(inputs.model, inputs.data, inputs.recipe,
                    seeds=[seed for _, seed in task.stack], device=device, threads=task.threads,
                    on_epoch=stack.on_epoch, on_end=stack.on_end)
    except DataUnavailable as missing:  # not retried, as a trial alone's (run_trial_body)
        return stack.outcomes(Status.UNAVAILABLE, str(missing))
    except NoImages as nothing:
        return stack.outcomes(Status.UNAVAILABLE, f"NoImages: {nothing}")
    except CorruptShard as corrupt:
        return stack.outcomes(Status.UNAVAILABLE, str(corrupt))
    except Exception as error:
        return stack.outcomes(Status.FAILED, f"{type(error).__name__}: {error}",
                              traceback.format_exc())
    return stack.outcomes()


class _Stack:
    """What a stack's task knows of its seeds as they train: each one's epochs, its result once
    its run has ended, its built model; and each one's outcome from them."""

    def __init__(self, task: TrialTask, board: Any | None, where: Placement) -> None:
        self.task, self.board, self.where = task, board, where
        self.numbers = [number for number, _ in task.stack]
        self.epochs: list[list[dict[str, Any]]] = [[] for _ in task.stack]
        self.ended: dict[int, TrainResult] = {}  # each seed's result, as its run ends
        self.built: list[torch.nn.Module] = []  # each seed's model, as the factory built it

    def on_epoch(self, index: int, record: EpochRecord) -> bool:
        """Report the epoch; True where the driver's pruner stops this seed there."""
        self.epochs[index].append(asdict(record))
        return report_epoch(dataclasses.replace(self.task, trial_number=self.numbers[index]),
                            self.board, record)

    def on_end(self, index: int, result: TrainResult) -> None:
        """Keep a seed's result as its run ends; one that ends before the stack (diverged or
        pruned, never with weights) is sent to the driver, which records it then."""
        self.ended[index] = result
        if not result.ok:
            report_end(self.board, self.outcome(index, Status.FAILED, "", None))

    def outcome(self, index: int, status: str, reason: str, trace: str | None) -> TrialOutcome:
        """Seed `index`'s outcome: its result where its run ended, else `status`."""
        number, result = self.numbers[index], self.ended.get(index)
        if result is None:
            return TrialOutcome(number, status, reason, trace, self.where, library_versions(),
                                tuple(self.epochs[index]))
        if result.status == "stopped":
            return TrialOutcome(number, Status.PRUNED,
                                f"pruned after epoch {result.epochs_completed}", None, self.where,
                                library_versions(), tuple(self.epochs[index]),
                                execution=result.execution)
        # The factory built each seed's model in order; train_seeds leaves each its final weights.
        keep = self.task.keep_weights and result.ok
        return outcome_of(result, trial_number=number, where=self.where,
                          weights=weights_of(self.built[index]) if keep else None)

    def outcomes(self, status: str = Status.FAILED, reason: str = "",
                 trace: str | None = None) -> list[TrialOutcome]:
        return [self.outcome(index, status, reason, trace) for index in range(len(self.numbers))]


def _backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())
