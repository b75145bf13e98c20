"""The shape of an error rate's interval near 0 or 1 (stats.py gives it its width).

The generalized pivot's interval is symmetric about the mean and clipped to [0, 1], while near 0
(or 1) a rate's sampling is skewed: the symmetric interval missed the truth on the far side two
to eight times as often as on the near one (1% error, 1,000 images, 3 and 5 seeds: 3.5-4.2% of
studies above, 0.5% below). `score_shaped` keeps the pivot's spread and gives it the shape of a
Wilson score interval. Torch-free.
"""

from __future__ import annotations

import math

from scipy import stats as scipy_stats


def shaped(mean: float, n: int) -> bool:
    """Whether a rate of `mean` over `n` seeds is shaped: from three seeds on, and a rate of
    exactly 0 or 1 at any count. At two, the pivot's half-width is mostly the seeds' one degree
    of freedom, whose t tails are not a rate's skew (two seeds at 1.4% and 2.2% would reach
    17%), and its symmetric interval already errs on the safe side (97-99.5% covered)."""
    return n >= 3 or mean in (0.0, 1.0)


def score_shaped(mean: float, low: float, high: float, images: int,
                 level: float) -> tuple[float, float]:
    """(low, high): the interval of a Wilson score interval whose size N' gives the pivot's
    half-width on the side away from the nearer bound, N' = p(1 - p) z^2 / half^2, so that seeds
    that vary widen it as they widen the pivot's; at p = 1/2 the two intervals are one. A mean
    of exactly 0 (or 1), with no spread left to match, takes the exact (Clopper-Pearson) bound
    of 0 wrong in `images`, which the Agresti-Coull floor fell short of (0.28% for 1,000
    images, where the exact bound is 0.37%)."""
    tail = (1 - level) / 2
    near_one = mean > 0.5
    p = 1 - mean if near_one else mean  # the distance to the nearer bound
    half = (mean - low) if near_one else (high - mean)
    if p <= 0:
        far, near = 1 - tail ** (1 / images), 0.0
    elif half > 0:
        z = float(scipy_stats.norm.ppf(1 - tail))
        size = p * (1 - p) * z * z / half**2
        centre = (p + z * z / (2 * size)) / (1 + z * z / size)
        spread = z * math.sqrt(p * (1 - p) / size + z * z / (4 * size**2)) / (1 + z * z / size)
        far, near = min(centre + spread, 1.0), max(centre - spread, 0.0)
    else:
        return low, high
    return (1 - far, 1 - near) if near_one else (near, far)


__all__ = ["score_shaped", "shaped"]
