"""What a training run reports: the record of the whole run (each finished epoch's record,
`EpochRecord`, is resnet_ablate.record's: it crosses to the driver, which loads no torch)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..data.errors import NoImages
from ..recipe import TrainRecipe
from ..record import EpochRecord, ExecutionRecord, complement

# "stopped": its caller stopped it after an epoch (train_seeds' on_epoch, as a pruner does).
TrainStatus = Literal["completed", "diverged", "stopped"]


def epoch_line(record: EpochRecord, epochs: int, eval_split: str) -> str:
    """An epoch's line in a run's log, as `train` and `train_seeds` write it."""
    return (f"epoch {record.epoch}/{epochs} lr {record.lr:g} train loss {record.train_loss:.4f} "
            f"error {record.train_error:.4f} {eval_split} error {record.test_error:.4f} "
            f"({record.seconds:.1f}s)")


@dataclass(frozen=True)
class TrainResult:
    """What a training run produced. Accuracies are None when no epoch was completed.

    `images_per_second` counts training alone (no evaluation, no compilation); `compile_seconds`
    is the time `torch.compile` took before training (0 without it); `execution` is how the run
    executed (device, precision, memory format, compile, CUDA graphs, decode, stacked seeds).
    """

    status: TrainStatus
    reason: str | None
    history: tuple[EpochRecord, ...]
    epochs_completed: int
    final_test_accuracy: float | None
    best_test_accuracy: float | None
    final_train_accuracy: float | None
    wall_seconds: float
    images_per_second: float
    compile_seconds: float
    execution: ExecutionRecord
    warmup_steps: int
    seed: int
    eval_split: str
    recipe: TrainRecipe
    # The final evaluation's test-set size and errors, and which images it got wrong (packed by
    # record.pack_outcomes, in the evaluation's order; in-memory data sets in one process only):
    # what honest intervals and per-image paired comparisons need
    # (resnet_ablate/stats/intervals.py).
    test_images: int | None = None
    test_wrong: int | None = None
    test_outcomes: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (plain floats, lists and dicts)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        values["history"] = [dataclasses.asdict(record) for record in self.history]
        values["recipe"] = self.recipe.to_dict()
        values["execution"] = self.execution.stored()
        return values


def result_of(status: TrainStatus, reason: str | None, history: Sequence[EpochRecord],
              **fields: Any) -> TrainResult:
    """A run's `TrainResult`: the fields a history gives (epochs completed, final and best
    accuracies) worked out from it, the others as given."""
    last = history[-1] if history else None
    return TrainResult(
        status=status, reason=reason, history=tuple(history), epochs_completed=len(history),
        final_test_accuracy=None if last is None else complement(last.test_error),
        best_test_accuracy=None if last is None else complement(
            min(r.test_error for r in history)),
        final_train_accuracy=None if last is None else complement(last.train_error),
        **fields)


def require_images(count: float, what: str, skipped: float) -> None:
    """NoImages, naming `what` and the images skipped, where `count` images is none."""
    if count < 1:
        raise NoImages(f"{what} had no image to score: {int(skipped)} image(s) skipped as "
                       "undecodable or unlabelled, none read; check the data set's files")
