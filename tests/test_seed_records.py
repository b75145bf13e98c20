"""What the results say of seeds whose records are not the plain case: seeds that failed (left
out, and every row over them says so), a damaged record (one error naming the seed and its
trial), seeds scored on test sets of different sizes (bounded by the smallest, and said), and a
configuration without a training error beside those with one (the report pairs by
configuration)."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from helpers import write_study

from resnet_ablate import stats
from resnet_ablate.record import TrialKey, pack_outcomes
from resnet_ablate.results import load, plots, report
from resnet_ablate.stats.adaptive import SeedResult, _error_estimate

IMAGES = 300
SPACE = {"depth": [8, 14], "shortcut": ["A", "none"]}


def _cells(seed: int = 0, sizes: dict | None = None) -> dict:
    rng = np.random.default_rng(seed)
    difficulty = rng.uniform(0.1, 0.3, IMAGES)
    return {((depth, shortcut), s): (rng.random((sizes or {}).get((depth, shortcut, s), IMAGES))
                                      < difficulty[:(sizes or {}).get((depth, shortcut, s), IMAGES)]
                                      ).astype(float)
            for depth in SPACE["depth"] for shortcut in SPACE["shortcut"] for s in range(5)}


def _add_failed(storage: str, name: str, point: tuple, seed: int, kind: str) -> None:
    study = optuna.load_study(study_name=name, storage=storage)
    distributions = {f: optuna.distributions.CategoricalDistribution(levels)
                     for f, levels in SPACE.items()}
    study.add_trial(optuna.trial.create_trial(
        params=dict(zip(SPACE, point)), distributions=distributions,
        state=optuna.trial.TrialState.FAIL,
        user_attrs={TrialKey.SEED: seed, TrialKey.FAILURE_KIND: kind,
                    TrialKey.FAILURE: f"{kind} in a test"}))


def test_failed_seeds_are_left_out_and_every_row_over_them_counts_them_by_kind(tmp_path):
    """Two seeds of the plain depth-14 net diverged and one failed with an error; a seed that
    failed and then completed on its retry is not counted. Summary, compare, effects and the
    figures' captions each say how many of a row's seeds are missing and why; rows that lost
    none say nothing."""
    cells = _cells()
    lost = {((14, "none"), 1): "diverged", ((14, "none"), 3): "diverged",
            ((8, "none"), 4): "error"}
    for key in lost:
        del cells[key]
    path = tmp_path / "lost.db"
    storage = write_study(path, "lost", SPACE, cells)
    for (point, seed), kind in lost.items():
        _add_failed(storage, "lost", point, seed, kind)
    _add_failed(storage, "lost", (8, "A"), 2, "worker_lost")  # retried, and completed
    results = load(str(path))

    summary = results.summary().set_index(["depth", "shortcut"])
    assert summary.loc[(14, "none"), "n"] == 3
    assert summary.loc[(14, "none"), "note"].startswith(
        "2 seeds failed (diverged: 2), left out: this row is over the seeds that finished")
    assert summary.loc[(8, "none"), "note"].startswith("1 seed failed (error: 1), left out")
    assert "failed" not in summary.loc[(8, "A"), "note"] + summary.loc[(14, "A"), "note"]
    compared = results.compare("shortcut", "A").set_index("depth")
    assert "2 seeds failed (diverged: 2)" in compared.loc[14, "note"]
    assert "3 seeds failed (diverged: 2, error: 1)" in compared.loc["all", "note"]
    effects = results.effects()
    main = effects[(effects["factor(s)"] == "shortcut") & (effects["level"] == "none")]
    assert "3 seeds failed (diverged: 2, error: 1)" in main["note"].iloc[0]
    for kind in ("depth", "pareto"):
        title = " ".join(plots.plot(results, kind).axes[0].get_title().split())
        assert "3 failed seeds left out (diverged: 2, error: 1)" in title, kind


def test_a_damaged_record_is_named_by_its_seed_and_trial(tmp_path):
    """A per-image record that is not that of its rate (a store edited by hand) is one error that
    names the seed by its number and its trial, not by its position among the row's seeds."""
    cells = {key: wrong for key, wrong in _cells().items() if key[1] in (0, 3, 4)}
    path = tmp_path / "damaged.db"

    def damage(point, seed, attrs):
        if point == (14, "A") and seed == 3:
            attrs[TrialKey.TEST_OUTCOMES] = pack_outcomes(np.ones(IMAGES))

    write_study(path, "damaged", SPACE, cells, edit=damage)
    results = load(str(path))
    trials = results.trials
    number = int(trials[(trials["depth"] == 14) & (trials["shortcut"] == "A")
                        & (trials["seed"] == 3)]["number"].iloc[0])
    assert number != 1  # the seed's position in its row, which the error named
    with pytest.raises(ValueError, match=rf"seed 3 \(trial {number}\)'s error rate"):
        results.summary()


def test_seeds_scored_on_test_sets_of_different_sizes_are_bounded_by_the_smallest(tmp_path):
    """One seed's evaluation lost an image: its configuration's row bounds the test set's
    sampling by the smaller set (scipy-free: stats.error_rate on that size) and says so, where
    it claimed that no size was recorded and gave Student's t over seeds."""
    cells = _cells(sizes={(8, "A", 2): IMAGES - 1})
    path = tmp_path / "sizes.db"
    write_study(path, "sizes", SPACE, cells)
    summary = load(str(path)).summary().set_index(["depth", "shortcut"])
    row = summary.loc[(8, "A")]
    rates = [float(np.mean(cells[((8, "A"), seed)])) for seed in range(5)]
    expected = stats.error_rate(None, rates, IMAGES - 1)
    assert row["method"] == expected.method
    assert (row["test_error_ci95_low"], row["test_error_ci95_high"]) == pytest.approx(
        (expected.low, expected.high))
    assert f"different sizes ({IMAGES - 1} to {IMAGES} images)" in row["note"]
    assert "not recorded" not in row["note"]
    assert "different sizes" not in summary.loc[(14, "A"), "note"]


def test_the_report_pairs_training_error_with_its_own_configuration(tmp_path):
    """A configuration whose trials recorded no training error (an older store) beside others
    that did: the report's table gives each configuration its own training error, and that one
    none, where it failed on the tables' different lengths."""
    path = tmp_path / "train.db"

    def older(point, seed, attrs):
        if point == (8, "none"):
            del attrs[TrialKey.FINAL_TRAIN_ACCURACY]

    write_study(path, "train", SPACE, _cells(), edit=older)
    results = load(str(path))
    table = report.summary_with_training_error(results).set_index(["depth", "shortcut"])
    training = results.summary(metric="train_error").set_index(["depth", "shortcut"])
    assert np.isnan(table.loc[(8, "none"), "train_error_mean"])
    for key in training.index:
        assert table.loc[key, "train_error_mean"] == pytest.approx(
            training.loc[key, "train_error_mean"])
    assert "train_error_mean" in report.render_report(results)


def test_the_adaptive_rule_bounds_different_test_set_sizes_as_the_summary_does():
    """The rule that closes a configuration on its interval's width sees the interval the
    summary then shows: over seeds on test sets of 300, 299 and 300 images, the binomial bound
    on the smallest (it took Student's t over seeds, 7 times narrower)."""
    rng = np.random.default_rng(4)
    seeds = [SeedResult(seed, float(rng.uniform(0.1, 0.12)), size)
             for seed, size in enumerate((IMAGES, IMAGES - 1, IMAGES))]
    estimate = _error_estimate(seeds, 0.95)
    expected = stats.error_rate(None, [s.error for s in seeds], IMAGES - 1)
    assert (estimate.method, estimate.low, estimate.high) == (
        expected.method, pytest.approx(expected.low), pytest.approx(expected.high))


def test_the_report_shows_the_papers_test_views_where_trials_recorded_them(tmp_path):
    """A study evaluated as the paper tested (10-crop, multi-scale) has those errors in its
    report, summarised over seeds as `summary --metric` gives them; a study without them has no
    such section."""
    path = tmp_path / "views.db"
    cells = _cells()

    def tested(point, seed, attrs):
        error = float(np.mean(cells[(point, seed)]))
        attrs[TrialKey.CURVES] = [{"epoch": 1, "test_error": error,
                                   "test_error_10crop": max(error - 0.02, 0.0)}]

    write_study(path, "views", SPACE, cells, edit=tested)
    results = load(str(path))
    page = report.render_report(results, responses=False)
    assert "The paper's test protocol" in page and "<h3>test_error_10crop</h3>" in page
    assert "test_error_multiscale" not in page  # not recorded
    expected = results.summary(metric="test_error_10crop")
    assert f"{100 * expected['test_error_10crop_mean'].iloc[0]:.2f}" in page
    plain = tmp_path / "plain.db"
    write_study(plain, "plain", SPACE, _cells())
    assert "The paper's test protocol" not in report.render_report(load(str(plain)),
                                                                   responses=False)
