"""Seeds that stand apart from their configuration's other seeds (one that barely trained, say).
Torch-free.

The intervals (intervals.py) assume seed effects that vary roughly alike; a seed far from the rest
breaks that, and the interval then covers far less than 95% (one seed in ten 3 logits worse:
40-80%, README), almost always below the truth. Such a row is not to be read as it stands, so
its note says so (summaries, comparisons, effects: contrasts.seeds_apart_note) rather than
leaving the reader to find the seed in `trials`.

**Method** (Rosner's generalized extreme Studentized deviate procedure, each step's deviate the
externally studentized residual, Bonferroni over the seeds left): a seed's distance from the
mean of the others, in the others' own spread,

    t_i = (x_i - mean(x without i)) / (s(x without i) sqrt(1 + 1/(m - 1))),

follows Student's t with m - 2 degrees of freedom when the m seeds' values are exchangeable
normal draws (a new seed's prediction interval from the other m - 1). Step k takes the seed with
the largest deviate among those left, its two-sided p-value times the m left (Bonferroni: a
bound on the chance that any of them stands that far apart by luck), and sets it aside; after at most
(n - 1) // 2 steps (seeds apart are a minority), the seeds apart are those set aside up to the
last step whose p < `ALPHA`. Stepping on past a step that failed is what finds two seeds apart
that each widen the other's leave-one-out spread (masking: a single test names neither).

The others' variance is taken no lower than what the test set's size allows a rate that is never
wrong (intervals.py's floor, ``r(1 - r)/N`` at ``r = 2/(N + 4)``): others whose error counts tie are
not seeds without variance, and a seed a handful of images away from them is not apart. Where
the size is unknown, a seed beside others that tie cannot be judged. Fewer than `MIN_SEEDS`
seeds are not tested: at three, one degree of freedom, no seed is apart short of ~90% error
beside two that tie at 8%.

How it behaves, by simulation with known truth (the stats tests' logistic model, 400 test images
at 8% error, 2,000 studies a cell; `tests/test_apart.py` holds them with 1,000): where seed
effects are normal, a row is flagged in 0-1.6% of studies at 4 to 10 seeds where the test set's
sampling dominates and 0.4-3% where seeds vary as much (held at 4%, also for 2% error on 60
images, where counts tie often); logit seed effects of sd 0.8, whose rates are skewed and whose
intervals cover less, 3.1% at 5 seeds and 9.4% at 10. One seed 3 logits worse than seeds of
sd 0.1 (one that barely trained) is named in 77% of studies at 4 seeds and all at 5 and 10
(held at 95%); two such seeds in 72% at 5 and all at 10 (held at 95%); one 1.5 logits worse
(2.4x the error) in 19%, 50% and 99.5% at 4, 5 and 10 seeds. Where each seed is 3 logits worse
with chance one in ten (README's coverage case), the note is on 92% of the studies that have
such a seed at 5 seeds (64% of those with two or more) and 99.6% at 10, and on 0.2% and 1.2% of
those that have none. Paired differences (`compare`: each seed's difference of two
configurations on one test set, the floor doubled as for independent rates, which the shared
test set makes conservative): null pairs are flagged in at most 1.4% and 2.6% of studies in the
two regimes (the test holds 4% where seeds vary as much), 5.2% at 10 seeds of sd 0.8; one seed
3 logits worse in 51%, 96% and all at 4, 5 and 10 seeds (held at 95% at 10), two such in 49% at
5 and all at 10.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats

from .floors import agresti_coull_floor

ALPHA = 0.01  # each step's level: the nominal chance of setting a seed apart by luck
NAME = "outlier test"  # how a row's note and its table's methods name the test
MIN_SEEDS = 4
METHOD = ("each seed's distance from the other seeds' mean in their spread (externally "
          "studentized residual, Student t), Bonferroni over the seeds left, stepped down as "
          "Rosner's generalized ESD")


@dataclass(frozen=True)
class SeedsApart:
    """The seeds at `positions` (of the values given) that stand apart: their values, the
    others' range, and the adjusted p-value of the step that decided how many stand apart."""

    positions: tuple[int, ...]
    values: tuple[float, ...]
    others_low: float
    others_high: float
    n: int
    p_value: float


# Values that tie but for floating-point rounding (differences 2/360 - 1/360 and 3/360 - 2/360
# differ in their last bits): as stats' ties, relative to their size.
_TIE_TOLERANCE = 1e-12


def _floor(images: int | None) -> float:
    """The least variance the other seeds' values may claim (see the module docstring); 0
    where the test set's size is unknown."""
    return agresti_coull_floor(0.0, images) if images else 0.0


def _most_apart(values: np.ndarray, floor: float) -> tuple[int, float]:
    """(position, Bonferroni-adjusted p) of the value farthest from the others in their spread;
    (-1, 1) where none can be judged (the others tie and no floor is known)."""
    m = len(values)
    best, best_t = -1, -1.0
    for i in range(m):
        others = np.delete(values, i)
        if floor == 0.0 and np.ptp(others) <= _TIE_TOLERANCE * max(1.0, np.abs(others).max()):
            continue  # tied others without a test set's size: a spread unknown, not zero
        variance = max(float(others.var(ddof=1)), floor)
        t = abs(values[i] - others.mean()) / math.sqrt(variance * (1 + 1 / (m - 1)))
        if t > best_t:
            best, best_t = i, t
    if best < 0:
        return -1, 1.0
    return best, min(1.0, m * float(2 * scipy_stats.t.sf(best_t, m - 2)))


def seeds_apart(values: Sequence[float], images: int | None = None, alpha: float = ALPHA, *,
                squared_weights: float = 1.0) -> SeedsApart | None:
    """The seeds among `values` (one per seed, rates over a test set of `images` where that is
    known) that stand apart from the rest (see the module docstring), or None: fewer than
    `MIN_SEEDS` seeds, a value that is not finite, or none apart. Values that are contrasts of
    rates (a paired difference: weights -1 and 1) give the sum of their weights' squares: the
    floor is the rates' floor times that, as for a sum of independent rates."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n < MIN_SEEDS or not np.isfinite(values).all():
        return None
    floor, left = _floor(images) * squared_weights, list(range(n))
    set_aside, p_values = [], []
    for _ in range((n - 1) // 2):
        position, p = _most_apart(values[left], floor)
        if position < 0:
            break
        set_aside.append(left.pop(position))
        p_values.append(p)
    decided = [k for k, p in enumerate(p_values) if p < alpha]
    if not decided:
        return None
    count = decided[-1] + 1
    apart = tuple(sorted(set_aside[:count]))
    others = np.delete(values, apart)
    return SeedsApart(apart, tuple(float(values[i]) for i in apart), float(others.min()),
                      float(others.max()), n, p_values[count - 1])
