"""Many tests in one table: Holm's adjustment of its rows' p-values. Torch-free."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjustment of a table's p-values (Holm 1979): the k-th smallest of m
    times (m - k + 1), made non-decreasing in that order and capped at 1. Rejecting where the
    adjusted value is below alpha keeps the chance of any false rejection in the table at most
    alpha, however the tests depend on each other (they share seeds and the test set). A NaN
    (a row with no test) stays NaN and is not counted in m."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    order = tested[np.argsort(p[tested], kind="stable")]
    largest = 0.0
    for rank, i in enumerate(order):
        largest = max(largest, min(1.0, (len(order) - rank) * p[i]))
        adjusted[i] = largest
    return adjusted


__all__ = ["holm"]
