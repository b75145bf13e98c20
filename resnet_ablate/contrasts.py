"""What every comparison of a study's trials shares (results.py's tables and effects.py's
contrasts): which metrics are error rates, the range a difference can take, an estimate turned
into that of its complement or negation, the note printed beside a number, and the seed-stratified
estimate for metrics without test-set sampling. Torch-free; reads no store.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import stats
from .record import METRICS

# The metrics whose intervals take the test set's own sampling into account.
ERROR_RATES = ("test_error", "test_accuracy")


def note(estimate: stats.Estimate) -> str:
    """What a reader must know beside a number: too few seeds, no interval, a condition."""
    parts = []
    if 0 < estimate.n < stats.FEW_SEEDS:
        parts.append(f"few seeds (n={estimate.n})")
    if estimate.note:
        parts.append(estimate.note)
    return "; ".join(parts)


def with_methods(frame: pd.DataFrame) -> pd.DataFrame:
    frame.attrs["methods"] = sorted(set(frame["method"]) - {""}) if "method" in frame else []
    return frame


def seed_stratified(differences: pd.Series, others: Sequence[str],
                    bounds: tuple[float, float]) -> stats.Estimate:
    """A metric without test-set sampling (training error, FLOPs, time) over several
    configurations of the other factors: `differences` (paired differences or contrasts, indexed
    by the `others` columns and "seed") averaged per seed over the configurations, and Student's
    t over the seeds that every configuration has, each seed one paired unit. (The per-
    configuration t estimates carry no variance draws, so `stats.stratified` cannot combine
    them.)"""
    by_configuration = differences.unstack(list(others))  # rows: seeds; columns: configurations
    complete = by_configuration.dropna()
    estimate = stats.seed_mean(complete.mean(axis=1).to_numpy(float), bounds)
    configurations = by_configuration.shape[1]
    note = (f"mean of {configurations} configurations' differences over the {len(complete)} "
            f"seed{'s' if len(complete) != 1 else ''} all of them have")
    return dataclasses.replace(estimate, note="; ".join(filter(None, [note, estimate.note])),
                               method=f"stratified over configurations ({estimate.method})")


def complement(estimate: stats.Estimate) -> stats.Estimate:
    """The estimate of 1 - x from that of x (accuracy from error)."""
    return dataclasses.replace(estimate, mean=1 - estimate.mean, low=1 - estimate.high,
                               high=1 - estimate.low, variance_draws=None)


def negated(estimate: stats.Estimate) -> stats.Estimate:
    """The estimate of -x from that of x (an accuracy difference from an error difference)."""
    return dataclasses.replace(estimate, mean=-estimate.mean, low=-estimate.high,
                               high=-estimate.low)


def difference_bounds(metric: str) -> tuple[float, float]:
    """The range a difference of `metric` can take: [-1, 1] for a rate."""
    if metric in METRICS:
        span = METRICS[metric].high - METRICS[metric].low
        return -span, span
    return -math.inf, math.inf



def plain(value: Any) -> str:
    """A value as a message shows it: 8, not np.int64(8); 'A' quoted."""
    value = value.item() if isinstance(value, np.generic) else value
    return repr(value) if isinstance(value, str) else str(value)


__all__ = ["ERROR_RATES", "complement", "difference_bounds", "negated", "note", "plain",
           "seed_stratified", "with_methods"]
