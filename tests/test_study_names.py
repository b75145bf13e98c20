"""Study names are names, not paths or URL text: one alphabet (storage.STUDY_NAME_ALPHABET),
checked where a spec is parsed and wherever a name given by the user becomes a store's path (the
query commands, `results.load`), so that no name writes or reads outside the runs folder."""

from __future__ import annotations

import os
from pathlib import Path

import optuna
import pytest
from helpers import raw_spec, write_spec

from resnet_ablate import storage
from resnet_ablate.cli import main
from resnet_ablate.results import load
from resnet_ablate.storage import (STUDY_NAME_ALPHABET, StudyNameError, default_storage,
                                   study_file)

# Each once made a store somewhere else, or one no query could read: `%2F` is a `/` to the URL
# parser, `#` starts its fragment, `?` its query ("a?b" was stored as runs/a).
BAD_NAMES = ["%2F..%2F..%2Fescaped_by_name", "a#b", "a?b", "..", "a..b", ".hidden", "x" * 300,
             "résumé", "", "my study", "a/b", "a\\b", "-flag", "x\x00y"]
GOOD_NAMES = ["s", "quickstart", "cifar10_depth", "Run-2.v3", "0", "x" * 100]


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.fixture
def nested_runs(tmp_path, monkeypatch) -> Path:
    """tmp/work/deep/runs, the working folder tmp/work/deep: room above it for an escape to land."""
    runs = tmp_path / "work" / "deep" / "runs"
    runs.mkdir(parents=True)
    monkeypatch.chdir(runs.parent)
    monkeypatch.delenv(storage.RUNS_ENVIRONMENT_VARIABLE, raising=False)
    return runs


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_name_outside_the_alphabet_never_becomes_a_store_path(name, tmp_path):
    with pytest.raises(StudyNameError) as info:
        default_storage(name, tmp_path)
    assert str(info.value).startswith(f"study {repr(name)[:60]}")
    assert STUDY_NAME_ALPHABET in str(info.value)


@pytest.mark.parametrize("name", GOOD_NAMES)
def test_ordinary_names_are_stores_in_the_runs_folder(name, tmp_path):
    assert default_storage(name, tmp_path) == f"sqlite:///{tmp_path / (name + '.db')}"


def test_a_path_outside_the_folder_is_refused_even_past_the_alphabet(tmp_path, monkeypatch):
    monkeypatch.setattr(storage, "check_study_name", lambda name: name)  # as if it were loosened
    with pytest.raises(StudyNameError, match="would lie outside"):
        study_file("../escaped", ".db", tmp_path / "runs")
    with pytest.raises(StudyNameError, match="would lie outside"):
        study_file("sub/inner", ".artifacts", tmp_path / "runs")
    assert study_file("fine", ".db", tmp_path / "runs") == tmp_path / "runs" / "fine.db"


@pytest.mark.parametrize("command", [["show"], ["export"], ["summary"], ["pareto"],
                                     ["compare", "--factor", "depth", "--baseline", "20"]])
@pytest.mark.parametrize("name", BAD_NAMES[:8])
def test_query_commands_refuse_the_name_and_write_nothing(command, name, nested_runs, tmp_path,
                                                           capsys):
    before = _files_under(tmp_path)
    assert main([command[0], name, *command[1:], "--runs-dir", "runs"]) == 2
    error = capsys.readouterr().err
    assert f"resnet-ablate {command[0]}: error: study {repr(name)[:60]}" in error
    assert "is not a usable name" in error
    assert STUDY_NAME_ALPHABET in error and "Traceback" not in error
    assert _files_under(tmp_path) == before


@pytest.mark.parametrize("name", [n for n in BAD_NAMES if "/" not in n])  # "a/b" is a file's path
def test_results_load_refuses_the_name_and_writes_nothing(name, nested_runs, tmp_path):
    before = _files_under(tmp_path)
    with pytest.raises(StudyNameError, match="is not a usable name"):
        load(name, runs_dir=nested_runs)
    assert _files_under(tmp_path) == before


def test_a_spec_with_such_a_name_is_refused_by_run_before_anything_is_written(nested_runs,
                                                                               tmp_path, capsys):
    spec = write_spec(tmp_path, {**raw_spec("ok"), "study": "%2F..%2F..%2Fescaped_by_name"})
    before = _files_under(tmp_path)
    assert main(["run", str(spec), "--runs-dir", "runs", "--dry-run"]) == 2
    error = capsys.readouterr().err
    assert "study: '%2F..%2F..%2Fescaped_by_name' is not a usable name" in error
    assert _files_under(tmp_path) == before


def test_ordinary_names_load_by_name_and_odd_old_stores_by_their_path(nested_runs):
    optuna.create_study(study_name="Run-2.v3", storage=f"sqlite:///{nested_runs}/Run-2.v3.db")
    assert load("Run-2.v3", runs_dir="runs").study == "Run-2.v3"
    # A store made before names were checked is still read through the path of its file.
    old = nested_runs / "my study.db"
    optuna.create_study(study_name="my study", storage=f"sqlite:///{old}")
    assert load(os.fspath(old)).study == "my study"


def test_a_stores_tag_names_the_store_not_its_password(tmp_path, monkeypatch):
    from resnet_ablate.storage import store_tag

    monkeypatch.chdir(tmp_path)
    assert store_tag("sqlite:///runs/a.db") == store_tag(f"sqlite:///{tmp_path}/runs/a.db")
    assert store_tag("sqlite:///runs/a.db") != store_tag("sqlite:///runs/b.db")
    assert len(store_tag("sqlite:///runs/a.db")) == 8
    one = store_tag("postgresql+psycopg://me:secret@db.lab:5432/studies")
    assert one == store_tag("postgresql+psycopg://me:other@db.lab:5432/studies")
    assert one != store_tag("postgresql+psycopg://me:secret@db2.lab:5432/studies")


@pytest.mark.parametrize("folder", ["runs#1", "runs%41b", "runs?x=1", "ru ns é"])
def test_a_runs_folder_with_url_characters_in_its_path_holds_its_stores_and_reads_back(
        folder, tmp_path, capsys):
    """A store's path went into a database URL as it was: in `runs?x=1` the study was written to
    a file `runs` beside it, in `runs%41b` refused as unopenable (%41 read as `A`), and in
    `runs#1` trained and recorded, then unreadable by every query (a `#` ends SQLite's URI
    filename). Written where the path says, and read back by name and by path."""
    from helpers import write_study

    runs = tmp_path / folder
    runs.mkdir()
    optuna.create_study(study_name="written", storage=default_storage("written", runs))
    write_study(runs / "study.db", "study", {"shortcut": ["A"]},
                {(("A",), 0): [0, 1, 0, 0], (("A",), 1): [0, 0, 1, 1]})
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]
    assert sorted(p.name for p in runs.iterdir()) == ["study.db", "written.db"]
    assert load("study", runs_dir=runs).trials["seed"].tolist() == [0, 1]
    assert main(["show", "study", "--runs-dir", str(runs), "--columns", "seed"]) == 0
    assert main(["show", str(runs / "study.db"), "--columns", "seed"]) == 0
    assert main(["ls", "--runs-dir", str(runs)]) == 0
    listed = capsys.readouterr().out
    assert "written" in listed and "study" in listed
    assert storage.sqlite_path(default_storage("study", runs)) == runs / "study.db"
