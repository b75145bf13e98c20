"""Intervals and tests for ablation answers at the seed counts people run (2-10). Torch-free.

A trial's test error is the mean of a seeds x test-images table of 0/1 outcomes: every seed of a
configuration is scored on the same test images. Two things vary when the study is run again:
the seeds (training noise) and, for the error rate the data set stands for, the test images
themselves. An interval over seeds alone is an interval for *this test set's* mean; it is too
narrow for the error rate, more so as seeds are added, and zero-width when two seeds happen to
miss the same number of images. The methods here take both into account.

**The model (two-way crossed random effects).** The outcome of seed i on test image j is ``w_ij =
mu + a_i + b_j + e_ij``: a seed effect (variance s2_seed), an image effect (s2_image) and their
interaction (s2_resid), seeds and test images drawn independently from their populations. The
quantity estimated is ``mu``, the error rate over both. The variance of the table's grand mean is
``s2_seed/n + s2_image/N + s2_resid/(n N)``, estimated without bias from the table's ANOVA mean
squares (see `_crossed`): ``(MS_seed + MS_image - MS_resid)/(n N)``. Its first part, the seeds'
share ``s2_seed/n + s2_resid/(n N) = E[MS_seed]/(n N)``, rests on n - 1 degrees of freedom, one at
n = 2; the rest, the test images' ``s2_image/N``, on as many as the images that carry it allow
(Satterthwaite's moment match, `seed_tables.image_df`: up to N - 1 where many do, about twice their
count where a few do, as in a paired table that differs on a handful of images). The interval comes
from a generalized pivotal quantity (Weerahandi) that draws each part from what its mean square
allows: where seeds dominate it is Student's t with n - 1 df (exact for normal seed means), and
where the test images dominate it is the normal interval. The seeds' mean square is taken no lower
than the seed x image residual allows (``E[MS_seed] >= E[MS_resid]``; see
`pivot.LEAST_PLAUSIBLE_QUANTILE`), and at n = 2, where seeds tie often, and from n = 3 on where it
was taken so (ties and near-ties), no draw of the seeds' part falls below the residual's
(`pivot.seed_draw_floor`): seeds whose error counts tie while they disagree image by image are not
seeds without variance. Between the two extremes, with so few degrees of freedom, a pivot of this
kind over-covers (up to 98.8% at n = 2, 99.6% where the residual makes up the seeds' part).
**Calibration** (from n = 3 on): the pivot is taken at a level that depends on n, on the seed share
the table shows and on the residual's share of the seeds' part it shows (`pivot.alpha_widening`),
chosen so that under the model the coverage of the 95% interval stays at 95.5% +- 1 point at every
true seed share and residual share (minimax, half a point to the safe side;
`benchmarks/calibrate_pivot.py` made the constants and plots the coverage; before 0.4.0 the level
ignored the residual and, where it makes up the seeds' part, over-covered to 97.7%). At n = 2 the
pivot is taken as it is: conservative (see `pivot.PIVOT_CALIBRATION`). At other levels alpha is
changed in the same proportion; the p-value is rescaled so that p < 0.05 exactly when the 95%
interval excludes zero.
The coverage is over studies: a table whose seeds happen to nearly tie shows a small seed share and
covers less (in the tests' regimes, the tenth of tables with the smallest share 72-96% at n = 2 and
66-84% at n = 3: an audit of 0.3.3, 3,000 studies a regime), one that shows a large share more, as
Student's t does conditional on a small sample variance.

Paired comparisons apply the same analysis to the table of differences ``w(level) - w(baseline)``
(seeds paired by seed number, images by position): the images' shared difficulty cancels, which
is what makes a per-image paired test more powerful than one over seed means. Any contrast of
configurations scored on one test set is analysed the same way (`contrast`): an interaction's
difference of differences, and the mean of several configurations' differences (a main
effect), whose per-image table is averaged seed by seed and image by image, so that what the
configurations share (the test images, and anything a seed number fixes) is counted once.

**Without a per-image record** (stores written before it was kept, and metrics without one:
best-epoch, top-5, multi-view errors), the test-image term is bounded by the binomial variance of
N images, ``p(1 - p)/N`` (an upper bound for it under the model). A contrast's cells share the
test set, so their terms are correlated: the cells of each sign are summed as if perfectly
correlated, ``(sum_c |w_c| sqrt(p_c(1 - p_c)/N))^2`` (Cauchy-Schwarz, exact at correlation 1: k
configurations pooled share their test images, and averaging them does not shrink that part),
and the two signs' sums are added, which assumes images are not harder for one configuration
exactly where they are easier for another (no negative correlation): conservative, and said so.

A rate of exactly 0 (or 1) takes the exact (Clopper-Pearson) end of 0 wrong (right) in N images,
and no rate's interval reaches less far (a configuration with errors is never bounded more tightly
than one without). Near 0 the interval, symmetric and clipped at 0, misses more often above than
below (README).

The variance has a floor: what Agresti-Coull allows a test set of N images without a single
error, ``r(1 - r)/N`` with ``r = 2/(N + 4)``, where the seeds agree image by image, and less as
far as they are seen to disagree (`floors.table_floor`), so that no table, not even one without a
single error or disagreement, gives a zero-width interval, and one whose seeds disagree is not
held to what N images alone allow (a floor that binds makes the interval conservative: the N
images' floor alone bound paired tables of configurations that err alike, at 200 images a
1-point difference found at 10 seeds 9% of the time, 74% now). Intervals are clipped to the
metric's range.
With one seed there is no estimate of seed-to-seed variation and no interval.

Inputs that cannot describe seeds scored on one test set raise one ValueError (seed_tables.py).
Without the test set's size an interval is over seeds only and conditional on this test set;
seeds that tie then get none (a zero-width interval would claim certainty).

The tests (tests/test_stats.py) hold these methods to simulated studies drawn from the model with
known truth (in its Bernoulli form, a logistic model of seeds and images): in two regimes (seeds
that vary little next to the test set's sampling, and as much), coverage of the 95% interval
within 93-97% at n = 3, 5, 10 and 94-99.7% at n = 2; the paired test's type I error at most 6%
over those seed counts (7% at each), also for seeds that tie and differ on a few images, and
at two seeds whose counts tie often p < 0.05, 0.01 and 0.001 no more often than 6%, 1.5% and
0.3%, and among the ties p < 0.05 at most 10%; the
mean over configurations that share a test set and a per-image effect at most 7.5% at 3 and 10
seeds. Where seeds dominate far more (logit seed effects of sd 0.8), the seed means are skewed
and the interval covers as Student's t over them does: about 93% at n = 2 and 89-91% at n = 3
to 10 (the test holds it to the t interval's coverage), at 8% error: at 0.5% and 2% an audit
found 84-92%, the t interval as low.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats as scipy_stats
from scipy.special import ndtr  # the normal distribution function, without scipy.stats' overhead

from .floors import binomial_bound, shared_test_set_bound, table_floor
from .pivot import (Pivot, alpha_widening, least_plausible_ratio, residual_share_shown,
                    seed_draw_floor, variance_draws)
from .seed_tables import (SeedRecordsError, checked_bounds, checked_level, finite_values,
                          image_df, outcome_table, rates_per_seed, test_set_size)

LEVEL = 0.95
FEW_SEEDS = 3  # below this, an interval says mostly that there are too few seeds

CROSSED = "seeds x test images (crossed random effects, generalized pivot)"
BINOMIAL_BOUND = ("seeds + binomial bound on the test set (conservative: no per-image record "
                  "used)")
SEEDS_ONLY = "Student t over seeds"


@dataclass(frozen=True)
class Estimate:
    """A mean with its interval (95% unless another level was asked for) and two-sided p-value
    against zero, and how they were made.

    `std` is the seed-to-seed standard deviation of the per-seed values; `se` the standard error
    of `mean` under `method` (for a pivot, the median of its draws). `note` says why an interval
    is missing or what it is conditional on ("" when there is nothing to say)."""

    mean: float
    std: float
    se: float
    low: float
    high: float
    p_value: float
    n: int
    method: str
    note: str = ""


# ----------------------------------------------------------------------------------------------
# Intervals from the pivot (pivot.py)


def _from_pivot(mean: float, pivot: Pivot, n: int, std: float, method: str,
                bounds: tuple[float, float], levels: tuple[float, ...]) -> list[Estimate]:
    """Interval (at each of `levels`) and p-value from the pivot ``mean - Z sqrt(V)``, Z
    standard normal and V the variance draws: its distribution function is a mixture of
    normals, evaluated exactly in Z, so that small p-values are accurate rather than a count of
    draws. Calibrated where the pivot carries a seed share (`pivot.alpha_widening`)."""
    widening = alpha_widening(pivot.seed_df, pivot.seed_share, pivot.residual_share)
    # Rescaled so that p < 0.05 exactly where the calibrated 95% interval excludes zero.
    zero = 2 * float(np.mean(ndtr(-abs(mean) / np.sqrt(pivot.variances))))
    se = float(math.sqrt(np.median(pivot.variances)))
    estimates = []
    for level in levels:
        alpha = min((1 - level) * widening, 0.99)  # below a 1% interval, widening has no room
        half = pivot.half_width(alpha)
        estimates.append(Estimate(mean, std, se, max(mean - half, bounds[0]),
                                  min(mean + half, bounds[1]), min(zero / widening, 1.0), n,
                                  method))
    return estimates


# ----------------------------------------------------------------------------------------------
# The crossed seeds x images analysis


def _crossed(table: np.ndarray, stream: int) -> tuple[float, Pivot]:
    """(grand mean, pivot) of an n x N table under the crossed random-effects model (module
    docstring); n >= 2, N >= 2.

    The variance of the grand mean is written as two parts, each from mean squares: the seeds'
    ``MS_seed/(n N)``, uncertain (n - 1 df, see `pivot.variance_draws`), and the test images'
    ``(MS_image - MS_resid)/(n N)``, precise where many images carry it and less so where few do
    (`seed_tables.image_df`). The seeds' mean square is taken no lower than the residual allows
    (`pivot.least_plausible_ratio`), at two seeds or where it was taken so no draw of the seeds'
    part below the residual's (`pivot.seed_draw_floor`), and a table without a single error (or
    disagreement) not at zero width (`floors.table_floor`). The pivot carries the residual's
    share for the calibration (`pivot.residual_share_shown`)."""
    n, images = table.shape
    grand = float(table.mean())
    seed_means, image_means = table.mean(axis=1), table.mean(axis=0)
    ss_seed = images * float(((seed_means - grand) ** 2).sum())
    ss_image = n * float(((image_means - grand) ** 2).sum())
    ss_resid = max(float(((table - grand) ** 2).sum()) - ss_seed - ss_image, 0.0)
    cells = n * images
    ms_seed, ms_image = ss_seed / (n - 1), ss_image / (images - 1)
    ms_resid = ss_resid / ((n - 1) * (images - 1))
    seeds, test_images = ms_seed / cells, max(ms_image - ms_resid, 0.0) / cells
    residual = ms_resid / cells
    implausible = seeds < residual * least_plausible_ratio(n - 1)
    seeds = max(seeds, residual * least_plausible_ratio(n - 1))
    test_images = max(test_images, table_floor(ms_image, ms_resid, n, images) - seeds)
    floor = seed_draw_floor(residual, n - 1, implausible)
    variances = variance_draws(seeds, n - 1, test_images, stream, image_df(image_means), floor)
    return grand, Pivot(variances, n - 1, seeds / (seeds + test_images),
                        residual_share_shown(residual, seeds, floor > 0))


def _exact_at_the_ends(estimate: Estimate, images: int, level: float) -> Estimate:
    """A rate of exactly 0 (or 1) with the exact (Clopper-Pearson) end of 0 wrong (right) in N
    images, which the variance floor alone fell short of (0.28% for 1,000 images; 0.37%), and
    every other rate's interval reaching at least as far: a configuration with an error is never
    quoted a tighter upper end than one without (one error among three seeds of 1,000 images
    gave 0.29%, two 0.26%, none 0.37%: an audit's finding)."""
    if math.isnan(estimate.high):
        return estimate
    far = 1 - ((1 - level) / 2) ** (1 / images)
    low = 0.0 if estimate.mean == 0.0 else min(estimate.low, 1 - far)
    high = 1.0 if estimate.mean == 1.0 else max(estimate.high, far)
    return replace(estimate, low=low, high=high)


def _no_interval(mean: float, n: int, method: str, reason: str) -> Estimate:
    return Estimate(mean, math.nan, math.nan, math.nan, math.nan, math.nan, n, method, reason)


def _seed_std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


ONE_SEED = "one seed: seed-to-seed variation unknown, no interval"
SIZE_UNKNOWN = "conditional on this test set: its size was not recorded"
TIED_SEEDS = "seeds tie: their spread is unknown, not zero, so no interval"
TIED_SIZE_UNKNOWN = ("seeds tie and the test set's size was not recorded: no interval (a spread "
                     "over seeds alone would claim certainty)")


def error_rate(outcomes: Sequence[np.ndarray] | None, rates: Sequence[float],
               images: int | None, level: float = LEVEL) -> Estimate:
    """The error rate of one configuration from its seeds: `rates` (each seed's error on the
    test set), `outcomes` (each seed's 0/1 vector over the same test images, or None where not
    recorded) and `images` (the test set's size, or None where not recorded). See the module
    docstring for the methods; the interval (at `level`) is clipped to [0, 1]. Inputs that
    cannot describe seeds scored on one test set raise ValueError, saying what is wrong."""
    rates, level = rates_per_seed(rates, "error_rate"), checked_level(level)
    images = test_set_size(images, [] if outcomes is None else outcomes)
    table = None if outcomes is None or images is None \
        else outcome_table(outcomes, rates, images, "error_rate")
    n = len(rates)
    if n == 0:
        return _no_interval(math.nan, 0, "", "no completed seed")
    mean, std = float(rates.mean()), _seed_std(rates)
    if n < 2:
        return _no_interval(mean, n, CROSSED if table is not None else BINOMIAL_BOUND, ONE_SEED)
    if table is not None and images >= 2:
        grand, pivot = _crossed(table, stream=0)
        (estimate,) = _from_pivot(grand, pivot, n, std, CROSSED, (0.0, 1.0), (level,))
        return _exact_at_the_ends(estimate, images, level)
    if images:
        bounded = Pivot(variance_draws(std**2 / n, n - 1, binomial_bound(mean, images)))
        (estimate,) = _from_pivot(mean, bounded, n, std, BINOMIAL_BOUND, (0.0, 1.0), (level,))
        return _exact_at_the_ends(estimate, images, level)
    return _over_seeds_only(rates, (0.0, 1.0), level)


_TIE_TOLERANCE = 1e-12  # values, relative to their size, that tie but for rounding


def _tied(values: np.ndarray) -> bool:
    """Whether the seeds' values tie: equal, or equal but for floating-point rounding (the
    differences 2/360 - 1/360 and 3/360 - 2/360 differ in their last bits, which would give an
    interval of width 1e-17 and p ~ 1e-16). Real seeds' values differ by far more: rates by
    1/size of their set."""
    return float(np.ptp(values)) <= _TIE_TOLERANCE * max(1.0, float(np.abs(values).max()))


def _over_seeds_only(values: np.ndarray, bounds: tuple[float, float], level: float) -> Estimate:
    """Student's t over seeds for an error rate whose test set's size is unknown: conditional on
    this test set, and no interval at all where the seeds tie (it would have zero width)."""
    if len(values) >= 2 and _tied(values):
        return _no_interval(float(values.mean()), len(values), SEEDS_ONLY, TIED_SIZE_UNKNOWN)
    return seed_mean(values, bounds, note=SIZE_UNKNOWN, level=level)


def seed_mean(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf),
              note: str = "", level: float = LEVEL, *, exact_ties: bool = False,
              not_independent: str = "") -> Estimate:
    """Mean over seeds with the Student t interval and the one-sample t-test's p-value (a metric
    without test-set sampling: FLOPs, time, training error), clipped to `bounds`. Values that
    tie give no interval (their spread is unknown, not zero: four seeds at 0% training error,
    or differences of one image each, would claim certainty), except with `exact_ties`, for
    what a configuration fixes (FLOPs, parameters): their zero-width interval is the truth.
    Values that are not independent draws (`not_independent` says why: stacked seeds' shares of
    one timing) give the mean alone."""
    values, level = finite_values(values, "seed_mean"), checked_level(level)
    bounds = checked_bounds(bounds)
    n = len(values)
    if n == 0:
        return _no_interval(math.nan, 0, SEEDS_ONLY, "no completed seed")
    mean = float(values.mean())
    if n < 2 or not_independent:
        return _no_interval(mean, n, SEEDS_ONLY, ONE_SEED if n < 2 else not_independent)
    if not exact_ties and _tied(values):
        return _no_interval(mean, n, SEEDS_ONLY, f"{note}; {TIED_SEEDS}" if note else TIED_SEEDS)
    std = _seed_std(values)
    se = std / math.sqrt(n)
    half = float(scipy_stats.t.ppf(0.5 + level / 2, n - 1)) * se
    p_value = float(2 * scipy_stats.t.sf(abs(mean) / se, n - 1)) if se > 0 else math.nan
    return Estimate(mean, std, se, max(mean - half, bounds[0]), min(mean + half, bounds[1]),
                    p_value, n, SEEDS_ONLY, note)


def paired_difference(base: Sequence[np.ndarray] | None, other: Sequence[np.ndarray] | None,
                      base_rates: Sequence[float], other_rates: Sequence[float],
                      images: int | None, level: float = LEVEL) -> Estimate:
    """Error rate of `other` minus `base`, seeds paired by position: the contrast of two cells
    with weights (-1, 1) (see `contrast`). With per-image outcomes for both, the crossed
    analysis of the table of per-image differences; else the per-seed differences with the
    binomial bound on the test set. The interval (at `level`) is clipped to [-1, 1]."""
    return paired_differences(base, other, base_rates, other_rates, images, (level,))[0]


def paired_differences(base: Sequence[np.ndarray] | None, other: Sequence[np.ndarray] | None,
                       base_rates: Sequence[float], other_rates: Sequence[float],
                       images: int | None, levels: Sequence[float]) -> list[Estimate]:
    """`paired_difference` at each of `levels`, from one analysis of the table (an adaptive
    rule asks for two levels of every comparison at every look: the analysis, not the
    intervals, is most of the time)."""
    return _contrast("paired_difference", [base, other], (-1.0, 1.0), [base_rates, other_rates],
                     images, tuple(levels))


def contrast(tables_by_cell: Sequence[Sequence[np.ndarray] | None] | None,
             weights: Sequence[float], rates_by_cell: Sequence[Sequence[float]],
             images: int | None, level: float = LEVEL) -> Estimate:
    """A contrast of error rates, ``sum_c weights[c] * rate(c)``, seeds paired by position across
    the cells: a difference for weights (-1, 1); the difference of differences of a two-factor
    interaction for (1, -1, -1, 1); the mean of k configurations' differences for weights
    +-1/k over their 2k cells (what `compare`'s "all" row and a main effect are: the cells
    share one test set, so their per-image differences are averaged image by image and seed by
    seed, never treated as independent).

    `rates_by_cell[c][i]` is seed i's error rate in cell c; `tables_by_cell[c]` that cell's
    per-seed 0/1 vectors over the shared test images (None for the whole, or for any cell, where
    not recorded); `images` the test set's size (None where not recorded). Methods, as for a
    difference: the crossed seeds x images analysis of the per-image contrast table
    ``sum_c w_c W_c``; without a per-image record, the per-seed contrasts with the test set
    bounded per sign of the weights, as if the cells of a sign were perfectly correlated (see
    the module docstring); without the size, Student t over seeds. The
    interval (at `level`) is clipped to the range a contrast of rates can take (``[sum of
    negative weights, sum of positive]``)."""
    return _contrast("contrast", tables_by_cell, weights, rates_by_cell, images, (level,))[0]


def _contrast(what: str, tables_by_cell: Sequence[Sequence[np.ndarray] | None] | None,
              weights: Sequence[float], rates_by_cell: Sequence[Sequence[float]],
              images: int | None, levels: tuple[float, ...]) -> list[Estimate]:
    """A contrast's estimate at each of `levels` (see `contrast`)."""
    weights = finite_values(weights, f"{what}'s weights")
    levels = tuple(checked_level(level) for level in levels)
    if len(rates_by_cell) != len(weights) or \
            len({np.size(r) for r in rates_by_cell}) > 1:
        raise ValueError(f"{what}: {len(weights)} weights and {len(rates_by_cell)} cells of seeds "
                         f"({[int(np.size(r)) for r in rates_by_cell]}): give one weight per cell, "
                         "the cells' seeds paired by position")
    if tables_by_cell is not None and len(tables_by_cell) != len(weights):
        raise ValueError(f"{what}: outcome tables for {len(tables_by_cell)} cells and "
                         f"{len(weights)} weights: give one table per cell (None for a cell "
                         "without its per-image record)")
    rates = [rates_per_seed(r, f"{what}, cell {c}") for c, r in enumerate(rates_by_cell)]
    cells = tables_by_cell if tables_by_cell is not None else [None] * len(rates)
    images = test_set_size(images, [v for t in cells if t is not None for v in t])
    per_image = all(t is not None for t in cells) and images is not None and images >= 2
    tables = [outcome_table(t, r, images, f"{what}, cell {c}")
              for c, (t, r) in enumerate(zip(cells, rates))] if per_image else None
    bounds = (float(weights[weights < 0].sum()), float(weights[weights > 0].sum()))
    n = len(rates[0]) if rates else 0
    if n == 0:
        return [_no_interval(math.nan, 0, "", "no seed with every cell")] * len(levels)
    values = sum(w * r for w, r in zip(weights, rates))
    mean, std = float(values.mean()), _seed_std(values)
    if n < 2:
        return [_no_interval(mean, n, CROSSED if per_image else BINOMIAL_BOUND, ONE_SEED)] \
            * len(levels)
    if tables is not None:
        grand, pivot = _crossed(sum(w * t for w, t in zip(weights, tables)), stream=3)
        return _from_pivot(grand, pivot, n, std, CROSSED, bounds, levels)
    if images:
        test_part = shared_test_set_bound(weights, [float(r.mean()) for r in rates], images)
        bounded = Pivot(variance_draws(std**2 / n, n - 1, test_part, stream=3))
        return _from_pivot(mean, bounded, n, std, BINOMIAL_BOUND, bounds, levels)
    return [_over_seeds_only(values, bounds, level) for level in levels]


__all__ = ["BINOMIAL_BOUND", "CROSSED", "Estimate", "FEW_SEEDS", "LEVEL", "SEEDS_ONLY",
           "SeedRecordsError", "contrast", "error_rate", "paired_difference",
           "paired_differences", "seed_mean"]
