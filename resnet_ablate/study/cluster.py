"""Ray wiring: joining or starting the cluster, launching trials on it, and the mailbox through
which running trials report epochs and hear the pruner's verdicts."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

import optuna
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ..board import TrialBoard
from ..record import PRUNABLE_OBJECTIVES, EpochRecord, TrialOutcome, TrialTask, epoch_objective
from ..spec import StudySpec
from .cores import usable_cores
from .signals import StopRequested, handlers_kept


class ClusterError(RuntimeError):
    """The Ray cluster cannot give trials what the spec asks for."""


_SINGLE_NODE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Within: a local Ray takes 127.0.0.1 as its node's address, and then its servers (GCS,
    raylet, workers) listen on loopback only, not on every interface. Ray decides that from its
    single-node switch, an environment variable read once at import (so the process's copy is
    set too) and inherited by the processes it starts. A cluster run must not have it: other
    nodes have to reach the driver."""
    from ray._private import ray_constants

    previous = os.environ.get(_SINGLE_NODE), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_NODE] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if previous[0] is None:
            os.environ.pop(_SINGLE_NODE, None)
        else:
            os.environ[_SINGLE_NODE] = previous[0]
        ray_constants.ENABLE_RAY_CLUSTER = previous[1]


@contextlib.contextmanager
def _stderr_aside() -> Iterator[None]:
    """Within: what anything in this process (C++ included) writes to stderr goes to a temporary
    file, dropped afterwards."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as aside:
            os.dup2(aside.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
    finally:
        os.close(saved)


def check_address(address: str, timeout: float = 5.0) -> None:
    """ClusterError unless something listens at a Ray address ("host:port" or "ray://host:port").
    Checked before joining: Ray itself retries an unreachable address for minutes in silence."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"--address {address!r} is not a Ray address; expected HOST:6379 (the "
                           "head node's GCS) or ray://HOST:10001 (Ray Client)")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ClusterError(f"no Ray cluster answers at {address} ({error.strerror or error}); "
                           "start one with `ray start --head`, or leave --address out to run on "
                           "a local Ray") from None


def connect(spec: StudySpec, address: str | None, workers: int) -> bool:
    """Join the cluster at `address`, or start a local Ray of our own sized for `workers`;
    whether this call started a Ray (then `disconnect` stops it). The process's SIGTERM handler
    is left as it was (ray.init installs one that just exits)."""
    started = False
    if not ray.is_initialized():
        sigterm = signal.getsignal(signal.SIGTERM)
        try:
            if address:
                _join(address)
            else:
                _start_local(spec, workers)
                started = True
        except SystemExit as exit_:
            # ray.init's own SIGTERM handler ran (a SIGTERM taken by another thread than the one
            # holding signals runs it in this one): the stop it asked for, as SIGTERM stops a
            # study, with whatever of Ray had started stopped, not left to outlive us.
            ray.shutdown()
            if exit_.code != signal.SIGTERM:
                raise
            raise StopRequested("SIGTERM") from None
        except BaseException:
            ray.shutdown()  # a Ray started halfway
            raise
        finally:
            if threading.current_thread() is threading.main_thread() and sigterm is not None:
                signal.signal(signal.SIGTERM, sigterm)
    _cluster_messages_on_stderr()
    try:
        _check_gpus(spec)
    except ClusterError:
        if started:
            disconnect()
        raise
    return started


def _cluster_messages_on_stderr() -> None:
    """Ray's driver prints the cluster's error messages ("(raylet) A worker died or was killed
    ...") on stdout, where `run` prints its table: on stderr instead (the driver records such a
    loss itself, as worker_lost). Where this Ray prints them otherwise, nothing changes."""
    from ray._private import worker

    printing = getattr(worker, "print_to_stdstream", None)
    if printing is None or getattr(printing, "to_stderr", False):
        return

    def on_stderr(data: dict[str, Any], ignore_prefix: bool) -> None:
        printing({**data, "is_err": True}, ignore_prefix)

    on_stderr.to_stderr = True  # type: ignore[attr-defined]
    worker.print_to_stdstream = on_stderr


def disconnect() -> None:
    """Stop the local Ray this process started: its GCS, raylet, agents and workers exit now
    (within about two seconds) rather than when the interpreter exits. A driver killed with
    SIGKILL runs nothing: then Ray's own fate-sharing stops the GCS and raylet at once, and its
    dashboard and runtime-env agents exit about 60 s later, when their last report to the gone
    GCS times out. Ray's shutdown sets SIGTERM's handler back to the default: the handlers are
    put back after it."""
    with handlers_kept():
        ray.shutdown()


def _join(address: str) -> None:
    check_address(address)
    try:
        # Ray's core logs each failed attempt to join, a line a second for 20 s: kept
        # aside, so that a refusal reads as one line.
        with _stderr_aside():
            ray.init(address=address, logging_level="ERROR", log_to_driver=False,
                     runtime_env=_worker_environment())
    except Exception as error:  # noqa: BLE001 - Ray raises many kinds; one line for each
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ClusterError(
            f"cannot join the Ray cluster at {address}: {reason}; if the cluster uses "
            "token authentication, set RAY_AUTH_MODE=token with its token in "
            "~/.ray/auth_token (or RAY_AUTH_TOKEN)") from None


def oversubscribed(spec: StudySpec, workers: int) -> str | None:
    """Why a local Ray sized for this spec would oversubscribe this machine's cores, or None:
    Ray takes the CPUs it is given on trust, and each trial runs `cpus` threads, so
    `workers x cpus` beyond the cores runs many times slower than fewer would."""
    cores = usable_cores()
    replicas = spec.resources.replica_count
    wanted = workers * spec.resources.cpus * replicas
    if not cores or wanted <= cores:
        return None
    times = f" x {replicas} replicas" if replicas > 1 else ""
    return (f"warning: {workers} worker(s) x resources.cpus={spec.resources.cpus:g}{times} = "
            f"{wanted:g} CPUs on a machine with {cores} core(s): trials will share cores, "
            f"slower than with fewer (resources.cpus x workers <= {cores})")


def _start_local(spec: StudySpec, workers: int) -> None:
    start_local_ray(max(1, math.ceil(workers * spec.resources.cpus * spec.resources.replica_count)))


def start_local_ray(cpus: int) -> None:
    """The Ray a driver starts when given no cluster: of its own (address="local", even where
    another one runs on this machine), `cpus` CPUs, listening on loopback only, no dashboard."""
    with _loopback_only(), _no_dashboard_process():
        ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                 logging_level="ERROR", log_to_driver=False)


@contextlib.contextmanager
def _no_dashboard_process() -> Iterator[None]:
    """Within: a local Ray starts no dashboard process. With include_dashboard=False Ray still
    starts one (about 90 MB) that serves only its usage statistics, and waits for it to come up;
    nothing of ours uses it. Ray offers no switch for that, so the head node's step that starts
    it is skipped (where this Ray version has it)."""
    from ray._private import node

    start = getattr(node.Node, "start_api_server", None)
    if start is None:
        yield
        return
    node.Node.start_api_server = lambda self, **kwargs: None
    try:
        yield
    finally:
        node.Node.start_api_server = start


def _check_gpus(spec: StudySpec) -> None:
    gpus_needed = _gpus_per_trial(spec)
    gpus = ray.cluster_resources().get("GPU", 0)
    if gpus_needed > 0 and gpus < gpus_needed:
        raise ClusterError(
            f"{spec.source}: a trial needs {gpus_needed:g} GPU(s) ({_asked(spec)}) but the Ray "
            f"cluster has {gpus:g}; ask for fewer, or set gpus: 0 to train on CPUs")


def _worker_environment() -> dict[str, Any] | None:
    """The runtime environment of this job's workers on a cluster we join: the driver's opt-in to
    `pipe:` shard URLs (data/shard_urls.py), which the cluster's workers would not inherit otherwise (a
    local Ray's workers inherit the driver's environment)."""
    from ..data.shard_urls import ALLOW_PIPE_URLS_ENV, pipe_urls_allowed

    return {"env_vars": {ALLOW_PIPE_URLS_ENV: "1"}} if pipe_urls_allowed() else None


def _gpus_per_trial(spec: StudySpec) -> float:
    """The GPUs one trial holds: a fraction or one, or one per replica of a data-parallel one."""
    replicas = spec.resources.replica_count
    return float(replicas) if replicas > 1 and spec.resources.gpus else min(spec.resources.gpus, 1)


def _asked(spec: StudySpec) -> str:
    nodes = spec.resources.nodes
    return f"resources.gpus={spec.resources.gpus:g}" + (f" x nodes={nodes}" if nodes > 1 else "")


def local_gpu_shortfall(spec: StudySpec) -> str | None:
    """Why a local Ray could not run the spec's trials for want of GPUs (None: it could), found
    as `connect` would find it, without starting one."""
    import torch

    needed, present = _gpus_per_trial(spec), torch.cuda.device_count()
    if needed <= present:
        return None
    return f"a trial needs {needed:g} GPU(s) ({_asked(spec)}) but this machine has {present}"


def check_local_gpus(spec: StudySpec) -> None:
    """Refuse a run on a local Ray that could not hold one trial, before anything starts."""
    shortfall = local_gpu_shortfall(spec)
    if shortfall is not None:
        raise ClusterError(f"{spec.source}: {shortfall}; set gpus: 0 to train on CPUs, or pass "
                           "--address of a Ray cluster that has them")


def launch(spec: StudySpec, task: TrialTask, board: Any) -> ray.ObjectRef:
    """Start one trial (or a stack of seeds: `task.stack`, whose task returns an outcome per
    seed) as a Ray task with the spec's resources per trial. A data-parallel
    trial's task holds none: it waits for its replicas, which hold them (data_parallel.py).
    The trial's code (torch, Ray Train) loads here, at the first launch, not with the driver."""
    if task.replicas > 1:
        from ..data_parallel import run_data_parallel_trial

        return run_data_parallel_trial.remote(task, board)
    from ..worker import run_stacked_trials, run_trial

    options: dict[str, Any] = {"num_cpus": spec.resources.cpus}
    if spec.resources.gpus:
        options["num_gpus"] = spec.resources.gpus
    remote = run_stacked_trials if task.stack else run_trial
    return remote.options(**options).remote(task, board)


def new_board() -> Any:
    """A trial mailbox on the driver's own node, so that losing a worker node keeps it."""
    return TrialBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node_id=ray.get_runtime_context().get_node_id(), soft=True)).remote()


def drain_epochs(board: Any, waiting: Any = contextlib.nullcontext) -> \
        dict[int, list[EpochRecord]] | None:
    """Per-epoch records the running trials reported since the last call, by trial number; None
    when the mailbox is unreachable (lost with its node). The wait for them runs within
    `waiting()` (the driver's: a stop signal may cut it short)."""
    try:
        reply = board.drain.remote()
        with waiting():
            return ray.get(reply)
    except ray.exceptions.RayError:
        return None


def drain_ended(board: Any, waiting: Any = contextlib.nullcontext) -> dict[int, TrialOutcome]:
    """The outcomes of stacked seeds that ended before their stacks since the last call, by
    trial number; none when the mailbox is unreachable (the stacks' own outcomes hold them)."""
    try:
        reply = board.drain_ended.remote()
        with waiting():
            return ray.get(reply)
    except ray.exceptions.RayError:
        return {}


def report_to_pruner(spec: StudySpec, board: Any, trial: optuna.Trial,
                     records: list[EpochRecord], prunes: bool) -> None:
    """Tell Optuna a trial's new epochs (single accuracy-type objective), and the trial the
    pruner's verdict on its latest one, but for its last: a trial that trained every epoch has
    finished, and pruning it then would drop a finished result for its final error."""
    if len(spec.objectives) == 1 and spec.objectives[0] in PRUNABLE_OBJECTIVES:
        for record in records:
            trial.report(epoch_objective(record, spec.objectives[0]), record.epoch)
    if prunes and records and records[-1].epoch < spec.train.epochs:
        board.judge.remote(trial.number, records[-1].epoch, trial.should_prune())
