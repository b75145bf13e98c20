"""A run's ETA, from the training work left rather than a count of trials.

A trial's work is its FLOPs per image times its epochs (the images per epoch are the study's, the
same for every trial). Trials of one study differ in it by up to 50x (ResNet-20 against 1202
layers), and the shallow ones finish first: a mean time per trial times the trials left said six
minutes for a study with half an hour to go. Here the work left (pending trials, and what running
ones have still to train) is divided by the rate at which ended trials did theirs; a running
trial has left its expected time less the time it has run.

A trial also takes time its work does not scale: its process's start, its data, its first
steps, and on small nets a per-step cost that FLOPs do not count. Once ended trials span
`SPREAD` in work, their seconds are fitted as `fixed + work / rate` (least squares): the
bottleneck-width study's trials took 21-94 s for 11x the work on a 2-CPU machine; replaying
their times, the work alone put the ETA at 1.3-2.6x the time left until its last few trials,
the fit within 11% of it from the tenth of its 24 trials to the twentieth. A fit whose rate
comes out negative (ended trials of nearly one size, noise) counts each trial as their mean
time; before any spread, the work alone.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ..arch import ResNetArch
from ..spec import StudySpec
from .costs import StudyCosts


# Ended trials' largest work over their smallest from which their time is fitted (below it, the
# fit's slope is mostly noise).
SPREAD = 1.3
# FIRST_TRIALS: the first trial each worker runs also starts it (its process, its imports: the
# quickstart's first two trials took 16 s, the next two of the same size 8 s), which no later
# trial pays; once as many trials again have ended, the first `workers` are left out of the fit
# (with them, the quickstart's ETA read 70 s with 51 s to go).


class RemainingTime:
    """Work done and its time, from ended trials; the seconds left for the work still to do."""

    def __init__(self, spec: StudySpec, costs: StudyCosts, workers: int) -> None:
        self.spec = spec
        self.costs = costs
        self.workers = max(1, workers)
        # Each ended trial's work (FLOPs x its epochs trained) and time (its own: a stack's
        # share).
        self.ended_work: list[float] = []
        self.ended_seconds: list[float] = []
        # By architecture: its work per epoch (FLOPs per image) and its epochs, found once (the
        # progress line asks for every pending trial's, ten times a second).
        self._sizes: dict[ResNetArch, tuple[float, int]] = {}

    def _size(self, arch: ResNetArch) -> tuple[float, int]:
        if arch not in self._sizes:
            self._sizes[arch] = (float(self.costs.profile(arch).flops),
                                 self.spec.recipe_for(arch).epochs)
        return self._sizes[arch]

    def work(self, arch: ResNetArch, epochs_done: int = 0) -> float:
        """What a trial of `arch` has left to train after `epochs_done` epochs."""
        per_epoch, epochs = self._size(arch)
        return per_epoch * max(0, epochs - epochs_done)

    def ended(self, arch: ResNetArch, seconds: float, epochs_trained: int) -> None:
        self.ended_work.append(self._size(arch)[0] * max(1, epochs_trained))
        self.ended_seconds.append(seconds)

    def time_model(self) -> tuple[float, float] | None:
        """(fixed seconds a trial, seconds per unit of work) from the ended trials (see the
        module docstring); None before any has ended."""
        work, seconds = np.array(self.ended_work), np.array(self.ended_seconds)
        if len(work) >= 2 * self.workers:  # (see FIRST_TRIALS)
            work, seconds = work[self.workers:], seconds[self.workers:]
        if not len(work) or seconds.sum() <= 0:
            return None
        if work.max() < SPREAD * work.min():
            return 0.0, seconds.sum() / work.sum()
        per_work = np.mean((work - work.mean()) * (seconds - seconds.mean())) / np.var(work)
        fixed = seconds.mean() - per_work * work.mean()
        if per_work < 0:
            return float(seconds.mean()), 0.0
        if fixed < 0:  # (slower than its work alone would say: the work alone)
            return 0.0, seconds.sum() / work.sum()
        return float(fixed), float(per_work)

    def seconds_left(self, pending: Iterable[ResNetArch],
                     running: Iterable[tuple[ResNetArch, int, float]],
                     unknown: int) -> float | None:
        """The ETA of `pending` trials, `running` ones (each with the epochs it has done and
        the seconds it has run) and `unknown` more whose architecture the sampler has yet to
        choose (each the mean ended trial's work); None before any trial has ended. A running
        trial has left its expected time less the seconds it has run, and no less than its work
        left at the rate: counted by its work left alone, its fixed time taken as spent, a trial
        at its first epoch had next to nothing left (the ETA read 0:00 while the last trials had
        all their epochs to go)."""
        model = self.time_model()
        if model is None:
            return None
        fixed, per_work = model
        mean_work = sum(self.ended_work) / len(self.ended_work)
        seconds = sum(fixed + per_work * self.work(arch) for arch in pending)
        seconds += sum(max(fixed + per_work * self.work(arch) - ran,
                           per_work * self.work(arch, done)) for arch, done, ran in running)
        seconds += unknown * (fixed + per_work * mean_work)
        return seconds / self.workers


__all__ = ["RemainingTime"]
