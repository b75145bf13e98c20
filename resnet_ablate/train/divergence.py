"""The divergence watch: a run whose training loss blows up is stopped and recorded as diverged,
never as a result. Non-finite at any read, orders of magnitude above the loss of guessing at two
reads in a row, or settling back at guessing after a blow-up (see `DivergenceWatch`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

from ..record import EpochRecord

# A training loss this many times the loss of guessing (ln of the class count), at two reads in a
# row, is a blow-up, not learning: healthy runs start near 1x and go down.
DIVERGED_LOSS_FACTOR = 1000.0
# A blow-up that settles: a read above BLOWUP_LOSS_FACTOR x the loss of guessing, then a last
# epoch whose training loss and training error are still at or above SETTLED_AT_CHANCE x those of
# guessing (ln C and 1 - 1/C), is a run that never learned (lr 10: loss 21.6 falling to 4.0 at
# 90% test error), diverged rather than a result. A bad start that recovers has learned: its
# error is well below guessing even where its loss is still high (over-confident logits).
BLOWUP_LOSS_FACTOR = 5.0
SETTLED_AT_CHANCE = 0.95


class Diverged(Exception):
    """The training loss blew up (see `DivergenceWatch.read`); the message says where."""


class DivergenceWatch:
    """Reads of a run's running training loss, every `check_every` steps and at epoch ends."""

    def __init__(self, num_classes: int, check_every: int) -> None:
        self.num_classes = max(num_classes, 2)
        self.check_every = check_every
        self.read_loss_sum, self.read_images = 0.0, 0  # what the epoch's last read saw
        self.above_limit_at_last_read = False
        self.peak_read = (0.0, 0)  # the highest training loss a read saw, and its epoch

    @property
    def chance_loss(self) -> float:
        """The training loss of guessing: ln of the class count."""
        return math.log(self.num_classes)

    def start_epoch(self) -> None:
        self.read_loss_sum, self.read_images = 0.0, 0

    def read(self, loss_sum: float, seen: float, epoch: int, step: int) -> None:
        """Raise Diverged for a run whose training loss blew up: non-finite at any read, or a
        mean over the steps since the last read above DIVERGED_LOSS_FACTOR times the loss of
        guessing at two reads in a row. A learning run starts near that loss and goes down, and a
        bad start recovers within a read or two; one that stays orders of magnitude above it
        (lr 100 gives 1e20) is diverged. Each read's loss also feeds the run's peak, which
        `never_learned` judges at the end. `loss_sum` and `seen` are the epoch's so far."""
        images = seen - self.read_images
        interval_loss = (loss_sum - self.read_loss_sum) / max(images, 1)
        self.read_loss_sum, self.read_images = loss_sum, seen
        if images > 0 and interval_loss > self.peak_read[0]:
            self.peak_read = (float(interval_loss), epoch)
        chance = self.chance_loss
        if not math.isfinite(loss_sum):
            problem = "non-finite training loss"
        elif interval_loss > DIVERGED_LOSS_FACTOR * chance and self.above_limit_at_last_read:
            problem = (f"training loss {interval_loss:.3g}, over {DIVERGED_LOSS_FACTOR:g}x "
                       f"the {chance:.3g} of guessing at two reads in a row,")
        else:
            self.above_limit_at_last_read = interval_loss > DIVERGED_LOSS_FACTOR * chance
            return
        raise Diverged(f"{problem} at epoch {epoch}, seen at step {step} "
                       f"(read every {self.check_every} steps)")

    def never_learned(self, history: Sequence[EpochRecord]) -> str | None:
        """Why a finished run is diverged although no read stopped it, or None: its loss went
        above BLOWUP_LOSS_FACTOR x the loss of guessing at some read, and its last epoch's
        training loss and training error are both still at or above SETTLED_AT_CHANCE x those
        of guessing (ln C, 1 - 1/C for C classes), so it never learned. A healthy run starts
        near the loss of guessing and ends well below it; a bad start that recovers ends with an
        error well below guessing."""
        if not history:
            return None
        chance = self.chance_loss
        chance_error = 1 - 1 / self.num_classes
        peak, peak_epoch = self.peak_read
        final = history[-1]
        if (peak <= BLOWUP_LOSS_FACTOR * chance
                or final.train_loss < SETTLED_AT_CHANCE * chance
                or final.train_error < SETTLED_AT_CHANCE * chance_error):
            return None
        return (f"training loss rose to {peak:.3g} at epoch {peak_epoch}, over "
                f"{BLOWUP_LOSS_FACTOR:g}x the {chance:.3g} of guessing, and ended at "
                f"{final.train_loss:.3g} (training error {final.train_error:.3g}) at epoch "
                f"{final.epoch}, not below {SETTLED_AT_CHANCE:g}x guessing: it never learned")

    def state_dict(self) -> dict[str, Any]:
        return {"above_limit_at_last_read": self.above_limit_at_last_read,
                "peak_read": list(self.peak_read)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.above_limit_at_last_read = state["above_limit_at_last_read"]
        peak_loss, peak_epoch = state["peak_read"]
        self.peak_read = (float(peak_loss), int(peak_epoch))
