"""The statistics of resnet_ablate/stats/intervals.py held to simulated studies with known truth
(coverage of the 95% interval, type I error of the paired test, at n = 2, 3, 5, 10 seeds), to
hand-computed values, and to the cases that used to overstate the answer (tied seeds, no errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit
from helpers import REGIMES, error_table, offset_for, true_error

from resnet_ablate import stats
from resnet_ablate.stats import pivot

SEED_COUNTS = (2, 3, 5, 10)
TEST_IMAGES = 400
REPLICATIONS = 1000  # simulation error of a coverage ~0.7 points, against the 2 allowed




@pytest.mark.parametrize("regime", list(REGIMES))
def test_error_rate_intervals_cover_thetrue_error_at_2_to_10_seeds(regime):
    error, seed_sd, image_sd = REGIMES[regime]
    offset = offset_for(error, seed_sd, image_sd)
    truth = true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(1)
    for n in SEED_COUNTS:
        covered = 0
        for _ in range(REPLICATIONS):
            # A new test set drawn from the image population, and n new seeds.
            table = error_table(rng, n, offset, seed_sd, image_sd, rng.normal(0, image_sd, TEST_IMAGES))
            estimate = stats.error_rate(list(table), table.mean(axis=1), TEST_IMAGES)
            covered += estimate.low <= truth <= estimate.high
        coverage = covered / REPLICATIONS
        # 95% nominal, held within 93-97% from 3 seeds on: neither overstated nor, as an
        # uncalibrated pivot is at 3 seeds (up to 99%), so wide that it hides real effects. At
        # 2 seeds the pivot is not narrowed (pivot.PIVOT_CALIBRATION) and its draws never fall
        # below the residual (pivot.seed_draw_floor): at least 94%, at most 99.7%.
        low, high = (0.94, 0.997) if n == 2 else (0.93, 0.97)
        assert low <= coverage <= high, (regime, n, coverage)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_paired_test_keeps_its_type_one_error_at_2_to_10_seeds(regime):
    error, seed_sd, image_sd = REGIMES[regime]
    offset = offset_for(error, seed_sd, image_sd)
    rng = np.random.default_rng(2)
    rejected = {}
    for n in SEED_COUNTS:
        count = 0
        for _ in range(REPLICATIONS):
            difficulty = rng.normal(0, image_sd, TEST_IMAGES)  # shared: one test set for both
            base = error_table(rng, n, offset, seed_sd, image_sd, difficulty)
            level = error_table(rng, n, offset, seed_sd, image_sd, difficulty)  # no true difference
            estimate = stats.paired_difference(list(base), list(level), base.mean(axis=1),
                                               level.mean(axis=1), TEST_IMAGES)
            count += estimate.p_value < 0.05
        rejected[n] = count / REPLICATIONS
    # At most 6% over the seed counts (simulation error 0.35 points), each count at most 7% (its
    # own simulation error 0.7 points); and from 3 seeds on not needlessly conservative: at
    # least 3% over those seed counts and 2% at each. Two seeds are held from above only: their
    # draws never fall below the residual (pivot.seed_draw_floor), which where seeds vary little
    # makes the test conservative (about 0.5% here) rather than call ties different.
    assert np.mean(list(rejected.values())) <= 0.06, rejected
    assert all(rate <= 0.07 for rate in rejected.values()), rejected
    from_three = [rate for n, rate in rejected.items() if n >= 3]
    assert np.mean(from_three) >= 0.03 and min(from_three) >= 0.02, rejected


def test_where_seeds_vary_little_the_paired_test_is_not_needlessly_conservative():
    """Configurations whose seeds have little effect of their own, compared on one test set (as
    converged networks mostly are): the seeds' part of a paired table is then mostly the seed x
    image residual, where the calibration without it over-covered (97.7% at 3 seeds under the
    model) and called 2.95% of these null comparisons different at 3 and 5 seeds on 400 images
    (README: 2.8% and 3.4% over 12,000 and 10,000). Calibrated over the residual's share too
    (0.4.0): 3.65% here; held to at least 3.3% and at most 6%."""
    error, seed_sd, image_sd = REGIMES["images dominate"]
    offset = offset_for(error, seed_sd, image_sd)
    rng = np.random.default_rng(21)
    rejected = []
    for n in (3, 5):
        for _ in range(2000):
            difficulty = rng.normal(0, image_sd, TEST_IMAGES)
            base, level = (error_table(rng, n, offset, seed_sd, image_sd, difficulty)
                           for _ in range(2))
            rejected.append(stats.paired_difference(list(base), list(level), base.mean(axis=1),
                                                    level.mean(axis=1), TEST_IMAGES).p_value
                            < 0.05)
    # 4,000 null comparisons: the simulation's own error about 0.3 points.
    assert 0.033 <= np.mean(rejected) <= 0.06, np.mean(rejected)


def test_the_calibration_holds_under_its_model_at_every_residual_share():
    """pivot.PIVOT_CALIBRATION against the coverage it was fitted to, computed afresh
    (benchmarks/calibrate_pivot.py: quadrature over the seeds' chi-square, the pivot's own
    quantiles): within a point of 95.5% at the true shares and residual shares sampled (the
    fit's worst case is a point, at 3 seeds), which the levels without a residual's share missed
    by 2.2 (97.7% at 3 seeds). A change to the pivot's rule without a refit of its constants
    fails here."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "calibrate_pivot.py"
    spec = importlib.util.spec_from_file_location("calibrate_pivot", path)
    calibrate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(calibrate)
    covered = {(df, share, residual): calibrate.coverage(share, df, pivot.PIVOT_CALIBRATION[df],
                                                         residual)
               for df in (2, 4, 9) for share in (0.1, 0.45, 0.87, 0.99)
               for residual in (0.0, 0.5, 1.0)}
    assert all(0.9445 <= c <= 0.9655 for c in covered.values()), covered  # (quadrature's 0.05)


def _correlated_pair(rng, n: int, images: int, error: float, difference: float,
                     shared: float) -> tuple[np.ndarray, np.ndarray]:
    """Two configurations that err alike (as a small architectural change does): the same
    seed effect for a seed number, and the same draw for `shared` of its image outcomes."""
    difficulty = rng.normal(0, 1.5, images)
    seeds = rng.normal(0, 0.1, (n, 1))
    draws, own = rng.random((n, images)), rng.random((n, images))
    level_draws = np.where(rng.random((n, images)) < shared, draws, own)
    base = draws < expit(offset_for(error, 0.1, 1.5) + seeds + difficulty)
    level = level_draws < expit(offset_for(error + difference, 0.1, 1.5) + seeds + difficulty)
    return base.astype(float), level.astype(float)


def test_configurations_that_err_alike_on_a_small_test_set_are_told_apart_as_seeds_allow():
    """The variance floor (what 200 images allow a table without an event) bound whatever the
    seed count, so that two configurations whose differences are few and on different images
    could not be told apart below about 1.4 points at any seed count: at 10 seeds a true
    1-point difference was found 7% of the time and a null one never. The floor now shrinks
    as the seeds are seen to disagree image by image: here 1.7% of null comparisons are called
    different and 74% of 1-point differences found (with the floor of 200 images alone, 0% and
    9%), each interval covering its truth at least 95.8% of the time."""
    rng = np.random.default_rng(12)
    images, n, replications = 200, 10, 600
    truth = {d: true_error(offset_for(0.08 + d, 0.1, 1.5), 0.1, 1.5) - 0.08 for d in (0, .01)}
    rejected, covered = {0: 0, 0.01: 0}, {0: 0, 0.01: 0}
    for difference in rejected:
        for _ in range(replications):
            base, level = _correlated_pair(rng, n, images, 0.08, difference, shared=0.9)
            estimate = stats.paired_difference(list(base), list(level), base.mean(axis=1),
                                               level.mean(axis=1), images)
            rejected[difference] += estimate.p_value < 0.05
            covered[difference] += estimate.low <= truth[difference] <= estimate.high
    assert 0.01 <= rejected[0] / replications <= 0.06, rejected
    assert rejected[0.01] / replications >= 0.6, rejected
    assert min(covered.values()) / replications >= 0.94, covered
    # An audit's table: every one of 30 seeds gets 2 more images wrong (+1 point, all 60
    # discordant outcomes one way: the sign test's p is 1.7e-18); it was p = 0.16.
    rng = np.random.default_rng(0)
    base = [(rng.random(images) < 0.08).astype(float) for _ in range(30)]
    level = []
    for row in base:
        worse = row.copy()
        worse[rng.choice(np.flatnonzero(row == 0), 2, replace=False)] = 1
        level.append(worse)
    estimate = stats.paired_difference(base, level, [b.mean() for b in base],
                                       [b.mean() for b in level], images)
    assert estimate.mean == pytest.approx(0.01) and estimate.low > 0.005
    assert estimate.p_value < 1e-6


@pytest.mark.parametrize("n", SEED_COUNTS)
def test_seeds_that_dominate_the_variance_are_covered_as_students_t_covers_them(n):
    # Seeds that vary far more than a large test set samples: the crossed interval is then the t
    # interval over the seed means, exact under normality. A calibration that narrowed it at two
    # seeds covered 91-92%; it must cover as the t interval does, within simulation error.
    seed_sd, image_sd, images = 0.8, 0.3, 2000
    offset = offset_for(0.08, seed_sd, image_sd)
    truth = true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(5 + n)
    crossed = over_seeds = 0
    for _ in range(REPLICATIONS):
        table = error_table(rng, n, offset, seed_sd, image_sd, rng.normal(0, image_sd, images))
        estimate = stats.error_rate(list(table), table.mean(axis=1), images)
        crossed += estimate.low <= truth <= estimate.high
        seed_means = table.mean(axis=1)
        half = scipy_stats.t.ppf(0.975, n - 1) * scipy_stats.sem(seed_means)
        over_seeds += abs(seed_means.mean() - truth) <= half
    # Both cover less than 95% here: seed effects on the logit scale make the seed means skewed,
    # and the t interval is exact only for normal ones (README: about 93% at 2 seeds, 89-91% at
    # 3 to 10). The calibrated pivot this replaced covered 2.7 points less than the t interval on
    # the same tables at 2 seeds.
    assert crossed >= over_seeds - 0.01 * REPLICATIONS, (n, crossed, over_seeds)
    assert 0.87 <= crossed / REPLICATIONS <= 0.95, (n, crossed / REPLICATIONS)


def _lognormal_seeds(sd: float):
    """Right-skewed seed effects on the logit: a lognormal, centred, of standard deviation `sd`."""
    def draw(rng, size):
        z = rng.lognormal(0, 1, size)
        return sd * (z - math.exp(0.5)) / math.sqrt((math.e - 1) * math.e)
    return draw


def _one_in_ten_worse(rng, size):
    """Seeds that train alike (sd 0.1) but one in ten 1.5 logits worse (about 2.4x the error)."""
    return np.where(rng.random(size) < 0.1, 1.5, 0.0) + rng.normal(0, 0.1, size)


@pytest.mark.parametrize("seed_effects, low, high", [
    (_lognormal_seeds(0.4), 0.87, 0.96), (_lognormal_seeds(0.8), 0.72, 0.89),
    (_one_in_ten_worse, 0.80, 0.91)], ids=["lognormal-0.4", "lognormal-0.8", "one-in-ten"])
def test_right_skewed_seed_noise_is_covered_as_readme_says(seed_effects, low, high):
    # The intervals assume roughly symmetric seed effects; README states what they cover when
    # seeds are right-skewed (at 3 to 10 seeds: 88-93%, 75-84%, 83-88% for these three), and
    # that it is no worse than Student's t over the seed means. The truth: the mean over a large
    # sample of seeds and images.
    image_sd, offset = 1.5, -3.2
    rng = np.random.default_rng(7)
    truth = float(expit(offset + seed_effects(rng, 400_000)
                        + rng.normal(0, image_sd, 400_000)).mean())
    for n in (3, 5, 10):
        crossed = over_seeds = 0
        for _ in range(REPLICATIONS):
            wrong = rng.random((n, TEST_IMAGES)) < expit(
                offset + seed_effects(rng, (n, 1)) + rng.normal(0, image_sd, TEST_IMAGES))
            table = wrong.astype(float)
            estimate = stats.error_rate(list(table), table.mean(axis=1), TEST_IMAGES)
            crossed += estimate.low <= truth <= estimate.high
            seed_means = table.mean(axis=1)
            half = scipy_stats.t.ppf(0.975, n - 1) * scipy_stats.sem(seed_means)
            over_seeds += abs(seed_means.mean() - truth) <= half
        coverage, students = crossed / REPLICATIONS, over_seeds / REPLICATIONS
        assert low <= coverage <= high, (n, coverage)
        assert coverage >= students - 0.01, (n, coverage, students)


@pytest.mark.parametrize("spreads, seeds, at_least, at_most", [
    ((0.1, 0.8), 3, 0.06, 0.11), ((0.1, 0.8), 10, 0.05, 0.10), ((0.8, 0.8), 3, 0.0, 0.07)],
    ids=["unequal-3-seeds", "unequal-10-seeds", "equal-3-seeds"])
def test_the_paired_test_where_one_configurations_seeds_vary_far_more(spreads, seeds, at_least,
                                                                      at_most):
    """Both configurations 8% over seeds and images, one's logit seed effects of sd 0.1, the
    other's 0.8 (a net that trains reliably beside one that sometimes does not): the per-seed
    differences are skewed and compare's p < 0.05 in 8.5% of null studies at 3 seeds, 7.5% at
    10 (an audit's 1,500 each), as README states: held within 6-11% and 5-10% here (600
    each: 9.2% and 6.7%), so that a change in either direction is seen; with equal spreads
    within 7% (3.3%)."""
    from helpers import study_in_memory

    images, replications = 1000, 600
    offsets = [offset_for(0.08, sd, 1.5) for sd in spreads]
    rng = np.random.default_rng(21 + seeds)
    rejected = 0
    for _ in range(replications):
        difficulty = rng.normal(0, 1.5, images)
        tables = [error_table(rng, seeds, offset, sd, 1.5, difficulty)
                  for offset, sd in zip(offsets, spreads)]
        study = study_in_memory([({"shortcut": level}, s, table[s])
                                 for level, table in zip(("A", "none"), tables)
                                 for s in range(seeds)])
        rejected += study.compare("shortcut", "A").iloc[0]["p_value"] < 0.05
    assert at_least <= rejected / replications <= at_most, rejected / replications


def test_tied_seeds_that_differ_on_a_few_images_keep_the_type_one_error():
    # Every seed of each configuration identical (seeds that do not matter), the configurations
    # apart on about 20 images, each of which goes either way with probability 1/2 (no true
    # difference): the seeds show no share, and a calibration that narrowed such tables at two
    # seeds rejected 8.5% of them.
    images, replications = 1000, 2000
    rng = np.random.default_rng(6)
    for n in (2, 3):
        rejected = 0
        for _ in range(replications):
            base = (rng.random(images) < 0.08).astype(float)
            other = base.copy()
            apart = rng.random(images) < 0.02
            up = apart & (rng.random(images) < 0.5)
            other[up], base[apart & ~up] = 1 - base[up], 1 - base[apart & ~up]
            tables = np.tile(base, (n, 1)), np.tile(other, (n, 1))
            rejected += stats.paired_difference(*map(list, tables), *(t.mean(axis=1) for t in tables),
                                                images).p_value < 0.05
        # 5% nominal; the simulation's own error is 0.5 points.
        assert rejected / replications <= 0.065, (n, rejected / replications)


def test_two_seeds_whose_error_counts_tie_by_chance_are_not_read_as_certain():
    # Two seeds per configuration that disagree on different images but whose counts happen to
    # tie (60 and 60 wrong, then 55 and 55): the seeds' mean square is 0, yet every seed pair
    # differs on 75 images. McNemar on either seed alone gives p = 0.64; the pivot that read the
    # tie as seeds without variance gave p = 0.0004 and an interval of [-1.9, -0.6] points.
    images = 400

    def net(first: int, own: int) -> np.ndarray:  # 20 images every net misses, `own` of its own
        wrong = np.zeros(images)
        wrong[:20] = 1
        wrong[first:first + own] = 1
        return wrong

    base, other = [net(20, 40), net(60, 40)], [net(100, 35), net(135, 35)]
    estimate = stats.paired_difference(base, other, [b.mean() for b in base],
                                       [o.mean() for o in other], images)
    assert estimate.mean == pytest.approx(-5 / images)
    # As McNemar pooled over both seed pairs, 70 improved and 80 worse (p = 0.46), would have it.
    pooled = scipy_stats.binomtest(70, 150).pvalue
    assert estimate.low < 0 < estimate.high and estimate.p_value == pytest.approx(pooled, abs=0.1)
    assert scipy_stats.binomtest(35, 75).pvalue > 0.6  # the reference the comment quotes


def test_two_seeds_keep_the_paired_test_where_their_counts_tie_often():
    # Null studies where the seeds vary little next to the test set (the regime in which two
    # seeds' error counts tie often, 3.5% of these): p-values below 0.05, 0.01 and 0.001 no more
    # often than nominal, also among the ties. The pivot that read a tie as seeds without
    # variance gave 1.9% below 0.01 and 1.5% below 0.001 here; flooring only the seeds'
    # estimate still called 40% of the ties different at 0.05.
    error, seed_sd, image_sd = REGIMES["images dominate"]
    offset = offset_for(error, seed_sd, image_sd)
    rng = np.random.default_rng(7)
    p_values, tied = [], []
    for _ in range(3000):
        difficulty = rng.normal(0, image_sd, TEST_IMAGES)
        base, level = (error_table(rng, 2, offset, seed_sd, image_sd, difficulty) for _ in range(2))
        p_values.append(stats.paired_difference(list(base), list(level), base.mean(axis=1),
                                                level.mean(axis=1), TEST_IMAGES).p_value)
        tied.append(np.ptp((level - base).sum(axis=1)) == 0)
    p_values, tied = np.array(p_values), np.array(tied)
    # Bounds a little above the nominal rates: 5%, 1% and 0.1% of 3,000 replications are 150,
    # 30 and 3 events (simulation error 0.4, 0.18 and 0.06 points); the ties are about 100.
    rates = [float(np.mean(p_values < level)) for level in (0.05, 0.01, 0.001)]
    assert rates[0] <= 0.06 and rates[1] <= 0.015 and rates[2] <= 0.003, rates
    assert tied.sum() >= 50 and np.mean(p_values[tied] < 0.05) <= 0.1, \
        (tied.sum(), np.mean(p_values[tied] < 0.05))


def test_three_seeds_whose_differences_tie_on_different_images_are_not_read_as_certain():
    # Each seed: the level wrong on 1 image the baseline gets right and right on 3 it gets wrong,
    # other images for each seed (360 images): the seeds' differences tie at -2 images, so
    # their mean square is 0, while pooled over seeds 3 images improved and 9 worsened (a sign
    # test's p = 0.15). The pivot read the tie as seeds that agree: p = 0.03 (an audit), where
    # the same tables with differences of -3, -2 and -1 images gave 0.10.
    images = 360

    def seeds(baseline_wrong: list[list[int]], level_wrong: list[list[int]]):
        tables = []
        for wrong in (baseline_wrong, level_wrong):
            table = np.zeros((3, images))
            table[:, 200:205] = 1  # five images every net misses
            for seed, own in enumerate(wrong):
                table[seed, own] = 1
            tables.append(list(table))
        return tables

    tied = seeds([[10, 11, 12], [14, 15, 16], [18, 19, 20]], [[100], [101], [102]])
    apart = seeds([[10, 11, 12, 50], [14, 15, 16], [18, 19]], [[100], [101], [102]])
    estimates = [stats.paired_difference(base, level, [t.mean() for t in base],
                                         [t.mean() for t in level], images)
                 for base, level in (tied, apart)]
    assert [e.mean for e in estimates] == pytest.approx([-2 / images] * 2)
    assert scipy_stats.binomtest(3, 12).pvalue == pytest.approx(0.146, abs=1e-3)
    assert estimates[0].low < 0 < estimates[0].high
    assert estimates[0].p_value == pytest.approx(estimates[1].p_value, abs=0.03)
    assert estimates[0].p_value == pytest.approx(0.10, abs=0.01)  # README's figure


def test_three_seeds_whose_differences_tie_or_nearly_tie_keep_the_paired_test():
    # Null studies on a small, lopsided test set (360 images, 2% error, most images always right
    # or always wrong: a few discordant images per seed), where the seeds' differences tie or
    # come within an image of a tie often (5% of these at 3 seeds): 33-50% of such studies were
    # called different at p < 0.05 (an audit), the seeds' spread read as none. Overall the test
    # keeps its level; among the ties and near-ties at most 10% (README: 6-9%; nominal 5%; about
    # 50 of them, so the simulation's own error is about 3 points there).
    n, images, replications = 3, 360, 2000
    rng = np.random.default_rng(12)
    p_values, close = [], []
    for _ in range(replications):
        wrong = expit(rng.normal(-7, 4, images))
        base, level = ((rng.random((n, images)) < wrong).astype(float) for _ in range(2))
        p_values.append(stats.paired_difference(list(base), list(level), base.mean(axis=1),
                                                level.mean(axis=1), images).p_value)
        differences = (level - base).sum(axis=1)
        close.append(np.ptp(differences) <= 1 and abs(differences.mean()) >= 1)
    p_values, close = np.array(p_values), np.array(close)
    assert np.mean(p_values < 0.05) <= 0.06 and close.sum() >= 30, \
        (np.mean(p_values < 0.05), close.sum())
    assert np.mean(p_values[close] < 0.05) <= 0.10, (close.sum(), np.mean(p_values[close] < 0.05))


def test_binomial_bound_without_per_image_record_is_conservative():
    error, seed_sd, image_sd = REGIMES["seeds matter"]
    offset = offset_for(error, seed_sd, image_sd)
    truth = true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(3)
    for n in (2, 5):
        covered = 0
        for _ in range(REPLICATIONS):
            table = error_table(rng, n, offset, seed_sd, image_sd, rng.normal(0, image_sd, TEST_IMAGES))
            estimate = stats.error_rate(None, table.mean(axis=1), TEST_IMAGES)
            assert estimate.method == stats.BINOMIAL_BOUND
            covered += estimate.low <= truth <= estimate.high
        assert covered / REPLICATIONS >= 0.93, (n, covered / REPLICATIONS)


@pytest.mark.parametrize("configurations", [5, 10])
def test_the_binomial_bound_holds_for_configurations_that_share_the_test_set(configurations):
    """Without a per-image record, k configurations scored on one test set share its sampling:
    pooled (summary --by, weights 1/k) the test-image part does not shrink by k, and a level
    whose per-image pattern is the same in every configuration does not average out of the "all"
    row. Bounding each cell's part as if the cells were independent covered 87% (k=5) and 72%
    (k=10) pooled, and rejected 7% and 20% of null "all" rows; the bound stays conservative."""
    seed_sd, image_sd, level_sd, n, replications = 0.1, 3.0, 2.0, 5, 300
    offset = offset_for(0.08, seed_sd, image_sd)
    truth = true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(configurations)
    covered = rejected = 0
    for _ in range(replications):
        difficulty = rng.normal(0, image_sd, TEST_IMAGES)
        # Each configuration a little different image by image, around the shared difficulty.
        tables = [error_table(rng, n, offset, seed_sd, 0, difficulty + rng.normal(0, 0.3, TEST_IMAGES))
                  for _ in range(configurations)]
        pooled = stats.contrast(None, [1 / configurations] * configurations,
                                [t.mean(axis=1) for t in tables], TEST_IMAGES)
        assert pooled.method == stats.BINOMIAL_BOUND
        covered += pooled.low <= truth <= pooled.high
        with_base, with_level = (difficulty + rng.normal(0, level_sd, TEST_IMAGES)
                                 for _ in range(2))
        bases, others = ([error_table(rng, n, offset, seed_sd, 0, pattern)
                          for _ in range(configurations)] for pattern in (with_base, with_level))
        cells = [table.mean(axis=1) for pair in zip(bases, others) for table in pair]
        everything = stats.contrast(None, [-1 / configurations, 1 / configurations]
                                    * configurations, cells, TEST_IMAGES)
        rejected += everything.p_value < 0.05
    assert covered / replications >= 0.95, covered / replications
    assert rejected / replications <= 0.05, rejected / replications


def test_a_test_set_of_tied_seeds_is_never_a_zero_width_certainty():
    # Two seeds that both miss 31 of 360 images (the quickstart's ResNet-56): the t interval over
    # seeds was [8.61%, 8.61%]; the test set alone allows about +-2.9 points (Wilson 6.1-12.0%).
    images, wrong = 360, 31
    outcomes = [np.r_[np.ones(wrong), np.zeros(images - wrong)]] * 2
    estimate = stats.error_rate(outcomes, [wrong / images] * 2, images)
    wilson = scipy_stats.binomtest(wrong, images).proportion_ci(method="wilson")
    assert estimate.low < wilson.low + 0.01 and estimate.high > wilson.high - 0.01
    assert estimate.note == "" and estimate.method == stats.CROSSED


def test_tied_differences_of_two_seeds_are_not_a_p_value_of_1e_15():
    # Two seeds, each 5 images better than the baseline's on a 360-image test set: the paired t
    # over seeds had zero spread and p ~ 1e-15.
    images = 360
    base = [np.r_[np.ones(36), np.zeros(images - 36)] for _ in range(2)]
    level = [np.r_[np.ones(31), np.zeros(images - 31)] for _ in range(2)]
    estimate = stats.paired_difference(base, level, [36 / images] * 2, [31 / images] * 2, images)
    assert estimate.mean == pytest.approx(-5 / images)
    assert estimate.low < estimate.mean < estimate.high
    assert estimate.p_value > 1e-3


@pytest.mark.parametrize("n", [2, 3])
def test_no_errors_at_all_reaches_the_exact_bound_of_none_wrong_in_n_images(n):
    estimate = stats.error_rate([np.zeros(1000)] * n, [0.0] * n, 1000)
    # Clopper-Pearson's upper 97.5% bound of 0 in 1,000 (the Agresti-Coull floor gave 0.28%).
    exact = scipy_stats.beta.ppf(0.975, 1, 1000)
    assert estimate.low == 0.0 and estimate.high == pytest.approx(exact, rel=1e-9)
    everything = stats.error_rate([np.ones(1000)] * n, [1.0] * n, 1000)
    assert everything.high == 1.0 and everything.low == pytest.approx(1 - exact, rel=1e-9)


@pytest.mark.parametrize("n", [2, 3])
def test_a_rate_with_errors_is_never_bounded_more_tightly_than_one_without(n):
    """One, two or three errors among the seeds of 1,000 images (on different images) gave upper
    ends of 0.29%, 0.26% and 0.30% at three seeds, below the 0.37% of none wrong (an audit's
    finding): seeing errors told a reader the rate was surely lower. Every upper end is now at
    least Clopper-Pearson's of 0 in 1,000, and every lower end at most that of 1,000 right."""
    images, exact = 1000, scipy_stats.beta.ppf(0.975, 1, 1000)
    for errors in range(1, 2 * n + 1):
        table = np.zeros((n, images))
        for j in range(errors):
            table[j % n, j] = 1
        estimate = stats.error_rate(list(table), table.mean(axis=1), images)
        assert estimate.high >= exact - 1e-15, (errors, estimate)
        estimate = stats.error_rate(list(1 - table), 1 - table.mean(axis=1), images)
        assert estimate.low <= 1 - exact + 1e-15, (errors, estimate)


def test_a_few_errors_among_seeds_keep_an_upper_end_near_their_rate():
    """One error among three seeds of 1,000 images: an interval skewed as a score interval of
    the pivot's spread (tried, withdrawn) reached 8%, two errors 1.9%: neither monotone nor
    honest. The symmetric interval stays under 1%."""
    images = 1000
    highs = []
    for counts in ((1, 0, 0), (2, 1, 0), (5, 0, 0)):
        rows = [np.r_[np.ones(k), np.zeros(images - k)] for k in counts]
        highs.append(stats.error_rate(rows, [k / images for k in counts], images).high)
    assert max(highs[:2]) < 0.01 and highs[-1] < 0.015, highs


@pytest.mark.parametrize("n", [3, 5])
def test_near_zero_error_the_interval_misses_above_as_readme_says(n):
    """At 1% error (1,000 images, images far apart in difficulty) the symmetric interval,
    clipped at 0, misses the truth above it more often than below: README states it (3.5-6% of
    studies above, 0.3-1.3% below), and this holds it there."""
    error, seed_sd, image_sd, images, replications = 0.01, 0.1, 4.0, 1000, 600
    offset = offset_for(error, seed_sd, image_sd)
    truth = true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(7)
    above = below = 0
    for _ in range(replications):
        table = error_table(rng, n, offset, seed_sd, image_sd, rng.normal(0, image_sd, images))
        estimate = stats.error_rate(list(table), table.mean(axis=1), images)
        above += truth > estimate.high
        below += truth < estimate.low
    # The simulation's error is ~0.9 points.
    assert above / replications <= 0.075, above / replications
    assert below / replications <= 0.025, below / replications
    assert 1 - (above + below) / replications >= 0.915


def test_one_seed_gives_no_interval_and_says_why():
    estimate = stats.error_rate([np.ones(10)], [1.0], 10)
    assert math.isnan(estimate.low) and "one seed" in estimate.note


def test_crossed_analysis_matches_hand_computed_mean_squares_when_seeds_do_not_vary():
    # Deterministic images (every seed misses the same 40 of 400): no seed or residual variance,
    # so the variance of the mean is the image part alone, p(1 - p)/N with the ANOVA's N - 1:
    # MS_image / (n N) = n * sum((c_j - p)^2) / (N - 1) / (n N). Its degrees of freedom by
    # Satterthwaite's moment match, 2 N / (k - 1) with k the kurtosis of 0/1 values at p = 0.1,
    # (1 - 3 p q) / (p q); with no seed part, the pivot is then Student's t with that many.
    images, n, p = 400, 3, 0.1
    row = np.r_[np.ones(40), np.zeros(images - 40)]
    estimate = stats.error_rate([row] * n, [p] * n, images)
    variance = p * (1 - p) * images / (images - 1) / images
    kurtosis = (1 - 3 * p * (1 - p)) / (p * (1 - p))
    df = round(2 * images / (kurtosis - 1))
    assert estimate.se == pytest.approx(
        math.sqrt(variance * df / scipy_stats.chi2.median(df)), rel=1e-3)
    # The t interval, at the level the calibration gives a table whose seeds have no share.
    level = pivot.PIVOT_CALIBRATION[n - 1][0][0]
    half = scipy_stats.t.ppf(0.5 + level / 2, df) * math.sqrt(variance)
    assert (estimate.low, estimate.high) == (pytest.approx(p - half, rel=1e-3),
                                             pytest.approx(p + half, rel=1e-3))


def test_a_few_discordant_images_rest_on_few_degrees_of_freedom():
    # Two tied seeds, 4 of 1,000 images right where the baseline was wrong: as a sign test on
    # those 4 (exact p = 0.125), not a normal approximation over 999 images (p = 0.046, which
    # rejected 12% of such null tables).
    images = 1000
    base = np.r_[np.ones(80), np.zeros(images - 80)]
    level = base.copy()
    level[:4] = 0
    estimate = stats.paired_difference([base] * 2, [level] * 2, [0.08] * 2, [0.076] * 2, images)
    assert estimate.p_value > 0.05
    assert estimate.p_value == pytest.approx(scipy_stats.t.sf(2.0, 8) * 2, rel=0.05)


def test_seed_mean_is_students_t_and_clipped():
    values = np.array([0.01, 0.02, 0.6])
    low, high = scipy_stats.t.interval(0.95, 2, loc=values.mean(), scale=scipy_stats.sem(values))
    estimate = stats.seed_mean(values, (0.0, 1.0))
    assert (estimate.low, estimate.high) == (max(low, 0.0), pytest.approx(min(high, 1.0)))
    assert estimate.p_value == pytest.approx(scipy_stats.ttest_1samp(values, 0).pvalue)


def test_seeds_that_tie_on_a_metric_without_test_set_sampling_get_no_interval():
    """Four seeds at 0% training error, or per-seed differences of one image each (in their
    last bits apart): the t interval would have zero width and p ~ 1e-30, claiming certainty
    that four seeds cannot give. FLOPs, which the configuration fixes, tie exactly."""
    for tied in ([0.0] * 4, [1 / 1437, 2 / 1437 - 1 / 1437, 3 / 1437 - 2 / 1437]):
        estimate = stats.seed_mean(tied, (-1.0, 1.0))
        assert estimate.mean == pytest.approx(np.mean(tied), abs=1e-15)
        assert math.isnan(estimate.low) and math.isnan(estimate.p_value)
        assert "seeds tie" in estimate.note and estimate.n == len(tied)
    noted = stats.seed_mean([0.0, 0.0], note="from the stored values")
    assert noted.note.startswith("from the stored values; seeds tie")
    exact = stats.seed_mean([4.1e7] * 3, (0.0, math.inf), exact_ties=True)
    assert (exact.low, exact.high, exact.note) == (4.1e7, 4.1e7, "")
    # Seeds one ulp of a large value apart still tie; one image of 1437 apart do not.
    assert math.isnan(stats.seed_mean([30.0, 30.0 + 4e-15]).low)
    spread = stats.seed_mean([0.0, 1 / 1437, 0.0])
    assert spread.high > spread.low and spread.p_value == pytest.approx(
        scipy_stats.ttest_1samp([0.0, 1 / 1437, 0.0], 0).pvalue)


def _mean_over_configurations(bases, others, images) -> stats.Estimate:
    """The "all" row of a comparison over k configurations (contrasts.stratified_contrast): one
    contrast of their 2k cells, weighted -1/k and 1/k."""
    k = len(bases)
    tables = [table for pair in zip(bases, others) for table in pair]
    return stats.contrast([list(t) for t in tables], [-1 / k, 1 / k] * k,
                          [t.mean(axis=1) for t in tables], images)


@pytest.mark.parametrize("seeds", [3, 10])
def test_the_mean_over_configurations_keeps_its_type_one_error_when_they_share_the_test_set(seeds):
    # Four configurations scored on one test set, the compared level no better, but each image a
    # little easier or harder with that level in every configuration alike (a per-image effect
    # they share). Combining the configurations' differences as independent rejected 7.9% of
    # such studies at 5 seeds and 19.7% at 10.
    seed_sd, image_sd, level_sd, configurations = 0.05, 1.5, 1.0, 4
    offset = offset_for(0.08, seed_sd, math.hypot(image_sd, level_sd))
    rng = np.random.default_rng(seeds)
    rejected, replications = 0, 600
    for _ in range(replications):
        difficulty = rng.normal(0, image_sd, TEST_IMAGES)
        with_base, with_level = (difficulty + rng.normal(0, level_sd, TEST_IMAGES)
                                 for _ in range(2))
        bases = [error_table(rng, seeds, offset, seed_sd, 0, with_base) for _ in range(configurations)]
        others = [error_table(rng, seeds, offset, seed_sd, 0, with_level)
                  for _ in range(configurations)]
        estimate = _mean_over_configurations(bases, others, TEST_IMAGES)
        rejected += estimate.p_value < 0.05
        assert estimate.n == seeds
    # 5% nominal; the simulation's own error is 0.9 points.
    assert 0.02 <= rejected / replications <= 0.075, rejected / replications


@pytest.mark.parametrize("regime", list(REGIMES))
def test_a_mean_over_configurations_covers_the_mean_of_theirtrue_errors(regime):
    """summary --by fewer factors than the study sweeps (summaries._pooled_estimate): two
    configurations of true errors 6% and 10% scored on one test set, each seed averaged over
    them (one contrast weighted 1/2, 1/2): its interval covers the mean of the true errors as a
    configuration's own interval covers its error."""
    error, seed_sd, image_sd = REGIMES[regime]
    offsets = [offset_for(e, seed_sd, image_sd) for e in (0.06, 0.10)]
    truth = np.mean([true_error(o, seed_sd, image_sd) for o in offsets])
    rng = np.random.default_rng(5)
    for n in (2, 3, 10):
        covered = 0
        for _ in range(REPLICATIONS):
            difficulty = rng.normal(0, image_sd, TEST_IMAGES)
            tables = [error_table(rng, n, o, seed_sd, image_sd, difficulty) for o in offsets]
            estimate = stats.contrast([list(t) for t in tables], [0.5, 0.5],
                                      [t.mean(axis=1) for t in tables], TEST_IMAGES)
            covered += estimate.low <= truth <= estimate.high
        coverage = covered / REPLICATIONS
        # As a configuration's own: 93-97% from 3 seeds on, 94-99.7% at 2 (measured 94.2-95.5%
        # at 3 and 10 seeds, 96.8-98.9% at 2).
        low, high = (0.94, 0.997) if n == 2 else (0.93, 0.97)
        assert low <= coverage <= high, (regime, n, coverage)


def test_the_mean_over_configurations_is_the_mean_of_their_differences():
    rng = np.random.default_rng(4)
    bases = [(rng.random((3, 300)) < 0.2).astype(float) for _ in range(2)]
    others = [(rng.random((3, 300)) < 0.2 + shift).astype(float) for shift in (0.0, 0.05)]
    combined = _mean_over_configurations(bases, others, 300)
    parts = [stats.paired_difference(list(b), list(o), b.mean(axis=1), o.mean(axis=1), 300)
             for b, o in zip(bases, others)]
    assert combined.mean == pytest.approx(np.mean([p.mean for p in parts]))
    assert combined.n == 3 and combined.method == stats.CROSSED
    assert combined.se < max(p.se for p in parts)  # averaging two configurations narrows
    assert -1 <= combined.low < combined.mean < combined.high <= 1


def test_an_unknown_test_set_size_never_gives_tied_seeds_a_zero_width_interval():
    for estimate in (stats.error_rate(None, [0.1, 0.1], None),
                     stats.paired_difference(None, None, [0.1, 0.1], [0.08, 0.08], None),
                     # both differences one image of 360, tied but for their last bits
                     stats.paired_difference(None, None, [1 / 360, 2 / 360], [2 / 360, 3 / 360],
                                             None)):
        assert math.isnan(estimate.low) and math.isnan(estimate.high)
        assert estimate.note == stats.TIED_SIZE_UNKNOWN
    spread = stats.error_rate(None, [0.1, 0.12], None)
    assert spread.low < 0.11 < spread.high and spread.note == stats.SIZE_UNKNOWN


_ROW = np.r_[np.ones(9), np.zeros(91)]  # 9 of 100 wrong


@pytest.mark.parametrize("call, complaint", [
    (lambda: stats.error_rate([_ROW, _ROW], [np.nan, 0.09], 100), r"seed 0 has nan"),
    (lambda: stats.error_rate(None, [1.5, 0.09], 100), r"number in \[0, 1\]; seed 0 has 1.5"),
    (lambda: stats.error_rate([_ROW, _ROW], [0.5, 0.09], 100),
     r"seed 0's error rate 0.5 is not that of its outcomes \(9 of 100 wrong"),
    (lambda: stats.error_rate([_ROW, _ROW[:50]], [0.09, 0.09], 100),
     r"seed 1's outcomes cover 50 images and the test set has 100"),
    (lambda: stats.error_rate([_ROW, _ROW], [0.09, 0.09], 200),
     r"seed 0's outcomes cover 100 images and the test set has 200"),
    (lambda: stats.error_rate([_ROW] * 3, [0.09, 0.09], 100), r"3 seeds' outcomes for 2 error rates"),
    (lambda: stats.error_rate([np.r_[np.nan, _ROW[1:]], _ROW], [0.09, 0.09], 100),
     r"an outcome is 0 \(right\) or 1 \(wrong\); seed 0 has nan"),
    (lambda: stats.paired_difference([_ROW] * 3, [_ROW] * 2, [0.09] * 3, [0.09] * 2, 100),
     r"paired_difference: 2 weights and 2 cells of seeds \(\[3, 2\]\)"),
    (lambda: stats.contrast(None, [1, -1], [[0.1, np.inf], [0.1, 0.1]], 100),
     r"contrast, cell 0: an error rate is a number in \[0, 1\]; seed 1 has inf"),
    (lambda: stats.error_rate(None, [0.1, 0.1], 0), r"size is a whole number of images >= 1"),
    (lambda: stats.error_rate(None, [0.1, 0.1], math.inf), r"or None where not recorded; got inf"),
    (lambda: stats.error_rate(None, [0.1, 0.1], True), r"or None where not recorded; got True"),
    (lambda: stats.error_rate(None, [0.1, 0.1], np.array([100])), r"whole number of images"),
    (lambda: stats.error_rate([np.array([]), np.array([])], [0.1, 0.1], None),
     r"got 0 \(the length of the outcome vectors\)"),
    (lambda: stats.error_rate([_ROW, None], [0.09, 0.09], 100),
     r"seed 1's outcomes cover none and the test set has 100"),
    (lambda: stats.error_rate(None, [[0.1, 0.2], [0.1]], 100), r"one error rate per seed, a flat"),
    (lambda: stats.error_rate([_ROW, _ROW], [0.09, 0.09], 100, level=1.2),
     r"level is a number between 0 and 1"),
    (lambda: stats.contrast([[_ROW, _ROW]], [1, -1], [[0.09, 0.09], [0.09, 0.09]], 100),
     r"outcome tables for 1 cells and 2 weights"),
    (lambda: stats.contrast(None, [1, np.nan], [[0.09, 0.09], [0.09, 0.09]], 100),
     r"contrast's weights: give one finite value per seed; seed 1 has nan"),
    (lambda: stats.seed_mean([1.0, np.nan]), r"one finite value per seed; seed 1 has nan"),
    (lambda: stats.seed_mean(["a", "b"]), r"one value per seed, a flat sequence of numbers"),
    (lambda: stats.seed_mean([1.0, 2.0], (1.0, 0.0)), r"low <= high"),
])
def test_inputs_that_cannot_describe_seeds_on_one_test_set_raise_one_clear_error(call, complaint):
    with pytest.raises(ValueError, match=complaint):
        call()


def test_intervals_at_any_level_nest_inside_the_95_percent_one():
    # A 50% interval: the calibration's widening of alpha (up to 2.2x) must not push it past 1.
    rng = np.random.default_rng(8)
    for _ in range(50):
        table = (rng.random((3, 200)) < rng.uniform(0.05, 0.3)).astype(float)
        wide, narrow = (stats.error_rate(list(table), table.mean(axis=1), 200, level=level)
                        for level in (0.95, 0.5))
        assert wide.low <= narrow.low <= narrow.high <= wide.high


def test_holm_adjusts_as_computed_by_hand_and_leaves_rows_without_a_test_out():
    adjusted = stats.holm([0.01, 0.04, 0.03, math.nan, 0.005])
    # m = 4 tests: 0.005 x 4, 0.01 x 3, 0.03 x 2, then 0.04 x 1 raised to the running maximum.
    assert np.allclose(adjusted, [0.03, 0.06, 0.06, math.nan, 0.02], equal_nan=True)
    assert np.array_equal(stats.holm([0.6, 0.9]), [1.0, 1.0])


@pytest.mark.parametrize("correlation", [0.0, 0.6])
def test_holm_keeps_the_chance_of_any_false_finding_in_a_null_table_at_5_percent(correlation):
    """18 null tests a table (effects' rows for a 3x3x3 study), correlated as rows that share
    seeds and the test set are: unadjusted, one p < 0.05 turns up in most tables; adjusted, in
    at most 5% (Holm holds under any dependence; equicorrelated z-scores here)."""
    rng = np.random.default_rng(19)
    tables, tests = 4000, 18
    shared = rng.standard_normal((tables, 1))
    z = np.sqrt(correlation) * shared + np.sqrt(1 - correlation) * rng.standard_normal(
        (tables, tests))
    p = 2 * scipy_stats.norm.sf(np.abs(z))
    any_raw = (p < 0.05).any(axis=1).mean()
    any_adjusted = np.mean([(stats.holm(row) < 0.05).any() for row in p])
    assert any_raw > 0.2
    assert any_adjusted <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / tables)
    # Not so strict that it never finds anything: one real effect among the 17 null ones.
    z[:, 0] += 4.5
    found = np.mean([stats.holm(row)[0] < 0.05 for row in 2 * scipy_stats.norm.sf(np.abs(z))])
    assert found > 0.8


def test_the_pivots_half_width_is_the_mixtures_quantile_scipy_finds():
    # The interval's ends solve P(|Z| sqrt(V) > h) = alpha over the variance draws: Newton's
    # method in pivot.py against scipy's bracketing root finder at a tight tolerance, over draws
    # from one to eleven seed degrees of freedom, with and without the images' part, at levels
    # from 1% to 99.99%.
    from scipy import optimize
    from scipy.special import ndtr

    rng = np.random.default_rng(8)
    for _ in range(300):
        seed_df = int(rng.integers(1, 12))
        variances = pivot.variance_draws(
            10 ** rng.uniform(-8, -2), seed_df, 10 ** rng.uniform(-8, -2) * (rng.random() < 0.9),
            int(rng.integers(0, 4)), int(rng.integers(1, 2000)) if rng.random() < 0.7 else None)
        alpha = float(rng.choice([1e-12, 1e-4, 0.01, 0.05, 0.0643, 0.1, 0.5, 0.99]))
        sd = np.sqrt(variances)
        reference = optimize.brentq(lambda h: 2 * np.mean(ndtr(-h / sd)) - alpha, 0,
                                    50 * sd.max(), xtol=1e-15, rtol=1e-13)
        assert pivot.Pivot(variances).half_width(alpha) == pytest.approx(reference, rel=1e-9)
    # Draws of no variance (a pivot built by hand) weigh nothing beyond any h > 0.
    variances = np.r_[np.zeros(600), np.full(424, 1e-4)]
    reference = optimize.brentq(lambda h: 424 / 1024 * 2 * ndtr(-h / 1e-2) - 0.05, 0, 1,
                                xtol=1e-15, rtol=1e-13)
    assert pivot.Pivot(variances).half_width(0.05) == pytest.approx(reference, rel=1e-9)
