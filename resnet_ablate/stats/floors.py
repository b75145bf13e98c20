"""The least variance a mean of 0/1 outcomes on N test images can honestly claim (intervals.py
takes its tables' variances no lower), and the binomial bounds that stand in for the test
images' part where no per-image record was kept. Torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def agresti_coull_floor(count: float, cells: int) -> float:
    """The least variance a mean of `cells` 0/1 outcomes with `count` ones can honestly claim:
    binomial at the Agresti-Coull rate (count + 2)/(cells + 4)."""
    rate = (count + 2) / (cells + 4)
    return rate * (1 - rate) / cells


def table_floor(ms_image: float, ms_resid: float, n: int, images: int) -> float:
    """The least variance an n x N table's mean can claim, from its image and residual mean
    squares: what Agresti-Coull allows N images without a single error where the seeds agree
    image by image (a table without an event: the images, not the n N outcomes, are the
    sample), and less as far as the table shows them to disagree: the floor of N image means
    over n seeds whose outcomes on an image correlate as the table's do, ``(1 + (n - 1) icc)/n``
    of it, the intraclass correlation taken with the floor itself as image variance (so that a
    table without an event keeps all of it, and one with a single event most of it).

    A floor of N images alone, whatever the seeds, bound paired tables of configurations that
    err alike (their differences few, and on different images): at 200 images no difference
    below about 1.4 points could be found, at any seed count."""
    floor = agresti_coull_floor(0.0, images)
    image_part = max(ms_image - ms_resid, 0.0) / n + floor
    icc = image_part / (image_part + ms_resid)
    return floor * (1 + (n - 1) * icc) / n


def binomial_bound(rate: float, images: int) -> float:
    """p(1 - p)/N: the test-image part's upper bound when no per-image record was kept."""
    return agresti_coull_floor(rate * images, images)


def shared_test_set_bound(weights: np.ndarray, rates: Sequence[float], images: int) -> float:
    """The test-image part of a contrast's variance without a per-image record (intervals.py's
    docstring): per sign, the cells' binomial bounds as if perfectly correlated; the signs
    added."""
    deviations = np.array([math.sqrt(binomial_bound(rate, images)) for rate in rates])
    return float((weights.clip(min=0) @ deviations) ** 2 + (weights.clip(max=0) @ deviations) ** 2)
