"""One trial, as it runs on a Ray worker: build the architecture, train it, return a record.

Workers compute and the driver owns state: a trial never touches the study's storage. It reads its
data set once per worker process (`load_dataset` caches), streams per-epoch records to the driver's
`TrialBoard` (which answers whether the driver wants the trial pruned), and returns a plain-dict
outcome, its exceptions included, so that only a lost worker surfaces as a Ray error.
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
from .data import SyntheticSpec, load_dataset
from .models import build
from .recipe import TrainRecipe
from .train import EpochRecord, train


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


def execute(task: TrialTask, board: Any | None = None) -> dict[str, Any]:
    """Run one trial and return its outcome; `board` is a TrialBoard handle or None."""
    device = torch.device("cuda" if task.use_gpu else "cpu")
    outcome: dict[str, Any] = {"trial_number": task.trial_number, **_where(device),
                               "versions": library_versions()}
    epochs: list[dict[str, Any]] = []

    def on_epoch(record: EpochRecord) -> None:
        epochs.append(asdict(record))
        if board is None:
            return
        try:
            stop = ray.get(board.report.remote(task.trial_number, asdict(record)))
            if task.await_pruner:
                deadline = time.monotonic() + PRUNER_WAIT_SECONDS
                while (stop := ray.get(board.verdict.remote(task.trial_number, record.epoch))) is None \
                        and time.monotonic() < deadline:
                    time.sleep(0.02)
        except ray.exceptions.RayError:
            return  # the mailbox was lost with its node: no progress or pruning, training goes on
        if stop:
            raise PrunedByDriver(f"pruned after epoch {record.epoch}")

    try:
        dataset_kwargs = dict(task.dataset)
        if dataset_kwargs.get("synthetic") is not None:
            dataset_kwargs["synthetic"] = SyntheticSpec(**dataset_kwargs["synthetic"])
        data = load_dataset(**dataset_kwargs)
        arch = ResNetArch.from_dict(task.arch)

        built: list[torch.nn.Module] = []

        def model() -> torch.nn.Module:  # built by train() under the trial's seed
            built.append(build(arch, num_classes=data.num_classes, in_channels=data.in_channels))
            return built[-1]

        result = train(model, data, TrainRecipe.from_dict(task.recipe), seed=task.seed,
                       device=device, threads=task.threads, on_epoch=on_epoch)
    except PrunedByDriver as pruned:
        return {**outcome, "status": "pruned", "reason": str(pruned), "curves": epochs}
    except Exception as error:  # recorded by the driver; the study goes on
        return {**outcome, "status": "failed", "reason": f"{type(error).__name__}: {error}",
                "traceback": traceback.format_exc(), "curves": epochs}

    outcome.update(result.to_dict())
    outcome["curves"] = outcome.pop("history")  # the trial record's name (record.TrialKey)
    outcome["status"] = "completed" if result.ok else "failed"
    outcome["diverged"] = result.status == "diverged"
    if task.keep_weights and result.ok:
        buffer = io.BytesIO()
        torch.save(built[-1].to("cpu").state_dict(), buffer)  # with its metadata (versions)
        outcome["weights"] = buffer.getvalue()
    return outcome


@ray.remote(max_retries=0)
def run_trial(task: TrialTask, board: Any | None = None) -> dict[str, Any]:
    """The Ray task; resources are declared where the driver launches it."""
    return execute(task, board)
