"""One run of the driver: fill free workers with trials, collect the trials that ended, show
progress; until the grid is done, the budget spent, or the run is stopped. A worker's task is one
trial, or with resources.stack_seeds a stack of one grid point's ready seeds trained as one model
(trial.py's run_stacked_body), each seed asked, reported and recorded as a trial of its own.

Faults, and what this loop makes of them:
- an exception in a trial comes back as a failed outcome: recorded with its traceback, and the study
  goes on (the grid point is tried again, up to `max_attempts`, after a back-off);
- a killed worker surfaces as a Ray error: recorded as failed ("worker lost") and retried;
- Ctrl-C, SIGTERM or SIGHUP cancel the running tasks and mark their trials interrupted (FAIL), so
  the store stays consistent and the same command resumes; the signal is acted on at the loop's
  next turn or, where the loop waits for Ray, at once, and further signals wait until the marking is
  done (signals.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import optuna
import ray

from ..arch import ResNetArch
from ..progress import StudyProgress
from ..record import FailureKind, Status, TrialKey, TrialTask
from ..spec import StudySpec
from ..spec.sections import trial_threads
from . import cluster
from .costs import StudyCosts
from .eta import RemainingTime
from .draws import stand_in
from .grid import GridHistory, PendingPoint, look, take_ready
from .recorder import TrialRecorder
from .signals import StopSignals, heard_in, signals_held
from .space import decode_params, prunes
from .standing import best_so_far

POLL_SECONDS = 0.1  # a short wait keeps pruning decisions and the display close to the workers


@dataclass
class RunningTrial:
    trial: optuna.Trial
    point: PendingPoint | None  # the grid point it runs; None where the sampler chose
    arch: ResNetArch
    seed: int
    started: float = field(default_factory=time.monotonic)
    epochs_done: int = 0
    # Its outcome is recorded: a stacked seed whose run ended while its stack trains on.
    recorded: bool = False

    def point_in(self, spec: StudySpec) -> PendingPoint:
        """Its grid point, or the configuration the sampler chose, with its seed."""
        return self.point or PendingPoint(decode_params(self.trial.params, spec.space), self.seed)

    def end_line(self, result: str) -> str:
        """The progress line of its end other than completed (`result`), with the reason."""
        attrs = self.trial.user_attrs
        why = attrs.get(TrialKey.FAILURE) or attrs.get(TrialKey.PRUNED)
        return f"trial {self.trial.number} ({self.arch.name}, seed {self.seed}) {result}: {why}"


@dataclass
class LoopResult:
    counts: Counter[str]  # Status.COMPLETED, Status.PRUNED and each failure kind, this run
    launched: int
    interrupted: str  # "" for a run that ended by itself, else "SIGINT", "SIGTERM" or "SIGHUP"
    marked: int = 0  # unfinished trials the stop marked interrupted (stored as FAIL)


def trial_task(spec: StudySpec, number: int, arch: ResNetArch, seed: int, *,
               keep_weights: bool, checkpoints: str | None) -> TrialTask:
    """What the worker of trial `number` is sent: `arch` trained with `seed` as `spec` says."""
    return TrialTask(
        trial_number=number, arch=arch.to_dict(), seed=seed,
        dataset=spec.dataset.load_kwargs(), recipe=spec.recipe_for(arch).to_dict(),
        threads=trial_threads(spec.resources.cpus),
        use_gpu=spec.resources.gpus > 0,
        keep_weights=keep_weights, await_pruner=prunes(spec),
        replicas=spec.resources.replica_count, cpus_per_replica=spec.resources.cpus,
        checkpoints=checkpoints, max_restarts=spec.max_restarts,
    )


class DriverLoop:
    """One run of the driver over the work `runner.py` found left: the pending grid points (or
    the sampler's trials) launched as workers free up, each ended trial recorded, until the work,
    the trial budget or the time budget is spent, or the run is stopped."""

    def __init__(self, spec: StudySpec, *, study: optuna.Study, recorder: TrialRecorder,
                 costs: StudyCosts, history: GridHistory, pending: list[PendingPoint],
                 to_ask: float, workers: int, deadline: float, keep_weights: bool,
                 checkpoints: str, progress: StudyProgress, renew_lease: Callable[[], None],
                 stop_signals: StopSignals) -> None:
        self.spec = spec
        self.study = study
        self.recorder = recorder
        self.costs = costs
        self.history = history
        self.pending = pending  # grid points still to run (grid studies)
        self.to_ask = to_ask  # trials that may still be asked (inf: no bound)
        self.workers = workers
        self.deadline = deadline
        self.keep_weights = keep_weights
        self.checkpoints = checkpoints  # where data-parallel trials keep theirs
        self.progress = progress
        self.renew_lease = renew_lease
        self.stop_signals = stop_signals
        # Each task's trials: one, or a stack of one grid point's seeds (resources.stack_seeds).
        self.running: dict[ray.ObjectRef, list[RunningTrial]] = {}
        self.counts: Counter[str] = Counter()
        self.remaining_time = RemainingTime(spec, costs, workers)
        self._archs: dict[str, ResNetArch] = {}  # pending grid points' architectures, by key
        self._closed_said: set[Any] = set()  # configurations the adaptive rule closed, told of
        self.launched = 0
        self.board: Any = None
        self.best: str | None = None

    def run(self) -> LoopResult:
        self.board = cluster.new_board()
        self.best = best_so_far(self.spec, self.study)
        interrupted, marked = "", 0
        try:
            while True:
                self.stop_signals.raise_if_heard()
                self.fill()
                if not self.running:
                    if not self.pending:
                        self._add_open_seeds()
                    if not self.pending or time.monotonic() >= self.deadline:
                        break
                    time.sleep(0.2)  # retries wait out their back-off
                    continue
                self.collect()
                self.show_progress()
        except KeyboardInterrupt as stop:
            # The signal the handler heard: an exception raised inside ray.wait comes out of it
            # as a plain KeyboardInterrupt, whichever signal raised it.
            interrupted = self.stop_signals.settle() or heard_in(stop)
            marked = self._stop(stop_description(interrupted))
        finally:
            self.progress.close()
            ray.kill(self.board)
        return LoopResult(self.counts, self.launched, interrupted, marked)

    # -- the three steps

    def fill(self) -> None:
        """Launch trials (or stacks of a grid point's seeds) while a worker is free, trials may
        be asked and time is left. A sampler's study runs its trials to run again (a failure
        tried again, a trial a stop interrupted) before it asks for new ones."""
        while len(self.running) < self.workers and self.to_ask > 0 \
                and time.monotonic() < self.deadline:
            points = self._next_ready_points() if self.spec.sampler == "grid" or self.pending \
                else [None]  # [None]: the sampler's configuration, with its next seed
            if not points:
                return
            self.to_ask -= len(points)
            self.launched += len(points)
            self._launch(points)

    def collect(self) -> None:
        """Wait briefly for an ended trial; pass reported epochs on; record what ended."""
        with self.stop_signals.interruptible():
            done, _ = ray.wait(list(self.running), num_returns=1, timeout=POLL_SECONDS)
        self.renew_lease()
        self._report_epochs()
        for ref in done:
            # Heard meanwhile: the stop marks what is left (a worker that a Ctrl-C to the process
            # group ended is interrupted, not failed).
            self.stop_signals.raise_if_heard()
            self._record_end(ref, self.running.pop(ref))

    def show_progress(self) -> None:
        running = _unrecorded(self.running.values())
        epochs = ", ".join(f"{r.epochs_done}/{self.spec.recipe_for(r.arch).epochs}"
                           for r, _ in running)
        left = None if self.to_ask == math.inf else int(self.to_ask)  # None: time alone bounds
        self.progress.update(
            done=self.counts[Status.COMPLETED], running=len(running),
            failed=failures(self.counts), remaining=left, best=self.best,
            eta_seconds=_time_to(self.deadline) if left is None else
            self.remaining_time.seconds_left((self._arch_of(p) for p in self.pending),
                                             _progress_of(running),
                                             unknown=max(0, left - len(self.pending))),
            epochs=f" (epochs {epochs})" if running else "",
        )

    # -- their parts

    def _arch_of(self, point: PendingPoint) -> ResNetArch:
        if point.key not in self._archs:
            self._archs[point.key] = self.spec.arch(decode_params(point.params, self.spec.space))
        return self._archs[point.key]

    def _add_open_seeds(self) -> None:
        """Adaptive seeds: every started trial has ended, so the grid points whose question is
        still open get their next seed, each open or newly closed one said (grid.look)."""
        added, lines = look(self.spec, self.study.get_trials(deepcopy=False), self.costs,
                            self._closed_said)
        for line in lines:
            self.progress.log(line)
        self.pending.extend(added)
        self.to_ask += len(added)  # adaptive seeds have no budget.trials (spec/parse.py)

    def _next_ready_points(self) -> list[PendingPoint]:
        """The next ready grid point, with (resources.stack_seeds) ready seeds of it, taken off
        `pending` (grid.take_ready)."""
        return take_ready(self.pending, int(min(self.spec.resources.stack_seeds, self.to_ask)))

    def _launch(self, points: list[PendingPoint | None]) -> None:
        """One task for the trials of `points` (grid points of one configuration, their seeds
        stacked where there are several), or with [None] one trial of the sampler's choice with
        its configuration's first free seed. A draw that cannot be trained (its seeds all spent,
        or over budget.max_gflops) is recorded, and another configuration stands in (draws.py)."""
        running = []
        for point in points:
            trial = self.recorder.ask(None if point is None else point.params,
                                      None if point is None else point.seed)
            arch = self.spec.arch(decode_params(trial.params, self.spec.space))
            if point is None and not self.recorder.seed_draw(
                    trial, self.costs.profile(arch) if self.costs.over_budget(arch) else None):
                return self._stand_in(trial)
            running.append(RunningTrial(trial, point, arch, trial.user_attrs[TrialKey.SEED]))
        # (Pending points are within budget.max_gflops: grid.pending_points, unfinished_points
        # and more_seeds leave out those over it.)
        arch = running[0].arch  # one configuration: one architecture
        prof = self.costs.profile(arch)
        for r in running:
            self.recorder.record_launch(r.trial, arch, prof)
        first = running[0]
        task = trial_task(self.spec, first.trial.number, arch, first.seed,
                          keep_weights=self.keep_weights, checkpoints=self.checkpoints)
        if len(running) > 1:
            task = dataclasses.replace(task, stack=tuple((r.trial.number, r.seed)
                                                         for r in running))
        self.running[cluster.launch(self.spec, task, self.board)] = running

    def _stand_in(self, drawn: optuna.Trial) -> None:
        """A sampler's draw not trained does not count against budget.trials: a configuration
        with a seed left trains in its place, or, where none is left, the run ends."""
        self.launched -= 1
        point = stand_in(self.spec, self.study.get_trials(deepcopy=False), drawn.number,
                         self.costs)
        self.to_ask = 0 if isinstance(point, str) else self.to_ask + 1
        if isinstance(point, str):
            self.progress.log(point)
        else:
            self.pending.append(point)

    def _report_epochs(self) -> None:
        drained = cluster.drain_epochs(self.board, self.stop_signals.interruptible)
        if drained is None:
            # Running trials lose progress and pruning (they train on); new ones get a new board.
            self.board = cluster.new_board()
            return
        by_number = {r.trial.number: r for trials in self.running.values() for r in trials}
        for number, records in drained.items():
            running = by_number.get(number)
            # Recorded already: a stacked seed whose end came in with (or before) its last epoch.
            if running is None or running.recorded:
                continue
            # A data-parallel trial that resumed from a checkpoint reports its later epochs again.
            records = [r for r in records if r.epoch > running.epochs_done]
            if not records:
                continue
            running.epochs_done = records[-1].epoch
            cluster.report_to_pruner(self.spec, self.board, running.trial, records,
                                     prunes(self.spec))
        self._record_early_ends(self.stop_signals.interruptible)

    def _record_early_ends(self, waiting: Callable[[], Any] = contextlib.nullcontext) -> None:
        """Record stacked seeds that ended (diverged, pruned) while their stacks train on, so a
        stop or lost worker keeps them; the board is asked only while a stack runs."""
        stacks = [trials for trials in self.running.values() if len(trials) > 1]
        ended = cluster.drain_ended(self.board, waiting) if stacks else {}
        for trials in stacks:
            for running in trials:
                outcome = ended.get(running.trial.number)
                if outcome is not None and not running.recorded:
                    running.recorded = True
                    self._ended(running, self.recorder.finish(running.trial, outcome),
                                len(trials))

    def _record_end(self, ref: ray.ObjectRef, trials: list[RunningTrial]) -> None:
        """Record the outcome of each of a task's trials (a stack's: one outcome each)."""
        try:
            outcomes = ray.get(ref)
        except ray.exceptions.RayError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            for running in trials:
                if running.recorded:
                    continue
                self.recorder.fail(running.trial, FailureKind.WORKER_LOST,
                                   f"worker lost: {type(error).__name__}: {reason}")
                self._ended(running, FailureKind.WORKER_LOST, len(trials))
            return
        if not isinstance(outcomes, list):
            outcomes = [outcomes]
        for running, outcome in zip(trials, outcomes, strict=True):
            if not running.recorded:
                self._ended(running, self.recorder.finish(running.trial, outcome), len(trials))

    def _ended(self, running: RunningTrial, result: str, stacked: int) -> None:
        """What follows a trial's end: the tally, a retry, the best, a line."""
        self.counts[result] += 1
        # A stack's seeds share its time: each trial's share of it, and of the work done.
        epochs = self.spec.recipe_for(running.arch).epochs if result == Status.COMPLETED \
            else running.epochs_done
        self.remaining_time.ended(running.arch, (time.monotonic() - running.started) / stacked,
                                  epochs)
        retry = self.history.retry(running.point_in(self.spec)) \
            if result in FailureKind.RETRYABLE else None
        if retry is not None:
            self.pending.append(retry)
            self.to_ask += 1
        if result == Status.COMPLETED:
            self.best = best_so_far(self.spec, self.study)
        else:
            self.progress.log(running.end_line(result))

    def _stop(self, how: str) -> int:
        """Cancel what runs and mark its trials, holding further signals until that is done; how
        many were marked (the command says so, on one line)."""
        with signals_held():
            for ref in self.running:
                ray.cancel(ref, force=True)
            self._record_early_ends()  # those that ended since the last look
            return self.recorder.mark_unfinished(how)


def _time_to(deadline: float) -> float | None:
    """A run bounded by time alone: its ETA is the time to its deadline (the line read "ETA
    0:00" all along); None without one."""
    return None if deadline == math.inf else max(0.0, deadline - time.monotonic())


def _unrecorded(stacks: Iterable[list[RunningTrial]]) -> list[tuple[RunningTrial, int]]:
    """The running trials not yet recorded, each with its stack's size (its seeds share its
    time)."""
    return [(r, len(trials)) for trials in stacks for r in trials if not r.recorded]


def _progress_of(running: list[tuple[RunningTrial, int]]
                 ) -> list[tuple[ResNetArch, int, float]]:
    """What the ETA takes of each running trial: its architecture, its epochs done and the
    seconds it has run (its share of its stack's)."""
    now = time.monotonic()
    return [(r.arch, r.epochs_done, (now - r.started) / stacked) for r, stacked in running]


def stop_description(signal_name: str) -> str:
    """How a stop signal is named in the trials it interrupted and in the command's message."""
    return "the user (Ctrl-C)" if signal_name == "SIGINT" else signal_name


def failures(counts: Counter[str]) -> int:
    return sum(n for outcome, n in counts.items() if outcome not in Status.NOT_FAILURES)
