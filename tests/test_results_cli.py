"""The query commands of `resnet-ablate` (ls, show, export, summary, compare, pareto, plot, report)
on the study test_results.py runs: what each prints matches the Python results, and every lookup
problem is one line on stderr with exit code 2."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import optuna
import pandas as pd
import pytest
from scipy import stats
from helpers import RESULTS_SEEDS as SEEDS
from helpers import RESULTS_STUDY as STUDY
from helpers import results_study_spec

from resnet_ablate.cli import main
from resnet_ablate.results import display_frame
from resnet_ablate.storage import ResultsError


@pytest.fixture
def cli(runs, capsys):
    """Runs `resnet-ablate COMMAND STUDY ... --runs-dir RUNS`; returns (exit code, stdout, stderr)."""
    def run(*argv: str, study: bool = True):
        code = main([argv[0], *([STUDY] if study else []), *argv[1:], "--runs-dir", runs])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _table_rows(text: str) -> tuple[list[str], list[list[str]]]:
    lines = text.strip().splitlines()
    header = lines[0].replace("params (M)", "params_M").replace("wall (s)", "wall_s")
    return header.split(), [line.split() for line in lines[1:]]


def test_ls_lists_the_study_with_counts_by_state(cli):
    code, out, _ = cli("ls", study=False)
    header, rows = _table_rows(out)
    assert code == 0 and header[:6] == ["study", "trials", "COMPLETE", "RUNNING", "FAIL", "PRUNED"]
    assert rows[0][:6] == [STUDY, "12", "12", "0", "0", "0"]


def test_show_prints_every_trial_with_units(cli, results):
    code, out, _ = cli("show")
    header, rows = _table_rows(out)
    assert code == 0 and len(rows) == 12
    assert header[:5] == ["number", "state", "depth", "shortcut", "seed"] and "GFLOPs" in header
    shown = display_frame(results.trials).set_index("number")
    for row in rows:
        expected = shown.loc[row[0]]
        assert row[header.index("test_error")] == expected["test_error"]  # e.g. "29.69%"
        assert row[header.index("test_error")].endswith("%")
        assert row[header.index("GFLOPs")] == expected["GFLOPs"]
        assert row[header.index("depth")] == expected["depth"]


def test_show_where_and_sort(cli, results):
    code, out, _ = cli("show", "--where", "depth == 14 and shortcut == 'A'", "--sort=-test_error,number",
                       "--format", "csv")
    shown = pd.read_csv(io.StringIO(out))
    expected = results.trials.query("depth == 14 and shortcut == 'A'")
    assert code == 0 and sorted(shown["number"]) == sorted(expected["number"])
    assert list(shown["test_error"]) == sorted(expected["test_error"], reverse=True)
    assert set(shown["shortcut"]) == {"A"} and set(shown["depth"]) == {14}


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_export_is_exact(cli, results, fmt):
    code, out, _ = cli("export", "--format", fmt)
    exported = pd.read_csv(io.StringIO(out)) if fmt == "csv" else pd.DataFrame(json.loads(out))
    assert code == 0 and list(exported.columns) == list(results.trials.columns)
    exported = exported.set_index("number").sort_index()
    frame = results.trials.set_index("number").sort_index()
    for column in ("test_error", "train_error", "wall_seconds", "images_per_second"):
        assert exported[column].tolist() == frame[column].tolist()  # exact, not rounded
    assert exported["flops"].tolist() == frame["flops"].tolist()
    assert exported["shortcut"].tolist() == frame["shortcut"].tolist()


def test_export_curves_to_a_file(cli, results, tmp_path):
    target = tmp_path / "figures" / "run 1" / "curves.csv"  # folders that do not exist yet
    code, out, err = cli("export", "--what", "curves", "-o", str(target))
    curves = pd.read_csv(target)
    assert code == 0 and out == "" and str(target) in err
    assert len(curves) == 24 and curves["test_error"].tolist() == results.curves()["test_error"].tolist()


def test_an_output_of_a_dash_is_stdout(cli, results, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli("export", "--what", "curves", "--format", "csv", "-o", "-")
    assert code == 0 and not (tmp_path / "-").exists()
    assert len(pd.read_csv(io.StringIO(out))) == len(results.curves())


def test_summary_by_depth_and_shortcut(cli, results):
    code, out, _ = cli("summary", "--by", "depth,shortcut", "--format", "json")
    printed = pd.DataFrame(json.loads(out))
    expected = results.summary(by=["depth", "shortcut"])
    assert code == 0 and printed["n"].tolist() == [3, 3, 3, 3]
    for column in ("test_error_mean", "test_error_std", "test_error_ci95_low", "test_error_ci95_high"):
        assert printed[column].tolist() == pytest.approx(expected[column].tolist())
    code, out, _ = cli("summary", "--by", "depth,shortcut")
    header, rows = _table_rows(out)
    assert "test_error_mean" in header and "params_M" in header and "GFLOPs" in header
    means = [row[header.index("test_error_mean")] for row in rows]
    assert means == [f"{100 * v:.2f}%" for v in expected["test_error_mean"]]


def test_compare_prints_the_paired_comparison_with_its_method(cli, runs, results, tmp_path):
    code, out, _ = cli("compare", "--factor", "shortcut", "--baseline", "A", "--format", "json")
    printed = json.loads(out)
    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{runs}/{STUDY}.db").get_trials()
    error = {(t.params["depth"], t.params["shortcut"], t.user_attrs["seed"]):
             1 - t.user_attrs["final_test_accuracy"] for t in trials}
    expected = results.compare("shortcut", "A")
    assert code == 0 and [row["depth"] for row in printed] == [8, 14, "all"]
    assert [row["p_value"] for row in printed] == pytest.approx(expected["p_value"].tolist())
    assert [row["method"] for row in printed] == expected["method"].tolist()
    for row in printed[:2]:
        plain = np.array([error[(row["depth"], "none", s)] for s in SEEDS])
        base = np.array([error[(row["depth"], "A", s)] for s in SEEDS])
        assert row["diff_mean"] == pytest.approx((plain - base).mean())
    # The training error has no test-set sampling: scipy's paired t-test.
    code, out, _ = cli("compare", "--factor", "shortcut", "--baseline", "A", "--metric",
                       "train_error", "--format", "json")
    train = {(t.params["depth"], t.params["shortcut"], t.user_attrs["seed"]):
             1 - t.user_attrs["final_train_accuracy"] for t in trials}
    for row in json.loads(out)[:2]:
        plain = np.array([train[(row["depth"], "none", s)] for s in SEEDS])
        base = np.array([train[(row["depth"], "A", s)] for s in SEEDS])
        assert row["p_value"] == pytest.approx(stats.ttest_rel(plain, base).pvalue)
    code, out, err = cli("compare", "--factor", "shortcut", "--baseline", "A")
    header, rows = _table_rows(out)
    assert code == 0 and "p_value" in header and [r[header.index("depth")] for r in rows] == ["8", "14", "all"]
    assert "method" in err and "crossed random effects" in err
    # Specs accept option "a" for "A": so does the baseline, with the same table.
    assert cli("compare", "--factor", "shortcut", "--baseline", "a")[1] == out
    # A table saved with -o keeps the methods and notes under it, as the terminal shows them.
    saved = tmp_path / "compare.txt"
    code, _, err = cli("compare", "--factor", "shortcut", "--baseline", "A", "-o", str(saved))
    footer = [line for line in err.splitlines() if not line.startswith("wrote ")]
    assert code == 0 and footer and saved.read_text().rstrip("\n").endswith("\n".join(footer))
    assert saved.read_text().startswith(out.rstrip("\n"))


def test_pareto_prints_the_non_dominated_trials(cli, results):
    code, out, _ = cli("pareto", "--over", "trials", "--format", "csv")
    printed = pd.read_csv(io.StringIO(out))
    done = results.completed()
    front = [n for n, e, f in zip(done["number"], done["test_error"], done["flops"])
             if not any((e2 <= e and f2 <= f) and (e2 < e or f2 < f)
                        for e2, f2 in zip(done["test_error"], done["flops"]))]
    assert code == 0 and sorted(printed["number"]) == sorted(front)
    # No names at all is one line (it was a TypeError from deep inside).
    code, _, err = cli("pareto", "--objectives", "")
    assert code == 2 and err.count("\n") == 1
    assert "--objectives '': give names separated by commas, such as test_error,flops" in err


@pytest.mark.parametrize("argv, message", [
    (["pareto", "--objectives", "test_error,test_error"], "--objectives: 'test_error' is listed "
                                                          "twice; list each once"),
    (["show", "--columns", ","], "--columns ',': give names separated by commas"),
    (["show", "--sort", "depth, depth"], "--sort: 'depth' is listed twice"),
    (["export", "--sort", " "], "--sort ' ': give names separated by commas"),
    (["summary", "--by", ",,"], "--by ',,': give names separated by commas, such as depth,"),
])
def test_a_list_option_that_names_nothing_or_a_name_twice_is_one_line(cli, argv, message):
    # ("show --columns ," printed "(no rows)", and a repeated objective a front over one.)
    code, out, err = cli(*argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("kind", ["curves", "depth", "pareto", "responses"])
def test_plot_writes_a_png(cli, tmp_path, kind):
    target = tmp_path / f"{kind}.png"
    code, _, err = cli("plot", "--kind", kind, "-o", str(target))
    data = target.read_bytes()
    assert code == 0 and str(target) in err and data[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(io.BytesIO(data), format="png").shape[:2]
    assert height >= 300 and width >= 400


@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_plot_writes_the_format_its_file_name_names(cli, tmp_path, suffix, magic):
    # A file named .svg held PNG bytes.
    target = tmp_path / f"depth{suffix}"
    code, _, _ = cli("plot", "--kind", "depth", "-o", str(target))
    assert code == 0 and target.read_bytes().startswith(magic)


@pytest.mark.parametrize("argv, message", [
    (["plot", "--kind", "depth", "-o", "depth.jpg"],
     "cannot write a plot as 'depth.jpg': the file name must end in .png, .svg, .pdf"),
    (["report", "-o", "report.pdf"], "cannot write the report as 'report.pdf': it is an HTML "
                                     "page, so the file name must end in .html"),
])
def test_an_output_file_of_another_format_is_refused(cli, tmp_path, argv, message):
    argv[-1] = str(tmp_path / argv[-1])
    code, _, err = cli(*argv)
    assert code == 2 and message in err and not list(tmp_path.iterdir())


def test_a_selection_is_named_in_the_report_and_the_figures(cli, results, tmp_path):
    """A report of `--where depth == 14` said "trials: 6 COMPLETE" of a study of 12, with the
    filter nowhere on the page or in the figures' titles."""
    target = tmp_path / "report.html"
    code, _, _ = cli("report", "--where", "depth == 14", "-o", str(target), "--no-responses")
    page = target.read_text()
    selected = len(results.trials.query("depth == 14"))
    assert code == 0 and "[where depth == 14]" in page
    assert (f"<code>--where depth == 14</code>: {selected} of the study's "
            f"{len(results.trials)}") in page
    assert results.where("depth == 14").title == f"{STUDY} [where depth == 14]"
    assert results.where("depth == 14").where("shortcut == 'A'").selection == \
        "(depth == 14) and (shortcut == 'A')"
    plain = tmp_path / "all.html"
    cli("report", "-o", str(plain), "--no-responses")
    assert "[where" not in plain.read_text() and "selected by" not in plain.read_text()


def test_where_given_twice_selects_the_trials_matching_both(cli, results, tmp_path):
    """A second --where replaced the first, without a word: the answers were over trials the
    first had left out (an audit: `--where "depth == 56" --where "shortcut == 'A'"` listed
    depth 20)."""
    code, out, _ = cli("show", "--where", "depth == 14", "--where", "shortcut == 'A'",
                       "--format", "csv")
    expected = results.trials.query("depth == 14 and shortcut == 'A'")
    assert code == 0 and sorted(pd.read_csv(io.StringIO(out))["number"]) == \
        sorted(expected["number"])
    code, out, _ = cli("summary", "--where", "depth == 14", "--where", "shortcut == 'A'",
                       "--format", "csv")
    assert code == 0 and len(pd.read_csv(io.StringIO(out))) == 1
    target = tmp_path / "report.html"
    cli("report", "--where", "depth == 14", "--where", "shortcut == 'A'", "-o", str(target),
        "--no-responses")
    assert "[where (depth == 14) and (shortcut == &#x27;A&#x27;)]" in target.read_text()


def test_storage_and_runs_dir_together_are_refused(cli, capsys):
    """A query reads the runs folder only to find the store: beside --storage it was ignored
    without a word."""
    with pytest.raises(SystemExit) as stop:  # argparse's own refusal
        cli("summary", "--storage", "sqlite:///elsewhere.db")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "--runs-dir: not allowed with argument --storage" in err, err


def test_a_selection_that_matches_nothing_lists_the_values_it_could_name(cli, results):
    code, _, err = cli("summary", "--where", "shortcut == 'B'")
    depths = ", ".join(str(d) for d in sorted(results.trials["depth"].unique()))  # 8 before 14
    assert code == 2 and err.count("\n") == 1
    assert f"(its values: depth: {depths}; shortcut: 'A', 'none')" in err, err


def test_report_writes_the_html_page(cli, results, tmp_path):
    target = tmp_path / "out" / "report.html"
    code, _, _ = cli("report", "-o", str(target), "--no-responses")
    page = target.read_text()
    assert code == 0 and "<h2>Summary over seeds</h2>" in page and "<h2>Paired comparisons</h2>" in page
    assert "Layer responses" not in page and page.count("data:image/png;base64,") == 3
    for cell in display_frame(results.summary())["test_error_mean"]:
        assert f"<td>{cell}</td>" in page


# -- errors: one line on stderr naming what exists, exit code 2


@pytest.mark.parametrize("argv, message", [
    (["show", "--where", "speed > 1"], "no column 'speed' (a value of text is written in "
                                       "quotes: 'speed'); a filter has only"),
    (["show", "--where", "shortcut == A"], "no column 'A' (a value of text is written in quotes: "
                                           "'A')"),
    (["show", "--where", "@pd.io.common.os.system('echo PWNED') == 0"], "is not a filter"),
    (["show", "--sort", "speed"], "no column 'speed' in study 'results-small'; columns:"),
    (["summary", "--by", "width"], "no column 'width'"),
    (["compare", "--factor", "shortcut", "--baseline", "C"], "shortcut values: 'A', 'none'"),
    (["pareto", "--objectives", "test_error,seed"], "no direction known for 'seed'"),
    (["summary", "--metric", "arch_name"], "'arch_name' is not a numeric column, so it has no mean"),
    (["compare", "--factor", "depth", "--baseline", "8", "--metric", "shortcut"],
     "'shortcut' is not a numeric column"),
    (["compare", "--factor", "seed", "--baseline", "0"],
     "'seed' is not a factor study 'results-small' sweeps, so it has no levels to compare; "
     "factors: depth, shortcut"),
    (["compare", "--factor", "arch_name", "--baseline", "plain8"], "'arch_name' is not a factor"),
])
def test_bad_columns_and_values_are_one_line_errors(cli, argv, message):
    code, out, err = cli(*argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_pareto_figures_cost_is_named_as_a_metric_and_settings_are_no_metrics(runs):
    """plot_pareto(cost='wall') (the tables' label) is refused naming the metrics, which do not
    include the true/false settings a trial records (compile, cuda_graphs: listed as if they could
    be a cost; an audit)."""
    from resnet_ablate.results import load, plots

    results = load(STUDY, runs_dir=runs)
    assert {"compile", "cuda_graphs"} <= set(results.trials.columns)
    assert not {"compile", "cuda_graphs"} & set(results.metrics())
    with pytest.raises(ResultsError, match=r"no column 'wall' .*; metrics: .*wall_seconds"):
        plots.plot_pareto(results, cost="wall")
    with pytest.raises(ResultsError, match=r"'compile' names a trial or its configuration"):
        results.summary(metric="compile")


def test_output_never_replaces_a_store_and_other_files_only_with_force(cli, runs, tmp_path):
    store = Path(runs) / f"{STUDY}.db"
    before = store.read_bytes()
    for spelling in (str(store), f"{runs}/./{STUDY}.db"):
        for force in ([], ["--force"]):
            code, out, err = cli("export", "--format", "csv", "-o", spelling, *force)
            assert code == 2 and "is a SQLite database" in err and "refusing" in err
    assert store.read_bytes() == before
    # Nor where SQLite would take the file for the store's journal or log: a table written to
    # STORE.db-journal made every later query on the store fail (an audit)
    for companion in ("-journal", "-wal", "-shm"):
        code, _, err = cli("export", "-o", f"{store}{companion}", "--force")
        assert code == 2 and f"rollback journal or write-ahead log of {STUDY}.db" in err
        assert not Path(f"{store}{companion}").exists()
    assert cli("summary")[0] == 0
    existing = tmp_path / "table.csv"
    existing.write_text("keep me\n")
    code, _, err = cli("export", "-o", str(existing))
    assert code == 2 and "exists; pass --force to replace it" in err
    assert existing.read_text() == "keep me\n"
    code, _, _ = cli("export", "-o", str(existing), "--force")
    assert code == 0 and existing.read_text().startswith("number,")
    code, _, err = cli("plot", "--kind", "depth", "-o", str(store), "--force")
    assert code == 2 and store.read_bytes() == before
    # A study's own folders and saved weights: never, --force or not (a link is followed).
    kept = sorted((Path(runs) / f"{STUDY}.artifacts").glob("trial-*.pt"))
    assert kept, "the study keeps its trials' weights"
    weights = kept[0]
    saved = weights.read_bytes()
    (tmp_path / "linked").symlink_to(weights.parent)
    for target, said in ((weights, "a study's own folder"),
                         (weights.parent / "new.csv", "a study's own folder"),
                         (tmp_path / "linked" / "new.csv", "a study's own folder"),
                         (Path(runs) / f"{STUDY}.checkpoints" / "t" / "plot.png",
                          "a study's own folder")):
        code, _, err = cli("export", "-o", str(target), "--force")
        assert code == 2 and said in err and "Traceback" not in err, err
        assert not target.exists() or target == weights
    moved = tmp_path / "kept.pt"
    moved.write_bytes(saved)
    code, _, err = cli("plot", "--kind", "depth", "-o", str(moved), "--force")
    assert code == 2 and "is a zip archive (saved weights?)" in err
    assert weights.read_bytes() == saved and moved.read_bytes() == saved
    # Into a path through a file, or where nothing may be written: one line, exit 2.
    code, _, err = cli("export", "-o", str(existing / "inside.csv"))
    assert code == 2 and f"{existing} is a file, not a folder" in err and existing.is_file()
    code, _, err = cli("report", "-o", "/proc/report.html", "--no-responses")
    assert code == 2 and err.count("\n") == 1 and "cannot write /proc/report.html" in err


def test_the_python_writers_never_write_over_recorded_results(runs, tmp_path):
    """write_report and save_plot refuse what `-o` refuses: a store, saved weights, a study's
    own folders (from Python they wrote over a store without a word)."""
    from resnet_ablate.results.plots import save_plot
    from resnet_ablate.results.report import write_report
    from resnet_ablate.results import ResultsError, load

    results = load(STUDY, runs_dir=runs)
    store = Path(runs) / f"{STUDY}.db"
    before = store.read_bytes()
    inside = Path(runs) / f"{STUDY}.artifacts" / "page.html"
    for write in (lambda path: write_report(results, path, responses=False),
                  lambda path: save_plot(results, "depth", path)):
        for target, said in ((store, "is a SQLite database"), (inside, "a study's own folder")):
            with pytest.raises(ResultsError, match=said):
                write(target)
        assert store.read_bytes() == before and not inside.exists()
    assert write_report(results, tmp_path / "page.html", responses=False).is_file()


@pytest.mark.parametrize("damage", [
    ("UPDATE trial_user_attributes SET value_json = '{not json' WHERE key = 'arch'",
     "JSONDecodeError"),
    ("UPDATE trial_values SET value = NULL WHERE trial_id = 1", "AssertionError"),
    ("UPDATE trial_user_attributes SET value_json = CAST(X'22AC22' AS BLOB) WHERE key = 'arch'",
     "UnicodeDecodeError"),
    # A parameter's index outside its distribution's choices (an edited store).
    ("UPDATE trial_params SET param_value = 999 WHERE trial_id = 1", "IndexError"),
], ids=["bad json", "a missing objective value", "bytes that are not utf-8", "a parameter index"])
def test_a_damaged_record_is_one_line_naming_the_store(runs, capsys, tmp_path, damage):
    statement, kind = damage
    copy = tmp_path / f"{STUDY}.db"
    shutil.copy(Path(runs) / f"{STUDY}.db", copy)
    with sqlite3.connect(copy) as connection:
        connection.execute(statement)
    for command in (["ls"], ["show", STUDY], ["summary", STUDY]):
        assert main([*command, "--storage", f"sqlite:///{copy}"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert f"study store sqlite:///{copy}: a record in it cannot be read ({kind}" in err, err


def test_missing_study_or_storage_names_what_exists(runs, capsys, tmp_path):
    assert main(["show", "other", "--runs-dir", runs]) == 2
    assert f"no study storage at {runs}/other.db; databases in {runs}/: {STUDY}.db" in capsys.readouterr().err
    assert main(["show", "other", "--storage", f"sqlite:///{runs}/{STUDY}.db"]) == 2
    assert f"no study 'other' in sqlite:///{runs}/{STUDY}.db; studies there: {STUDY}" in capsys.readouterr().err
    assert main(["summary", "x", "--storage", "nosuchdb://host/x"]) == 2
    assert "storage URL 'nosuchdb://host/x' names a database this installation cannot open" \
        in capsys.readouterr().err
    assert main(["ls", "--runs-dir", str(tmp_path)]) == 2
    assert "no .db file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_empty_study_is_an_error_for_show_and_summary(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'empty.db'}"
    optuna.create_study(study_name="empty", storage=storage)
    assert main(["show", "empty", "--storage", storage]) == 2
    assert "study 'empty' in " in capsys.readouterr().err
    # A filter does not turn "no trials yet" into an empty table that looks like an answer.
    for command in ("show", "export"):
        assert main([command, "empty", "--storage", storage, "--where", "seed == 1"]) == 2
        captured = capsys.readouterr()
        assert captured.out == "" and captured.err.endswith("has no trials yet\n")
    assert main(["summary", "empty", "--storage", storage]) == 2
    assert "has no completed trial to summarise (it has no trials)" in capsys.readouterr().err


def test_the_installed_command_exits_2_without_a_traceback(runs):
    done = subprocess.run([sys.executable, "-m", "resnet_ablate.cli", "compare", STUDY, "--factor",
                           "nosuch", "--baseline", "A", "--runs-dir", runs],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("resnet-ablate compare: error: no column 'nosuch'")
    assert "Traceback" not in done.stderr


def test_a_reader_that_closes_the_pipe_early_ends_the_command_quietly(runs, tmp_path):
    """`resnet-ablate export STUDY | head -1`: the reader goes away before the table is written;
    the command exits 0 without a word, as other command-line tools do."""
    command = subprocess.Popen([sys.executable, "-m", "resnet_ablate.cli", "export", STUDY,
                                "--format", "csv", "--runs-dir", runs],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    command.stdout.close()  # before it writes a byte
    assert command.wait(timeout=120) == 0
    assert command.stderr.read() == b""
    # The plan of a study too (`run --dry-run | head -1`), which is printed by the run command.
    spec = tmp_path / "study.yaml"
    spec.write_text(json.dumps(results_study_spec()))
    planning = subprocess.Popen([sys.executable, "-m", "resnet_ablate.cli", "run", str(spec),
                                 "--dry-run", "--runs-dir", runs],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    planning.stdout.close()
    assert planning.wait(timeout=120) == 0
    assert planning.stderr.read() == b""
    # A closed stderr is no answer: a failing command still fails.
    failing = subprocess.Popen([sys.executable, "-m", "resnet_ablate.cli", "show", "nosuch",
                                "--runs-dir", runs], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    failing.stderr.close()
    assert failing.wait(timeout=120) != 0
    failing.stdout.close()


def test_the_runs_folder_comes_from_the_environment_for_the_cli_and_python(runs, monkeypatch,
                                                                          capsys, tmp_path):
    from resnet_ablate.results import load

    monkeypatch.chdir(tmp_path)  # no runs/ here: only the variable can lead to the study
    monkeypatch.setenv("RESNET_ABLATE_RUNS", runs)
    assert main(["show", STUDY, "--columns", "number"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 13
    assert load(STUDY).storage == f"sqlite:///{Path(runs) / STUDY}.db"


def test_a_store_whose_records_disagree_is_a_one_line_error(runs, tmp_path, capsys):
    """A store edited by hand: one trial's per-image record swapped for that of a trial with
    another error. Every command that computes statistics says so in one line, naming what
    disagrees, rather than a traceback."""
    store = tmp_path / f"{STUDY}.db"
    shutil.copy(Path(runs) / f"{STUDY}.db", store)
    trials = optuna.load_study(study_name=STUDY, storage=f"sqlite:///{store}").get_trials()
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    first = done[0]
    other = next(t for t in done if t.values[0] != first.values[0])
    with sqlite3.connect(store) as db:
        db.execute("update trial_user_attributes set value_json = (select value_json from "
                   "trial_user_attributes where key = 'test_outcomes' and trial_id = ?) "
                   "where key = 'test_outcomes' and trial_id = ?",
                   (other._trial_id, first._trial_id))
    for argv in (["summary"], ["compare", "--factor", "shortcut", "--baseline", "A"]):
        assert main([argv[0], str(store), *argv[1:]]) == 2
        captured = capsys.readouterr()
        assert captured.out == ""
        assert captured.err.startswith(f"resnet-ablate {argv[0]}: error: the store's records of a "
                                       "configuration's seeds disagree")
        assert "is not that of its outcomes" in captured.err
        assert len(captured.err.strip().splitlines()) == 1
