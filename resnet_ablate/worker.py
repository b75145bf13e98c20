"""One trial, as it runs on a Ray worker: build the architecture, train it, return a record.

Workers compute and the driver owns state: a trial never touches the study's storage. It reads its
data set once per worker process (`load_dataset` caches), streams per-epoch records to the driver's
`TrialBoard` (which answers whether the driver wants the trial pruned), and returns a plain-dict
outcome, its exceptions included, so that only a lost worker surfaces as a Ray error. A trial of
several replicas runs as a data-parallel run (data_parallel.py) and returns the same outcome.
"""

from __future__ import annotations

import io
import os
import platform
import socket
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
import torch

from .arch import ResNetArch
from .data import DataBundle, Streamed, SyntheticSpec, load_dataset
from .models import build
from .recipe import TrainRecipe
from .train import EpochRecord, TrainResult, train


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


class PrunedByDriver(Exception):
    """The driver's pruner stopped this trial after an epoch."""


PRUNER_WAIT_SECONDS = 120.0  # past this a trial stops waiting for a verdict and trains on


@ray.remote(num_cpus=0)
class TrialBoard:
    """Mailbox between running trials and the driver: epoch records in, verdicts out."""

    def __init__(self) -> None:
        self._new: dict[int, list[dict[str, Any]]] = {}
        self._stop: set[int] = set()
        self._judged: dict[int, int] = {}  # the last epoch of each trial the driver has seen

    def report(self, trial_number: int, record: dict[str, Any]) -> bool:
        """Store an epoch record; True when the driver asked this trial to stop."""
        self._new.setdefault(trial_number, []).append(record)
        return trial_number in self._stop

    def drain(self) -> dict[int, list[dict[str, Any]]]:
        new, self._new = self._new, {}
        return new

    def judge(self, trial_number: int, epoch: int, stop: bool) -> None:
        """The driver's verdict on a trial after it has seen `epoch`."""
        self._judged[trial_number] = epoch
        if stop:
            self._stop.add(trial_number)

    def verdict(self, trial_number: int, epoch: int) -> bool | None:
        """Whether to stop after `epoch`; None while the driver has not seen that epoch."""
        if self._judged.get(trial_number, 0) < epoch:
            return None
        return trial_number in self._stop


def library_versions() -> dict[str, str]:
    import optuna
    import triton

    return {
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


def _where(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    node = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None
    return {"device": f"{device.type}: {name}", "host": socket.gethostname(), "pid": os.getpid(),
            "node_id": node}


def report_epoch(task: TrialTask, board: Any | None, record: EpochRecord) -> bool:
    """Send an epoch's record to the driver's board; True when the driver wants the trial
    stopped (after waiting for its verdict, with a pruner)."""
    if board is None:
        return False
    try:
        stop = ray.get(board.report.remote(task.trial_number, asdict(record)))
        if task.await_pruner:
            deadline = time.monotonic() + PRUNER_WAIT_SECONDS
            while (stop := ray.get(board.verdict.remote(task.trial_number, record.epoch))) is None \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
    except ray.exceptions.RayError:
        return False  # the mailbox was lost with its node: no progress or pruning, training goes on
    return bool(stop)


@dataclass
class TrialInputs:
    """What a trial trains: its data set, and a model factory that keeps what it built."""

    data: DataBundle | Streamed
    arch: ResNetArch
    recipe: TrainRecipe
    built: list[torch.nn.Module]

    @classmethod
    def of(cls, task: TrialTask) -> TrialInputs:
        dataset_kwargs = dict(task.dataset)
        if dataset_kwargs.get("synthetic") is not None:
            dataset_kwargs["synthetic"] = SyntheticSpec(**dataset_kwargs["synthetic"])
        return cls(load_dataset(**dataset_kwargs), ResNetArch.from_dict(task.arch),
                   TrainRecipe.from_dict(task.recipe), [])

    def model(self) -> torch.nn.Module:
        """The trial's model, built by train() under the trial's seed."""
        self.built.append(build(self.arch, num_classes=self.data.num_classes,
                                in_channels=self.data.in_channels))
        return self.built[-1]


def started_outcome(task: TrialTask, device: torch.device) -> dict[str, Any]:
    """The outcome's fields known before training: where the trial runs, with what."""
    return {"trial_number": task.trial_number, **_where(device), "versions": library_versions()}


def finished_outcome(outcome: dict[str, Any], result: TrainResult) -> dict[str, Any]:
    """The outcome of a run that trained to its end (completed or diverged)."""
    outcome = {**outcome, **result.to_dict()}
    outcome["curves"] = outcome.pop("history")  # the trial record's name (record.TrialKey)
    outcome["status"] = "completed" if result.ok else "failed"
    outcome["diverged"] = result.status == "diverged"
    return outcome


def weights_of(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.to("cpu").state_dict(), buffer)  # with its metadata (versions)
    return buffer.getvalue()


def execute(task: TrialTask, board: Any | None = None) -> dict[str, Any]:
    """Run one trial in this process and return its outcome; `board` is a TrialBoard handle or
    None."""
    device = torch.device("cuda" if task.use_gpu else "cpu")
    outcome = started_outcome(task, device)
    epochs: list[dict[str, Any]] = []

    def on_epoch(record: EpochRecord) -> None:
        epochs.append(asdict(record))
        if report_epoch(task, board, record):
            raise PrunedByDriver(f"pruned after epoch {record.epoch}")

    try:
        inputs = TrialInputs.of(task)
        result = train(inputs.model, inputs.data, inputs.recipe, seed=task.seed, device=device,
                       threads=task.threads, on_epoch=on_epoch)
    except PrunedByDriver as pruned:
        return {**outcome, "status": "pruned", "reason": str(pruned), "curves": epochs}
    except Exception as error:  # recorded by the driver; the study goes on
        return {**outcome, "status": "failed", "reason": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(), "curves": epochs}
    outcome = finished_outcome(outcome, result)
    if task.keep_weights and result.ok:
        outcome["weights"] = weights_of(inputs.built[-1])
    return outcome


@ray.remote(max_retries=0)
def run_trial(task: TrialTask, board: Any | None = None) -> dict[str, Any]:
    """The Ray task; resources are declared where the driver launches it (none for a
    data-parallel trial: its replicas hold them)."""
    if task.replicas > 1:
        from .data_parallel import execute_data_parallel  # Ray Train loads only where needed

        return execute_data_parallel(task, board)
    return execute(task, board)
