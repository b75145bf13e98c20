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
where the test images dominate it is the normal interval. The seeds' mean square is taken no
lower than the seed x image residual allows (``E[MS_seed] >= E[MS_resid]``; see
`LEAST_PLAUSIBLE_QUANTILE`): two seeds whose error counts tie while they disagree image by image
are not seeds without variance. Between the two extremes, with so few degrees of freedom, a
pivot of this kind over-covers (up to 98.8% at n = 2). **Calibration** (from n = 3 on):
the pivot is taken at a level that depends on the seed share the table shows and on n
(`_alpha_widening`), chosen so that under the model the coverage of the 95% interval stays at 95.5%
+- 1 point at every true seed share (minimax over the share, half a point to the safe side;
`benchmarks/calibrate_pivot.py` made the constants and plots the coverage before and after). At n =
2 the pivot is taken as it is: conservative (see `PIVOT_CALIBRATION`). At other levels alpha is
changed in the same proportion; the p-value is rescaled so that p < 0.05 exactly when the 95%
interval excludes zero. The coverage is over studies: a table whose seeds happen to nearly tie
shows a small seed share and covers less (about 76-87% at n = 2 in the tests' regimes), one that
shows a large share more, as Student's t does conditional on a small sample variance.

Paired comparisons apply the same analysis to the table of differences ``w(level) - w(baseline)``
(seeds paired by seed number, images by position): the images' shared difficulty cancels, which
is what makes a per-image paired test more powerful than one over seed means. Any contrast of
configurations scored on one test set is analysed the same way (`contrast`): an interaction's
difference of differences, and the mean of several configurations' differences (a main
effect), whose per-image table is averaged seed by seed and image by image, so that what the
configurations share (the test images, and anything a seed number fixes) is counted once.

**Without a per-image record** (stores written before it was kept), the test-image term is bounded
by the binomial variance of N images, ``p(1 - p)/N`` (an upper bound for it under the model;
for a difference the two configurations' terms are added, which assumes images are not harder
for one configuration exactly where they are easier for the other): conservative, and said so.

The variance has a floor: what Agresti-Coull allows a test set of N images without a single
error, ``r(1 - r)/N`` with ``r = 2/(N + 4)``, so that no table, not even one without a single
error or disagreement, gives a zero-width interval; on ordinary tables it does not bind (a floor
that did would make the interval conservative). Intervals are clipped to the metric's range.
With one seed there is no estimate of seed-to-seed variation and no interval.

Inputs that cannot describe seeds scored on one test set raise one ValueError (seed_tables.py).
Without the test set's size an interval is over seeds only and conditional on this test set;
seeds that tie then get none (a zero-width interval would claim certainty).

The tests (tests/test_stats.py) hold these methods to simulated studies drawn from the model with
known truth (in its Bernoulli form, a logistic model of seeds and images): in two regimes (seeds
that vary little next to the test set's sampling, and as much), coverage of the 95% interval
within 93-97% at n = 3, 5, 10 and 94-98.8% at n = 2; the paired test's type I error at most 6%
over those seed counts (7% at each), also for seeds that tie and differ on a few images, and
at two seeds whose counts tie often p < 0.01 and p < 0.001 no more often than 1.5% and 0.3%; the
mean over configurations that share a test set and a per-image effect at most 7.5% at 3 and 10
seeds. Where seeds dominate far more (logit seed effects of sd 0.8), the seed means are skewed
and the interval covers as Student's t over them does: about 93% at n = 2 and 89-91% at n = 3
to 10 (the test holds it to the t interval's coverage).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize
from scipy import stats as scipy_stats
from scipy.special import ndtr  # the normal distribution function, without scipy.stats' overhead

from .seed_tables import (checked_bounds, checked_level, finite_values, image_df, outcome_table,
                          rates_per_seed, test_set_size)

LEVEL = 0.95
FEW_SEEDS = 3  # below this, an interval says mostly that there are too few seeds

CROSSED = "seeds x test images (crossed random effects, generalized pivot)"
BINOMIAL_BOUND = "seeds + binomial bound on the test set (conservative: no per-image record)"
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
# The pivot: a generalized pivotal quantity for the mean


# Chi-square draws per seed term: a stratified (Latin hypercube) sample, fixed so that the same
# table always gives the same interval.
PIVOT_DRAWS = 1024
_PIVOT_SEED = 20161207


@functools.lru_cache(maxsize=64)
def _chi2_draws(seed_df: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([_PIVOT_SEED, stream])
    cells = (rng.permutation(PIVOT_DRAWS) + rng.random(PIVOT_DRAWS)) / PIVOT_DRAWS
    draws = scipy_stats.chi2.ppf(cells, seed_df)
    draws.flags.writeable = False  # shared by every call: the cache hands out one array
    return draws


_IMAGE_STREAMS = 16  # the images' draws use streams of their own: independent of the seeds'


def _pivot_variances(seed_scale: float, seed_df: int, fixed: float, stream: int = 0,
                     fixed_df: int | None = None) -> np.ndarray:
    """Draws of the variance of the mean given what the table shows.

    The seeds' part has an estimate `seed_scale` with only n - 1 degrees of freedom: its true
    value is drawn as ``seed_scale * df / X`` with ``X ~ chi2(df)`` (Weerahandi's generalized
    pivotal quantity). At n = 2 this is what keeps the interval honest: one degree of freedom
    cannot rule out a seed variance several times the one observed. The test images' part
    (`fixed`) is drawn the same way with its own `fixed_df` (`seed_tables.image_df`),
    independently; None takes it as known (the binomial bound, an upper bound already)."""
    variances = seed_scale * seed_df / _chi2_draws(seed_df, stream) + fixed
    if fixed_df is not None:
        variances += fixed * (fixed_df / _chi2_draws(fixed_df, stream + _IMAGE_STREAMS) - 1)
    return variances


@dataclass(frozen=True)
class Pivot:
    """What an interval is drawn from: the variance draws, and for the calibration the seeds'
    degrees of freedom and their estimated share of the variance (None: not calibrated, as for
    the conservative binomial bound and for combined strata)."""

    variances: np.ndarray
    seed_df: int = 0
    seed_share: float | None = None


# The pivot's calibration (module docstring): at df seed degrees of freedom the 95% pivot is
# taken at the level interpolated at the table's seed share between these knots, the levels
# from benchmarks/calibrate_pivot.py --fit (minimax over the true share of |coverage - 95.5%|
# under the model; that script prints the coverage before and after). At one degree of freedom
# (two seeds) there is none: the pivot is taken as it is, over-covering (up to 98.8%) rather
# than narrowed. There the share a table shows says little of the true one (two seeds that
# differ by chance tie often), and the narrowing the fit found fell below 95% in the model's
# Bernoulli form where it matters most: coverage 92% where seeds dominate, and a paired test
# that rejected 8.2% of seeds that tie and differ on a few images (tests/test_stats.py holds
# both). Beyond 9 degrees of freedom the pivot is within a point of 95.5% as it is.
CALIBRATION_KNOTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
PIVOT_CALIBRATION: dict[int, tuple[float, ...]] = {
    2: (0.9526, 0.8883, 0.9517, 0.9534, 0.9584, 0.9472),
    3: (0.9536, 0.9232, 0.9352, 0.9457, 0.9533, 0.9519),
    4: (0.9544, 0.9370, 0.9323, 0.9511, 0.9497, 0.9541),
    5: (0.9548, 0.9423, 0.9394, 0.9472, 0.9512, 0.9539),
    6: (0.9589, 0.9432, 0.9323, 0.9594, 0.9421, 0.9568),
    7: (0.9539, 0.9498, 0.9399, 0.9539, 0.9482, 0.9554),
    8: (0.9633, 0.9349, 0.9614, 0.9223, 0.9681, 0.9457),
    9: (0.9585, 0.9402, 0.9630, 0.9285, 0.9630, 0.9486),
}


def _alpha_widening(seed_df: int, share: float | None) -> float:
    """How much the calibration (see above) widens a pivot's alpha: at 95% to the calibrated
    level's, at other levels in the same proportion (1 where there is nothing to calibrate)."""
    if share is None or seed_df not in PIVOT_CALIBRATION:
        return 1.0
    level = float(np.interp(share, CALIBRATION_KNOTS, PIVOT_CALIBRATION[seed_df]))
    return (1 - level) / (1 - LEVEL)


def _from_pivot(mean: float, pivot: Pivot, n: int, std: float, method: str,
                bounds: tuple[float, float], note: str = "", level: float = LEVEL) -> Estimate:
    """Interval and p-value from the pivot ``mean - Z sqrt(V)``, Z standard normal and V the
    variance draws: its distribution function is a mixture of normals, evaluated exactly in Z,
    so that small p-values are accurate rather than a count of draws. Calibrated where the pivot
    carries a seed share (`_alpha_widening`)."""
    sd = np.sqrt(pivot.variances)

    def below(value: float) -> float:  # P(pivot <= value)
        return float(np.mean(ndtr((value - mean) / sd)))

    reach = 50 * float(sd.max())
    widening = _alpha_widening(pivot.seed_df, pivot.seed_share)
    alpha = min((1 - level) * widening, 0.99)  # below a 1% interval, widening has no room
    low = optimize.brentq(lambda v: below(v) - alpha / 2, mean - reach, mean, xtol=1e-7)
    high = optimize.brentq(lambda v: below(v) - (1 - alpha / 2), mean, mean + reach, xtol=1e-7)
    # Rescaled so that p < 0.05 exactly where the calibrated 95% interval excludes zero.
    zero = 2 * float(np.mean(ndtr(-abs(mean) / sd)))
    return Estimate(mean, std, float(math.sqrt(np.median(pivot.variances))),
                    max(low, bounds[0]), min(high, bounds[1]), min(zero / widening, 1.0), n,
                    method, note)


# ----------------------------------------------------------------------------------------------
# The crossed seeds x images analysis


def _crossed(table: np.ndarray, stream: int) -> tuple[float, Pivot]:
    """(grand mean, pivot) of an n x N table under the crossed random-effects model (module
    docstring); n >= 2, N >= 2.

    The variance of the grand mean is written as two parts, each from mean squares: the seeds'
    ``MS_seed/(n N)``, uncertain (n - 1 df, see `_pivot_variances`), and the test images'
    ``(MS_image - MS_resid)/(n N)``, precise where many images carry it and less so where few do
    (`seed_tables.image_df`). The seeds' mean square is taken no lower than the residual's
    (`_least_plausible_ratio`). A floor keeps a table without a single error (or disagreement)
    from a zero width."""
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
    seeds = max(seeds, ms_resid / cells * _least_plausible_ratio(n - 1))
    # The floor: what Agresti-Coull allows N images without a single error (seeds may all agree,
    # so the images, not the n N outcomes, are the sample). On the estimate, not on each draw,
    # and no higher: a floor that binds on ordinary tables truncates the pivot and makes it
    # conservative.
    test_images = max(test_images, _floor(0.0, images) - seeds)
    variances = _pivot_variances(seeds, n - 1, test_images, stream, image_df(image_means))
    return grand, Pivot(variances, n - 1, seeds / (seeds + test_images))


# E[MS_seed] = N s2_seed + s2_resid is at least E[MS_resid], and the residual, on (n - 1)(N - 1)
# degrees of freedom, is known almost exactly: the seeds' mean square below MS_resid times the
# chi2(n - 1)/(n - 1) quantile at this level is less than even seeds without an effect of their
# own would show 95% of the time. In 0/1 tables it happens far more often than that: two
# seeds whose error counts tie (or differences that tie) have MS_seed = 0 while they disagree
# image by image, and the pivot read such a tie as seeds without variance (p = 0.0004 where
# McNemar on one seed gives 0.64; p < 0.001 for 1.5% of null studies of two seeds, 15 times
# too often). Taken no lower, the tie reads as what the residual alone allows; in normal theory
# the floor touches the 5% of tables with the smallest seed mean square where seeds have no
# effect of their own and fewer where they have one, so the calibration stands.
LEAST_PLAUSIBLE_QUANTILE = 0.05


@functools.lru_cache(maxsize=64)
def _least_plausible_ratio(seed_df: int) -> float:
    """The least MS_seed/MS_resid taken as observed (above): chi2(df) at its
    LEAST_PLAUSIBLE_QUANTILE, over df."""
    return float(scipy_stats.chi2.ppf(LEAST_PLAUSIBLE_QUANTILE, seed_df)) / seed_df


def _floor(count: float, cells: int) -> float:
    """The least variance a mean of `cells` 0/1 outcomes with `count` ones can honestly claim:
    binomial at the Agresti-Coull rate (count + 2)/(cells + 4)."""
    rate = (count + 2) / (cells + 4)
    return rate * (1 - rate) / cells


def _binomial_bound(rate: float, images: int) -> float:
    """p(1 - p)/N: the test-image part's upper bound when no per-image record was kept."""
    return _floor(rate * images, images)


def _no_interval(mean: float, n: int, method: str, reason: str) -> Estimate:
    return Estimate(mean, math.nan, math.nan, math.nan, math.nan, math.nan, n, method, reason)


def _seed_std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else math.nan


ONE_SEED = "one seed: seed-to-seed variation unknown, no interval"
SIZE_UNKNOWN = "conditional on this test set: its size was not recorded"
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
        return _from_pivot(grand, pivot, n, std, CROSSED, (0.0, 1.0), level=level)
    if images:
        bounded = Pivot(_pivot_variances(std**2 / n, n - 1, _binomial_bound(mean, images)))
        return _from_pivot(mean, bounded, n, std, BINOMIAL_BOUND, (0.0, 1.0), level=level)
    return _over_seeds_only(rates, (0.0, 1.0), level)


def _over_seeds_only(values: np.ndarray, bounds: tuple[float, float], level: float) -> Estimate:
    """Student's t over seeds for an error rate whose test set's size is unknown: conditional on
    this test set, and no interval at all where the seeds tie (it would have zero width)."""
    if len(values) >= 2 and np.ptp(values) == 0:
        return _no_interval(float(values.mean()), len(values), SEEDS_ONLY, TIED_SIZE_UNKNOWN)
    return seed_mean(values, bounds, note=SIZE_UNKNOWN, level=level)


def seed_mean(values: Sequence[float], bounds: tuple[float, float] = (-math.inf, math.inf),
              note: str = "", level: float = LEVEL) -> Estimate:
    """Mean over seeds with the Student t interval and the one-sample t-test's p-value (a metric
    without test-set sampling: FLOPs, time, training error), clipped to `bounds`. Values that
    do not vary give a zero-width interval: for FLOPs and parameters that is the truth."""
    values, level = finite_values(values, "seed_mean"), checked_level(level)
    bounds = checked_bounds(bounds)
    n = len(values)
    if n == 0:
        return _no_interval(math.nan, 0, SEEDS_ONLY, "no completed seed")
    mean = float(values.mean())
    if n < 2:
        return _no_interval(mean, n, SEEDS_ONLY, ONE_SEED)
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
    return _contrast("paired_difference", [base, other], (-1.0, 1.0), [base_rates, other_rates],
                     images, level)


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
    bounded by ``sum_c w_c^2 p_c(1 - p_c)/N``; without the size, Student t over seeds. The
    interval (at `level`) is clipped to the range a contrast of rates can take (``[sum of
    negative weights, sum of positive]``)."""
    return _contrast("contrast", tables_by_cell, weights, rates_by_cell, images, level)


def _contrast(what: str, tables_by_cell: Sequence[Sequence[np.ndarray] | None] | None,
              weights: Sequence[float], rates_by_cell: Sequence[Sequence[float]],
              images: int | None, level: float) -> Estimate:
    weights = finite_values(weights, f"{what}'s weights")
    level = checked_level(level)
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
        return _no_interval(math.nan, 0, "", "no seed with every cell")
    values = sum(w * r for w, r in zip(weights, rates))
    mean, std = float(values.mean()), _seed_std(values)
    if n < 2:
        return _no_interval(mean, n, CROSSED if per_image else BINOMIAL_BOUND, ONE_SEED)
    if tables is not None:
        grand, pivot = _crossed(sum(w * t for w, t in zip(weights, tables)), stream=3)
        return _from_pivot(grand, pivot, n, std, CROSSED, bounds, level=level)
    if images:
        test_part = sum(w**2 * _binomial_bound(float(r.mean()), images)
                        for w, r in zip(weights, rates))
        bounded = Pivot(_pivot_variances(std**2 / n, n - 1, test_part, stream=3))
        return _from_pivot(mean, bounded, n, std, BINOMIAL_BOUND, bounds, level=level)
    return _over_seeds_only(values, bounds, level)


__all__ = ["BINOMIAL_BOUND", "CROSSED", "Estimate", "FEW_SEEDS", "LEVEL", "SEEDS_ONLY",
           "contrast", "error_rate", "paired_difference", "seed_mean"]
