"""A seed that stands apart from its configuration's other seeds (one that barely trained, say).
Torch-free.

The intervals (stats.py) assume seed effects that vary roughly alike; one seed far from the rest
breaks that, and the interval then covers far less than 95% (one seed in ten 3 logits worse:
40-80%, README), almost always below the truth. Such a row is not to be read as it stands, so
the summary says so in its note rather than leaving the reader to find the seed in `trials`.

**Method** (the outlier test of an externally studentized residual, with Bonferroni's
adjustment): each seed's distance from the mean of the others, in the others' own spread,

    t_i = (x_i - mean(x without i)) / (s(x without i) sqrt(1 + 1/(n - 1))),

follows Student's t with n - 2 degrees of freedom when the seeds' values are exchangeable
normal draws (a new seed's prediction interval from the other n - 1); the smallest two-sided
p-value, times n, is the chance that any of the n seeds stands that far apart by luck. A seed
stands apart at p < `ALPHA`. The others' variance is taken no lower than what the test set's
size allows a rate that is never wrong (stats.py's floor, ``r(1 - r)/N`` at ``r = 2/(N + 4)``):
others whose error counts tie are not seeds without variance, and one seed a handful of images
away from them is not apart. With three seeds (one degree of freedom) only a seed very far from
two that nearly tie can be flagged; the test has power from four or five on.

How it behaves, by simulation with known truth (`tests/test_apart.py`, the stats tests'
logistic model, 400 test images at 8% error, 2,000 studies a cell): where seed effects are
normal, a row is flagged in 0-1.1% of studies at 3 to 10 seeds where the test set's sampling
dominates and 0-2.4% where seeds vary as much (the test holds 3.5% at 5 and 10 seeds, and for
2% error on 60 images, where counts tie often); logit seed effects of sd 0.8, whose rates are
skewed and whose intervals cover less, 2.9% at 5 seeds and 7.7% at 10. One seed 3 logits worse
than seeds of sd 0.1 (one that barely trained) is flagged in none of the studies at 3 seeds, 76%
at 4, 99.95% at 5 and all at 10 (held at least 95% at 5 and 10); one 1.5 logits worse (2.4x the
error) in 19%, 49% and 99% at 4, 5 and 10 seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

ALPHA = 0.01  # the chance, over a configuration's seeds, of calling one apart by luck
METHOD = ("its distance from the other seeds' mean in their spread (externally studentized "
          "residual, Student t), Bonferroni over the seeds")


@dataclass(frozen=True)
class SeedApart:
    """The seed at `position` (of the values given) that stands apart: its value, the others'
    range, and the Bonferroni-adjusted p-value of its distance from them."""

    position: int
    value: float
    others_low: float
    others_high: float
    n: int
    p_value: float


def _floor(images: int | None) -> float:
    """The least variance the other seeds' values may claim (see the module docstring); 0
    where the test set's size is unknown."""
    if not images:
        return 0.0
    rate = 2 / (images + 4)
    return rate * (1 - rate) / images


def seed_apart(values: Sequence[float], images: int | None = None,
               alpha: float = ALPHA) -> SeedApart | None:
    """The seed among `values` (one per seed, rates over a test set of `images` where that is
    known) that stands apart from the rest at Bonferroni-adjusted p < `alpha`, or None (fewer
    than three seeds, or none apart). Where the test set's size is unknown, a seed beside others
    that tie cannot be judged and is not flagged."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < 3 or not np.isfinite(values).all():
        return None
    floor = _floor(images)
    best, best_p = -1, math.inf
    for i in range(n):
        others = np.delete(values, i)
        variance = max(float(others.var(ddof=1)), floor)
        distance = abs(values[i] - others.mean())
        if variance == 0.0:
            continue
        t = distance / math.sqrt(variance * (1 + 1 / (n - 1)))
        p = float(2 * scipy_stats.t.sf(t, n - 2))
        if p < best_p:
            best, best_p = i, p
    adjusted = min(1.0, n * best_p)
    if best < 0 or adjusted >= alpha:
        return None
    others = np.delete(values, best)
    return SeedApart(best, float(values[best]), float(others.min()), float(others.max()), n,
                     adjusted)
