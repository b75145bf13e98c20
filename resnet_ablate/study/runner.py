"""The study runner: the public face over the driver's parts (opening the store, the grid's
history, the loop), for `resnet-ablate run` and for Python."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from ..progress import StudyProgress
from ..record import FailureKind, Status, TrialKey, shown_state
from ..spec import SpecError, StudySpec
from ..storage import (ARTIFACTS_SUFFIX, CHECKPOINTS_SUFFIX, file_in_the_way, runs_folder,
                       sqlite_path, store_faults, study_file, weights_folder)
from . import cluster, grid
from .costs import StudyCosts
from .draws import stand_in
from .grid import GridHistory, PendingPoint, PlannedTrial
from .loop import DriverLoop, failures
from .recorder import TrialRecorder
from .signals import StopSignals, signals_held, stop_on_signals
from .lease import DriverLease
from .opening import check_store_folder, open_study, prepare_store_folder, read_study

# Recorded trials that budget.trials does not count, as a run counts them: a stop's (they run
# again), a failure that is tried again (the point counts once if it is given up), and a
# sampler's draws not trained (study/draws.py).
_NOT_COUNTED = (FailureKind.INTERRUPTED, *FailureKind.RETRYABLE, FailureKind.REPEAT,
                FailureKind.OVER_BUDGET)


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # a Ray cluster ("ray://host:10001" or "host:6379"); local if None
    storage: str | None = None  # overrides the spec's storage
    workers: int | None = None  # overrides resources.workers
    runs_dir: Path = field(default_factory=runs_folder)  # see storage.py
    keep_weights: bool = True
    max_artifact_mb: float = 2048.0  # the trained-weights store beside the study stops growing here
    progress: bool = True


@dataclass(frozen=True)
class RunSummary:
    study: str
    storage: str
    completed: int
    failed: int
    pruned: int
    launched: int
    interrupted: str  # "" for a run that ended by itself, else "SIGINT", "SIGTERM" or "SIGHUP"
    wall_seconds: float
    counts_by_state: Mapping[str, int] = field(default_factory=dict)
    marked_interrupted: int = 0  # unfinished trials the stop marked interrupted


class StudyRunner:
    """Runs one spec's study to completion (or budget), resuming whatever its store holds."""

    def __init__(self, spec: StudySpec, options: RunOptions = RunOptions()) -> None:
        self.spec = spec
        self.options = options
        self.storage = options.storage or spec.storage_url(options.runs_dir)
        self.workers = options.workers or spec.resources.workers
        self.costs = StudyCosts(spec)
        self._study: optuna.Study | None = None

    @property
    def study(self) -> optuna.Study:
        """The study in its store, created on first use (a dry run reads it: read_study)."""
        if self._study is None:
            prepare_store_folder(self.storage)
            self._study = open_study(self.spec, self.storage)
        return self._study

    def _existing_trials(self) -> list[optuna.trial.FrozenTrial]:
        if self._study is None:
            database = sqlite_path(self.storage)
            if database is not None and not database.exists():
                return []  # opening it would create the file
            with store_faults(self.storage):
                names = [s.study_name for s in optuna.get_all_study_summaries(self.storage)]
            if self.spec.study not in names:
                return []
            return read_study(self.spec, self.storage).get_trials(deepcopy=False)
        return self._study.get_trials(deepcopy=False)

    @property
    def checkpoints(self) -> str:
        """Where data-parallel trials keep their checkpoints: the spec's folder or URI, else
        <study>.checkpoints beside the store."""
        folder = weights_folder(self.storage, self.options.runs_dir)
        return self.spec.checkpoints or str(
            study_file(self.spec.study, CHECKPOINTS_SUFFIX, folder).resolve())

    def check_checkpoints(self) -> None:
        """Refuse a checkpoint folder that cannot be one (a file, or under a file) before anything
        runs: every replica would fail to write there and each attempt be lost."""
        if self.spec.resources.replica_count < 2 or "://" in self.checkpoints:
            return
        path = Path(self.checkpoints).expanduser()
        blocking = path if path.exists() and not path.is_dir() else file_in_the_way(path)
        if blocking is not None:
            named = "checkpoints" if self.spec.checkpoints else "the default checkpoints folder"
            raise SpecError(f"{self.spec.source}: checkpoints: {named} {path} cannot be a folder: "
                            f"{blocking} is a file; name a folder every node sees (or a URI)")

    def plan(self) -> list[PlannedTrial]:
        """Every grid point x seed with its cost and status; nothing is trained or written. The
        data set is checked as a run would check it; the GPUs are not: a plan is made on a
        machine other than the one it is for (`gpu_shortfall` says whether this one would do)."""
        check_store_folder(self.storage)
        self.check_checkpoints()
        self.costs.check_dataset()
        trials, history = self._recorded()
        return grid.plan(self.spec, history, self.costs, self._trials_left(trials, history),
                         grid.outlook(self.spec, trials, history, self.costs))

    def gpu_shortfall(self) -> str | None:
        """Why a run of this study here would be refused for want of GPUs (None: it would not,
        or it runs on a cluster, whose GPUs are checked once connected)."""
        return None if self.options.address else cluster.local_gpu_shortfall(self.spec)

    def oversubscription(self) -> str | None:
        """The warning a run here prints where its local Ray would give the trials more CPUs
        than this machine's cores (None: it would not, or it runs on a cluster)."""
        return None if self.options.address else cluster.oversubscribed(self.spec, self.workers)

    def trials_left(self) -> float:
        """How many trials budget.trials still allows this study (inf: no bound), counted as a
        run counts them; nothing is written."""
        check_store_folder(self.storage)
        return self._trials_left(*self._recorded())

    def nothing_to_draw(self) -> str | None:
        """Why a sampler's run would end before training anything, its space covered or over
        budget.max_gflops (draws.stand_in's reason), or None; nothing is written."""
        check_store_folder(self.storage)
        found = stand_in(self.spec, self._existing_trials(), 0, self.costs)
        return found if isinstance(found, str) else None

    def _recorded(self) -> tuple[list[optuna.trial.FrozenTrial], GridHistory]:
        """The study's recorded trials and their history, read without writing the store."""
        trials = self._existing_trials()
        return trials, GridHistory(self.spec, trials)

    def run(self) -> RunSummary:
        started = time.monotonic()
        # A bad store, a missing data set or a cluster without the GPUs asked for stops the run
        # here, before Ray starts or the store is written.
        self.check_checkpoints()
        self.costs.check_dataset()
        if self.options.address:
            cluster.check_address(self.options.address)
        else:
            cluster.check_local_gpus(self.spec)
        self.study  # opened (or created) and checked to be this spec's study
        # From here a stop signal is noted and acted on where it is safe (signals.py). Ray starts
        # with signals held (one started halfway would be left to outlive this process), and a
        # local Ray of our own is stopped before returning, so that none of its processes
        # outlives the command.
        with stop_on_signals() as stop_signals:
            with signals_held():
                own_ray = cluster.connect(self.spec, self.options.address, self.workers)
            try:
                with store_faults(self.storage):
                    summary = self._run(started, stop_signals)
            finally:
                if own_ray:
                    with signals_held():
                        cluster.disconnect()
        # A signal heard while Ray stopped stops the command as well (no table).
        if summary.interrupted or stop_signals.heard is None:
            return summary
        return dataclasses.replace(summary, interrupted=stop_signals.heard)

    def _run(self, started: float, stop_signals: StopSignals) -> RunSummary:
        lease = DriverLease(self.study, self.storage)
        lease.acquire()  # before touching trials: another live driver's are not interrupted
        try:
            folder = weights_folder(self.storage, self.options.runs_dir)
            progress = StudyProgress(self.spec.study, enabled=self.options.progress)
            recorder = TrialRecorder(
                self.study, self.spec, artifacts=study_file(self.spec.study, ARTIFACTS_SUFFIX, folder),
                store_folder=folder, max_artifact_mb=self.options.max_artifact_mb,
                store=self.storage, log=progress.warn)
            crowded = self.oversubscription()
            if crowded:
                print(crowded, file=sys.stderr, flush=True)
            recovered = recorder.recover_interrupted()
            recorder.remove_partial_weights()
            if recovered.ended:
                progress.log(f"ended {recovered.ended} trial(s) of an interrupted run as they "
                             "were recorded before it stopped (not run again)")
            if recovered.interrupted:
                progress.log(f"marked {recovered.interrupted} trial(s) of an interrupted run "
                             "interrupted; resuming (they run again)")
            trials = self.study.get_trials(deepcopy=False)
            kept = sum(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
            if kept:
                progress.log(f"resuming: {kept} completed trial(s) of this study kept, not run "
                             "again")
            history = GridHistory(self.spec, trials)
            pending, left = self._work_left(trials, history)
            minutes = self.spec.budget.minutes
            loop = DriverLoop(
                self.spec, study=self.study, recorder=recorder, costs=self.costs, history=history,
                pending=pending, to_ask=left, workers=self.workers,
                deadline=started + 60 * minutes if minutes else math.inf,
                keep_weights=self.options.keep_weights,
                checkpoints=self.checkpoints,
                progress=progress,
                renew_lease=lease.renew, stop_signals=stop_signals)
            result = loop.run()
            if not self.spec.checkpoints:  # the default folder, left empty by finished trials
                with contextlib.suppress(OSError):
                    study_file(self.spec.study, CHECKPOINTS_SUFFIX, folder).rmdir()
        except Exception:
            lease.check_same_file()  # the reason behind a database error, where the file went away
            raise
        finally:
            with signals_held():
                lease.release()
        states = Counter(shown_state(t) for t in self.study.get_trials(deepcopy=False))
        return RunSummary(
            study=self.spec.study, storage=self.storage, completed=result.counts[Status.COMPLETED],
            failed=failures(result.counts), pruned=result.counts[Status.PRUNED],
            launched=result.launched,
            # A signal heard after the loop's last turn still stops the command (no table).
            interrupted=result.interrupted or stop_signals.heard or "",
            wall_seconds=time.monotonic() - started, counts_by_state=dict(states),
            marked_interrupted=result.marked)


    def _work_left(self, trials: list[optuna.trial.FrozenTrial],
                   history: GridHistory) -> tuple[list[PendingPoint], float]:
        """The grid points still to run (grid studies; a sampler's: its trials to run again),
        and how many trials may still be asked (inf: no bound). Trials an interrupted run left
        do not count against budget.trials."""
        left = self._trials_left(trials, history)
        sampled = self.spec.sampler != "grid"
        pending = grid.unfinished_points(self.spec, history, trials, self.costs) if sampled \
            else grid.pending_points(self.spec, history, self.costs)
        if left != math.inf:
            pending = pending[: max(0, int(left))]
        return pending, left if sampled else len(pending)

    def _trials_left(self, trials: list[optuna.trial.FrozenTrial],
                     history: GridHistory) -> float:
        """How many trials budget.trials still allows (inf: no bound), counted as a run counts
        them (_NOT_COUNTED): a resumed run trains as many as one run would have."""
        budget = self.spec.budget.trials
        if budget is None:
            return math.inf
        return budget - len(history.given_up_points()) - sum(1 for t in trials if t.user_attrs.get(
            TrialKey.FAILURE_KIND) not in _NOT_COUNTED)


def run_study(spec: StudySpec, options: RunOptions = RunOptions()) -> RunSummary:
    """Run (or resume) the study a spec describes; see study/loop.py for fault handling."""
    return StudyRunner(spec, options).run()


def plan_study(spec: StudySpec, options: RunOptions = RunOptions()) -> list[PlannedTrial]:
    """The trials a grid study would run, with parameters, FLOPs and cost; nothing is trained."""
    return StudyRunner(spec, options).plan()


def trials_left(spec: StudySpec, options: RunOptions = RunOptions()) -> float:
    """How many more trials budget.trials allows the spec's study, as a resumed run counts them
    (inf: no bound): what a sampler's dry run says, where it can list no trials."""
    return StudyRunner(spec, options).trials_left()
