"""The --where filter language: what pandas' query selects for the same text, and nothing runs."""

import numpy as np
import pandas as pd
import pytest

from resnet_ablate.results.filters import FilterError, filter_mask


@pytest.fixture
def frame():
    return pd.DataFrame({
        "depth": pd.array([20, 20, 56, 56, 110, None], dtype="Int64"),
        "shortcut": ["A", "none", "A", "B", "A", "C"],
        "fused": pd.array([True, False, True, True, None, False], dtype="boolean"),
        "test_error": [0.08, 0.10, 0.07, np.nan, 0.06, 0.3],
    })


@pytest.mark.parametrize("text", [
    "depth == 20",
    "depth == 20 and shortcut == 'A'",
    "depth >= 56 or shortcut != 'A'",
    "not (depth == 20)",
    "shortcut in ['A', 'B']",
    "shortcut not in ('A',)",
    "test_error < 0.08",
    "20 < depth <= 56",
    "test_error > -1 and depth != 110",
])
def test_filters_select_what_pandas_query_selects(frame, text):
    expected = frame.query(text).index
    assert list(frame[filter_mask(frame, text)].index) == list(expected)


def test_a_bare_boolean_column_selects_where_it_is_true_and_unknowns_are_left_out(frame):
    assert list(frame[filter_mask(frame, "fused")].index) == [0, 2, 3]
    assert list(frame[filter_mask(frame, "not fused")].index) == [1, 5]  # row 4 is unknown
    assert list(frame[filter_mask(frame, "not fused")].index) == list(frame.query("not fused").index)


@pytest.mark.parametrize("text, problem", [
    ("@pd.io.common.os.system('echo PWNED') == 0", "not a filter"),
    ("depth.__class__ == 1", "not a value"),
    ("__import__('os').system('touch pwned') == 0", "not a value"),
    ("shortcut == open('x').read()", "not a value"),
    ("depth + 1 == 21", "not a value"),
    ("shortcut in [open('x')]", "not a value"),
    ("lambda: 1", "not a condition"),
    ("test_error", "column 'test_error' is not true/false"),
    ("shortcut < 5", "shortcut holds text and 5 is a number"),
    ("depth > 'x'", "depth holds numbers and 'x' is text"),
    ("'20' <= depth", "depth holds numbers and '20' is text"),
    # == and `in` too, where they matched nothing and the error listed depth: 20 (an audit)
    ("depth == '20'", "depth holds numbers and '20' is text"),
    ("depth in [20, '56']", "depth holds numbers and '56' is text"),
    ("shortcut != 1", "shortcut holds text and 1 is a number; compare it with text in quotes"),
    ("not " * 3000 + "fused", "nested too deeply"),
    ("colour == 'red'", "no column 'colour'"),
    ("shortcut in 'AB'", "`in` takes a list of values"),
    ("1 == 1", "a comparison needs a column on one side"),
])
def test_anything_but_columns_and_values_is_refused_and_nothing_runs(frame, text, problem,
                                                                     tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FilterError, match=problem) as error:
        filter_mask(frame, text)
    assert any(part in str(error.value) for part in (
        "over the columns: depth, shortcut, fused, test_error", "is not a filter",
        "is text", "is a number", "nested too deeply"))
    assert not list(tmp_path.iterdir())  # no file was touched


@pytest.mark.parametrize("text", ["colour == 'red'", "1 == 1", "lambda: 1", "shortcut in 'AB'"])
def test_the_languages_own_errors_are_not_reworded_as_values_that_do_not_compare(frame, text):
    with pytest.raises(FilterError) as error:
        filter_mask(frame, text)
    assert "do not compare" not in str(error.value), str(error.value)


def test_a_column_of_text_and_numbers_compares_for_equality_with_either():
    """The text-or-number check that == and `in` gained refused `sched == 0.1` on a column that
    holds both (a review): where the column holds both, equality selects as pandas' query does;
    an ordering stays refused, as it was."""
    mixed = pd.DataFrame({"sched": ["none", 0.1, 0.2, None]})
    for text in ("sched == 0.1", "sched in [0.1, 'none']", "sched != 'none'"):
        assert list(mixed[filter_mask(mixed, text)].index) == list(mixed.query(text).index)
    with pytest.raises(FilterError, match="sched holds text and 0.1 is a number"):
        filter_mask(mixed, "sched < 0.1")


@pytest.mark.parametrize("text, meant", [("test_error < 5", "0.05"), ("test_error >= 50", "0.5"),
                                         ("test_error in [10, 20]", "0.1")])
def test_a_rate_compared_with_a_percentage_is_refused_naming_the_fraction(frame, text, meant):
    """Tables show rates in % ("2.22%") while a filter compares the fractions: `test_error < 5`
    selected every trial, `test_error > 50` none, without a word (an audit)."""
    with pytest.raises(FilterError, match=rf"test_error is a fraction from 0 to 1 .* write {meant}$"):
        filter_mask(frame, text, rates=("test_error",))
    # a rate within 0 to 1 selects as pandas does; other columns are not rates
    assert list(frame[filter_mask(frame, "test_error < 0.075 or depth > 5",
                                  rates=("test_error",))].index) == \
        list(frame.query("test_error < 0.075 or depth > 5").index)
    assert list(frame[filter_mask(frame, "test_error < 5")].index) == \
        list(frame.query("test_error < 5").index)  # no rates named: compared as given
