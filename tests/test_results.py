"""Results read from a small study the runner produces here (synthetic data, 2 Ray workers):
tables, seed statistics checked against scipy.stats, Pareto fronts against brute force, curves,
Fig. 7 layer responses, plots and the HTML report; and the errors for what does not exist."""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import shutil
import sqlite3

import matplotlib.collections
import matplotlib.image
import matplotlib.lines
import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from scipy import stats

from helpers import RESULTS_DEPTHS, RESULTS_SEEDS, RESULTS_SHORTCUTS, RESULTS_STUDY, write_study
from resnet_ablate.record import unpack_outcomes
from resnet_ablate.results import (ResultsError, display_frame, list_studies, load, plot_axes,
                                   plots, report)
from resnet_ablate.results.display import footnotes
from resnet_ablate.stats import (BINOMIAL_BOUND, CROSSED, SEEDS_ONLY, contrast, error_rate,
                                 paired_difference)

STUDY, DEPTHS, SHORTCUTS, SEEDS = RESULTS_STUDY, RESULTS_DEPTHS, RESULTS_SHORTCUTS, RESULTS_SEEDS


@pytest.fixture(scope="module")
def raw_trials(runs):
    """The trials as Optuna stores them: the independent reference for every check."""
    storage = f"sqlite:///{runs}/{STUDY}.db"
    return optuna.load_study(study_name=STUDY, storage=storage).get_trials(deepcopy=False)


def _error_of(trial) -> float:
    return 1.0 - trial.user_attrs["final_test_accuracy"]


def _by_point(raw_trials) -> dict[tuple, float]:
    return {(t.params["depth"], t.params["shortcut"], t.user_attrs["seed"]): _error_of(t)
            for t in raw_trials}


# -- the trials table


def test_a_stored_value_past_64_bits_is_shown_as_stored_not_a_traceback():
    # Stores written before seeds were range-checked can hold one; the other columns stay whole.
    from resnet_ablate.results.store_reading import trials_frame

    frame = trials_frame([{"number": 0, "seed": 10**20, "depth": 20},
                          {"number": 1, "seed": 1, "depth": None}])
    assert frame["seed"].tolist() == [10**20, 1]
    assert str(frame["depth"].dtype) == "Int64" and frame["depth"].tolist()[0] == 20


def test_trials_frame_has_one_row_per_trial_with_what_the_runner_recorded(results, raw_trials):
    frame = results.trials.set_index("number")
    assert len(frame) == len(raw_trials) == 12
    assert results.swept == ("depth", "shortcut")
    for t in raw_trials:
        # The seed is an Optuna parameter too (optuna-dashboard shows it), as well as the
        # attribute the toolkit reads.
        assert t.params["seed"] == t.user_attrs["seed"]
        row = frame.loc[t.number]
        assert (row["depth"], row["shortcut"], row["seed"]) == (
            t.params["depth"], t.params["shortcut"], t.user_attrs["seed"])
        assert row["state"] == "COMPLETE" and row["stages"] == "-".join(
            map(str, t.user_attrs["arch"]["stages"]))
        assert row["params"] == t.user_attrs["params"] and row["flops"] == t.user_attrs["flops"]
        assert row["test_error"] == pytest.approx(t.values[0])
        assert row["test_accuracy"] == t.user_attrs["final_test_accuracy"]
        assert row["train_error"] == pytest.approx(1 - t.user_attrs["final_train_accuracy"])
        assert row["wall_seconds"] == t.user_attrs["wall_seconds"] > 0
        assert row["images_per_second"] == t.user_attrs["images_per_second"] > 0
        assert row["weights"] == t.user_attrs["weights"] and row["epochs"] == 2
        execution = t.user_attrs["execution"]  # resolved on this CPU: no compile, no graphs
        assert (row["precision"], row["compile"], row["cuda_graphs"]) == (
            execution["precision"], False, False) == ("fp32", execution["compile"],
                                                      execution["cuda_graphs"])
        assert row["compile_seconds"] == t.user_attrs["compile_seconds"]
        assert row["version"] == t.user_attrs["versions"]["resnet-ablate"] is not None
    # Whole numbers stay whole (no 8.0 from a nullable column).
    assert str(frame["depth"].dtype) == "Int64" and str(frame["flops"].dtype) == "Int64"


def test_where_filters_with_the_filter_language(results):
    chosen = results.where("depth == 14 and shortcut == 'A'")
    assert sorted(chosen.trials["seed"]) == [0, 1, 2]
    assert set(chosen.trials["arch_name"]) == {"resnet14-cifar-A"}
    with pytest.raises(ResultsError, match=r"no column 'nosuch' .* over the columns: number, state"):
        results.where("nosuch == 1")


def test_sorted_by_and_unknown_columns(results):
    ordered = results.sorted_by(["-test_error", "number"])
    assert list(ordered["test_error"]) == sorted(results.trials["test_error"], reverse=True)
    with pytest.raises(ResultsError, match=r"no column 'speed' in study 'results-small'; columns: .*flops"):
        results.sorted_by(["speed"])


# -- statistics against scipy.stats


def _outcomes_of(trial) -> np.ndarray:
    return unpack_outcomes(trial.user_attrs["test_outcomes"], trial.user_attrs["test_images"])


def test_each_trial_records_its_test_set_and_which_images_it_got_wrong(raw_trials):
    for t in raw_trials:
        outcomes = _outcomes_of(t)
        assert len(outcomes) == t.user_attrs["test_images"] > 0
        assert outcomes.sum() == t.user_attrs["test_wrong"]
        assert outcomes.mean() == pytest.approx(_error_of(t))


def test_rows_of_one_seed_name_no_method_for_the_intervals_they_do_not_have(results):
    """One seed a configuration: every interval and p-value is blank, and the tables named the
    crossed analysis as their method and Holm's over "0 tested rows" (an audit)."""
    one_seed = results.where("seed == 0")
    for frame in (one_seed.summary(), one_seed.compare("shortcut", SHORTCUTS[0])):
        assert frame.attrs["methods"] == [], frame.attrs["methods"]
    assert results.compare("shortcut", SHORTCUTS[0]).attrs["methods"][0] == CROSSED


def test_summary_intervals_include_the_test_sets_sampling(results, raw_trials):
    summary = results.summary(by=["depth", "shortcut"]).set_index(["depth", "shortcut"])
    points = _by_point(raw_trials)
    assert len(summary) == 4 and summary.attrs["methods"] == [CROSSED]
    for depth in DEPTHS:
        for shortcut in SHORTCUTS:
            values = np.array([points[(depth, shortcut, s)] for s in SEEDS])
            trials = [t for t in raw_trials
                      if (t.params["depth"], t.params["shortcut"]) == (depth, shortcut)]
            row = summary.loc[(depth, shortcut)]
            assert row["n"] == 3 and row["method"] == CROSSED
            assert row["test_error_mean"] == pytest.approx(values.mean())
            assert row["test_error_std"] == pytest.approx(values.std(ddof=1))
            expected = error_rate([_outcomes_of(t) for t in trials],
                                  [_error_of(t) for t in trials], trials[0].user_attrs["test_images"])
            assert (row["test_error_ci95_low"], row["test_error_ci95_high"]) == (
                pytest.approx(expected.low), pytest.approx(expected.high))
            # Never narrower than the test set's binomial sampling of the mean error alone.
            images = trials[0].user_attrs["test_images"]
            p = min(max(values.mean(), 1 / images), 1 - 1 / images)
            binomial = 1.96 * np.sqrt(p * (1 - p) / (images * len(values)))
            assert row["test_error_ci95_high"] - row["test_error_ci95_low"] >= binomial
            assert row["params"] == trials[0].user_attrs["params"]
            assert row["flops"] == trials[0].user_attrs["flops"]


def test_summary_of_a_metric_without_test_sampling_is_students_t(results, raw_trials):
    summary = results.summary(by=["depth", "shortcut"], metric="train_error")
    summary = summary.set_index(["depth", "shortcut"])
    for depth in DEPTHS:
        for shortcut in SHORTCUTS:
            values = np.array([1 - t.user_attrs["final_train_accuracy"] for t in raw_trials
                               if (t.params["depth"], t.params["shortcut"]) == (depth, shortcut)])
            low, high = stats.t.interval(0.95, len(values) - 1, loc=values.mean(),
                                         scale=stats.sem(values))
            row = summary.loc[(depth, shortcut)]
            assert row["method"] == SEEDS_ONLY and row["note"] == ""
            # Student's t, clipped to the [0, 1] an error rate lives in.
            assert (row["train_error_ci95_low"], row["train_error_ci95_high"]) == (
                pytest.approx(max(low, 0.0)), pytest.approx(min(high, 1.0)))


def test_every_rate_over_the_test_set_takes_its_sampling_and_best_error_says_it_is_picked_there(
        results, raw_trials):
    # The lowest test error over epochs has no per-image record: the binomial bound on the test
    # set's size, as test_error without its record, never Student's t over seeds alone (whose
    # interval tied seeds would shrink to a point).
    summary = results.summary(by=["depth", "shortcut"], metric="best_test_error")
    summary = summary.set_index(["depth", "shortcut"])
    for depth in DEPTHS:
        for shortcut in SHORTCUTS:
            trials = [t for t in raw_trials
                      if (t.params["depth"], t.params["shortcut"]) == (depth, shortcut)]
            best = [min(c["test_error"] for c in t.user_attrs["curves"]) for t in trials]
            expected = error_rate(None, best, trials[0].user_attrs["test_images"])
            row = summary.loc[(depth, shortcut)]
            assert row["method"] == BINOMIAL_BOUND == expected.method
            assert (row["best_test_error_ci95_low"], row["best_test_error_ci95_high"]) == (
                pytest.approx(expected.low), pytest.approx(expected.high))
            assert "picked on the test set, so optimistic" in row["note"]
    table = results.compare("shortcut", SHORTCUTS[0], metric="best_test_error")
    assert set(table["method"]) <= {BINOMIAL_BOUND, f"stratified over configurations "
                                                    f"({BINOMIAL_BOUND})"}


def test_a_metric_no_trial_recorded_is_one_error_and_a_trial_without_it_is_left_out_with_a_note(
        results):
    trials = results.trials.copy()
    trials["test_top5_error"] = np.nan
    unrecorded = dataclasses.replace(results, trials=trials)
    for call in (lambda r: r.summary(metric="test_top5_error"),
                 lambda r: r.compare("shortcut", SHORTCUTS[0], metric="test_top5_error"),
                 lambda r: r.pareto(["test_top5_error", "flops"])):
        with pytest.raises(ResultsError, match="no completed trial of study .* recorded "
                                               "test_top5_error, so there is nothing to"):
            call(unrecorded)
    trials = results.trials.copy()
    trials.loc[trials.index[0], "train_error"] = np.nan
    partial = dataclasses.replace(results, trials=trials)
    summary = partial.summary(metric="train_error")
    assert summary["n"].sum() == len(results.completed()) - 1
    # The note is on the rows over that trial only (its configuration; compare's "all" row).
    lacking = trials.iloc[0]
    noted = summary["note"].str.contains("1 completed trial without train_error left out")
    assert noted.tolist() == ((summary["depth"] == lacking["depth"])
                              & (summary["shortcut"] == lacking["shortcut"])).tolist()
    compared = partial.compare("shortcut", SHORTCUTS[0], metric="train_error")
    noted = compared["note"].str.contains("1 completed trial without train_error left out")
    over_it = [row.depth in (lacking["depth"], "all")
               and lacking["shortcut"] in (row.baseline, row.shortcut)
               for row in compared.itertuples()]
    assert noted.any() and noted.tolist() == over_it


def test_a_summary_over_several_configurations_averages_each_seed_over_them(results):
    """summary(by=["shortcut"]) of a study that sweeps depth too: each row is the mean of its
    depths' means with each seed one unit (averaged over the depths), never the depths' trials
    taken as more seeds."""
    table = results.summary(by=["shortcut"], metric="wall_seconds")
    done = results.completed()
    for row in table.itertuples():
        mine = done[done["shortcut"] == row.shortcut]
        per_seed = mine.groupby("seed")["wall_seconds"].mean()  # each seed over the depths
        assert row.n == len(SEEDS) == len(per_seed)
        low, high = stats.t.interval(0.95, len(per_seed) - 1, loc=per_seed.mean(),
                                     scale=stats.sem(per_seed))
        assert row.wall_seconds_mean == pytest.approx(per_seed.mean())
        assert (row.wall_seconds_ci95_low, row.wall_seconds_ci95_high) == pytest.approx(
            (max(low, 0.0), high))
        assert f"mean over {len(DEPTHS)} configurations" in row.note
    errors = results.summary(by=["shortcut"])
    for row in errors.itertuples():
        means = [done[(done["shortcut"] == row.shortcut) & (done["depth"] == d)]["test_error"]
                 .mean() for d in DEPTHS]
        assert row.n == len(SEEDS) and row.test_error_mean == pytest.approx(np.mean(means))
        assert row.method.startswith("stratified over configurations (seeds x test images")


def test_pruned_seeds_are_named_where_the_summary_leaves_them_out(results):
    """A pruned seed has no final error: the mean over the others is biased (the pruner let the
    better seeds finish), and its row says so; a configuration with every seed pruned has no
    row, and the table's notes say that too."""
    trials = results.trials.copy()
    first = trials.iloc[0]
    point = (trials["depth"] == first["depth"]) & (trials["shortcut"] == first["shortcut"])
    trials.loc[trials.index[0], "state"] = "PRUNED"
    summary = dataclasses.replace(results, trials=trials).summary()
    noted = summary["note"].str.contains("1 pruned seed left out: the pruner let the seeds "
                                         "that looked better finish, so this row is biased")
    assert noted.tolist() == ((summary["depth"] == first["depth"])
                              & (summary["shortcut"] == first["shortcut"])).tolist()
    assert summary.loc[noted, "n"].item() == len(SEEDS) - 1
    # compare and effects leave its pair out too, and say so on the rows it is left out of.
    pruned = dataclasses.replace(results, trials=trials)
    other = next(s for s in SHORTCUTS if s != first["shortcut"])
    compared = pruned.compare("shortcut", baseline=other)
    noted = compared["note"].str.contains("1 pruned seed left out")
    assert noted.tolist() == [row.depth in (first["depth"], "all")
                              for row in compared.itertuples()]
    effects = pruned.effects()
    assert effects["note"].str.contains("1 pruned seed left out").all()  # each covers it
    trials.loc[point, "state"] = "PRUNED"
    summary = dataclasses.replace(results, trials=trials).summary()
    assert len(summary) == len(DEPTHS) * len(SHORTCUTS) - 1
    assert footnotes(summary)[len(summary.attrs["methods"])] == (
        f"note: depth={first['depth']}, shortcut={first['shortcut']}: all {len(SEEDS)} trials "
        "pruned, no completed seed to summarise")
    # Interrupted and failed alike: a configuration without a completed trial is named.
    trials.loc[point, "state"] = ["INTERRUPTED"] * (len(SEEDS) - 1) + ["FAIL"]
    summary = dataclasses.replace(results, trials=trials).summary()
    assert footnotes(summary)[len(summary.attrs["methods"])] == (
        f"note: depth={first['depth']}, shortcut={first['shortcut']}: no completed trial to "
        f"summarise ({len(SEEDS) - 1} INTERRUPTED, 1 FAIL)")


def test_a_width_rule_studys_summary_shows_its_test_error_at_the_rules_level(results):
    plain = results.summary()
    assert not plain["note"].str.contains("width rule").any()
    # Every configuration's test error at the rule's level (99.17% over its six looks), wider
    # than the 95% interval; only those the rule closed before max seeds say they stopped early:
    # every one with a width any interval reaches, none with one that none reaches.
    for width, early in ((1.0, True), (1e-9, False)):
        adaptive = dataclasses.replace(results, seed_rule={"min": 2, "max": 10,
                                                           "until": {"width": width}})
        table = adaptive.summary()
        assert table["note"].str.contains(
            "the width rule's 99.17% interval .5% shared over its 6 looks.: a 95% interval "
            "whatever look stopped the seeds").all()
        assert (table["test_error_ci95_low"] <= plain["test_error_ci95_low"]).all()
        assert (table["test_error_ci95_high"] >= plain["test_error_ci95_high"]).all()
        assert (table["test_error_ci95_high"] - table["test_error_ci95_low"]
                > plain["test_error_ci95_high"] - plain["test_error_ci95_low"]).all()
        stopped = table["note"].str.contains("stopped early by the width rule")
        assert stopped.all() if early else not stopped.any()
        # Another metric is not adjusted, and says so where the rule stopped early.
        other = adaptive.summary(metric="train_error")
        assert np.allclose(other["train_error_ci95_low"],
                           results.summary(metric="train_error")["train_error_ci95_low"])
        unadjusted = other["note"].str.contains("not adjusted for that, so it covers less")
        assert unadjusted.all() if early else not unadjusted.any()
    decided = dataclasses.replace(results, seed_rule={
        "min": 2, "max": 10, "until": {"decided": "shortcut", "margin": 0.01}})
    assert not decided.summary()["note"].str.contains("width rule").any()
    # The comparison the rule decided says its interval is not adjusted for the looks; others
    # do not.
    from resnet_ablate.results.contrasts import LOOKED

    assert all(note.endswith(LOOKED) for note in decided.compare("shortcut", "A")["note"])
    assert not any(LOOKED in note for note in decided.compare("depth", DEPTHS[0])["note"])
    assert not any(LOOKED in note for note in results.compare("shortcut", "A")["note"])
    # The table's notes show it whole, once for every row or on each (a "; " within a note's
    # part would split it there).
    shown = footnotes(decided.compare("shortcut", "A"))
    assert any(LOOKED in line for line in shown) and "; " not in LOOKED


def test_a_seed_completed_twice_counts_once_in_the_summary_as_in_compare(results):
    trials = results.trials
    first = trials.iloc[0]
    twice = dataclasses.replace(results, trials=pd.concat(
        [trials, trials.iloc[[0]].assign(test_error=first["test_error"] + 0.1)],
        ignore_index=True))
    point = {"depth": first["depth"], "shortcut": first["shortcut"]}
    before = results.summary(by=["depth", "shortcut"]).set_index(["depth", "shortcut"])
    after = twice.summary(by=["depth", "shortcut"]).set_index(["depth", "shortcut"])
    row, was = after.loc[tuple(point.values())], before.loc[tuple(point.values())]
    assert row["n"] == was["n"] == len(SEEDS)
    # The seed's two trials averaged into one value: the mean moves by 0.1 / 2 / seeds.
    assert row["test_error_mean"] == pytest.approx(was["test_error_mean"] + 0.05 / len(SEEDS))
    assert row["method"] == BINOMIAL_BOUND  # an average of two trials has no per-image record
    # ... and the row says why, naming the seed; no other row does.
    why = f"seed {first['seed']} completed more than once: averaged into one value a seed"
    assert why in row["note"] and not after.drop(index=tuple(point.values()))["note"].str.contains(
        "more than once").any()
    compared = twice.compare("depth", DEPTHS[0]) if first["depth"] != DEPTHS[0] else \
        twice.compare("depth", DEPTHS[1])
    at = compared[compared["shortcut"] == first["shortcut"]]
    assert at["note"].str.contains(why).all() and at["method"].eq(BINOMIAL_BOUND).all()


def test_intervals_stay_in_the_range_of_the_metric_with_two_seeds(results):
    two_seeds = results.where("seed < 2")
    summary = two_seeds.summary(by=["depth", "shortcut"])
    assert (summary["n"] == 2).all()
    assert (summary["test_error_ci95_low"] >= 0).all() and (summary["test_error_ci95_high"] <= 1).all()
    widest = summary["test_error_ci95_high"] - summary["test_error_ci95_low"]
    assert (widest <= 1).all()


def test_summary_by_one_factor_averages_over_the_other(results, raw_trials):
    summary = results.summary(by=["shortcut"]).set_index("shortcut")
    errors = [_error_of(t) for t in raw_trials if t.params["shortcut"] == "none"]
    assert summary.loc["none", "n"] == len(SEEDS)  # seeds, not the depths' trials (6)
    assert summary.loc["none", "test_error_mean"] == pytest.approx(np.mean(errors))
    assert summary.loc["none", "arch_name"] == "2 architectures"


def test_compare_pairs_seeds_and_images_per_depth_and_stratifies_overall(results, raw_trials):
    table = results.compare("shortcut", "A")
    points = _by_point(raw_trials)
    by_point = {(t.params["depth"], t.params["shortcut"], t.user_attrs["seed"]): t
                for t in raw_trials}
    assert list(table["depth"]) == [8, 14, "all"]
    assert set(table["shortcut"]) == {"none"} and set(table["baseline"]) == {"A"}
    rows = table.to_dict("records")
    for depth, row in zip(DEPTHS, rows):
        base = np.array([points[(depth, "A", s)] for s in SEEDS])
        plain = np.array([points[(depth, "none", s)] for s in SEEDS])
        expected = paired_difference(
            [_outcomes_of(by_point[(depth, "A", s)]) for s in SEEDS],
            [_outcomes_of(by_point[(depth, "none", s)]) for s in SEEDS],
            base, plain, by_point[(depth, "A", SEEDS[0])].user_attrs["test_images"])
        assert row["n_pairs"] == len(SEEDS) and row["method"] == CROSSED
        assert row["diff_mean"] == pytest.approx((plain - base).mean())
        assert row["p_value"] == pytest.approx(expected.p_value)
        assert (row["diff_ci95_low"], row["diff_ci95_high"]) == (
            pytest.approx(expected.low), pytest.approx(expected.high))
        assert row["test_error_baseline"] == pytest.approx(base.mean())
    overall = rows[-1]
    assert overall["method"] == f"stratified over configurations ({CROSSED})"
    assert overall["diff_mean"] == pytest.approx(np.mean([r["diff_mean"] for r in rows[:-1]]))
    # One contrast over both depths' cells, weighted 1/2, seed by seed and image by image: the
    # depths share the test set, so their differences are not combined as independent.
    cells = [(depth, shortcut) for depth in DEPTHS for shortcut in ("A", "none")]
    expected = contrast([[_outcomes_of(by_point[(*cell, s)]) for s in SEEDS] for cell in cells],
                        [-0.5, 0.5] * len(DEPTHS), [[points[(*cell, s)] for s in SEEDS]
                                                    for cell in cells],
                        by_point[(DEPTHS[0], "A", SEEDS[0])].user_attrs["test_images"])
    assert (overall["diff_ci95_low"], overall["diff_ci95_high"], overall["p_value"]) == (
        pytest.approx(expected.low), pytest.approx(expected.high), pytest.approx(expected.p_value))
    assert overall["note"] == (f"mean over {len(DEPTHS)} configurations, on the {len(SEEDS)} "
                               "seeds all of them have")
    # Two seeds: the "all" row says so as every row does (its n is the seeds, not the pairs).
    few = results.where("seed < 2").compare("shortcut", "A").iloc[-1]
    assert few["note"].startswith("few seeds (n=2); mean over 2 configurations")


def test_the_all_row_is_over_the_seeds_every_configuration_has(results, raw_trials):
    # Depth 8 without its last seed: the "all" row is over seeds 0 and 1 only, and its side
    # columns (paired seeds, means) are over the same rows as its estimate: n_pairs counts the
    # seeds paired, not configurations x seeds.
    table = results.where(f"depth == {DEPTHS[1]} or seed < 2").compare("shortcut", "A")
    points = _by_point(raw_trials)
    rows = {row["depth"]: row for row in table.to_dict("records")}
    assert (rows[DEPTHS[0]]["n_pairs"], rows[DEPTHS[1]]["n_pairs"]) == (2, 3)
    overall, common = rows["all"], (0, 1)
    base = [points[(d, "A", s)] for d in DEPTHS for s in common]
    level = [points[(d, "none", s)] for d in DEPTHS for s in common]
    assert overall["n_pairs"] == len(common)
    assert overall["test_error_baseline"] == pytest.approx(np.mean(base))
    assert overall["test_error_level"] == pytest.approx(np.mean(level))
    assert overall["diff_mean"] == pytest.approx(np.mean(level) - np.mean(base))
    assert "on the 2 seeds all of them have" in overall["note"]
    # No seed in common: no estimate, and a note that says why.
    apart = results.where(f"(depth == {DEPTHS[0]} and seed == 0) or (depth == {DEPTHS[1]} "
                          "and seed > 0)").compare("shortcut", "A").iloc[-1]
    assert np.isnan(apart["diff_mean"]) and apart["n_pairs"] == 0
    assert apart["note"] == "no seed that all 2 configurations have"
    assert apart["method"] == "stratified over configurations"


def test_compare_of_a_metric_without_test_sampling_is_the_paired_t_test(results, raw_trials):
    table = results.compare("shortcut", "A", metric="train_error")
    train_error = {(t.params["depth"], t.params["shortcut"], t.user_attrs["seed"]):
                   1 - t.user_attrs["final_train_accuracy"] for t in raw_trials}
    for depth, row in zip(DEPTHS, table.to_dict("records")):
        base = np.array([train_error[(depth, "A", s)] for s in SEEDS])
        plain = np.array([train_error[(depth, "none", s)] for s in SEEDS])
        diff = plain - base
        low, high = stats.t.interval(0.95, len(diff) - 1, loc=diff.mean(), scale=stats.sem(diff))
        assert row["method"] == SEEDS_ONLY
        assert row["p_value"] == pytest.approx(stats.ttest_rel(plain, base).pvalue)
        assert (row["diff_ci95_low"], row["diff_ci95_high"]) == (pytest.approx(low), pytest.approx(high))


def test_compare_accepts_the_level_as_typed_and_names_the_valid_ones(results):
    by_depth = results.compare("depth", "8")  # text, as from a command line
    assert list(by_depth["shortcut"]) == ["A", "none", "all"] and set(by_depth["depth"]) == {14}
    with pytest.raises(ResultsError, match=r"no trial has shortcut='B'; shortcut values: 'A', 'none'"):
        results.compare("shortcut", "B")
    with pytest.raises(ResultsError, match="no column 'width'"):
        results.compare("width", "16")
    # None is no baseline, not the plain net's level 'none'.
    with pytest.raises(ResultsError, match=r"compare needs a baseline: one of shortcut's levels, "
                                           r"'A', 'none'"):
        results.compare("shortcut", None)
    # Columns that are not swept factors: one error naming the factors, not pandas' own.
    for column, level in (("seed", 0), ("arch_name", "plain8"), ("flops", 1), ("number", 0)):
        with pytest.raises(ResultsError, match=rf"'{column}' is not a factor study .* sweeps, so "
                                               r"it has no levels to compare; factors: depth, "
                                               r"shortcut"):
            results.compare(column, level)


def _brute_force_front(rows, objectives, signs):
    front = []
    for i, a in enumerate(rows):
        dominated = False
        for j, b in enumerate(rows):
            if i == j:
                continue
            no_worse = all(s * b[o] <= s * a[o] for o, s in zip(objectives, signs))
            better = any(s * b[o] < s * a[o] for o, s in zip(objectives, signs))
            dominated |= no_worse and better
        if not dominated:
            front.append(a["number"])
    return sorted(front)


def test_pareto_front_matches_brute_force(results, raw_trials):
    rows = [{"number": t.number, "test_error": _error_of(t), "flops": t.user_attrs["flops"],
             "params": t.user_attrs["params"], "accuracy": t.user_attrs["final_test_accuracy"]}
            for t in raw_trials]
    front = results.pareto(["test_error", "flops"], over="trials")
    assert sorted(front["number"]) == _brute_force_front(rows, ["test_error", "flops"], [1, 1])
    assert list(front["test_error"]) == sorted(front["test_error"])
    # Maximising accuracy is the same front as minimising error.
    by_accuracy = results.pareto(["test_accuracy", "params"], over="trials")
    assert sorted(by_accuracy["number"]) == _brute_force_front(rows, ["accuracy", "params"], [-1, 1])
    with pytest.raises(ResultsError, match="no direction known for 'seed'"):
        results.pareto(["test_error", "seed"])


def test_pareto_front_over_configurations_is_over_their_means_with_intervals(results, raw_trials):
    rows = []
    for depth in DEPTHS:
        for shortcut in SHORTCUTS:
            trials = [t for t in raw_trials
                      if (t.params["depth"], t.params["shortcut"]) == (depth, shortcut)]
            rows.append({"number": (depth, shortcut),
                         "test_error": np.mean([_error_of(t) for t in trials]),
                         "flops": trials[0].user_attrs["flops"]})
    front = results.pareto(["test_error", "flops"])
    assert sorted(zip(front["depth"], front["shortcut"])) == \
        _brute_force_front(rows, ["test_error", "flops"], [1, 1])
    summary = results.summary().set_index(["depth", "shortcut"])
    for row in front.to_dict("records"):
        expected = summary.loc[(row["depth"], row["shortcut"])]
        assert row["n"] == 3 and row["test_error"] == pytest.approx(expected["test_error_mean"])
        assert row["test_error_ci95_low"] == pytest.approx(expected["test_error_ci95_low"])
        assert row["flops"] == expected["flops"] and "flops_ci95_low" not in front  # one value
    # A member whose error interval overlaps that of a cheaper member says so, by hand.
    for row in front.to_dict("records"):
        rivals = [r for r in front.to_dict("records") if r["flops"] < row["flops"]
                  and r["test_error_ci95_low"] <= row["test_error_ci95_high"]
                  and row["test_error_ci95_low"] <= r["test_error_ci95_high"]]
        assert ("its test_error interval overlaps that of" in row["note"]) == bool(rivals)
        for rival in rivals:
            assert f"depth={rival['depth']}, shortcut={rival['shortcut']}" in row["note"]
    # In either order of the objectives: the same front, flags and method (FLOPs have no
    # interval, and no method of their own).
    reordered = results.pareto(["flops", "test_error"])
    assert sorted(zip(reordered["depth"], reordered["shortcut"])) == \
        sorted(zip(front["depth"], front["shortcut"]))
    by_point = reordered.set_index(["depth", "shortcut"])
    for row in front.to_dict("records"):
        again = by_point.loc[(row["depth"], row["shortcut"])]
        assert again["note"] == row["note"] and again["method"] == row["method"]
    # A second objective with an interval of its own names how that interval was made.
    timed = results.pareto(["test_error", "wall_seconds"])
    assert all(method.endswith("; wall_seconds: " + SEEDS_ONLY)
               for method in timed["method"])
    assert "wall_seconds: " not in " ".join(front["method"])
    with pytest.raises(ResultsError, match="over='seeds'"):
        results.pareto(over="seeds")


def test_curves_are_the_recorded_epochs(results, raw_trials):
    trial = raw_trials[5]
    curves = results.curves([trial.number])
    assert list(curves["epoch"]) == [1, 2]
    for record, row in zip(trial.user_attrs["curves"], curves.to_dict("records")):
        assert row["test_error"] == record["test_error"] and row["train_error"] == record["train_error"]
        assert row["shortcut"] == trial.params["shortcut"] and row["seed"] == trial.user_attrs["seed"]
    assert len(results.curves()) == 2 * len(raw_trials)
    # The Python API takes what the CLI takes: one trial's number, names as one string.
    assert results.curves(trial.number).equals(curves)
    assert results.summary(by="depth").equals(results.summary(by=["depth"]))
    assert results.summary(by=" depth, shortcut").equals(results.summary(by=["depth", "shortcut"]))
    assert results.pareto("test_error,flops").equals(results.pareto(["test_error", "flops"]))
    with pytest.raises(ResultsError, match=r"no trial 99 .*trials here: 0-11"):
        results.curves([99])


# -- Fig. 7: layer responses from the kept weights


def test_unfused_rebuild_computes_the_same_function_as_the_trained_fused_model(results):
    fused, unfused = results.model(0), results.model(0, fused=False)
    assert fused.fused and not unfused.fused
    assert fused.state_dict().keys() == unfused.state_dict().keys()
    images = results.dataset().test_x[:16]
    with torch.no_grad():
        torch.testing.assert_close(fused(images), unfused(images), rtol=1e-4, atol=1e-5)


def test_layer_responses_are_the_std_of_each_3x3_bn_output_before_add_and_relu(results, raw_trials):
    deep_plain = next(t for t in raw_trials
                      if (t.params["depth"], t.params["shortcut"]) == (14, "none"))
    responses = results.layer_responses([0, deep_plain.number])
    shallow = responses[responses["number"] == 0]
    assert list(shallow["module"]) == ["bn1", "layer1.0.bn1", "layer1.0.bn2", "layer2.0.bn1",
                                       "layer2.0.bn2", "layer3.0.bn1", "layer3.0.bn2"]
    assert list(shallow["layer"]) == list(range(1, 8))
    assert (responses["number"] == deep_plain.number).sum() == 13  # stem + 2 x 2 x 3 blocks

    # By hand: the stem, then block layer1.0 up to its second BN, before the add and the ReLU.
    model = results.model(0, fused=False)
    images = results.dataset().test_x
    with torch.no_grad():
        stem = model.bn1(model.conv1(images))
        block = model.layer1[0]
        first = block.bn1(block.conv1(torch.relu(stem)))
        second = block.bn2(block.conv2(torch.relu(first)))
    expected = [stem.double().std().item(), first.double().std().item(), second.double().std().item()]
    assert list(shallow["std"][:3]) == pytest.approx(expected, rel=1e-6)
    # Post-ReLU values would be a different (smaller) number: the hook sees the BN output.
    assert expected[2] != pytest.approx(torch.relu(second).double().std().item(), rel=1e-3)


# -- plots and report


def test_the_figures_of_means_over_seeds_say_how_many_seeds_and_what_was_pruned(results):
    """Each curve's label counts its own seeds (a configuration that lost one to the pruner has
    fewer), and the curves and depth figures name the pruned seeds they leave out."""
    trials = results.trials.copy()
    first = trials.iloc[0]
    trials.loc[trials.index[0], "state"] = "PRUNED"
    pruned = dataclasses.replace(results, trials=trials)
    curves = plots.plot_curves(pruned)
    labels = [line.get_label() for ax in curves.axes for line in ax.get_lines()
              if not line.get_label().startswith("_")]
    counts = sorted(int(label.rsplit("(", 1)[1].split()[0]) for label in labels)
    assert counts == [len(SEEDS) - 1] + [len(SEEDS)] * (len(labels) - 1)
    assert "1 pruned seed left out" in curves._suptitle.get_text()
    depth = plots.plot_depth(pruned)
    assert "1 pruned seed left out" in depth.axes[0].get_title()
    assert "pruned" not in plots.plot_depth(results).axes[0].get_title()
    assert first["state"] == "COMPLETE"


def test_the_responses_plot_pairs_each_plain_net_with_its_twin_and_labels_its_axis(results):
    """Fig. 7 as the paper draws it: a plain net and its ResNet twin in one colour (the depth's),
    dotted against solid; a log axis that spans less than a decade labelled in plain numbers."""
    responses = pd.DataFrame(
        [{"arch_name": name, "layer": layer, "std": std * (1 + 0.05 * layer)}
         for name, std in (("plain14-cifar", 1.0), ("resnet14-cifar-A", 0.9),
                           ("plain8-cifar", 1.1), ("resnet8-cifar-A", 0.95))
         for layer in range(1, 8)])
    figure = plots.plot_responses(results, responses)
    original = figure.axes[0]
    # Lines named by the factors that vary (an architecture's name leaves defaults out).
    plain8, resnet8, plain14, resnet14 = ("8-layer, plain", "8-layer, ResNet (A)",
                                          "14-layer, plain", "14-layer, ResNet (A)")
    colors = {line.get_label(): line.get_color() for line in original.get_lines()}
    assert colors[plain8] == colors[resnet8]
    assert colors[plain14] == colors[resnet14] != colors[plain8]
    styles = {line.get_label(): line.get_linestyle() for line in original.get_lines()}
    assert styles[plain8] == ":" and styles[resnet8] == "-"
    assert [text.get_text() for text in original.get_legend().get_texts()] == [
        plain8, resnet8, plain14, resnet14]  # twins paired
    figure.canvas.draw()
    low, high = original.get_ylim()
    labels = [t.get_text() for t in original.get_yticklabels()
              if t.get_text() and low <= t.get_position()[1] <= high]
    assert len(labels) >= 3 and not any("times" in label or "^" in label for label in labels)


def test_a_responses_legend_of_many_lines_goes_below_the_panels(results):
    # Eight lines' legend inside the left panel covered its lines at layers 3-5.
    names = [f"resnet{d}-cifar-bottleneck-B-bw{w}-v1" for d in (11, 20) for w in (16, 32, 64)]
    responses = pd.DataFrame([{"arch_name": name, "layer": layer, "std": 1.0 + 0.01 * i * layer}
                              for i, name in enumerate(names) for layer in range(1, 5)])
    figure = plots.plot_responses(results, responses)
    assert figure.axes[0].get_legend() is None and len(figure.legends) == 1
    assert len(figure.legends[0].get_texts()) == len(names)


def test_the_figures_of_a_study_without_shortcuts_show_its_own_factor():
    """A bottleneck-width study (depth x base_width, shortcut fixed): the depth figure draws a
    line per width (it drew one line, "test_error", averaging the widths), the Pareto figure
    colours by width with its long legend beside the axes and plain cost ticks, and Fig. 7 gives
    each configuration its own colour (it coloured by depth alone)."""
    from helpers import study_in_memory

    rng = np.random.default_rng(0)
    widths = (16, 32, 64, 128)
    study = study_in_memory([
        ({"depth": depth, "base_width": width}, seed, (rng.random(200) < 0.05).astype(float))
        for depth in (11, 20) for width in widths for seed in range(2)],
        model={"block": "bottleneck"})
    depth = plots.plot_depth(study).axes[0]
    assert [t.get_text() for t in depth.get_legend().get_texts()] == [
        f"base_width={w} (n=2 seeds)" for w in widths]
    pareto = plots.plot_pareto(study)
    legend = pareto.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()][1:] == [
        f"base_width={w} (n=2 seeds)" for w in widths]
    pareto.canvas.draw()
    ticks = [t.get_text() for t in pareto.axes[0].get_xticklabels() if t.get_text()]
    assert ticks and not any("times" in t or "^" in t for t in ticks), ticks
    assert legend.get_window_extent().x0 > pareto.axes[0].get_window_extent().x1  # beside
    names = sorted(study.completed()["arch_name"].unique())
    responses = pd.DataFrame([{"arch_name": name, "layer": layer, "std": 1.0 + layer}
                              for name in names for layer in range(1, 5)])
    lines = plots.plot_responses(study, responses).axes[0].get_lines()
    assert len({line.get_color() for line in lines}) == len(names) == 8
    # Where a figure's means pool a varied factor, its title says which.
    shortcut_free = plots.plot_depth(study, line_by="depth", x="base_width").axes[0]
    assert "means over every" not in shortcut_free.get_title()
    pooled = plots.plot_depth(study, x="base_width", line_by="base_width").axes[0]
    assert "means over every depth too" in pooled.get_title()


@pytest.mark.parametrize("kind", plots.KINDS)
def test_each_plot_is_a_valid_png(results, tmp_path, kind):
    path = plots.save_plot(results, kind, tmp_path / f"{kind}.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(io.BytesIO(data), format="png")
    height, width = image.shape[:2]
    assert image.shape[2] in (3, 4) and 300 <= height <= 2000 and 400 <= width <= 3000
    assert image[..., :3].std() > 0.05  # something is drawn, not a blank canvas


def test_the_depth_plots_legend_names_a_long_method_inside_the_figure(results, monkeypatch):
    """A stratified interval's method ("stratified over configurations (seeds x test images
    (...))") is wider than the panel: the legend's title wraps and stays inside the figure."""
    summary = type(results).summary
    long = ("stratified over configurations (seeds x test images (crossed random effects, "
            "generalized pivot))")

    def with_long_method(self, by=None, metric="test_error"):
        frame = summary(self, by, metric)
        frame.attrs["methods"] = [long]
        return frame

    monkeypatch.setattr(type(results), "summary", with_long_method)
    figure = plots.plot_depth(results)
    figure.canvas.draw()
    (ax,) = figure.axes
    legend = ax.get_legend()
    assert legend.get_title().get_text().replace("\n", " ") == f"95% CI: {long}"
    box, frame = legend.get_window_extent(), figure.bbox
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1, (box, frame)


def test_the_depth_plots_lines_stand_apart_so_that_no_bar_hides_another(results):
    (ax,) = plots.plot_depth(results).axes
    xs = [container[0].get_xdata() for container in ax.containers]  # one per line
    assert len(xs) == len(SHORTCUTS)
    for at_depth in zip(*xs):
        assert len(set(at_depth)) == len(at_depth)
        assert max(at_depth) - min(at_depth) < 0.1 * (max(DEPTHS) - min(DEPTHS))


def test_one_depth_is_drawn_at_its_tick_with_its_lines_close_together(results):
    # With one depth the axis zoomed to the lines' small offset: each at an edge, far from its tick.
    (ax,) = plots.plot_depth(results.where(f"depth == {DEPTHS[0]}")).axes
    low, high = ax.get_xlim()
    for container in ax.containers:
        (at,) = container[0].get_xdata()
        assert abs(at - DEPTHS[0]) < 0.1 * (high - low)
    assert low < DEPTHS[0] < high and high - low >= 1
    # Every bar stands at the centre, as tall as the axes: the legend beside them, not on them.
    figure = ax.figure
    figure.canvas.draw()
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 > ax.get_window_extent().x1
    assert legend.x1 <= figure.bbox.x1  # within the figure, which widened for it
    (several,) = plots.plot_depth(results).axes  # depths spread: the legend stays inside
    several.figure.canvas.draw()
    assert several.get_legend().get_window_extent().x1 <= several.get_window_extent().x1


def test_the_depth_plot_draws_any_metric_in_the_tables_unit(results):
    """Every metric was drawn as a rate: the axis read "wall seconds (%)", a 3 s trial at 300."""
    for metric, scale, unit in (("wall_seconds", 1.0, "wall (s)"), ("flops", 1e-9, "GFLOPs"),
                                ("test_error", 100.0, "test error (%)")):
        summary = results.summary(by=["depth", "shortcut"], metric=metric)
        (ax,) = plots.plot_depth(results, metric=metric).axes
        assert ax.get_ylabel() == f"{unit}, mean and 95% CI"
        drawn = sorted(y for container in ax.containers for y in container[0].get_ydata())
        np.testing.assert_allclose(drawn, sorted(scale * summary[f"{metric}_mean"]))


def test_the_figures_refuse_what_they_cannot_draw_in_one_line(results):
    with pytest.raises(ResultsError, match="^plot depth: x='shortcut' takes levels that are not "
                                           "numbers; give a numeric factor: depth$"):
        plots.plot_depth(results, x="shortcut")
    with pytest.raises(ResultsError, match="^plot depth: x='params' is not a factor; give a "
                                           "numeric factor: depth$"):
        plots.plot_depth(results, x="params")
    with pytest.raises(ResultsError, match="^plot curves: no per-epoch 'test_error'; curves are "
                                           "of 'error' or 'loss'"):
        plots.plot_curves(results, metric="test_error")


def test_a_mean_error_of_zero_is_drawn_at_the_axis_floor_and_marked(results, monkeypatch):
    """On the log axis a mean training error of 0 was left out: the line broke there, and a
    nonzero epoch between two zeros vanished (no marker): training looked as if it had stopped."""
    curves = results.curves()
    last = curves["epoch"] == curves["epoch"].max()
    zeroed = curves.assign(train_error=curves["train_error"].where(~last, 0.0))
    monkeypatch.setattr(type(results), "curves", lambda self, numbers=None: zeroed)
    figure = plots.plot_curves(results)
    means = zeroed.groupby(["shortcut", "depth", "epoch"])[["train_error", "test_error"]].mean()
    floor = 0.5 * 100 * means[means > 0].min().min()
    for ax in figure.axes:
        assert "0%, drawn at" in ax.get_ylabel()
        lines = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert lines and all(np.isfinite(line.get_ydata()).all() for line in lines)
        assert all(line.get_ydata()[-1] == pytest.approx(floor) for line in lines)
        marks = [line for line in ax.get_lines() if line.get_marker() == "v"
                 and len(line.get_xdata())]
        assert {float(x) for line in marks for x in line.get_xdata()} == {
            float(curves["epoch"].max())}


def test_curves_of_one_epoch_are_drawn_as_points_on_an_axis_of_whole_epochs(results, monkeypatch):
    """A study of one epoch drew each curve as a line of one point, which a line does not show:
    its figure was empty, on an axis from epoch 0.945 to 1.05."""
    curves = results.curves()
    first = curves[curves["epoch"] == 1]
    monkeypatch.setattr(type(results), "curves", lambda self, numbers=None: first)
    figure = plots.plot_curves(results)
    means = first.groupby(["shortcut", "depth"])[["train_error", "test_error"]].mean() * 100
    for ax in figure.axes:
        drawn = [line for line in ax.get_lines() if len(line.get_xdata())]
        assert drawn and all(line.get_marker() == "o" for line in drawn)
        assert {line.get_fillstyle() for line in drawn} == {"full", "none"}  # test, train
        assert ax.get_xlim() == (0, 2) and 1 in ax.get_xticks()
        assert ax.get_legend().get_title().get_text() == "filled: test, hollow: train"
    drawn = sorted(float(line.get_ydata()[0]) for ax in figure.axes for line in ax.get_lines()
                   if len(line.get_xdata()))
    assert drawn == pytest.approx(sorted(means.to_numpy().ravel()))
    monkeypatch.undo()
    several = plots.plot_curves(results)  # more epochs: lines, no markers
    assert all(line.get_marker() in ("None", "v") for ax in several.axes
               for line in ax.get_lines())


def test_figures_of_many_panels_wrap_two_to_a_row(results):
    """Four curve panels in a row made a figure 2,200 pixels wide, which a report page shrank
    until its text was 5 pixels high."""
    figure = plots.plot_curves(results, panel_by="seed")  # three panels
    panels = [ax for ax in figure.axes if ax.get_visible()]
    assert len(panels) == len(SEEDS) == 3
    assert len({round(ax.get_position().x0, 3) for ax in panels}) == 2  # columns
    assert len({round(ax.get_position().y0, 3) for ax in panels}) == 2  # rows
    assert figure.get_size_inches()[0] <= 11.0
    assert all(ax.get_yscale() == "log" for ax in panels)  # the last epochs not flat at 0


def test_the_pareto_figure_tags_each_mean_with_the_levels_its_colour_leaves_out():
    """Widths and depths swept: the means were coloured by width alone, a width's two depths
    told apart by nothing. Each mean is tagged with its depth, in its colour; an option-A net
    and its plain twin (one depth, one cost) share one grey tag rather than two drawn over
    each other."""
    from helpers import study_in_memory

    rng = np.random.default_rng(3)
    widths = study_in_memory([
        ({"depth": depth, "base_width": width}, seed, (rng.random(200) < 0.1).astype(float))
        for depth in (11, 20) for width in (16, 64) for seed in range(2)],
        model={"family": "bottleneck"})
    trials = widths.trials.assign(flops=widths.trials["flops"] * widths.trials["base_width"] // 16)
    (ax,) = plots.plot_pareto(dataclasses.replace(widths, trials=trials)).axes
    tags = sorted((t.get_text(), t.get_color()) for t in ax.texts)
    colours = {c.get_label().split(" (")[0]: c[0].get_color() for c in ax.containers}
    assert len(set(colours.values())) == 2
    assert tags == sorted((f"{depth}-layer", colours[f"base_width={width}"])
                          for depth in (11, 20) for width in (16, 64))
    twins = study_in_memory([
        ({"depth": depth, "shortcut": shortcut}, seed, (rng.random(200) < 0.1).astype(float))
        for depth in (20, 56) for shortcut in ("A", "none") for seed in range(2)])
    figure = plots.plot_pareto(twins)
    (ax,) = figure.axes
    assert sorted((t.get_text(), t.get_color()) for t in ax.texts) == [
        ("20-layer", "0.35"), ("56-layer", "0.35")]
    # The right-most tag ran past the axis (and, longer, off the figure): it is drawn within.
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for tag in ax.texts:
        box = tag.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, tag.get_text()


def test_the_pareto_figures_tags_sit_above_the_bars_they_name():
    """A tag was set beside its mean, over the next group's bar and the front's staircase (an
    audit). It sits above the highest bar of its means, within the axes; option B's projection
    (a few percent more FLOPs) shares its depth's tag with A and the plain net."""
    from helpers import study_in_memory

    rng = np.random.default_rng(4)
    study = study_in_memory([
        ({"depth": depth, "shortcut": shortcut}, seed, (rng.random(200) < 0.1).astype(float))
        for depth in (20, 56) for shortcut in ("A", "B", "none") for seed in range(3)])
    figure = plots.plot_pareto(study)
    (ax,) = figure.axes
    assert sorted(t.get_text() for t in ax.texts) == ["20-layer", "56-layer"]
    tops = [(segment[:, 0].mean(), segment[:, 1].max()) for container in ax.containers
            for segment in container[2][0].get_segments()]
    middle = np.mean(ax.get_xlim()) if not ax.get_xscale() == "log" else None
    renderer = figure.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    for tag in ax.texts:
        left = (tag.xy[0] < middle) if middle is not None else tag.get_text() == "20-layer"
        mine = [top for x, top in tops if (x < middle) == left]
        assert len(mine) == 3 and tag.xy[1] == pytest.approx(max(mine))
        box = tag.get_window_extent(renderer)
        assert tag.get_va() == "bottom" and frame.y0 <= box.y0 and box.y1 <= frame.y1


def test_figures_of_one_seed_each_promise_no_intervals(results):
    """One seed a configuration: the axes read "mean and 95% CI" and each legend entry showed a
    bar (an audit); they now say there is no interval, and the legend's markers are open."""
    one_seed = results.where("seed == 0")
    for figure in (plots.plot_depth(one_seed), plots.plot_pareto(one_seed)):
        (ax,) = figure.axes
        assert ax.get_ylabel().endswith("one seed each, no interval") and not ax.containers
        handles = ax.get_legend().legend_handles
        assert all(h.get_markerfacecolor() == "white" for h in handles
                   if isinstance(h, matplotlib.lines.Line2D) and h.get_marker() not in (None, "None", ""))
    assert plots.plot_depth(results).axes[0].get_ylabel().endswith("mean and 95% CI")


@pytest.mark.parametrize("depths", [(20, 56), (20, 200)], ids=["linear", "log"])
def test_the_pareto_figure_sets_groups_of_equal_cost_side_by_side_in_the_tables_units(depths):
    """Option A and its plain twin cost the same FLOPs (here exactly): their means were drawn
    at one x, one hiding the other. They are set apart by a share of the axis (of its decades
    on a log axis), in a fixed order, each within a few percent of its true cost, the staircase
    through the moved points; the axis is in GFLOPs as the tables are (0.02, not 20 MFLOPs)."""
    from helpers import study_in_memory

    rng = np.random.default_rng(1)
    study = study_in_memory([
        ({"depth": depth, "shortcut": shortcut}, seed, (rng.random(300) < 0.1).astype(float))
        for depth in depths for shortcut in ("A", "none") for seed in range(2)])
    (ax,) = plots.plot_pareto(study).axes
    means = {container.get_label().rsplit(" (", 1)[0]: container[0].get_xdata()
             for container in ax.containers}
    a, plain = np.asarray(means["ResNet (A)"], float), np.asarray(means["plain"], float)
    true = np.array(depths) * 1e-3  # depth x 1e6 FLOPs, in GFLOPs
    assert (a < true).all() and (plain > true).all()  # apart, A to the left
    log = ax.get_xscale() == "log"
    assert log == (depths[1] / depths[0] > 8)
    axis = np.log if log else (lambda values: values)
    span = axis(true[1]) - axis(true[0])
    assert axis(plain) - axis(a) == pytest.approx(plots.PARETO_SIDE_STEP * span * np.ones(2))
    assert np.abs(axis(a) - axis(true)).max() < 0.05 * span
    front_x = ax.get_lines()[0].get_xdata()
    assert set(np.round(front_x, 12)) <= set(np.round(np.concatenate([a, plain]), 12))
    assert ax.get_xlabel() == "GFLOPs (groups of equal cost set side by side)"
    one_shortcut = study.where("shortcut == 'A'")
    assert plots.plot_pareto(one_shortcut).axes[0].get_xlabel() == "GFLOPs"
    # A cost that varies by seed (wall seconds): each configuration's mean, in the tables' unit.
    study.trials["wall_seconds"] = rng.uniform(10, 11, len(study.trials))
    (ax,) = plots.plot_pareto(study, cost="wall_seconds").axes
    drawn = {c.get_label(): c[0].get_xdata() for c in ax.containers}
    means = study.trials.groupby(["shortcut", "depth"])["wall_seconds"].mean()
    assert ax.get_xlabel().startswith("wall (s)")
    # Four means within 0.6 s, a step 0.26 s: set a step apart in their true order, each moved
    # by less than two steps.
    order = np.argsort(means.to_numpy())
    placed = np.concatenate([drawn[label] for label in sorted(drawn)])[order]
    low, high = ax.get_xlim()
    step = plots.PARETO_SIDE_STEP * (high - low)
    assert (np.diff(placed) >= step - 1e-9).all()
    assert (np.abs(placed - means.to_numpy()[order]) < 2 * step).all()
    # One depth: every trial of one cost. Still apart, on an axis as wide as the cost.
    (ax,) = plots.plot_pareto(study.where(f"depth == {depths[0]}")).axes
    (a,), (plain,) = (container[0].get_xdata() for container in ax.containers)
    assert plain - a == pytest.approx(plots.PARETO_SIDE_STEP * true[0])
    assert ax.get_xlim() == pytest.approx((true[0] / 2, 1.5 * true[0]))
    assert ax.get_xlabel() == "GFLOPs (groups of equal cost set side by side)"


def test_a_mean_without_an_interval_is_drawn_open_and_without_a_bar(results):
    """One seed gives no interval (NaN bounds): drawn as a filled marker with a bar of zero
    length, it would read as a certainty. The deeper nets keep one seed here, the shallow ones all."""
    one_seed = results.where(f"seed == {SEEDS[0]} or depth == {DEPTHS[0]}")
    summary = one_seed.summary(by=["depth", "shortcut"])
    alone = summary[summary["n"] == 1]
    assert len(alone) == len(SHORTCUTS) and alone["test_error_ci95_low"].isna().all()
    expected = sorted(zip(alone["depth"].astype(float), 100 * alone["test_error_mean"]))
    for figure, x in ((plots.plot_depth(one_seed), "depth"),
                      (plots.plot_pareto(one_seed), "flops")):
        (ax,) = figure.axes
        opened = sorted(tuple(point) for c in ax.collections
                        if isinstance(c, matplotlib.collections.PathCollection)
                        and c.get_label() != plot_axes.ONE_SEED_LABEL and len(c.get_offsets())
                        and len(c.get_facecolor()) and (c.get_facecolor()[:, :3] == 1).all()
                        for point in c.get_offsets())
        if x == "depth":  # (each line a little to the side, so that bars never overlap)
            assert [p[0] for p in opened] == pytest.approx([p[0] for p in expected], abs=1)
        # (In the Pareto figure at the configurations' FLOPs, in the figure's unit.)
        assert sorted(p[1] for p in opened) == pytest.approx(sorted(p[1] for p in expected))
        assert plot_axes.ONE_SEED_LABEL in [t.get_text() for t in ax.get_legend().get_texts()]
        # Bars: one segment per mean; those of the one-seed means are not drawn (NaN), the
        # others have their interval's length.
        bars = [seg for container in ax.containers for seg in container[2][0].get_segments()]
        lengths = np.array([abs(seg[-1][1] - seg[0][1]) if len(seg) == 2 else np.nan
                            for seg in bars])
        assert len(bars) == len(summary)
        assert np.isnan(lengths).sum() == len(alone)
        assert (lengths[~np.isnan(lengths)] > 0).all()


def test_report_is_one_self_contained_page_with_the_tables_and_plots(results, tmp_path):
    path = report.write_report(results, tmp_path / "report.html")
    page = path.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    summary = display_frame(results.summary())
    for cell in [*summary["test_error_mean"], *summary["GFLOPs"]]:
        assert f"<td>{cell}</td>" in page
    # Configurations named by their swept columns, not by long architecture names.
    assert "<th>depth</th>" in page and "<th>arch_name</th>" not in page.split("<h2>Paired")[0]
    compare = display_frame(results.compare("shortcut", "A"))
    for cell in compare["p_value"]:
        assert f"<td>{cell}</td>" in page
    assert "<h3>shortcut against A</h3>" in page and "<h3>depth against 8</h3>" in page
    # The answer first: each factor's row over the other factor's configurations, in words,
    # decided by Holm's adjustment over the answer's two lines (by hand here).
    assert page.index("<h2>The answer</h2>") < page.index("<h2>Summary over seeds</h2>")
    rows = []
    for factor, baseline in (("shortcut", "A"), ("depth", DEPTHS[0])):
        table = results.compare(factor, baseline)
        other = [c for c in ("depth", "shortcut") if c != factor][0]
        (row,) = table[table[other] == "all"].to_dict("records")
        rows.append((baseline, other, row))
    smaller, larger = sorted(row["p_value"] for _, _, row in rows)
    holm = {smaller: min(1.0, 2 * smaller)}
    holm[larger] = max(holm[smaller], larger)
    for baseline, other, row in rows:
        low, high = 100 * row["diff_ci95_low"], 100 * row["diff_ci95_high"]
        adjusted = holm[row["p_value"]]
        verdict = "a difference" if adjusted < 0.05 else "no difference shown"
        assert (f"against {baseline}: test error {100 * row['diff_mean']:+.2f} points (95% "
                f"interval {low:+.2f} to {high:+.2f}, Holm p = {adjusted:.3g}; "
                f"{row['n_pairs']} paired seeds), averaged over {other} (2 configurations): "
                f"<b>{verdict}") in page
    assert "Holm's adjustment over the answer's 2 tested lines" in page
    assert "seed rule" not in page  # fixed seeds: no rule's verdict to speak of
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == 4  # pareto, curves, depth, responses
    for encoded in images:
        assert base64.b64decode(encoded)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page and "<script" not in page
    # What the trials ran on, and the training error beside the test error.
    attrs = results.attrs[int(results.completed()["number"].iloc[0])]
    assert "<th>Data set</th>" in page and "synthetic" in page
    assert f"torch {attrs['versions']['torch']}" in page and f"epochs: {attrs['recipe']['epochs']}" in page
    for cell in display_frame(results.summary(metric="train_error"))["train_error_mean"]:
        assert f"<td>{cell}</td>" in page
    assert page.count('<div class="wide">') == page.count("<table") - 1  # all but the setup table


def test_differences_are_shown_in_their_metrics_unit(results):
    """compare's differences of rates in %, of seconds in seconds and of FLOPs in GFLOPs (the
    numbers themselves unchanged), never a wall-time difference as a percentage."""
    for metric, unit, scale in (("test_error", "", 100), ("wall_seconds", " (wall (s))", 1),
                                ("flops", " (GFLOPs)", 1e-9)):
        frame = results.compare("shortcut", "A", metric=metric)
        shown = display_frame(frame)[f"diff_mean{unit}"]
        expected = frame["diff_mean"] * scale
        assert [float(cell.rstrip("%")) for cell in shown] == pytest.approx(
            expected.tolist(), abs={"test_error": 0.006, "wall_seconds": 0.06, "flops": 1e-4}[metric])
        assert all(cell.endswith("%") == (metric == "test_error") for cell in shown)


# -- reading a study that is running; what does not exist


@pytest.fixture
def live_copy(runs, tmp_path):
    """A copy of the study with one more trial the runner has asked for and not finished."""
    shutil.copy(f"{runs}/{STUDY}.db", tmp_path / f"{STUDY}.db")
    storage = f"sqlite:///{tmp_path / STUDY}.db"
    optuna.load_study(study_name=STUDY, storage=storage).ask()
    return tmp_path


def test_a_running_study_reads_without_locking_or_changing_the_file(live_copy):
    database = live_copy / f"{STUDY}.db"
    before = database.read_bytes()
    writer = sqlite3.connect(database, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # the runner is in the middle of a write transaction
    try:
        live = load(STUDY, runs_dir=live_copy)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert live.state_counts() == {"COMPLETE": 12, "RUNNING": 1}
    assert live.summary()["n"].sum() == 12  # only completed trials count
    assert database.read_bytes() == before
    assert sorted(p.name for p in live_copy.iterdir()) == [f"{STUDY}.db"]  # no journal left behind


def test_the_report_of_a_running_study_says_its_results_are_partial(live_copy, runs):
    from resnet_ablate.results.report import render_report

    said = "Trials are recorded as running: the study is still running, and these results are"
    assert said in render_report(load(STUDY, runs_dir=live_copy), responses=False)
    assert said not in render_report(load(STUDY, runs_dir=runs), responses=False)


def test_missing_storage_is_not_created_and_the_error_names_the_databases(runs, tmp_path):
    with pytest.raises(ResultsError, match=rf"no study storage at .*nope.db; databases in .*: {STUDY}.db"):
        load("nope", runs_dir=runs)
    with pytest.raises(ResultsError, match="holds no .db file"):
        load("nope", runs_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_missing_study_names_the_studies_there(runs):
    storage = f"sqlite:///{runs}/{STUDY}.db"
    with pytest.raises(ResultsError, match=rf"no study 'other' in {re.escape(storage)}; studies there: {STUDY}"):
        load("other", storage=storage)


def test_wrong_storage_url_says_what_is_expected():
    with pytest.raises(ResultsError, match=r"storage URL 'nosuchdb://x' names a database this installation cannot open.*sqlite:///runs/STUDY.db"):
        load("x", storage="nosuchdb://x")


def test_an_empty_study_loads_and_its_statistics_say_there_is_nothing_yet(tmp_path):
    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    empty = load("empty", storage=storage)
    assert empty.trials.empty and list(empty.trials.columns)[:3] == ["number", "state", "arch_name"]
    with pytest.raises(ResultsError, match="'empty' .* has no completed trial to summarise .*no trials"):
        empty.summary()
    with pytest.raises(ResultsError, match="no completed trial to take a Pareto front"):
        empty.pareto()
    # Not "no trial has shortcut='A'; shortcut values: none" ("none" is a level's name too).
    with pytest.raises(ResultsError, match="'empty' .* has no completed trial to compare .*no tr"):
        empty.compare("shortcut", "A")


def test_a_selection_that_matched_nothing_says_so_not_that_the_study_is_empty(results):
    nothing = results.where("depth == 99")
    total = len(results.trials)
    for statistic in (nothing.summary, lambda: nothing.compare("shortcut", "A"), nothing.pareto):
        with pytest.raises(ResultsError, match=rf"where 'depth == 99' matched none of the {total} "
                                               rf"trials of study '{RESULTS_STUDY}': nothing to"):
            statistic()
    failed = dataclasses.replace(results, trials=results.trials.assign(state="FAIL"))
    with pytest.raises(ResultsError, match=r"no completed trial to summarise \(of its trials "
                                           r"where 'depth == \d+': \d+ FAIL\)"):
        failed.where(f"depth == {RESULTS_DEPTHS[0]}").summary()


def test_a_summary_by_seed_or_a_non_metric_is_one_error_naming_what_is_valid(results):
    for by in (["seed"], ["depth", "number"]):
        with pytest.raises(ResultsError, match=r"a row's interval is over seeds, so its groups "
                                               r"are configurations; by takes the study's "
                                               r"configuration columns \(depth, shortcut\)"):
            results.summary(by=by)
    # A measurement as a group splits a configuration's seeds by their outcome (an audit:
    # `--by test_error` put unrelated trials in a row); what one configuration fixes does not.
    for by in (["test_error"], ["depth", "wall_seconds"]):
        with pytest.raises(ResultsError, match=rf"summary by '{by[-1]}': it differs between "
                                               r"trials of one configuration \(a measurement"):
            results.summary(by=by)
    assert len(results.summary(by=["depth", "params"])) == len(results.summary(by=["depth"]))
    with pytest.raises(ResultsError) as refused:
        results.summary(metric="arch_name")
    metrics = str(refused.value).split("metrics: ")[1].split(", ")
    assert "test_error" in metrics and "flops" in metrics
    assert not {"number", "seed", "depth", "base_width", "fused"} & set(metrics)


def test_a_baseline_without_completed_trials_is_named_beside_the_levels_that_have_them(results):
    """Levels are quoted as they are written in a filter: the plain net's level 'none' is not
    "no level"."""
    trials = results.trials
    only_plain = dataclasses.replace(results, trials=trials.assign(
        state=np.where(trials["shortcut"] == "none", "COMPLETE", "FAIL")))
    with pytest.raises(ResultsError, match=r"no completed trial with shortcut='A' yet; "
                                           r"completed levels: 'none'$"):
        only_plain.compare("shortcut", "A")


def test_a_trial_cut_short_before_its_launch_was_recorded_shows_its_configuration(tmp_path):
    """A driver killed between asking a trial and recording its launch leaves no architecture
    record: the trial's parameters (or, never asked, those it was enqueued with) still say
    which configuration it was."""
    from helpers import raw_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import open_study
    from resnet_ablate.study.recorder import TrialRecorder

    spec = parse_spec(raw_spec("cut", seeds=1, space={"shortcut": ["A", "none"]}))
    storage = f"sqlite:///{tmp_path / 'cut.db'}"
    study = open_study(spec, storage)
    recorder = TrialRecorder(study, spec, artifacts=tmp_path / "a", store_folder=tmp_path,
                             max_artifact_mb=1.0)
    recorder.ask({"shortcut": "A"}, 0)  # asked, launch never recorded
    study.enqueue_trial({"shortcut": "none", "seed": 0})  # enqueued, never asked
    assert recorder.recover_interrupted().interrupted == 2
    shown = load("cut", storage=storage).trials
    assert list(shown["shortcut"]) == ["A", "none"]
    assert list(shown["state"]) == ["INTERRUPTED", "INTERRUPTED"]


def test_list_studies_counts_trials_by_state(runs, live_copy):
    listed = list_studies(runs_dir=runs).set_index("study")
    assert listed.loc[STUDY, ["trials", "COMPLETE", "RUNNING", "FAIL"]].tolist() == [12, 12, 0, 0]
    assert listed.loc[STUDY, "question"] == "Do shortcuts help deeper nets?"
    live = list_studies(f"sqlite:///{live_copy / STUDY}.db").set_index("study")
    assert live.loc[STUDY, ["trials", "COMPLETE", "RUNNING"]].tolist() == [13, 12, 1]
    assert live.loc[STUDY, "PRUNED"] == 0


def test_a_study_loads_from_its_db_file_from_any_folder(runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not where runs/ is
    with pytest.raises(ResultsError, match=r"holds no \.db file; .* or the path of the study's"):
        load(STUDY)
    by_path = load(f"{runs}/{STUDY}.db")
    assert by_path.study == STUDY and len(by_path.trials) == len(load(STUDY, runs_dir=runs).trials)


def test_stores_written_under_old_names_group_by_the_architecture_they_describe(tmp_path):
    # Before custom CIFAR stages were named, depth 14 and stages (1, 2, 3) both stored the name
    # "resnet14-cifar-A": results name each trial from its stored description.
    from resnet_ablate.arch import ResNetArch

    storage = f"sqlite:///{tmp_path}/old.db"
    study = optuna.create_study(study_name="old", storage=storage)
    for seed, stages in enumerate([None, (1, 2, 3)]):
        arch = ResNetArch.from_dict({"family": "cifar", "depth": 14,
                                     **({"stages": stages} if stages else {})})
        study.add_trial(optuna.trial.create_trial(
            value=0.1, params={}, distributions={},
            user_attrs={"seed": seed, "arch": arch.to_dict(), "arch_name": "resnet14-cifar-A",
                        "final_test_accuracy": 0.9}))
    names = load("old", storage=storage).trials["arch_name"].tolist()
    assert names[0] == "resnet14-cifar-A" and names[1] != names[0]
    assert "1.2.3" in names[1]


def test_stacked_seeds_timings_are_shares_of_one_measurement_and_get_no_interval(tmp_path):
    """Seeds stacked into one run (resources.stack_seeds) each record a share of its one timing:
    equal but for timer jitter. Summary, compare and the explained variance give their means and
    no interval, p-value or F test (the same values unstacked get a 0.0003 s wide interval and
    p ~ 1e-22 from jitter); test error, measured per seed, keeps its interval."""
    from resnet_ablate.record import TrialKey

    rng = np.random.default_rng(0)
    cells = {((depth,), seed): (rng.random(200) < 0.1).astype(float)
             for depth in (8, 14) for seed in range(4)}

    def load_with(stacked: int):
        def edit(point, seed, attrs):
            attrs[TrialKey.WALL_SECONDS] = point[0] / 8 + 1e-4 * seed  # one timing, jittered
            attrs[TrialKey.EXECUTION] = {"device": "cpu", "precision": "fp32",
                                         "memory_format": "channels_last", "compile": False,
                                         "cuda_graphs": False, "stacked_seeds": stacked}
        storage = write_study(tmp_path / f"stacked{stacked}.db", "s", {"depth": [8, 14]}, cells,
                              edit=edit)
        return load("s", storage=storage)

    alone, stacked = load_with(1), load_with(4)
    assert alone.summary(metric="wall_seconds")["wall_seconds_ci95_low"].notna().all()
    assert alone.importance(metric="wall_seconds").attrs["notes"][0].startswith(
        "the configurations explain")
    summary = stacked.summary(metric="wall_seconds")
    assert summary["wall_seconds_mean"].tolist() == pytest.approx([1.00015, 1.75015])
    assert summary["wall_seconds_ci95_low"].isna().all()
    assert summary["note"].str.contains("share of one timing of its stack").all()
    compared = stacked.compare("depth", 8, metric="wall_seconds").iloc[0]
    assert compared["diff_mean"] == pytest.approx(0.75)
    assert np.isnan(compared["diff_ci95_low"]) and np.isnan(compared["p_value"])
    assert "share of one timing" in compared["note"]
    assert "stacked into one run" in stacked.importance(metric="wall_seconds").attrs["notes"][0]
    errors = stacked.summary(metric="test_error")
    assert errors["test_error_ci95_low"].notna().all()
    assert errors["test_error_ci95_low"].tolist() == \
        alone.summary(metric="test_error")["test_error_ci95_low"].tolist()
    # The report's trials table says which trials were stacked, where any was.
    from resnet_ablate.results.report import write_report

    page = write_report(stacked, tmp_path / "stacked.html", responses=False).read_text()
    assert "<th>stacked_seeds</th>" in page
    page = write_report(alone, tmp_path / "alone.html", responses=False).read_text()
    assert "<th>stacked_seeds</th>" not in page

