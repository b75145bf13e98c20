"""A run's ETA, from the training work left rather than a count of trials.

A trial's work is its FLOPs per image times its epochs (the images per epoch are the study's, the
same for every trial). Trials of one study differ in it by up to 50x (ResNet-20 against 1202
layers), and the shallow ones finish first: a mean time per trial times the trials left said six
minutes for a study with half an hour to go. Here the work left (pending trials, and what running
ones have still to train) is divided by the rate at which ended trials did theirs.
"""

from __future__ import annotations

from collections.abc import Iterable

from ..arch import ResNetArch
from ..spec import StudySpec
from .costs import StudyCosts


class RemainingTime:
    """Work done and its time, from ended trials; the seconds left for the work still to do."""

    def __init__(self, spec: StudySpec, costs: StudyCosts, workers: int) -> None:
        self.spec = spec
        self.costs = costs
        self.workers = max(1, workers)
        self.done_work = 0.0  # FLOPs x epochs of ended trials, over their epochs trained
        self.done_trials = 0
        self.done_seconds = 0.0  # their time, each trial's own (a stack's share)
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
        self.done_work += self._size(arch)[0] * max(1, epochs_trained)
        self.done_trials += 1
        self.done_seconds += seconds

    def seconds_left(self, pending: Iterable[ResNetArch],
                     running: Iterable[tuple[ResNetArch, int]], unknown: int) -> float | None:
        """The ETA of `pending` trials, `running` ones (with the epochs they have done) and
        `unknown` more whose architecture the sampler has yet to choose (each the mean ended
        trial's work); None before any trial has ended."""
        if not self.done_trials or self.done_seconds <= 0:
            return None
        left = sum(self.work(arch) for arch in pending)
        left += sum(self.work(arch, done) for arch, done in running)
        left += unknown * self.done_work / self.done_trials
        return left / (self.done_work / self.done_seconds) / self.workers


__all__ = ["RemainingTime"]
