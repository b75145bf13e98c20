"""The statistics of resnet_ablate/stats.py held to simulated studies with known truth (coverage of
the 95% interval, type I error of the paired test, at n = 2, 3, 5, 10 seeds), to hand-computed
values, and to the cases that used to overstate the answer (tied seeds, no errors)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit

from resnet_ablate import stats

SEED_COUNTS = (2, 3, 5, 10)
TEST_IMAGES = 400
REPLICATIONS = 1000  # simulation error of a coverage ~0.7 points, against the 2 allowed


def _true_error(offset: float, seed_sd: float, image_sd: float) -> float:
    """E[expit(offset + u + v)], u ~ N(0, seed_sd), v ~ N(0, image_sd): the error rate over the
    populations of seeds and test images, by Gauss-Hermite quadrature."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    return float((w * expit(offset + math.hypot(seed_sd, image_sd) * x)).sum() / w.sum())


def _offset_for(error: float, seed_sd: float, image_sd: float) -> float:
    """The logit offset whose true error rate is `error`."""
    low, high = -10.0, 10.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if _true_error(middle, seed_sd, image_sd) < error \
            else (low, middle)
    return (low + high) / 2


def _tables(rng, n: int, offset: float, seed_sd: float, image_sd: float,
            difficulty: np.ndarray) -> np.ndarray:
    """A seeds x images table of 0/1 errors: each seed trained anew, each image as hard as
    `difficulty` says (logistic model, the documented model's Bernoulli form)."""
    seeds = rng.normal(0, seed_sd, (n, 1))
    return (rng.random((n, len(difficulty))) < expit(offset + seeds + difficulty)).astype(float)


# Two regimes of the documented model: seeds that vary little next to the test set's sampling
# (as converged CIFAR nets do), and seeds that vary as much as the test set samples.
REGIMES = {"images dominate": (0.08, 0.1, 1.5), "seeds matter": (0.08, 0.4, 1.5)}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_error_rate_intervals_cover_the_true_error_at_2_to_10_seeds(regime):
    error, seed_sd, image_sd = REGIMES[regime]
    offset = _offset_for(error, seed_sd, image_sd)
    truth = _true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(1)
    for n in SEED_COUNTS:
        covered = 0
        for _ in range(REPLICATIONS):
            # A new test set drawn from the image population, and n new seeds.
            table = _tables(rng, n, offset, seed_sd, image_sd, rng.normal(0, image_sd, TEST_IMAGES))
            estimate = stats.error_rate(list(table), table.mean(axis=1), TEST_IMAGES)
            covered += estimate.low <= truth <= estimate.high
        coverage = covered / REPLICATIONS
        # 95% nominal, held within 93-97% at every seed count: neither overstated nor, as an
        # uncalibrated pivot is at 2-3 seeds (up to 99%), so wide that it hides real effects.
        assert 0.93 <= coverage <= 0.97, (regime, n, coverage)


@pytest.mark.parametrize("regime", list(REGIMES))
def test_paired_test_keeps_its_type_one_error_at_2_to_10_seeds(regime):
    error, seed_sd, image_sd = REGIMES[regime]
    offset = _offset_for(error, seed_sd, image_sd)
    rng = np.random.default_rng(2)
    rejected = {}
    for n in SEED_COUNTS:
        count = 0
        for _ in range(REPLICATIONS):
            difficulty = rng.normal(0, image_sd, TEST_IMAGES)  # shared: one test set for both
            base = _tables(rng, n, offset, seed_sd, image_sd, difficulty)
            level = _tables(rng, n, offset, seed_sd, image_sd, difficulty)  # no true difference
            estimate = stats.paired_difference(list(base), list(level), base.mean(axis=1),
                                               level.mean(axis=1), TEST_IMAGES)
            count += estimate.p_value < 0.05
        rejected[n] = count / REPLICATIONS
    # 5% +- 1 point over the seed counts (simulation error 0.35 points), each count within 3-7%
    # (its own simulation error 0.7 points): neither overstated nor needlessly conservative.
    assert 0.04 <= np.mean(list(rejected.values())) <= 0.06, rejected
    assert all(0.03 <= rate <= 0.07 for rate in rejected.values()), rejected


def test_binomial_bound_without_per_image_record_is_conservative():
    error, seed_sd, image_sd = REGIMES["seeds matter"]
    offset = _offset_for(error, seed_sd, image_sd)
    truth = _true_error(offset, seed_sd, image_sd)
    rng = np.random.default_rng(3)
    for n in (2, 5):
        covered = 0
        for _ in range(REPLICATIONS):
            table = _tables(rng, n, offset, seed_sd, image_sd, rng.normal(0, image_sd, TEST_IMAGES))
            estimate = stats.error_rate(None, table.mean(axis=1), TEST_IMAGES)
            assert estimate.method == stats.BINOMIAL_BOUND
            covered += estimate.low <= truth <= estimate.high
        assert covered / REPLICATIONS >= 0.93, (n, covered / REPLICATIONS)


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


def test_no_errors_at_all_still_has_an_interval_inside_zero_to_one():
    estimate = stats.error_rate([np.zeros(500)] * 3, [0.0] * 3, 500)
    assert estimate.low == 0.0 and 0 < estimate.high < 0.05


def test_one_seed_gives_no_interval_and_says_why():
    estimate = stats.error_rate([np.ones(10)], [1.0], 10)
    assert math.isnan(estimate.low) and "one seed" in estimate.note


def test_crossed_analysis_matches_hand_computed_mean_squares_when_seeds_do_not_vary():
    # Deterministic images (every seed misses the same 40 of 400): no seed or residual variance,
    # so the variance of the mean is the image part alone, p(1 - p)/N with the ANOVA's N - 1:
    # MS_image / (n N) = n * sum((c_j - p)^2) / (N - 1) / (n N).
    images, n = 400, 3
    row = np.r_[np.ones(40), np.zeros(images - 40)]
    estimate = stats.error_rate([row] * n, [0.1] * n, images)
    variance = 0.1 * 0.9 * images / (images - 1) / images
    assert estimate.se == pytest.approx(math.sqrt(variance), rel=1e-6)
    # The normal interval, at the level the calibration gives a table whose seeds have no share.
    level = stats.PIVOT_CALIBRATION[n - 1][0]
    half = scipy_stats.norm.ppf(0.5 + level / 2) * math.sqrt(variance)
    assert (estimate.low, estimate.high) == (pytest.approx(0.1 - half, rel=1e-3),
                                             pytest.approx(0.1 + half, rel=1e-3))


def test_seed_mean_is_students_t_and_clipped():
    values = np.array([0.01, 0.02, 0.6])
    low, high = scipy_stats.t.interval(0.95, 2, loc=values.mean(), scale=scipy_stats.sem(values))
    estimate = stats.seed_mean(values, (0.0, 1.0))
    assert (estimate.low, estimate.high) == (max(low, 0.0), pytest.approx(min(high, 1.0)))
    assert estimate.p_value == pytest.approx(scipy_stats.ttest_1samp(values, 0).pvalue)


def test_stratified_is_the_mean_of_the_strata_and_wider_than_none_alone():
    rng = np.random.default_rng(4)
    parts = []
    for shift in (0.0, 0.05):
        base = [(rng.random(300) < 0.2).astype(float) for _ in range(3)]
        level = [(rng.random(300) < 0.2 + shift).astype(float) for _ in range(3)]
        parts.append(stats.paired_difference(base, level, [b.mean() for b in base],
                                             [v.mean() for v in level], 300))
    combined = stats.stratified(parts)
    assert combined.mean == pytest.approx(np.mean([p.mean for p in parts]))
    assert combined.method.startswith("stratified over configurations")
    assert combined.se < max(p.se for p in parts)  # averaging two strata narrows
    assert -1 <= combined.low < combined.mean < combined.high <= 1
