"""A seed that stands apart from its configuration's others (resnet_ablate/apart.py, the note of
`Results.summary`): the statistic against the textbook's other formula for it, its false alarms
and its power by simulation with known truth, and the note a summary row carries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit
from helpers import REGIMES, offset_for, write_study

from resnet_ablate.apart import ALPHA, seed_apart
from resnet_ablate.results import load

REPLICATIONS = 1000
TEST_IMAGES = 400


def _external_p(values: np.ndarray, i: int) -> float:
    """Bonferroni p of value i as the regression textbook writes the externally studentized
    residual of an intercept-only model: the internal one r = e / (s sqrt(1 - h)), h = 1/n, made
    external by t = r sqrt((n - 2) / (n - 1 - r^2)); Student t with n - 2 df."""
    n = len(values)
    residual = values[i] - values.mean()
    r = residual / (values.std(ddof=1) * math.sqrt(1 - 1 / n))
    t = r * math.sqrt((n - 2) / (n - 1 - r * r))
    return min(1.0, n * 2 * float(scipy_stats.t.sf(abs(t), n - 2)))


def test_the_seed_apart_and_its_p_value_are_the_textbooks():
    values = np.array([0.081, 0.079, 0.084, 0.078, 0.131, 0.080])
    found = seed_apart(values)  # the size unknown: no floor, the textbook's statistic as it is
    assert found is not None and found.position == 4
    assert found.p_value == pytest.approx(_external_p(values, 4), rel=1e-9)
    assert (found.value, found.others_low, found.others_high, found.n) == (0.131, 0.078, 0.084, 6)
    # The same seed less far away: its p-value grows past ALPHA and nothing is said.
    values[4] = 0.095
    assert _external_p(values, 4) > ALPHA and seed_apart(values) is None


def test_others_that_tie_are_not_seeds_without_variance():
    # Four seeds with 40 of 400 wrong and one with 46: six images, a test set's sampling away.
    # Without the floor the others' spread is zero and any distance is infinitely far.
    assert seed_apart([0.1, 0.1, 0.1, 0.1, 0.115], images=400) is None
    assert seed_apart([0.1, 0.1, 0.1, 0.1, 0.115]) is None  # the size unknown: cannot be judged
    # Far beyond that floor: one seed that barely trained.
    assert seed_apart([0.1, 0.1, 0.1, 0.1, 0.6], images=400).position == 4
    assert seed_apart([0.1, 0.1]) is None  # two seeds: either may be the one apart


def _flag_rate(rng, n: int, seed_effects, offset: float, image_sd: float,
               images: int = TEST_IMAGES) -> float:
    flagged = 0
    for _ in range(REPLICATIONS):
        wrong = rng.random((n, images)) < expit(
            offset + seed_effects(rng, (n, 1)) + rng.normal(0, image_sd, images))
        flagged += seed_apart(wrong.mean(axis=1), images) is not None
    return flagged / REPLICATIONS


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_seeds_that_vary_alike_are_rarely_called_apart(regime):
    # The false alarms module apart.py states: at most 2.4% at 5 and 10 seeds (held at 3.5%:
    # 1,000 studies give a binomial error of half a point at that rate), also for rates near 0
    # on a small test set, where the counts tie often.
    error, seed_sd, image_sd = REGIMES[regime]
    rng = np.random.default_rng(11)
    normal = lambda rng, size: rng.normal(0, seed_sd, size)  # noqa: E731
    offset = offset_for(error, seed_sd, image_sd)
    for n in (5, 10):
        assert _flag_rate(rng, n, normal, offset, image_sd) <= 0.035, n
    assert _flag_rate(rng, 10, normal, offset_for(0.02, seed_sd, image_sd), image_sd,
                      images=60) <= 0.035


def test_a_seed_that_barely_trained_is_found():
    # One seed 3 logits worse than seeds of sd 0.1 (the case README's coverage figures say the
    # interval misses 20-60% of the time): flagged in 99.8% of studies at 5 seeds, all at 10.
    error, _, image_sd = REGIMES["images dominate"]
    offset = offset_for(error, 0.1, image_sd)

    def one_worse(rng, size):
        effects = rng.normal(0, 0.1, size)
        effects[rng.integers(size[0])] += 3.0
        return effects

    rng = np.random.default_rng(12)
    for n in (5, 10):
        assert _flag_rate(rng, n, one_worse, offset, image_sd) >= 0.95, n


def test_a_summary_row_names_the_seed_apart_and_the_table_its_method(tmp_path):
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0.05, 0.12, TEST_IMAGES)
    cells = {((depth,), seed): (rng.random(TEST_IMAGES) < difficulty + shift).astype(float)
             for depth in (8, 14) for seed in range(5)
             for shift in [0.45 if (depth, seed) == (14, 3) else 0.0]}
    results = load(write_study(tmp_path / "apart.db", "apart", {"depth": [8, 14]}, cells))
    table = results.summary()
    deep, shallow = (table[table["depth"] == d].iloc[0] for d in (14, 8))
    seed_three = float(np.mean(cells[((14,), 3)]))
    assert "seed 3 (trial 8) stands apart" in deep["note"], deep["note"]
    assert f"{100 * seed_three:.1f}% against" in deep["note"]
    assert "outlier test" not in shallow["note"]
    assert any(line.startswith("outlier test: ") and "Bonferroni" in line
               for line in table.attrs["methods"]), table.attrs["methods"]
    # Accuracy is the same seeds seen the other way up: the same seed stands apart.
    accuracy = results.summary(metric="test_accuracy")
    assert "seed 3 (trial 8) stands apart" in accuracy[accuracy["depth"] == 14].iloc[0]["note"]
