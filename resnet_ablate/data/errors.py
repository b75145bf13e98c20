"""The data sets' own failures, as the study driver tells them apart."""

from __future__ import annotations


class DataUnavailable(FileNotFoundError):
    """A data set's folder, file or shard is missing or cannot be reached: a deterministic
    failure (the same input fails again), so a trial that meets it before training is not retried
    (record.FailureKind.DATA_UNAVAILABLE). Its message is one line naming what is missing."""


class NoImages(ValueError):
    """Training or evaluation saw no image at all (an empty split, or every image skipped as
    undecodable), or no training image could be decoded for the per-pixel statistics: a score
    would be a number from nothing, so the trial fails. Deterministic: the same data fails the
    same way, so it is not retried."""


class SizeMisstated(ValueError):
    """A pass over a split read another number of images than the spec stated for it (a shard
    URL's train_size or val_size, which nothing counts before training): its epochs, costs and
    data-parallel steps would rest on a wrong size. Deterministic, so not retried."""
