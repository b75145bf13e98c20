"""Effects of every factor (resnet_ablate/results/effects.py, `Results.effects`, `resnet-ablate
effects`) on studies written straight into a store, without training, with known additive truth:
main effects are compare's stratified rows and the means of the cell differences, an interaction is
the difference of differences; the interaction test keeps its type I error and finds a large one."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from helpers import write_study

from resnet_ablate import stats
from resnet_ablate.cli import main
from resnet_ablate.results import ResultsError, load, report

IMAGES = 400
SEEDS = (0, 1, 2)
DEPTHS, SHORTCUTS = (8, 14), ("A", "none")
# The truth, added to each image's difficulty: depth 14 helps a little, no shortcut hurts, and
# the two together hurt more than their sum (the interaction).
DEPTH_14, NO_SHORTCUT, BOTH = -0.03, 0.05, 0.10


def _shift(depth: int, shortcut: str) -> float:
    return (DEPTH_14 if depth == 14 else 0) + (NO_SHORTCUT if shortcut == "none" else 0) + \
        (BOTH if (depth, shortcut) == (14, "none") else 0)


def _draw_cells(rng, points, shift, seeds=SEEDS, images=IMAGES) -> dict:
    difficulty = rng.uniform(0.15, 0.3, images)
    return {(point, seed): (rng.random(images) < difficulty + shift(*point)
                            + rng.normal(0, 0.01)).astype(float)
            for seed in seeds for point in points}


POINTS = [(d, s) for d in DEPTHS for s in SHORTCUTS]
SPACE = {"depth": list(DEPTHS), "shortcut": list(SHORTCUTS)}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(results, cells) of the depth x shortcut study."""
    cells = _draw_cells(np.random.default_rng(0), POINTS, _shift)
    path = tmp_path_factory.mktemp("effects") / "effects-small.db"
    write_study(path, "effects-small", SPACE, cells)
    return load(str(path)), cells


def _error(cells, point, seed) -> float:
    return float(np.mean(cells[(point, seed)]))


def _row(table, effect, factors):
    rows = table[(table["effect"] == effect) & (table["factor(s)"] == factors)]
    assert len(rows) == 1, rows
    return rows.iloc[0]


def test_main_effects_are_the_means_of_the_cell_differences_and_compares_stratified_rows(study):
    results, cells = study
    table = results.effects()
    assert list(table.columns) == ["effect", "factor(s)", "level", "baseline", "n_pairs",
                                   "diff_mean", "diff_ci95_low", "diff_ci95_high", "p_value",
                                   "p_holm", "method", "note", "metric"]
    # Holm over the whole table, by hand: the k-th smallest p times (m - k + 1), running maximum.
    p = table["p_value"].to_numpy(float)
    order = np.argsort(p, kind="stable")
    by_hand = np.maximum.accumulate(np.minimum(1, (len(p) - np.arange(len(p))) * p[order]))
    assert np.allclose(table["p_holm"].to_numpy(float)[order], by_hand)
    compared = results.compare("depth", 8)
    assert np.allclose(compared["p_holm"], stats.holm(compared["p_value"]))
    assert (compared["p_holm"] >= compared["p_value"]).all()
    depth = _row(table, "main", "depth")
    expected = np.mean([_error(cells, (14, s), seed) - _error(cells, (8, s), seed)
                        for s in SHORTCUTS for seed in SEEDS])
    # n_pairs: the seeds paired (each averaged over the two shortcut options), as summary's n.
    assert (depth["level"], depth["baseline"], depth["n_pairs"]) == (14, 8, len(SEEDS))
    assert depth["diff_mean"] == pytest.approx(expected)
    shortcut = _row(table, "main", "shortcut")
    expected = np.mean([_error(cells, (d, "none"), seed) - _error(cells, (d, "A"), seed)
                        for d in DEPTHS for seed in SEEDS])
    assert (shortcut["level"], shortcut["baseline"]) == ("none", "A")
    assert shortcut["diff_mean"] == pytest.approx(expected)
    overall = results.compare("shortcut", "A").iloc[-1]
    for column in ("diff_mean", "diff_ci95_low", "diff_ci95_high", "p_value", "method", "note"):
        assert shortcut[column] == overall[column]


def test_a_factor_swept_as_a_range_has_the_levels_its_trials_drew(study):
    """Random and TPE samplers sweep ranges (`depth: {low: 8, high: 14, step: 6}`): such a
    factor was left out of effects and the report's answer and comparisons, with an error saying
    the study had one factor. Its levels are those its trials drew, the lowest the baseline: the
    same effects as the study that lists them."""
    import dataclasses

    listed, _ = study
    ranged = dataclasses.replace(listed, spec={**listed.spec, "space": {
        **listed.spec["space"], "depth": {"low": 8, "high": 14, "step": 6}}})
    pd.testing.assert_frame_equal(ranged.effects(), listed.effects())
    assert [(factor, baseline) for factor, baseline, _ in report.comparisons(ranged)] == \
        [("depth", 8), ("shortcut", "A")]


def test_interaction_is_the_difference_of_differences_on_the_per_image_table(study):
    results, cells = study
    row = _row(results.effects(), "interaction", "depth x shortcut")
    assert (row["level"], row["baseline"], row["n_pairs"]) == ("14 x none", "8 x A", 3)
    per_seed = [_error(cells, (14, "none"), s) - _error(cells, (8, "none"), s)
                - _error(cells, (14, "A"), s) + _error(cells, (8, "A"), s) for s in SEEDS]
    assert row["diff_mean"] == pytest.approx(np.mean(per_seed))
    order = [(14, "none"), (8, "none"), (14, "A"), (8, "A")]
    expected = stats.contrast([[cells[(p, s)] for s in SEEDS] for p in order], [1, -1, -1, 1],
                              [[_error(cells, p, s) for s in SEEDS] for p in order], IMAGES)
    assert row["method"] == stats.CROSSED
    assert (row["diff_ci95_low"], row["diff_ci95_high"], row["p_value"]) == (
        pytest.approx(expected.low), pytest.approx(expected.high), pytest.approx(expected.p_value))
    assert -2 <= row["diff_ci95_low"] < row["diff_mean"] < row["diff_ci95_high"] <= 2
    assert row["diff_ci95_low"] <= BOTH <= row["diff_ci95_high"] and row["p_value"] < 0.05


def test_every_interval_holds_its_estimate_and_stays_in_range(study):
    results, _ = study
    for metric, (low, high) in {"test_error": (-2, 2), "test_accuracy": (-2, 2),
                                "train_error": (-2, 2)}.items():
        table = results.effects(metric)
        assert set(table["metric"]) == {metric} and table.attrs["methods"]
        assert (table["diff_ci95_low"] <= table["diff_mean"]).all()
        assert (table["diff_mean"] <= table["diff_ci95_high"]).all()
        assert (table["diff_ci95_low"] >= low).all() and (table["diff_ci95_high"] <= high).all()
        assert ((table["p_value"] >= 0) & (table["p_value"] <= 1)).all()


def test_accuracy_effects_are_the_error_effects_with_the_sign_flipped(study):
    results, _ = study
    error, accuracy = results.effects("test_error"), results.effects("test_accuracy")
    assert np.allclose(accuracy["diff_mean"], -error["diff_mean"])
    assert np.allclose(accuracy["diff_ci95_low"], -error["diff_ci95_high"])
    assert np.allclose(accuracy["p_value"], error["p_value"])


def test_a_metric_without_test_sampling_is_students_t_over_the_per_seed_contrasts(study):
    results, _ = study
    train = results.trials.set_index(["depth", "shortcut", "seed"])["train_error"]
    contrasts = np.array([train[(14, "none", s)] - train[(8, "none", s)] - train[(14, "A", s)]
                          + train[(8, "A", s)] for s in SEEDS])
    table = results.effects("train_error")
    row = _row(table, "interaction", "depth x shortcut")
    assert row["method"] == stats.SEEDS_ONLY
    assert row["diff_mean"] == pytest.approx(contrasts.mean())
    assert row["p_value"] == pytest.approx(scipy_stats.ttest_1samp(contrasts, 0).pvalue)
    # The main effect over two configurations: Student t over each seed's mean difference.
    depth = _row(table, "main", "depth")
    per_seed = [np.mean([train[(14, sc, s)] - train[(8, sc, s)] for sc in SHORTCUTS]) for s in SEEDS]
    assert depth["method"] == f"stratified over configurations ({stats.SEEDS_ONLY})"
    assert depth["p_value"] == pytest.approx(scipy_stats.ttest_1samp(per_seed, 0).pvalue)


def test_with_a_third_factor_each_pair_interacts_stratified_over_the_third(tmp_path):
    widths = (16, 32)
    points = [(d, s, w) for d in DEPTHS for s in SHORTCUTS for w in widths]
    cells = _draw_cells(np.random.default_rng(1), points,
                        lambda d, s, w: _shift(d, s) + (0.02 if w == 32 else 0))
    path = tmp_path / "three.db"
    write_study(path, "three", {**SPACE, "base_width": list(widths)}, cells)
    table = load(str(path)).effects()
    assert list(table["effect"]) == ["main"] * 3 + ["interaction"] * 3
    assert list(table["factor(s)"]) == ["depth", "shortcut", "base_width", "depth x shortcut",
                                        "depth x base_width", "shortcut x base_width"]
    row = _row(table, "interaction", "depth x shortcut")
    per_width = [np.mean([np.mean(cells[((14, "none", w), s)]) - np.mean(cells[((8, "none", w), s)])
                          - np.mean(cells[((14, "A", w), s)]) + np.mean(cells[((8, "A", w), s)])
                          for s in SEEDS]) for w in widths]
    assert row["diff_mean"] == pytest.approx(np.mean(per_width)) and row["n_pairs"] == len(SEEDS)
    assert row["method"].startswith("stratified over configurations")
    assert row["diff_ci95_low"] < row["diff_mean"] < row["diff_ci95_high"]


def test_without_a_per_image_record_the_interaction_uses_the_binomial_bound(tmp_path):
    cells = _draw_cells(np.random.default_rng(2), POINTS, _shift)
    path = tmp_path / "old.db"
    write_study(path, "old", SPACE, cells, outcomes=False)
    row = _row(load(str(path)).effects(), "interaction", "depth x shortcut")
    assert row["method"] == stats.BINOMIAL_BOUND
    assert row["diff_ci95_low"] < row["diff_mean"] < row["diff_ci95_high"]


def test_a_contrast_of_two_cells_is_the_paired_difference():
    rng = np.random.default_rng(3)
    base, other = ((rng.random((3, 200)) < p).astype(float) for p in (0.2, 0.3))
    rates = [base.mean(axis=1), other.mean(axis=1)]
    pair = stats.paired_difference(list(base), list(other), *rates, 200)
    two = stats.contrast([list(base), list(other)], [-1, 1], rates, 200)
    assert two.mean == pytest.approx(pair.mean) and two.method == pair.method
    assert (two.low, two.high) == (pytest.approx(pair.low, abs=2e-3), pytest.approx(pair.high, abs=2e-3))
    with pytest.raises(ValueError, match="one weight per cell"):
        stats.contrast(None, [1, -1, -1, 1], rates, 200)


# -- the interaction test held to simulated studies with known truth


def _simulated_contrast(rng, interaction: float, seeds: int, images: int,
                        seed_sd: float) -> stats.Estimate:
    """One simulated 2 x 2 study: each image has its difficulty and is a little harder or easier
    for each configuration (so images do not cancel exactly), each seed moves each cell's error;
    the true effects add, except `interaction` in the (level, level) cell."""
    difficulty = rng.uniform(0.2, 0.4, images)
    shifts = [0.15 + interaction, 0.05, 0.10, 0.0]  # (l, g), (b, g), (l, g0), (b, g0)
    tables = []
    for shift in shifts:
        per_image = difficulty + shift + rng.normal(0, 0.04, images)
        per_seed = rng.normal(0, seed_sd, (seeds, 1))
        tables.append((rng.random((seeds, images)) < per_image + per_seed).astype(float))
    return stats.contrast([list(t) for t in tables], [1, -1, -1, 1],
                          [t.mean(axis=1) for t in tables], images)


@pytest.mark.parametrize("seeds", [2, 3, 5, 10])
def test_interaction_test_keeps_its_type_one_error_at_2_to_10_seeds(seeds):
    rng = np.random.default_rng(seeds)
    null = [_simulated_contrast(rng, 0.0, seeds, 100, seed_sd=0.04) for _ in range(1000)]
    # 5% nominal; the simulation's own error is 0.7 points.
    assert np.mean([e.p_value < 0.05 for e in null]) <= 0.07
    assert np.mean([e.low <= 0 <= e.high for e in null]) >= 0.93
    assert all(-2 <= e.low <= e.mean <= e.high <= 2 for e in null)


@pytest.mark.parametrize("seeds", [3, 5])
def test_interaction_test_finds_a_large_interaction(seeds):
    rng = np.random.default_rng(10 + seeds)
    large = [_simulated_contrast(rng, 0.3, seeds, 400, seed_sd=0.04) for _ in range(50)]
    assert np.mean([e.p_value < 0.05 for e in large]) >= 0.8
    assert np.mean([e.low <= 0.3 <= e.high for e in large]) >= 0.9


# -- importance, errors, the command line and the report


def test_importance_shares_sum_to_one_and_rank_the_larger_effect_first(study):
    results, _ = study
    table = results.importance()
    assert list(table["factor"]) == ["shortcut", "depth"]
    assert table["importance"].sum() == pytest.approx(1.0)
    assert "fANOVA" in table.attrs["methods"][0]
    # Shares sum to 1 however little the factors explain: the note says how much they do
    # (omega^2 of a one-way ANOVA over the configurations, and its F test: scipy's).
    done = results.completed()
    groups = [g["test_error"].to_numpy() for _, g in done.groupby(["depth", "shortcut"])]
    k, n = len(groups), len(done)
    between = sum(len(g) * (g.mean() - done["test_error"].mean()) ** 2 for g in groups)
    within = sum(((g - g.mean()) ** 2).sum() for g in groups)
    mean_within = within / (n - k)
    omega = (between - (k - 1) * mean_within) / (between + within + mean_within)
    p_value = scipy_stats.f_oneway(*groups).pvalue
    (line,) = table.attrs["notes"]
    assert line.startswith(f"the configurations explain an estimated {100 * max(omega, 0):.0f}% "
                           f"of test_error's variance over these {n} trials")
    assert (f"F test of no difference on these test images (conditional on them: compare and "
            f"effects count the test set's sampling) p = {p_value:.3g}") in line


@pytest.mark.parametrize("shape", [(2, 2, 2), (3, 3, 2), (2, 2, 3)])
def test_the_explained_variance_is_about_zero_where_nothing_matters(shape):
    """Under seed noise alone the configurations' means still differ: their plain R^2 averaged
    43% over 2 x 2 configurations of 2 seeds. omega^2 is 0 on average there (the note shows it
    clipped at 0), and its F test rejects at its level."""
    from resnet_ablate.results.effects import explained_variance

    a, b, seeds = shape
    rng = np.random.default_rng(sum(shape))
    omegas, rejected = [], 0
    for _ in range(400):
        done = pd.DataFrame([{"f": i, "g": j, "test_error": 0.1 + 0.01 * rng.normal()}
                             for i in range(a) for j in range(b) for _ in range(seeds)])
        omega, p_value, configurations = explained_variance(done, ["f", "g"], "test_error")
        assert configurations == a * b
        omegas.append(omega)
        rejected += p_value < 0.05
    assert abs(np.mean(omegas)) < 0.03, np.mean(omegas)
    assert rejected / 400 <= 0.075, rejected / 400


@pytest.mark.parametrize("interaction", [True, False])
def test_an_all_row_over_configurations_that_disagree_says_so(interaction):
    """compare's "all" row averaged -0.14 points at depth 20 and -65.8 at 56 into -33 with p =
    0.012 and no word: where two configurations' intervals do not overlap, its note (and the
    main effect's, which is that row) says the average depends on the levels swept."""
    from helpers import study_in_memory

    rng = np.random.default_rng(4)
    difficulty = rng.uniform(0.05, 0.15, IMAGES)

    def shift(depth, shortcut):
        if shortcut == "A":
            return 0.0
        return 0.3 if depth == 14 or not interaction else 0.0

    study = study_in_memory([
        ({"depth": depth, "shortcut": shortcut}, seed,
         (rng.random(IMAGES) < difficulty + shift(depth, shortcut)).astype(float))
        for depth in DEPTHS for shortcut in SHORTCUTS for seed in SEEDS])
    table = study.compare("shortcut", "A")
    (note,) = table.loc[table["depth"] == "all", "note"]
    flag = "disagree (their 95% intervals do not overlap): this average depends on which depth"
    assert (flag in note) == interaction, note
    main = _row(study.effects(), "main", "shortcut")
    assert (flag in main["note"]) == interaction


def test_the_disagreement_flag_does_not_depend_on_row_order_or_a_row_without_interval():
    from itertools import permutations

    from resnet_ablate.results.paired import _strata_disagree

    rows = [{"depth": 8, "diff_ci95_low": -0.01, "diff_ci95_high": 0.01},
            {"depth": 14, "diff_ci95_low": 0.2, "diff_ci95_high": 0.4},
            {"depth": 20, "diff_ci95_low": float("nan"), "diff_ci95_high": float("nan")}]
    flags = {_strata_disagree(list(order), ["depth"], "test_error")
             for order in permutations(rows)}
    # each difference named with its interval as the table shows it
    assert len(flags) == 1 and ("depth=8 (-1.00% to 1.00%) and at depth=14 (20.00% to 40.00%) "
                                "disagree") in flags.pop()
    assert _strata_disagree([rows[0], rows[2]], ["depth"], "test_error") == ""
    # An exact metric's differences (FLOPs: zero-width intervals) by their one value, in GFLOPs
    exact = [{"depth": 8, "diff_ci95_low": -4480.0, "diff_ci95_high": -4480.0},
             {"depth": 14, "diff_ci95_low": -2690.0, "diff_ci95_high": -2690.0}]
    assert "depth=8 (-4.48e-06) and at depth=14 (-2.69e-06) disagree" in \
        _strata_disagree(exact, ["depth"], "flops")


def test_seeds_that_tie_within_every_configuration_are_not_p_0_all_explained():
    """Four configurations of two seeds each, every pair identical, the configurations a single
    image in 10,000 apart: there is no seed noise to test against, so no F test and no share
    (it printed "100% explained, p = 0", certainty from ties)."""
    from resnet_ablate.results.effects import _explained, explained_variance

    done = pd.DataFrame([{"f": i, "g": j, "test_error": 0.1 + (2 * i + j) / 10_000}
                         for i in range(2) for j in range(2) for _ in range(2)])
    assert explained_variance(done, ["f", "g"], "test_error") is None
    assert "not estimable here" in _explained(done, ["f", "g"], "test_error")
    # A seed that differs by rounding alone is still a tie; one image apart is not.
    rounded = done.assign(test_error=done["test_error"] * (1 + 1e-15 * np.arange(len(done))))
    assert explained_variance(rounded, ["f", "g"], "test_error") is None
    apart = done.assign(test_error=done["test_error"] + np.tile([0, 1e-4], 4))
    _, p_value, _ = explained_variance(apart, ["f", "g"], "test_error")
    # By hand: between SS = 2 x sum of squared deviations of the cell means; within SS = 4 x 2 x
    # (0.5e-4)^2; F = (between / 3) / (within / 4).
    means = 0.1 + np.arange(4) / 10_000 + 0.5e-4
    between = 2 * ((means - means.mean()) ** 2).sum()
    within = 8 * 0.5e-4 ** 2
    f = (between / 3) / (within / 4)
    assert p_value == pytest.approx(scipy_stats.f.sf(f, 3, 4))


def test_the_importance_f_test_is_conditional_on_the_test_images():
    """Why the note says "on these test images": 2 x 2 configurations of equal true error that
    find different images hard (per-configuration logit image effects of sd 1.5, seeds that vary
    little, 3 seeds on 2,000 images) differ on this test set, and the F test over trials rejects
    "no difference" in well over 5% of such studies (README: 7-15%); where the configurations
    share the images' difficulty it rejects at its level (the test above)."""
    from scipy.special import expit

    from resnet_ablate.results.effects import explained_variance

    rng = np.random.default_rng(15)
    rejected, studies = 0, 300
    for _ in range(studies):
        base = rng.normal(-2.0, 1.0, 2000)
        rows = []
        for i in range(2):
            for j in range(2):
                own = base + rng.normal(0, 1.5, 2000)  # which images this configuration misses
                for _ in range(3):
                    p_wrong = expit(own + rng.normal(0, 0.05))
                    rows.append({"f": i, "g": j,
                                 "test_error": float(np.mean(rng.random(2000) < p_wrong))})
        _, p_value, _ = explained_variance(pd.DataFrame(rows), ["f", "g"], "test_error")
        rejected += p_value < 0.05
    assert rejected / studies >= 0.075, rejected / studies


def test_an_unknown_metric_or_a_single_factor_is_a_clear_error(study, tmp_path):
    results, cells = study
    with pytest.raises(ResultsError, match=r"no column 'nosuch' in study 'effects-small'"):
        results.effects("nosuch")
    with pytest.raises(ResultsError, match=r"'arch_name' is not a numeric column"):
        results.effects("arch_name")
    # Under a filter the selection, not the study, has one factor: the message says so (it
    # blamed the study, which sweeps two).
    with pytest.raises(ResultsError, match=r"study 'effects-small' \(sweeping depth, shortcut\) "
                                           r"where depth == 8: one factor has two or more "
                                           r"completed levels \(shortcut: 'A', 'none'\).*"
                                           r"compare effects-small --factor shortcut "
                                           r"--baseline A --where 'depth == 8'` gives"):
        results.where("depth == 8").effects()  # the command for the same trials, filter kept
    one = {((s,), seed): cells[((8, s), seed)] for s in SHORTCUTS for seed in SEEDS}
    write_study(tmp_path / "one.db", "one", {"shortcut": list(SHORTCUTS)}, one)
    with pytest.raises(ResultsError, match="effects need two or more"):
        load(str(tmp_path / "one.db")).effects()


def test_cli_effects_prints_the_table_and_its_methods_on_stderr(study, capsys):
    results, _ = study
    code = main(["effects", results.storage.removeprefix("sqlite:///")])
    out, err = capsys.readouterr()
    assert code == 0
    header, *rows = out.strip().splitlines()
    assert header.split()[:5] == ["effect", "factor(s)", "level", "baseline", "n_pairs"]
    assert len(rows) == 3 and rows[2].split()[:2] == ["interaction", "depth"]
    assert f"method: {stats.CROSSED}" in err.splitlines()
    code = main(["effects", results.storage.removeprefix("sqlite:///"), "--format", "json"])
    exported = pd.DataFrame(json.loads(capsys.readouterr().out))
    assert code == 0 and exported["diff_mean"].tolist() == pytest.approx(
        results.effects()["diff_mean"].tolist())
    code = main(["effects", results.storage.removeprefix("sqlite:///"), "--importance",
                 "--format", "csv"])
    shares = pd.read_csv(io.StringIO(capsys.readouterr().out))
    assert code == 0 and set(shares["factor"]) == {"depth", "shortcut"}


def test_cli_effects_of_an_unknown_metric_is_one_line_and_exit_2(study, capsys):
    results, _ = study
    code = main(["effects", results.storage.removeprefix("sqlite:///"), "--metric", "nosuch"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("resnet-ablate effects: error: no column 'nosuch'") and err.count("\n") == 1


def test_report_has_a_section_with_the_effects_and_the_importance(study):
    results, _ = study
    page = report.render_report(results, responses=False)
    assert "<h2>Effects of each factor</h2>" in page
    section = page.split("<h2>Effects of each factor</h2>")[1].split("<h2>")[0]
    assert "depth x shortcut" in section and "14 x none" in section
    assert "fANOVA" in section and f"method: {stats.CROSSED}" in section


def test_trials_that_all_score_alike_give_a_note_not_a_traceback(tmp_path, capsys):
    """Every net at 0% error (an easy data set): fANOVA's forest has no variance to share and
    raised from inside Optuna, so `report` wrote no page and `effects --importance` ended in a
    traceback. Both now say why there is no importance; the effects themselves stand."""
    cells = {(point, seed): np.zeros(IMAGES) for point in POINTS for seed in SEEDS}
    path = tmp_path / "alike.db"
    write_study(path, "alike", SPACE, cells)
    results = load(str(path))
    said = ("study 'alike': every completed trial has the same test_error (0): the factors "
            "explain no variance, so fANOVA has none to share")
    with pytest.raises(ResultsError) as raised:
        results.importance()
    assert str(raised.value) == said
    assert main(["effects", str(path), "--importance"]) == 2
    assert capsys.readouterr().err == f"resnet-ablate effects: error: {said}\n"
    section = report.render_report(results, responses=False).split(
        "<h2>Effects of each factor</h2>")[1].split("<h2>")[0]
    assert f'<p class="note">{said}</p>' in section.replace("&#x27;", "'")
    assert results.effects()["diff_mean"].tolist() == [0.0, 0.0, 0.0]
