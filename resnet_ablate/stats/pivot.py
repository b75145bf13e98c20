"""The generalized pivotal quantity behind resnet_ablate.stats' intervals, and its calibration.

A mean's variance is a seeds' part, estimated from n - 1 degrees of freedom, plus a test-image
part; the pivot draws each from what its estimate allows (`variance_draws`, Weerahandi), and the
interval is taken at a level calibrated under the model (`alpha_widening`; made by
benchmarks/calibrate_pivot.py). intervals.py documents the model and the methods; this module holds
the draws and the constants. Torch-free.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import stats as scipy_stats
from scipy.special import ndtr, ndtri

# Chi-square draws per seed term: a stratified (Latin hypercube) sample, fixed so that the same
# table always gives the same interval.
PIVOT_DRAWS = 1024
_PIVOT_SEED = 20161207


# The images' degrees of freedom take hundreds of values over a study's tables, each draw's
# quantiles a millisecond to compute: kept for 1,024 of them (8 MiB).
@functools.lru_cache(maxsize=1024)
def _chi2_draws(seed_df: int, stream: int) -> np.ndarray:
    rng = np.random.default_rng([_PIVOT_SEED, stream])
    cells = (rng.permutation(PIVOT_DRAWS) + rng.random(PIVOT_DRAWS)) / PIVOT_DRAWS
    draws = scipy_stats.chi2.ppf(cells, seed_df)
    draws.flags.writeable = False  # shared by every call: the cache hands out one array
    return draws


_IMAGE_STREAMS = 16  # the images' draws use streams of their own: independent of the seeds'


def variance_draws(seed_scale: float, seed_df: int, fixed: float, stream: int = 0,
                   fixed_df: int | None = None, seed_floor: float = 0.0) -> np.ndarray:
    """Draws of the variance of the mean given what the table shows.

    The seeds' part has an estimate `seed_scale` with only n - 1 degrees of freedom: its true
    value is drawn as ``seed_scale * df / X`` with ``X ~ chi2(df)`` (Weerahandi's generalized
    pivotal quantity), never below `seed_floor` (`seed_draw_floor`). At n = 2 this is what
    keeps the interval honest: one degree of freedom cannot rule out a seed variance several
    times the one observed. The test images' part (`fixed`) is drawn the same way with its own
    `fixed_df` (`seed_tables.image_df`), independently; None takes it as known (the binomial
    bound, an upper bound already)."""
    seeds = seed_scale * seed_df / _chi2_draws(seed_df, stream)
    variances = np.maximum(seeds, seed_floor) + fixed
    if fixed_df is not None:
        variances += fixed * (fixed_df / _chi2_draws(fixed_df, stream + _IMAGE_STREAMS) - 1)
    return variances


_ROOT_TWO_PI = math.sqrt(2 * math.pi)
_sum = np.add.reduce
_HALF_WIDTH_TOLERANCE = 1e-10  # relative: far below any digit an interval is shown with
_HALF_WIDTH_STEPS = 200  # a bound only: Newton takes a few steps on the draws variance_draws makes


@dataclass(frozen=True)
class Pivot:
    """What an interval is drawn from: the variance draws, and for the calibration the seeds'
    degrees of freedom, their estimated share of the variance (None: not calibrated, as for
    the conservative binomial bound) and the residual's estimated share of theirs
    (`residual_share_shown`)."""

    variances: np.ndarray
    seed_df: int = 0
    seed_share: float | None = None
    residual_share: float = 0.0

    def half_width(self, alpha: float) -> float:
        """h with P(|Z| sqrt(V) > h) = alpha: the interval is the mean +- h, the pivot being a
        scale mixture of normals about the mean, symmetric. Newton's method on the log of the
        mixture's exact tail, from the quantile of the normal with the mixture's variance, kept
        inside the bracket that the least and largest draws' quantiles give (the mixture's lies
        between them): 3.9 evaluations to 1e-10 on average (4.6 from the median draw's
        quantile, which also cost a median; bisecting both ends took some thirty)."""
        # (Sums by the ufunc itself, not numpy's mean: this runs tens of thousands of times in a
        # simulation, and the functions' Python layers were a third of its time.)
        sd = np.sqrt(self.variances)
        positive = sd > 0
        share = positive.sum() / sd.size  # a draw of no variance puts no weight beyond any h > 0
        sd = sd[positive]
        if sd.size == 0:
            return 0.0
        inverse = 1.0 / sd
        z = -float(ndtri(alpha / 2))  # (not ndtri(1 - alpha/2): 1 - alpha/2 rounds off alpha)
        low, high = (z * float(sd.min()) if share == 1 else 0.0), z * float(sd.max())
        h = z * math.sqrt(float(_sum(self.variances)) / self.variances.size)
        target, count = alpha / 2, sd.size
        for _ in range(_HALF_WIDTH_STEPS):
            scaled = h * inverse
            tail = share * float(_sum(ndtr(-scaled))) / count  # P(Z sqrt(V) > h), decreasing in h
            if tail > target:
                low = h
            else:
                high = h
            scaled *= scaled
            scaled *= -0.5
            np.exp(scaled, out=scaled)
            scaled *= inverse
            density = share * float(_sum(scaled)) / count / _ROOT_TWO_PI
            step = (h + math.log(tail / target) * tail / density if tail > 0 and density > 0
                    else math.nan)
            if abs(step - h) <= _HALF_WIDTH_TOLERANCE * h:
                return step
            # (Converged steps are taken before this: the last one may land on the bracket.)
            h = step if low < step < high else (
                math.sqrt(low * high) if low > 0 else (low + high) / 2)
        return h  # (never reached in the tests: bisection alone would halve the bracket 200 times)


# The pivot's calibration (stats' module docstring): at df seed degrees of freedom the 95% pivot is
# taken at a level interpolated (bilinearly) at the table's seed share, between CALIBRATION_KNOTS,
# and at the residual's share of the seeds' part (`residual_share_shown`), between RESIDUAL_KNOTS:
# PIVOT_CALIBRATION[df][r][k] is the level at residual knot r and share knot k. The levels come
# from benchmarks/calibrate_pivot.py --fit (minimax over the true shares of |coverage - 95.5%|
# under the model, kept only where it beats the pivot as it is): first the row without a residual,
# over true seed shares alone (where a table shows no residual, none is there: 0.3.3's row, which
# the script keeps where it holds, as it does here); then, that row fixed, the rows with one, over
# the residual's true shares too, none above it, so that the residual's share only ever narrows an
# interval (fitted freely, the rows rose at intermediate shares, and where seeds dominate the
# paired test lost power). That script prints the coverage before and after: 94.5-96.5% at every
# seed share and residual share from 3 to 10 seeds, where it was 95.2-97.7% (95.2-95.8% without a
# residual, as before); the worst, 94.5%, where 3 seeds show a residual share far above its true
# one, small (0.1), which at 3 seeds they often do. Before 0.4.0 the levels were the row without a
# residual alone, and where the residual makes up the seeds' part (seeds without an effect of their
# own: converged networks compared on one test set, the commonest comparison) the interval covered
# up to 97.7% (3 seeds, seeds' share 95%) and the paired test was conservative
# (tests/test_stats.py; README gives the figures). At one degree of freedom (two seeds) there is no
# calibration: the pivot is taken as it is, over-covering (up to 98.8%; 99.6% where the residual
# makes up the seeds' part, `seed_draw_floor`) rather than narrowed. There the share a table shows
# says little of the true one (two seeds that differ by chance tie often), and the narrowing the
# fit found fell below 95% in the model's Bernoulli form where it matters most: coverage 92% where
# seeds dominate, and a paired test that rejected 8.2% of seeds that tie and differ on a few images
# (tests/test_stats.py holds both). Beyond 9 degrees of freedom the pivot is within a point of
# 95.5% as it is.
CALIBRATED_LEVEL = 0.95
CALIBRATION_KNOTS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
RESIDUAL_KNOTS = (0.0, 0.5, 1.0)
PIVOT_CALIBRATION: dict[int, tuple[tuple[float, ...], ...]] = {
    2: (
        (0.9526, 0.8883, 0.9517, 0.9534, 0.9584, 0.9472),
        (0.9522, 0.8871, 0.951, 0.953, 0.9574, 0.9458),
        (0.9522, 0.888, 0.951, 0.9469, 0.9319, 0.9468),
    ),
    3: (
        (0.9536, 0.9232, 0.9352, 0.9457, 0.9533, 0.9519),
        (0.9533, 0.9222, 0.9349, 0.945, 0.952, 0.9517),
        (0.9529, 0.9232, 0.9348, 0.9441, 0.9425, 0.9444),
    ),
    4: (
        (0.9544, 0.937, 0.9323, 0.9511, 0.9497, 0.9541),
        (0.9535, 0.9352, 0.9296, 0.9493, 0.9493, 0.9538),
        (0.9538, 0.9366, 0.9323, 0.9479, 0.9393, 0.9454),
    ),
    5: (
        (0.9548, 0.9423, 0.9394, 0.9472, 0.9512, 0.9539),
        (0.9531, 0.9402, 0.937, 0.9463, 0.9486, 0.9538),
        (0.9544, 0.9399, 0.9372, 0.9456, 0.9425, 0.9456),
    ),
    6: (
        (0.9589, 0.9432, 0.9323, 0.9594, 0.9421, 0.9568),
        (0.9571, 0.941, 0.9309, 0.9573, 0.9411, 0.9568),
        (0.9572, 0.9423, 0.9309, 0.9578, 0.9398, 0.9505),
    ),
    7: (
        (0.9539, 0.9498, 0.9399, 0.9539, 0.9482, 0.9554),
        (0.9524, 0.9491, 0.9387, 0.9516, 0.9477, 0.9548),
        (0.9533, 0.947, 0.9386, 0.9486, 0.9472, 0.9484),
    ),
    8: (
        (0.9552, 0.9483, 0.9482, 0.9463, 0.9535, 0.9542),
        (0.9536, 0.9468, 0.946, 0.9462, 0.9522, 0.9542),
        (0.9539, 0.9472, 0.9473, 0.9446, 0.9464, 0.9491),
    ),
    9: (
        (0.9571, 0.9454, 0.9537, 0.9454, 0.9509, 0.9529),
        (0.9553, 0.9442, 0.9526, 0.9426, 0.9504, 0.9529),
        (0.9555, 0.9441, 0.9518, 0.9439, 0.9482, 0.9499),
    ),
}


def residual_share_shown(residual: float, seeds: float, floored: bool) -> float:
    """The residual's share of the seeds' part as a table shows it, for the calibration: the
    residual part over the seeds' estimate, at most 1 (beyond it the seeds show less than the
    residual, which the model rules out). A table whose seeds' draws are floored
    (`seed_draw_floor`) is calibrated as one without a residual, as before 0.4.0: its draws
    hold the residual already, and the ties the floor guards are far commoner in tables of 0/1
    outcomes than under the normal model the levels are fitted to, so they keep the level they
    had (three seeds tied at -2 images each: p = 0.10)."""
    if floored or seeds <= 0:
        return 0.0
    return min(residual / seeds, 1.0)


def alpha_widening(seed_df: int, share: float | None, residual_share: float = 0.0) -> float:
    """How much the calibration (see above) widens a pivot's alpha: at 95% to the calibrated
    level's, at other levels in the same proportion (1 where there is nothing to calibrate)."""
    if share is None or seed_df not in PIVOT_CALIBRATION:
        return 1.0
    level = calibrated_level(PIVOT_CALIBRATION[seed_df], share, residual_share)
    return (1 - level) / (1 - CALIBRATED_LEVEL)


def calibrated_level(levels: tuple[tuple[float, ...], ...], share: float,
                     residual_share: float) -> float:
    """The 95% pivot's level from `levels` (a row per RESIDUAL_KNOTS, a level per
    CALIBRATION_KNOTS: one seed count's PIVOT_CALIBRATION, or a fit's), interpolated bilinearly
    at the seed share and residual share a table shows."""
    by_residual = [float(np.interp(share, CALIBRATION_KNOTS, row)) for row in levels]
    return float(np.interp(residual_share, RESIDUAL_KNOTS, by_residual))


# The least seeds' mean square taken as observed (stats._crossed). E[MS_seed] = N s2_seed +
# s2_resid is at least E[MS_resid], and the residual, on (n - 1)(N - 1) degrees of freedom, is
# known almost exactly: a seeds' mean square below MS_resid times the chi2(n - 1)/(n - 1) quantile
# at this level is less than even seeds without an effect of their own would show 95% of the time.
# In 0/1 tables it happens far more often than that: two seeds whose error counts tie (or whose
# differences tie) have MS_seed = 0 while they disagree image by image, and the pivot read such a
# tie as seeds without variance (p = 0.0004 where McNemar on one seed gives 0.64; p < 0.001 for
# 1.5% of null studies of two seeds, 15 times too often). Taken no lower, the tie reads as what the
# residual alone allows (at two seeds, together with `seed_draw_floor`: alone this floor still let
# ties through at 0.05). In normal theory the floor touches the 5% of tables with the smallest
# seeds' mean square where seeds have no effect of their own, and fewer where they have one: the
# calibration stands (within a point; calibrate_pivot.py's band).
LEAST_PLAUSIBLE_QUANTILE = 0.05


@functools.lru_cache(maxsize=64)
def least_plausible_ratio(seed_df: int) -> float:
    """The least MS_seed/MS_resid taken as observed (above): chi2(df) at its
    LEAST_PLAUSIBLE_QUANTILE, over df."""
    return float(scipy_stats.chi2.ppf(LEAST_PLAUSIBLE_QUANTILE, seed_df)) / seed_df


def seed_draw_floor(residual: float, seed_df: int, implausible: bool = False) -> float:
    """The least seeds' part a draw may take: the residual's part ``MS_resid/(n N)``, which the
    seeds' part holds whatever the seeds' own variance, at two seeds (one degree of freedom) and
    from three seeds on where the seeds' mean square was `implausible` (below what seeds without
    an effect of their own show 95% of the time: `least_plausible_ratio`, which it was raised
    to); else none (0).

    Two seeds tie often (2-4% of null studies where seeds vary little), and a tie's small mean
    square, even floored (above), still drew small seed parts: such null studies were called
    different at p < 0.05 40-66% of the time (5% with every draw floored). From three seeds on ties
    are rarer, but not rare where a test set is small or the configurations err on few images:
    three seeds whose differences tie at 2 images each, on different images (3 improved, 9 worse in
    all: a sign test's p = 0.15), gave p = 0.03, and 33-50% of such tied null studies were called
    different (an audit; 43% of those within one image of a tie). Floored where the seeds' mean
    square is implausible, exact ties among null studies are called different 5.5% of the time (21%
    before), ties and near-ties (within an image) 6-9% in the tests' lopsided regime
    (tests/test_stats.py) and 20% over an audit's twelve regimes (37% before): half of the
    near-ties fall above the threshold and are not floored (38% of those called different, where a
    sign test calls 8%). Nothing was made more liberal (0.3.3: no p-value fell), but the switch is
    hard: one image can carry a table across it, so that a tie of -2 images at each of 3 seeds gets
    p = 0.10 and the weaker (-2, -2, -1), not floored, 0.048 (0.4.0's calibration over the
    residual's share narrows such tables a little more: the largest reversal an audit found, at 4
    seeds, 0.098 against 0.052, was 0.060). Flooring every draw from three seeds on (the
    variance-component model's own constraint, and monotone in the seeds' spread) makes the pivot
    conservative where the residual makes up the seeds' part (coverage up to 99.3% at 3 seeds under
    the model; type I error 0.8-1.7% where seeds vary little), and a calibration over the
    residual's share the table shows did not undo it: fitted freely at three residual knots it
    stayed 1.9 points off 95.5% at 3 seeds, where the share shown says too little of the true one.
    So it is done only where the seeds' estimate cannot be taken as it is. Nor was the switch
    softened: a floor shrinking log-linearly from the threshold to the 25% quantile removes the
    reversal ((-2, -2, -1): p = 0.048 -> 0.089) but costs power where nothing is gained (measured
    on 0.4.1: coverage up to 98.3% at 3 seeds under the model where the residual makes up the
    seeds' part, 96.5% as it is; in three lopsided null regimes of 360 images at 3 seeds p < 0.05
    1.3-1.7% of the time, 2.3-3.1% as it is, and the ties and near-ties as often as before)."""
    return residual if seed_df == 1 or implausible else 0.0
