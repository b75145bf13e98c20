"""The mailbox between running trials and the driver: each finished epoch's record goes in, the
pruner's verdict on it comes out; and the outcome of a stacked seed whose run ended while its
stack trains on (`report_end`), which the driver records then, not when the stack ends. Ray only,
no torch: the driver creates the board (study/cluster.py) and every trial, in one process or as
replicas, reports to it (`report_epoch`)."""

from __future__ import annotations

import time
from typing import Any

import ray

from .record import EpochRecord, TrialOutcome, TrialTask


class PrunedByDriver(Exception):
    """The driver's pruner stopped this trial after an epoch."""


PRUNER_WAIT_SECONDS = 120.0  # past this a trial stops waiting for a verdict and trains on


@ray.remote(num_cpus=0)
class TrialBoard:
    """Mailbox between running trials and the driver: epoch records in, verdicts out."""

    def __init__(self) -> None:
        self._new: dict[int, list[EpochRecord]] = {}
        self._stop: set[int] = set()
        self._judged: dict[int, int] = {}  # the last epoch of each trial the driver has seen
        self._ended: dict[int, TrialOutcome] = {}

    def report(self, trial_number: int, record: EpochRecord) -> bool:
        """Store an epoch record; True when the driver asked this trial to stop."""
        self._new.setdefault(trial_number, []).append(record)
        return trial_number in self._stop

    def drain(self) -> dict[int, list[EpochRecord]]:
        new, self._new = self._new, {}
        return new

    def end(self, outcome: TrialOutcome) -> None:
        """Store the outcome of a stacked seed whose run ended before its stack's."""
        self._ended[outcome.trial_number] = outcome

    def drain_ended(self) -> dict[int, TrialOutcome]:
        ended, self._ended = self._ended, {}
        return ended

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


def report_epoch(task: TrialTask, board: Any | None, record: EpochRecord) -> bool:
    """Send an epoch's record to the driver's board; True when the driver wants the trial
    stopped (after waiting for its verdict, with a pruner)."""
    if board is None:
        return False
    try:
        stop = ray.get(board.report.remote(task.trial_number, record))
        # Not after the last epoch: the trial has finished, and a pruner's verdict on its final
        # error would only select among finished results (the driver does not judge it).
        if task.await_pruner and record.epoch < task.recipe["epochs"]:
            deadline = time.monotonic() + PRUNER_WAIT_SECONDS
            while (stop := ray.get(board.verdict.remote(task.trial_number, record.epoch))) is None \
                    and time.monotonic() < deadline:
                time.sleep(0.02)
    except ray.exceptions.RayError:
        return False  # the mailbox was lost with its node: no progress or pruning, training goes on
    return bool(stop)


def report_end(board: Any | None, outcome: TrialOutcome) -> None:
    """Send the driver the outcome of a stacked seed whose run has ended (diverged, or stopped
    by the pruner) while its stack trains on: recorded at once, it survives the stack's end by
    a stop signal or a lost worker. The stack's own outcomes hold it too, should the board be
    unreachable."""
    if board is None:
        return
    try:
        ray.get(board.end.remote(outcome))
    except ray.exceptions.RayError:
        pass  # the mailbox was lost with its node: the stack's outcomes still carry it

