"""The Python results API as a researcher calls it, held to what its docs say (an audit's
findings): rows over unlike sets of configurations say so, values a configuration fixes are
averaged over configurations, metrics are measurements, wrong arguments are one ResultsError
naming what is valid, and the figures keep costs in order and options apart."""

from __future__ import annotations

import os

import numpy as np
import pytest

from helpers import study_in_memory
from resnet_ablate.results import ResultsError, load, plots


def _study(depths=(8, 14), shortcuts=("A", "B", "none"), seeds=2, images=200):
    rng = np.random.default_rng(5)
    return study_in_memory([
        ({"depth": depth, "shortcut": shortcut}, seed, (rng.random(images) < 0.1).astype(float))
        for depth in depths for shortcut in shortcuts for seed in range(seeds)])


def test_a_value_each_configuration_fixes_is_averaged_over_configurations():
    """Parameters of A 75,002, B 77,754 and plain 75,002 at depth 8: their mean over the three
    configurations is 75,919.3; the mean of the distinct values (76,378) weighed A and plain as
    one."""
    study = _study()
    trials = study.trials
    for shortcut, params in (("A", 75002), ("B", 77754), ("none", 75002)):
        trials.loc[(trials["depth"] == 8) & (trials["shortcut"] == shortcut), "params"] = params
    row = study.summary(by="depth").set_index("depth").loc[8]
    assert row["params"] == pytest.approx((2 * 75002 + 77754) / 3)


def test_rows_over_unlike_sets_of_configurations_say_so():
    """A Ctrl-C left depth 56 without a plain trial: `summary --by shortcut` put A (over depths
    20 and 56) beside plain (depth 20 alone), and `effects` passed one configuration's
    difference off as a main effect, both without a word."""
    study = _study(depths=(20, 56), shortcuts=("A", "none")).where(
        "not (depth == 56 and shortcut == 'none')")
    rows = study.summary(by="shortcut").set_index("shortcut")
    assert rows.loc["none", "note"].endswith(
        "over 1 of the 2 configurations of depth the other rows pool: none completed at "
        "depth=56")
    assert "configurations of depth" not in rows.loc["A", "note"]
    effects = study.effects().set_index("factor(s)")
    assert "at shortcut=A only: no other configuration of shortcut has a completed pair, so " \
           "this is not the average over them" in effects.loc["depth", "note"]
    assert "at depth=20 only" in effects.loc["shortcut", "note"]
    assert "only" not in _study(depths=(20, 56), shortcuts=("A", "none")).effects().set_index(
        "factor(s)").loc["depth", "note"]


def test_numbers_that_name_a_trial_or_its_configuration_are_no_metrics():
    study = _study()
    for named in ("seed", "number", "depth"):
        with pytest.raises(ResultsError, match=rf"^'{named}' names a trial or its configuration, "
                                               r"not a measurement, so it has no mean; metrics: "
                                               r"params, flops"):
            study.summary(metric=named)
    with pytest.raises(ResultsError, match=r"^no column 'nope' in study 'simulated'; metrics: "
                                           r"params, flops, .*test_error"):
        study.summary(metric="nope")
    assert study.summary(metric="flops")["flops_mean"].notna().all()


@pytest.mark.parametrize("call, message", [
    (lambda r: r.compare("width", "A"), r"^no column 'width' in study 'simulated'; factors: "
                                        r"depth, shortcut$"),
    (lambda r: r.compare(["shortcut"], "A"), r"^expected a column name \(str\), got \['shortcut'\]"),
    (lambda r: r.compare("shortcut", "A", metric=["test_error"]), r"^expected a column name"),
    (lambda r: r.pareto(["test_error", "nope"]), r"^no column 'nope' .*; Pareto objectives: "),
    (lambda r: r.summary(by=5), r"^expected column names \(a str or a list of them\), got 5$"),
    (lambda r: r.pareto(5), r"^expected column names"),
    (lambda r: r.curves("0"), r"^expected trial numbers \(an int or a list of them\), got '0'"),
    (lambda r: r.curves([0.5]), r"^trial numbers are ints, got 0.5; trials here: 0-11$"),
    (lambda r: r.curves([True]), r"^trial numbers are ints, got True"),
    (lambda r: r.where(5), r"^where takes a filter \(str\)"),
    (lambda r: plots.plot_curves(r, panel_by="width"), r"factors: depth, shortcut$"),
], ids=["factor", "factor-list", "metric-list", "objective", "by-int", "objectives-int",
        "numbers-str", "numbers-float", "numbers-bool", "where-int", "panel"])
def test_a_wrong_argument_is_one_error_naming_what_is_valid(call, message):
    """Each gave a raw TypeError, KeyError or AttributeError, or listed all 44 trial columns
    for an unknown factor."""
    with pytest.raises(ResultsError, match=message):
        call(_study())


def test_sorted_by_one_name_sorts_by_that_column_and_a_bad_name_is_a_lookup_error(tmp_path):
    """`sorted_by("test_error")` split the name into letters ("no column 't'"); a study name
    outside the alphabet raised a ValueError that `except ResultsError` missed."""
    study = _study()
    assert study.sorted_by("test_error")["test_error"].is_monotonic_increasing
    assert study.sorted_by("-test_error")["test_error"].is_monotonic_decreasing
    with pytest.raises(ResultsError, match="quick\\?start"):
        load("quick?start", runs_dir=tmp_path)


def test_weights_are_found_after_the_working_folder_changes(tmp_path, monkeypatch):
    """Loaded by name from a relative runs folder, a later chdir made `model()` look for the
    weights from the new folder."""
    from helpers import write_study

    (tmp_path / "runs").mkdir()
    write_study(tmp_path / "runs" / "s.db", "s", {"shortcut": ["A"]},
                {(("A",), 0): [0, 1, 0, 0], (("A",), 1): [0, 0, 1, 1]})
    monkeypatch.chdir(tmp_path)
    study = load("s", runs_dir="runs")
    os.chdir("/")
    assert study.weights_folder == tmp_path / "runs"


def test_the_pareto_figure_keeps_near_equal_costs_in_their_order():
    """Three configurations 0.2-2.6% apart in FLOPs (plain 756.6, A 758.4, B 776.3 kFLOPs): set
    side by side by the colour groups' order, plain was drawn right of B and the front doubled
    back. Near costs are set apart in their true order."""
    study = _study(depths=(8,))
    trials = study.trials
    flops = {"A": 758_400, "B": 776_300, "none": 756_600}
    for shortcut, value in flops.items():
        trials.loc[trials["shortcut"] == shortcut, "flops"] = value
    (ax,) = plots.plot_pareto(study).axes
    drawn = {container.get_label().rsplit(" (", 1)[0]: float(container[0].get_xdata()[0])
             for container in ax.containers}
    assert drawn["plain"] < drawn["ResNet (A)"] < drawn["ResNet (B)"], drawn
    front = ax.get_lines()[0].get_xdata()
    assert np.all(np.diff(front) >= 0), front


def test_layer_responses_draw_each_shortcut_option_a_line_of_its_own():
    """The twins of one colour (A, B and plain at one depth) were all solid but the plain one:
    A and B were one line to the eye."""
    import pandas as pd

    study = _study(depths=(8,))
    names = study.completed().drop_duplicates("arch_name").set_index("shortcut")["arch_name"]
    responses = pd.DataFrame([{"arch_name": name, "seed": 0, "layer": layer, "std": 1.0 + layer}
                              for name in names for layer in range(1, 4)])
    figure = plots.plot_responses(study, responses)
    styles = {line.get_label(): line.get_linestyle() for line in figure.axes[0].get_lines()}
    assert sorted(styles.values()) == sorted(["-", "--", ":"])


def test_loss_curves_are_on_a_log_axis_that_one_large_loss_does_not_flatten():
    study = _study(depths=(8,), shortcuts=("A", "none"))
    for number, attrs in study.attrs.items():
        first = 210.0 if study.trials.set_index("number").loc[number, "shortcut"] == "none" \
            else 2.3
        attrs["curves"] = [{"epoch": e, "lr": 0.1, "train_loss": first / e, "train_error": 0.5,
                            "test_loss": first / e, "test_error": 0.5, "seconds": 1.0}
                           for e in (1, 2, 3)]
    ax = plots.plot_curves(study, metric="loss").axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "loss (log scale)"


def test_curves_keep_every_field_an_epoch_recorded():
    """Skipped images, top-5 and the last epoch's multi-view errors are recorded per epoch, and
    `curves` (what `export --what curves` writes) left them out."""
    study = _study(depths=(8,), shortcuts=("A",))
    for attrs in study.attrs.values():
        attrs["curves"] = [{"epoch": e, "lr": 0.1, "train_loss": 1.0, "train_error": 0.5,
                            "test_loss": 1.0, "test_error": 0.5, "seconds": 1.0,
                            "skipped_images": e, **({"test_ten_crop_error": 0.25} if e == 2
                                                    else {})} for e in (1, 2)]
    curves = study.curves()
    assert curves["skipped_images"].tolist() == [1, 2] * len(study.attrs)
    assert curves["test_ten_crop_error"].isna().tolist() == [True, False] * len(study.attrs)
    assert curves["test_ten_crop_error"].dropna().tolist() == [0.25] * len(study.attrs)


def test_decisions_of_a_study_with_fixed_seeds_is_one_line(tmp_path, capsys):
    from helpers import write_study
    from resnet_ablate.cli import main

    write_study(tmp_path / "s.db", "s", {"shortcut": ["A"]},
                {(("A",), 0): [0, 1, 0, 0], (("A",), 1): [0, 0, 1, 1]})
    assert main(["decisions", str(tmp_path / "s.db")]) == 2
    assert capsys.readouterr().err == (
        "resnet-ablate decisions: error: study 's' has fixed seeds, no adaptive seed rule whose "
        "decisions to show (`summary` and `compare` answer it)\n")


def test_a_level_without_a_paired_configuration_is_named_not_dropped_in_silence():
    """A sampler's study drew base_width 64 only at depth 11 and the baseline 16 only at depth
    20: compare (and the report's comparisons) showed the 32 row and nothing of 64."""
    from resnet_ablate.results import footnotes

    rng = np.random.default_rng(2)
    cells = [({"depth": depth, "base_width": width}, seed, (rng.random(100) < 0.1).astype(float))
             for depth, width in ((20, 16), (20, 32), (11, 64)) for seed in range(2)]
    table = study_in_memory(cells, model={"family": "bottleneck"}).compare("base_width", 16)
    assert table["base_width"].tolist() == [32]
    assert "note: base_width=64 has no row: no configuration of the other factors has " \
        "completed trials of it and of base_width=16 with the same seed" in footnotes(table)
