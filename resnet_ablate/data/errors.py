"""The data sets' own failures, as the study driver tells them apart."""

from __future__ import annotations


class DataUnavailable(FileNotFoundError):
    """A data set's folder, file or shard is missing or cannot be reached: a deterministic
    failure (the same input fails again), so a trial that meets it before training is not retried
    (record.FailureKind.DATA_UNAVAILABLE). Its message is one line naming what is missing."""
