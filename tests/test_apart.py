"""Seeds that stand apart from their configuration's others (resnet_ablate/stats/apart.py, the note
of `Results.summary`): the statistic against the textbook's other formula for it, its false alarms
and its power by simulation with known truth (two seeds apart included, which a single test misses),
and the note a summary row carries."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.special import expit
from helpers import REGIMES, offset_for, write_study

from resnet_ablate.results import load, plot_axes, plots
from resnet_ablate.stats.apart import ALPHA, seeds_apart

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
    found = seeds_apart(values)  # the size unknown: no floor, the textbook's statistic as it is
    assert found is not None and found.positions == (4,)
    assert found.p_value == pytest.approx(_external_p(values, 4), rel=1e-9)
    assert (found.values, found.others_low, found.others_high, found.n) == \
        ((0.131,), 0.078, 0.084, 6)
    # The same seed less far away: its p-value grows past ALPHA and nothing is said.
    values[4] = 0.095
    assert _external_p(values, 4) > ALPHA and seeds_apart(values) is None


def test_two_seeds_apart_are_both_named_where_each_hides_the_other():
    # Each widens the spread of the other's leave-one-out: the first step finds neither (its
    # p-value, by the textbook, is far above ALPHA), the second, without the first, does.
    values = np.array([0.080, 0.082, 0.079, 0.081, 0.078, 0.083, 0.080, 0.45, 0.52, 0.081])
    assert _external_p(values, 8) > 10 * ALPHA
    found = seeds_apart(values)
    assert found is not None and found.positions == (7, 8) and found.values == (0.45, 0.52)
    assert found.p_value == pytest.approx(_external_p(np.delete(values, 8), 7), rel=1e-9)


def test_others_that_tie_are_not_seeds_without_variance():
    # Four seeds with 40 of 400 wrong and one with 46: six images, a test set's sampling away.
    # Without the floor the others' spread is zero and any distance is infinitely far.
    assert seeds_apart([0.1, 0.1, 0.1, 0.1, 0.115], images=400) is None
    # The size unknown, others that tie cannot be judged, also where their mean is not exact
    # in floating point (3 of 60 wrong: a variance of 1e-35 rather than 0).
    assert seeds_apart([0.1, 0.1, 0.1, 0.1, 0.115]) is None
    assert seeds_apart([3 / 60, 3 / 60, 3 / 60, 4 / 60]) is None
    assert seeds_apart([2 / 360 - 1 / 360, 3 / 360 - 2 / 360, 4 / 360 - 3 / 360, 0.2]) is None
    # Far beyond that floor: one seed that barely trained.
    assert seeds_apart([0.1, 0.1, 0.1, 0.1, 0.6], images=400).positions == (4,)
    # Three seeds: one degree of freedom, not tested.
    assert seeds_apart([0.1, 0.1, 0.9], images=400) is None


def _flag_rate(rng, n: int, seed_effects, offset: float, image_sd: float,
               images: int = TEST_IMAGES) -> float:
    flagged = 0
    for _ in range(REPLICATIONS):
        wrong = rng.random((n, images)) < expit(
            offset + seed_effects(rng, (n, 1)) + rng.normal(0, image_sd, images))
        flagged += seeds_apart(wrong.mean(axis=1), images) is not None
    return flagged / REPLICATIONS


@pytest.mark.parametrize("regime", sorted(REGIMES))
def test_seeds_that_vary_alike_are_rarely_called_apart(regime):
    # The false alarms module apart.py states: at most 1.6% and 3% at 4 to 10 seeds (held at 4%:
    # 1,000 studies give a binomial error of half a point at 3%), also for rates near 0 on a
    # small test set, where the counts tie often.
    error, seed_sd, image_sd = REGIMES[regime]
    rng = np.random.default_rng(11)
    normal = lambda rng, size: rng.normal(0, seed_sd, size)  # noqa: E731
    offset = offset_for(error, seed_sd, image_sd)
    for n in (5, 10):
        assert _flag_rate(rng, n, normal, offset, image_sd) <= 0.04, n
    assert _flag_rate(rng, 10, normal, offset_for(0.02, seed_sd, image_sd), image_sd,
                      images=60) <= 0.04


def _worse(count: int):
    """Seed effects of sd 0.1 with `count` seeds 3 logits worse (seeds that barely trained)."""
    def draw(rng, size):
        effects = rng.normal(0, 0.1, size)
        effects[rng.choice(size[0], count, replace=False)] += 3.0
        return effects
    return draw


def test_seeds_that_barely_trained_are_found():
    # The case README's coverage figures say the interval misses 20-60% of the time: one such
    # seed is named in all but a few studies in a thousand at 5 and 10 seeds, two at 10 seeds
    # in all (a single test, masked, named neither).
    error, _, image_sd = REGIMES["images dominate"]
    offset = offset_for(error, 0.1, image_sd)
    rng = np.random.default_rng(12)
    for n in (5, 10):
        assert _flag_rate(rng, n, _worse(1), offset, image_sd) >= 0.95, n
    assert _flag_rate(rng, 10, _worse(2), offset, image_sd) >= 0.95


def _paired_flag_rate(rng, n: int, seed_sd: float, worse: int = 0) -> float:
    """How often the per-seed differences of two configurations of one truth, scored on one test
    set (seeds paired by number), are called apart; `worse` of the second's seeds 3 logits worse."""
    error, _, image_sd = REGIMES["seeds matter"]
    offset, flagged = offset_for(error, seed_sd, image_sd), 0
    for _ in range(REPLICATIONS):
        difficulty = rng.normal(0, image_sd, TEST_IMAGES)
        base = rng.random((n, TEST_IMAGES)) < expit(
            offset + rng.normal(0, seed_sd, (n, 1)) + difficulty)
        effects = rng.normal(0, seed_sd, (n, 1))
        effects[rng.choice(n, worse, replace=False)] += 3.0
        other = rng.random((n, TEST_IMAGES)) < expit(offset + effects + difficulty)
        differences = other.mean(axis=1) - base.mean(axis=1)
        flagged += seeds_apart(differences, TEST_IMAGES, squared_weights=2.0) is not None
    return flagged / REPLICATIONS


def test_paired_differences_are_called_apart_as_apart_py_says():
    # Null pairs: 0.9% and 2.6% at 5 and 10 seeds that vary as much as the test set samples
    # (held at 4%); one seed of the second configuration 3 logits worse: 96% and all.
    rng = np.random.default_rng(13)
    for n in (5, 10):
        assert _paired_flag_rate(rng, n, 0.4) <= 0.04, n
    assert _paired_flag_rate(rng, 10, 0.1, worse=1) >= 0.95


def test_a_summary_row_names_the_seeds_apart_and_the_table_its_method(tmp_path):
    rng = np.random.default_rng(3)
    difficulty = rng.uniform(0.05, 0.12, TEST_IMAGES)
    apart = {(14, 3), (20, 2), (20, 6)}  # depth 20 has ten seeds, two of them apart
    cells = {((depth,), seed): (rng.random(TEST_IMAGES) < difficulty + shift).astype(float)
             for depth, seeds in ((8, 5), (14, 5), (20, 10)) for seed in range(seeds)
             for shift in [0.45 if (depth, seed) in apart else 0.0]}
    results = load(write_study(tmp_path / "apart.db", "apart", {"depth": [8, 14, 20]}, cells))
    table = results.summary()
    shallow, deep, deeper = (table[table["depth"] == d].iloc[0]["note"] for d in (8, 14, 20))
    error = {key: f"{100 * np.mean(cells[(key[:1], key[1])]):.1f}%" for key in
             [(14, 3), (20, 2), (20, 6)]}
    assert f"seed 3 (trial 8) stands apart: {error[(14, 3)]} against" in deep, deep
    assert (f"seeds 2 and 6 (trials 12, 16) stand apart: {error[(20, 2)]} and {error[(20, 6)]} "
            "against") in deeper and "for the other 8 (outlier test p = " in deeper, deeper
    assert "outlier test" not in shallow
    assert any(line.startswith("outlier test: ") and "Bonferroni" in line
               for line in table.attrs["methods"]), table.attrs["methods"]
    # Accuracy is the same seeds seen the other way up: the same seed stands apart.
    accuracy = results.summary(metric="test_accuracy")
    assert "seed 3 (trial 8) stands apart" in accuracy[accuracy["depth"] == 14].iloc[0]["note"]
    # The depth and Pareto figures ring those two means, and no other (the depth figure at their
    # depths); the depth figure keeps the outlier test out of the bars' methods.
    means = table.set_index("depth")["test_error_mean"]
    for figure, depths in ((plots.plot_pareto(results), None), (plots.plot_depth(results), True)):
        (ax,) = figure.axes
        dashed = [c for c in ax.collections if c.get_linestyle()[0][1] is not None]
        ringed = np.concatenate([c.get_offsets() for c in dashed if len(c.get_offsets())])
        ringed = ringed[np.argsort(ringed[:, 1])]
        np.testing.assert_allclose(ringed[:, 1], [100 * means[14], 100 * means[20]])
        if depths:
            np.testing.assert_allclose(ringed[:, 0], [14, 20])
        assert plot_axes.SEEDS_APART_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
    assert "outlier test" not in ax.get_legend().get_title().get_text()


def test_rows_over_several_configurations_and_differences_name_the_seed_in_their_own_terms(
        tmp_path):
    # depth x shortcut, six seeds; seed 3 of depth 14, shortcut B barely trained.
    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.05, 0.12, TEST_IMAGES)
    points = [(d, s) for d in (8, 14) for s in ("A", "B")]
    cells = {(point, seed): (rng.random(TEST_IMAGES) < difficulty
                             + (0.45 if (point, seed) == ((14, "B"), 3) else 0)).astype(float)
             for point in points for seed in range(6)}
    results = load(write_study(tmp_path / "two.db", "two", {"depth": [8, 14],
                                                           "shortcut": ["A", "B"]}, cells))
    number = {key: i for i, key in enumerate(cells)}  # trials are numbered as written
    trials = f"trials {number[((14, 'A'), 3)]}, {number[((14, 'B'), 3)]}"
    # A row over both shortcuts: seed 3's mean over them, as accuracy where accuracy is shown.
    pooled = results.summary(by=["depth"], metric="test_accuracy").set_index("depth")
    accuracy = 100 * (1 - (cells[((14, "A"), 3)].mean() + cells[((14, "B"), 3)].mean()) / 2)
    assert f"seed 3 ({trials}) stands apart: {accuracy:.1f}% against" in pooled.loc[14, "note"]
    assert "outlier test" not in pooled.loc[8, "note"]
    # Shortcut B against A: seed 3's difference at depth 14, in points, and in the "all" row.
    table = results.compare("shortcut", "A")
    rows = {row["depth"]: row["note"] for row in table.to_dict("records")}
    difference = 100 * (cells[((14, "B"), 3)].mean() - cells[((14, "A"), 3)].mean())
    assert f"seed 3 ({trials}) stands apart: {difference:+.1f} points against" in rows[14]
    assert "outlier test" not in rows[8]
    assert "seed 3 (trials " in rows["all"] and "stands apart" in rows["all"]
    methods = table.attrs["methods"]
    assert any(m.startswith("outlier test: ") for m in methods)
    assert any(m.startswith("p_holm: ") for m in methods)
