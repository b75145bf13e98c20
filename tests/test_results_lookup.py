"""How a study is named when its results are read: a name, a path (str or Path), a storage URL;
what a miss says; and the command line's hints and notes around it."""

from __future__ import annotations

import argparse
import shlex

import optuna
import pytest

from resnet_ablate import results
from resnet_ablate.cli import _store_options, build_parser, main
from resnet_ablate.storage import ResultsError


@pytest.fixture
def study_s1(tmp_path, monkeypatch):
    """A runs folder holding study `s1` (two trials) in s1.db, away from the working folder."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "my runs"
    folder.mkdir()
    study = optuna.create_study(study_name="s1", storage=f"sqlite:///{folder / 's1.db'}")
    for value in (0.5, 0.25):
        study.add_trial(optuna.trial.create_trial(value=value))
    return folder


def test_a_study_is_found_by_name_by_str_or_path_and_by_storage_url(study_s1):
    runs = study_s1
    assert results.load("s1", runs_dir=runs).study == "s1"
    assert results.load(runs / "s1.db").study == "s1"  # a Path, as os.fspath takes it
    assert results.load(str(runs / "s1")).study == "s1"
    assert results.load(f"sqlite:///{runs / 's1.db'}").study == "s1"  # a URL where the name goes
    assert len(results.load(runs / "s1.db").trials) == 2


def test_a_missing_store_is_named_as_given_and_the_runs_folder_rule_is_said(study_s1):
    runs = study_s1
    with pytest.raises(ResultsError, match=r"no study store file nosuch\.db;") as missing:
        results.load("nosuch.db")
    assert "nosuch.db.db" not in str(missing.value)
    with pytest.raises(ResultsError, match=r"no study storage at .*nosuch\.db; databases in .*: s1\.db "
                                           r"\(the runs folder is --runs-dir / runs_dir, else "
                                           r"\$RESNET_ABLATE_RUNS, else \./runs\)"):
        results.load("nosuch", runs_dir=runs)
    with pytest.raises(ResultsError, match=r"RESNET_ABLATE_RUNS"):
        results.load("s1")  # ./runs does not exist here
    with pytest.raises(ResultsError, match=r"no study storage at .*none\.db"):
        results.load(f"sqlite:///{runs / 'none.db'}")
    # A folder given for a store: said so, and the stores in it listed (not its parent's).
    with pytest.raises(ResultsError, match=rf"^{runs} is a folder, not a study store file; "
                                           rf"databases in {runs}/: s1\.db"):
        results.load(f"{runs}/")


def test_a_study_ls_lists_from_another_store_of_the_runs_folder_is_found_by_name(study_s1):
    """`run ... --storage sqlite:///runs/mine.db` puts a study in mine.db: `ls` listed it, and
    `show NAME` said there was no NAME.db. The one store there that holds it is read; where two
    do, the name is ambiguous and the error names them."""
    runs = study_s1
    mine = optuna.create_study(study_name="deg", storage=f"sqlite:///{runs / 'mine.db'}")
    mine.add_trial(optuna.trial.create_trial(value=0.1))
    listed = results.list_studies(runs_dir=runs)
    assert "deg" in set(listed["study"])
    found = results.load("deg", runs_dir=runs)
    assert found.storage == f"sqlite:///{runs / 'mine.db'}" and len(found.trials) == 1
    assert main(["show", "deg", "--runs-dir", str(runs), "--columns", "number"]) == 0
    optuna.create_study(study_name="deg", storage=f"sqlite:///{runs / 'other.db'}")
    with pytest.raises(ResultsError, match=r"study 'deg' is in 2 stores of .* \(mine\.db, "
                                           r"other\.db\) and none is deg\.db: name one"):
        results.load("deg", runs_dir=runs)
    # A store of two studies given by its path: the command that names one, as a command.
    optuna.create_study(study_name="other", storage=f"sqlite:///{runs / 'mine.db'}")
    with pytest.raises(ResultsError, match=r"mine\.db holds 2 studies \(deg, other\); name one: "
                                           r"`resnet-ablate show NAME --storage 'sqlite:///"):
        results.load(str(runs / "mine.db"))


def test_the_commands_a_run_suggests_keep_its_runs_folder_and_work(study_s1, capsys):
    runs = study_s1
    options = _store_options(argparse.Namespace(storage=None, runs_dir=str(runs)))
    assert options == f" --runs-dir {shlex.quote(str(runs))}"
    assert main(["show", "s1", *shlex.split(options), "--columns", "number,state"]) == 0
    assert _store_options(argparse.Namespace(storage="sqlite:///x.db", runs_dir=None)) == " --storage sqlite:///x.db"
    assert _store_options(argparse.Namespace(storage=None, runs_dir=None)) == ""


def test_a_filter_that_empties_the_result_says_so_once(study_s1, capsys):
    runs = study_s1
    # A listing's empty table is an answer (a script exporting the failed trials finds none),
    # noted in one line; a statistic of nothing is one error.
    for command in ("show", "export"):
        assert main([command, "s1", "--runs-dir", str(runs), "--where", "number == 7"]) == 0
        assert capsys.readouterr().err == (f"resnet-ablate {command}: --where 'number == 7' "
                                           "matched none of the study's 2 trials\n")
    for command in ("summary", "pareto"):
        assert main([command, "s1", "--runs-dir", str(runs), "--where", "number == 7"]) == 2
        captured = capsys.readouterr()
        assert captured.err == (f"resnet-ablate {command}: error: --where 'number == 7' matched "
                                "none of the study's 2 trials\n") and captured.out == ""
    assert main(["show", "s1", "--runs-dir", str(runs), "--where", "number == 1"]) == 0
    assert "matched none" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["summary", "compare", "effects"])
def test_metric_has_help_naming_the_metrics(command):
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices[command]._actions
                  if "--metric" in a.option_strings)
    assert "test_error" in action.help and "images_per_second" in action.help and "show STUDY" in action.help


@pytest.mark.parametrize("argv, message", [
    (["show", "s", "--sortt", "test_error"], "resnet-ablate show: error: unrecognized arguments: "
     "--sortt test_error; did you mean --sort? (see `resnet-ablate show --help`)"),
    (["run", "s.yaml", "--dryrun"], "resnet-ablate run: error: unrecognized argument: --dryrun; "
     "did you mean --dry-run? (see `resnet-ablate run --help`)"),
    (["summary", "s", "--by=depth", "--metricc=x"], "resnet-ablate summary: error: unrecognized "
     "argument: --metricc=x; did you mean --metric? (see `resnet-ablate summary --help`)"),
    # Nothing close: no guess; a stray word: named as it is.
    (["show", "s", "--bogus"], "resnet-ablate show: error: unrecognized argument: --bogus (see "
     "`resnet-ablate show --help`)"),
    (["export", "s", "extra"], "resnet-ablate export: error: unrecognized argument: extra (see "
     "`resnet-ablate export --help`)"),
])
def test_an_argument_a_command_does_not_take_is_that_commands_error(argv, message, capsys):
    """argparse hands a subcommand's unknown arguments up to `resnet-ablate`, whose error named
    neither the command nor what it takes."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2 and capsys.readouterr().err == message + "\n"


def test_each_query_names_its_own_default_format():
    # export's help called "aligned table" its default; it prints csv.
    choices = build_parser()._subparsers._group_actions[0].choices
    for command, default in (("export", "exact csv (default)"),
                             ("show", "aligned table with units (default)")):
        action = next(a for a in choices[command]._actions if "--format" in a.option_strings)
        assert action.help.startswith(default) and action.default in action.help


# ---------------------------------------------------------------- the report page


def test_a_report_without_a_completed_trial_shows_the_trials_and_why_they_failed(tmp_path,
                                                                              capsys):
    from resnet_ablate.results import report
    from resnet_ablate.record import TrialKey

    storage = f"sqlite:///{tmp_path / 'failing.db'}"
    study = optuna.create_study(study_name="failing", storage=storage)
    for reason in ("CUDA out of memory at batch 512", "diverged: loss is nan at epoch 3"):
        study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL,
                                                  user_attrs={TrialKey.FAILURE: reason}))
    page = report.render_report(results.load("failing", storage=storage), responses=False)
    assert "<h2>Trials</h2>" in page
    assert "CUDA out of memory at batch 512" in page and "diverged: loss is nan at epoch 3" in page
    # From the command line the page is written (exit 0, as it has something to say) and
    # stderr says what it is, where every other command refuses such a study.
    target = tmp_path / "failing.html"
    assert main(["report", "failing", "--storage", storage, "-o", str(target)]) == 0
    err = capsys.readouterr().err
    assert target.is_file() and "study 'failing' has no completed trial: the page lists its " \
        "trials and why each ended" in err


def test_the_toolkits_own_version_is_recorded_with_each_trial(tmp_path, capsys):
    """Each trial's toolkit version, as the trials table's `version` and, where a study was
    resumed across versions, as the report's count of each version's completed trials."""
    import numpy as np

    import resnet_ablate
    from helpers import write_study
    from resnet_ablate.record import TrialKey
    from resnet_ablate.trial import library_versions

    assert library_versions()["resnet-ablate"] == resnet_ablate.__version__
    # Seeds 0-1 trained before an upgrade, seeds 2-4 after it (0.10.0 sorts before 0.9.1 as
    # text: the report lists versions in the order their trials ran).
    cells = {((depth,), seed): np.arange(40) % (seed + 3) == 0
             for depth in (8, 14) for seed in range(5)}

    def edit(point, seed, attrs):
        attrs[TrialKey.VERSIONS] = {"resnet-ablate": "0.9.1" if seed < 2 else "0.10.0",
                                    "torch": "2.13.0"}

    storage = write_study(tmp_path / "upgraded.db", "upgraded", {"depth": [8, 14]}, cells,
                          edit=edit)
    study = results.load("upgraded", storage=storage)
    trials = study.trials.set_index("number")
    assert [(row.seed, row.version) for row in trials.itertuples()] == [
        (seed, "0.9.1" if seed < 2 else "0.10.0") for _ in (8, 14) for seed in range(5)]
    assert main(["show", "upgraded", "--storage", storage, "--columns", "seed,version"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in shown[1:]] == [
        "0.9.1" if seed < 2 else "0.10.0" for _ in (8, 14) for seed in range(5)]
    from resnet_ablate.results.report import write_report

    page = write_report(study, tmp_path / "upgraded.html", responses=False).read_text()
    assert "resnet-ablate 0.9.1, torch 2.13.0; completed trials by toolkit version: 0.9.1 4, " \
        "0.10.0 6" in page
    # One version: the row names it once, without counts.
    same = results.load("upgraded-once", storage=write_study(
        tmp_path / "once.db", "upgraded-once", {"depth": [8]}, {((8,), 0): cells[((8,), 0)]},
        edit=edit))
    page = write_report(same, tmp_path / "once.html", responses=False).read_text()
    assert "resnet-ablate 0.9.1, torch 2.13.0</td>" in page and "by toolkit version" not in page


MEASURE_TABLES = """<script>document.body.insertAdjacentHTML("beforeend", "<pre id=widths>" +
[...document.querySelectorAll("table")].map(t => t.scrollWidth + "/" + t.parentElement.clientWidth).join(" ")
+ "</pre>")</script></body></html>"""


@pytest.mark.parametrize("study", ["results-small", "bottleneck widths", "adaptive seeds"])
def test_the_reports_tables_fit_a_1280_pixel_window_in_a_real_browser(runs, tmp_path, study):
    """Chromium, headless, lays the page out at 1280 px; every table must be no wider than what
    holds it (else it scrolls and cuts columns): also with long architecture names (a bottleneck
    width study's summary cut off its GFLOPs) and an adaptive study's reasons (its decisions
    table needed a scroll bar, the reasons cut off)."""
    import re
    import shutil
    import subprocess

    from resnet_ablate.results import report

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium on this machine to lay the page out")
    from helpers import RESULTS_STUDY

    import numpy as np

    from helpers import study_in_memory

    rng = np.random.default_rng(0)
    if study == RESULTS_STUDY:
        loaded = results.load(RESULTS_STUDY, runs_dir=runs)  # conftest's study
    elif study == "bottleneck widths":
        loaded = study_in_memory([
            ({"depth": depth, "base_width": width}, seed, (rng.random(300) < 0.05).astype(float))
            for depth in (29, 56) for width in (16, 32, 64, 128) for seed in range(2)],
            model={"block": "bottleneck", "shortcut": "B"})
    else:
        loaded = study_in_memory([
            ({"depth": depth, "shortcut": shortcut}, seed, (rng.random(300) < 0.08).astype(float))
            for depth in (20, 56) for shortcut in ("A", "none") for seed in range(2)],
            seed_rule={"min": 2, "max": 4, "until": {"decided": "shortcut", "margin": 0.01}})
        assert len(loaded.seed_decisions())
    page = report.render_report(loaded, responses=False)
    (tmp_path / "page.html").write_text(page.replace("</body></html>", MEASURE_TABLES))
    dom = subprocess.run([browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,900",
                          "--dump-dom", (tmp_path / "page.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    widths = [tuple(map(int, pair.split("/"))) for pair in re.search(r"<pre id=\"widths\">([^<]*)", dom)[1].split()]
    assert len(widths) >= 5 and all(0 < table <= holder for table, holder in widths), widths


def test_where_tells_text_levels_apart_without_case_as_specs_do():
    import pandas as pd

    from resnet_ablate.results.filters import filter_mask

    trials = pd.DataFrame({"shortcut": ["A", "B", None, "none"], "depth": [20, 56, 20, 8]})
    assert filter_mask(trials, "shortcut == 'a'").tolist() == [True, False, False, False]
    assert filter_mask(trials, "'a' == shortcut").tolist() == [True, False, False, False]
    assert filter_mask(trials, "shortcut in ['b', 'NONE']").tolist() == [False, True, False, True]
    assert filter_mask(trials, "shortcut != 'a' and depth == 20").tolist() == [False, False, True, False]
    assert filter_mask(trials, "depth in [20]").tolist() == [True, False, True, False]  # numbers as before
