"""The adapter below Optuna's public API (study/optuna_tables.py), checked against the installed
Optuna: what it writes is what Optuna's own API reads back, and its swap is atomic."""

import json

import optuna
import pytest

from resnet_ablate.study.optuna_tables import (STUDIES_TABLE, AttributeCell, LostRace,
                                               end_in_store, sqlite_tables)

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    return url, optuna.create_study(study_name="s", storage=url)


def _fresh(url):
    return optuna.load_study(study_name="s", storage=url)


def test_a_swapped_attribute_is_what_optunas_api_reads(store):
    url, _ = store
    cell = AttributeCell(url, "s", "driver")
    with cell.transaction() as connection:
        assert cell.read(connection) is None
        assert cell.swap(connection, None, json.dumps({"pid": 1}))
    assert _fresh(url).user_attrs["driver"] == {"pid": 1}
    with cell.transaction() as connection:
        assert cell.swap(connection, json.dumps({"pid": 1}), json.dumps({"pid": 2}))
    assert _fresh(url).user_attrs["driver"] == {"pid": 2}
    cell.close()


def test_a_swap_from_a_stale_value_changes_nothing(store):
    url, study = store
    study.set_user_attr("driver", {"pid": 7})  # written through Optuna's own API
    cell = AttributeCell(url, "s", "driver")
    with cell.transaction() as connection:
        assert cell.read(connection) == json.dumps({"pid": 7})
        assert not cell.swap(connection, json.dumps({"pid": 6}), json.dumps({"pid": 8}))
        assert cell.swap(connection, json.dumps({"pid": 7}), None)
    assert _fresh(url).user_attrs["driver"] is None
    cell.close()


def test_of_two_writers_that_read_the_attribute_free_only_the_first_takes_it(store):
    url, _ = store
    first, second = AttributeCell(url, "s", "driver"), AttributeCell(url, "s", "driver")
    try:
        with second.transaction() as late:
            assert second.read(late) is None  # read while it was still free
            with first.transaction() as early:
                assert first.swap(early, None, json.dumps({"pid": 1}))
            took = second.swap(late, None, json.dumps({"pid": 2}))
    except LostRace:  # where the second's insert reached the table: its uniqueness refused it
        took = False
    assert not took
    assert _fresh(url).user_attrs["driver"] == {"pid": 1}
    first.close()
    second.close()


def test_running_and_waiting_trials_are_failed_with_their_reason(store):
    url, study = store
    running = study.ask()
    study.enqueue_trial({})
    waiting = next(t for t in study.get_trials() if t.state == optuna.trial.TrialState.WAITING)
    for trial in (study.get_trials()[running.number], waiting):
        end_in_store(study, trial, {"failure": "interrupted"})
    stored = _fresh(url).get_trials()
    assert [t.state for t in stored] == [optuna.trial.TrialState.FAIL] * 2
    assert [t.user_attrs["failure"] for t in stored] == ["interrupted"] * 2


def test_an_optuna_store_is_told_from_other_files(store, tmp_path):
    url, _ = store
    assert STUDIES_TABLE in sqlite_tables(tmp_path / "s.db")
    other = tmp_path / "notes.db"
    other.write_text("not a database")
    assert sqlite_tables(other) == set()
