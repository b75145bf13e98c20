"""One trial as a data-parallel run on Ray Train: its replicas train together, and the study sees
one trial with the same record as any other.

Ray Train's TorchTrainer starts one process per replica (a GPU each, or CPUs), joins them in a
process group (NCCL on GPUs, gloo on CPUs) and runs `_replica` in each: train/'s loop with the
replicas of replicas.py. The leader (rank 0) reports each epoch to the driver's board and saves a
checkpoint of the whole run after it. When a replica is lost (its process or node dies), Ray
Train starts the group again, up to `max_restarts` times, and every replica resumes from the last
checkpoint it registered instead of from scratch. Each start of the replicas is marked beside the
checkpoints, so a restart from scratch (a replica lost before the first checkpoint registered)
counts in the record's restarts as one after epoch 0. Checkpoints hold tensors and plain values
only and load with `weights_only=True`: one holding any other object is refused, never run. The
trial's outcome travels back with the leader's last report; its weights, when kept, in the last
checkpoint. The checkpoints go once the trial has ended.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import traceback
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from .data import CorruptShard, DataUnavailable, NoImages, SizeMisstated
from .record import Status, TrialOutcome, TrialTask
from .replicas import Replicas
from .trial import run_trial_body

_STATE = "state.pt"  # an epoch's checkpoint: the run's state (train/) and its restarts
_OUTCOME = "outcome.json"  # the last checkpoint: the trial's outcome
_WEIGHTS = "weights.pt"  # and its trained weights, when kept


# Ray Train's controller takes at most one report from each replica per poll of them, every 2 s
# by default, and a replica's `ray.train.report` waits until its previous report was taken (a
# queue of one): a run whose epochs were shorter than that was held to one epoch per poll, and
# every trial's end waited out polls. A poll is a small call to each replica (one that does not
# answer in time is awaited at the next poll, not taken for lost), so they can come often. Ray
# Train hands this variable from the trial's process on to its controller.
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = 0.25


class CheckpointRefused(ValueError):
    """A checkpoint holding more than tensors and plain values: loading it could run code."""


class ReplicasLost(RuntimeError):
    """The run lost replicas (processes or nodes) more often than it may restart them: raised,
    so that the driver records the trial as lost and may try it again."""


@ray.remote(max_retries=0, num_cpus=0)
def run_data_parallel_trial(task: TrialTask, board: Any | None = None) -> TrialOutcome:
    """The Ray task of a data-parallel trial: it holds no resources and waits for its replicas,
    which hold them."""
    return execute_data_parallel(task, board)


def execute_data_parallel(task: TrialTask, board: Any | None = None) -> TrialOutcome:
    """Run one trial as `task.replicas` replicas and return its outcome (as worker.execute
    does for one process)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    # Ray Train resumes a run whose name it finds in the storage: a name of this call alone, so
    # that a folder left by a killed driver or a deleted study is never taken for this trial's.
    name = f"trial-{task.trial_number:05d}-{uuid.uuid4().hex[:8]}"
    storage = task.checkpoints or tempfile.mkdtemp(prefix="resnet-ablate-checkpoints-")
    starts = (f"{storage.rstrip('/')}/{name}.starts" if "://" in storage
              else str(Path(storage).expanduser().resolve() / f"{name}.starts"))
    os.environ.setdefault(POLL_INTERVAL_ENV, str(POLL_INTERVAL_S))  # a user's own setting stands
    resources: dict[str, float] = {"CPU": task.cpus_per_replica}
    if task.use_gpu:
        resources["GPU"] = 1
    trainer = _trainer_class()(
        _replica, train_loop_config={"task": task, "board": board, "starts": starts},
        torch_config=TorchConfig(backend="nccl" if task.use_gpu else "gloo"),
        # PACK: as few nodes as hold the replicas, whose gradients then cross the fewest links.
        scaling_config=ScalingConfig(num_workers=task.replicas, use_gpu=task.use_gpu,
                                     resources_per_worker=resources, placement_strategy="PACK"),
        run_config=RunConfig(storage_path=storage, name=name,
                             failure_config=FailureConfig(max_failures=task.max_restarts),
                             checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    try:
        try:
            result = trainer.fit()
        except Exception as error:  # noqa: BLE001 - Ray Train's failures, each made one line
            failed = _failed_in_code(task, error)
            if failed is not None:
                return failed
            raise ReplicasLost(_why_lost(error, task.max_restarts)) from None
        with result.checkpoint.as_directory() as folder:
            weights = Path(folder) / _WEIGHTS
            return TrialOutcome.from_json(json.loads((Path(folder) / _OUTCOME).read_text()),
                                          weights.read_bytes() if weights.exists() else None)
    finally:
        _remove(storage, name)
        if task.checkpoints is None:
            shutil.rmtree(storage, ignore_errors=True)


def _trainer_class() -> type:
    """Ray Train's TorchTrainer; on a Ray without a dashboard (the local Ray a driver starts, see
    study/cluster.py), without the placement-group cleaner Ray Train adds to every run.

    The cleaner watches the run's controller through Ray's State API, which the dashboard serves:
    with no dashboard it can watch nothing, and stopping it at the end of the run waits out its
    timeout, 12 s a trial. Without one, a Ray that dies with its driver has nothing to clean.
    (Where Ray names its default callbacks otherwise, the override changes nothing.)"""
    from ray.experimental import internal_kv
    from ray.train.torch import TorchTrainer

    if internal_kv._internal_kv_get("dashboard", namespace="dashboard") is not None:
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):  # Ray Train's own method, overridden
            return [callback for callback in super()._create_default_callbacks()
                    if type(callback).__name__ != "PlacementGroupCleanerCallback"]

    return Trainer


def _failed_in_code(task: TrialTask, error: Exception) -> TrialOutcome | None:
    """The failed outcome of a run whose replicas raised in the trial's code (an error, not a
    lost process: Ray Train restarted it all the same), else None."""
    from ray.exceptions import RayError

    failures = getattr(error, "worker_failures", None) or {}
    raised = sorted((rank, f) for rank, f in failures.items() if not isinstance(f, RayError))
    if not raised:
        return None
    rank, failure = raised[0]
    # Input that fails again the same way (wrong bytes in a replica's shard, no image, a wrong
    # size): not worth a retry of the trial, as a one-process trial's is not.
    deterministic = (CorruptShard, DataUnavailable, NoImages, SizeMisstated)
    status = Status.UNAVAILABLE if isinstance(failure, deterministic) else Status.FAILED
    return TrialOutcome(task.trial_number, status,
                        reason=f"{type(failure).__name__}: {failure} (replica {rank}, after "
                               f"{task.max_restarts} restart(s) of the data-parallel run)",
                        traceback="".join(traceback.format_exception(failure)))


def _why_lost(error: Exception, max_restarts: int) -> str:
    failures = getattr(error, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        first = (str(failure).strip().splitlines() or [type(failure).__name__])[0]
        return f"replica {rank} lost {max_restarts + 1} time(s): {first}"
    first = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return f"the data-parallel run lost its replicas {max_restarts + 1} time(s): {first}"


def _remove(storage: str, name: str) -> None:
    """Delete a finished trial's checkpoints and marks of its starts (a local folder, or under a
    URI)."""
    if "://" not in storage:
        for folder in (name, f"{name}.starts"):
            shutil.rmtree(Path(storage) / folder, ignore_errors=True)
        return
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(storage)
    for folder in (name, f"{name}.starts"):
        try:
            filesystem.delete_dir(f"{root.rstrip('/')}/{folder}")
        except OSError:
            pass  # already gone, or not ours to delete: the outcome is what matters


def note_start(starts: str) -> int:
    """Mark one start of a run's replicas in the folder `starts` (a local path or a URI); how
    many starts were marked before this one (0 for the run's first)."""
    import pyarrow.fs

    filesystem, root = pyarrow.fs.FileSystem.from_uri(starts)
    filesystem.create_dir(root, recursive=True)
    before = len(filesystem.get_file_info(pyarrow.fs.FileSelector(root)))
    with filesystem.open_output_stream(f"{root}/{uuid.uuid4().hex}"):
        pass
    return before


def load_state(folder: Path) -> dict[str, Any]:
    """An epoch's checkpoint (`_STATE` in `folder`): tensors and plain values only, loaded with
    `weights_only=True`; CheckpointRefused, naming the file, for one holding anything else."""
    path = folder / _STATE
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointRefused(f"checkpoint {path} holds more than tensors and plain values; "
                                f"refusing to load it, as loading could run code ({first[:160]})"
                                ) from None
    if not isinstance(saved, dict) or not {"train", "resumed_after"} <= set(saved):
        raise CheckpointRefused(f"checkpoint {path} is not a data-parallel run's state")
    return saved


def _replica(config: dict[str, Any]) -> None:
    """One replica's part of the run (in a Ray Train worker, inside its process group)."""
    from ray.train import Checkpoint, get_checkpoint, report
    from ray.train.torch import get_device

    task: TrialTask = config["task"]
    replicas = Replicas.of_process_group()
    device = get_device() if task.use_gpu else torch.device("cpu")
    # Starts before this one: restarts, each recorded by the epoch it resumed after.
    earlier_starts = note_start(config["starts"]) if replicas.leader else 0
    resume, resumed_after = None, [0] * earlier_starts
    checkpoint = get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            if (Path(folder) / _OUTCOME).exists():
                return  # restarted after its last report: the run is over, its outcome kept
            saved = load_state(Path(folder))
        resume = saved["train"]
        resumed_after = [*saved["resumed_after"], len(resume["history"])]

    def on_checkpoint(state: dict[str, Any]) -> None:
        with tempfile.TemporaryDirectory() as folder:
            if replicas.leader:
                torch.save({"train": state, "resumed_after": resumed_after},
                           Path(folder) / _STATE)
            report({"epoch": len(state["history"])},
                   checkpoint=Checkpoint.from_directory(folder) if replicas.leader else None)

    outcome = run_trial_body(task, config["board"], device, replicas=replicas, resume=resume,
                             on_checkpoint=on_checkpoint, resumed_after=tuple(resumed_after))
    _report_outcome(replicas, outcome)


def _report_outcome(replicas: Replicas, outcome: TrialOutcome) -> None:
    """The leader's last checkpoint holds the trial's outcome and its weights; every replica
    reports, as Ray Train wants."""
    from ray.train import Checkpoint, report

    with tempfile.TemporaryDirectory() as folder:
        if replicas.leader:
            (Path(folder) / _OUTCOME).write_text(json.dumps(outcome.to_json()))
            if outcome.weights is not None:
                (Path(folder) / _WEIGHTS).write_bytes(outcome.weights)
        report({"epoch": len(outcome.curves)},
               checkpoint=Checkpoint.from_directory(folder) if replicas.leader else None)
