"""The query commands: read a study's storage (finished or running); each is one call into
resnet_ablate.results / plots / report. A lookup problem is one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from .arguments import metric_help, storage_url
from .output import check_output, emit, emit_statistics
from .registry import command


def _query(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def guarded(args: argparse.Namespace) -> int:
        from ..results import ResultsError
        from ..stats import SeedRecordsError
        from ..storage import StudyNameError

        try:
            return fn(args)
        except StudyNameError as error:  # a name that would become a path or URL syntax
            print(f"resnet-ablate {args.command}: error: {error}; a store can also be named by "
                  "the path of its .db file", file=sys.stderr)
            return 2
        except ResultsError as error:
            print(f"resnet-ablate {args.command}: error: {error}", file=sys.stderr)
            return 2
        except SeedRecordsError as error:  # a store edited by hand, or by another version
            print(f"resnet-ablate {args.command}: error: the store's records of a configuration's "
                  f"seeds disagree, so they cannot be summarised: {error}", file=sys.stderr)
            return 2
        except BrokenPipeError:
            raise  # stdout's reader went away: the command table ends it quietly
        except OSError as error:  # writing -o: no permission, no space, ...
            # A failed write (no space: /dev/full) names no file; the path is -o's.
            path = error.filename or getattr(args, "output", None)
            print(f"resnet-ablate {args.command}: error: cannot write {path}: "
                  f"{error.strerror or error}", file=sys.stderr)
            return 2

    return guarded


def _swept_values(results) -> str:
    """Each swept column's values, as a filter writes them: what a selection could have named."""
    from ..results.display import natural_order

    def written(value) -> str:
        return f"'{value}'" if isinstance(value, str) else str(value)
    listed = []
    for column in (c for c in results.swept if c in results.trials.columns):
        values = sorted(results.trials[column].dropna().unique(), key=natural_order)
        listed.append(f"{column}: {', '.join(written(v) for v in values)}")
    return "; ".join(listed)


def _filter(filters: list[str] | None) -> str | None:
    """The one filter that --where given once or more stands for: all of them (an option given
    twice kept only the last, and the answers were over trials the first had left out)."""
    if not filters:
        return None
    return filters[0] if len(filters) == 1 else " and ".join(f"({f})" for f in filters)


def _load(args: argparse.Namespace, *, listing: bool = False):
    """The study, restricted by --where. A selection that matches nothing is one error, except
    for a `listing` (show, export), whose empty table is an answer: it is noted on stderr. A
    listing of a study with no trial at all is refused, with or without --where."""
    from ..results import ResultsError, load

    results = load(args.study, storage=args.storage, runs_dir=args.runs_dir)
    if listing and results.trials.empty:
        raise ResultsError(f"study {results.study!r} in {results.storage} has no trials yet")
    query = _filter(args.where)
    selected = results.where(query)
    if query and selected.trials.empty and not results.trials.empty:
        values = _swept_values(results)
        matched = (f"--where {query!r} matched none of the study's {len(results.trials)} "
                   "trials" + (f" (its values: {values})" if values else ""))
        if not listing:  # the command would only go on to find nothing to work on
            raise ResultsError(matched)
        print(f"resnet-ablate {args.command}: {matched}", file=sys.stderr)
    return selected


def _names(args: argparse.Namespace, option: str, example: str) -> list[str] | None:
    """The comma-separated names option `--OPTION` gives, or None where it is not given; one
    error where it is given but names nothing, or names one twice."""
    from ..results import ResultsError

    text = getattr(args, option)
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ResultsError(f"--{option} {text!r}: give names separated by commas, such as "
                           f"{example}")
    twice = next((name for i, name in enumerate(names) if name in names[:i]), None)
    if twice is not None:
        raise ResultsError(f"--{option}: {twice!r} is listed twice; list each once")
    return names


@command("ls")
@_query
def _ls(args: argparse.Namespace) -> int:
    from ..results import ResultsError, list_studies

    studies = list_studies(args.storage, runs_dir=args.runs_dir)
    unreadable = studies.attrs.get("unreadable", [])
    if studies.empty and unreadable:
        raise ResultsError(unreadable[0])
    emit(studies, args)
    for message in unreadable:  # listed what could be read; then each store that could not
        print(f"resnet-ablate {args.command}: error: {message}", file=sys.stderr)
    return 2 if unreadable else 0


SHOW_COLUMNS = ("number", "state", "seed", "params", "flops", "test_error", "train_error",
                "epochs", "wall_seconds", "images_per_second", "failure")


@command("show")
@_query
def _show(args: argparse.Namespace) -> int:
    results = _load(args, listing=True)
    frame = results.sorted_by(_names(args, "sort", "-test_error,number"))
    columns = _names(args, "columns", "number,depth,test_error")
    if columns is None:
        columns = ["number", "state", *results.swept, *SHOW_COLUMNS[2:]] if args.format == "table" \
            else list(frame.columns)
        if args.format == "table" and frame["skipped_images"].fillna(0).gt(0).any():
            # Images its scores leave out, where any were: else a score hides that it lacks them
            columns.insert(columns.index("epochs") if "epochs" in columns else len(columns),
                           "skipped_images")
    results.check_columns(columns)
    return emit(frame[list(dict.fromkeys(columns))], args)


@command("export")
@_query
def _export(args: argparse.Namespace) -> int:
    results = _load(args, listing=True)
    frame = results.curves() if args.what == "curves" else results.sorted_by(
        _names(args, "sort", "-test_error,number"))
    return emit(frame, args)


@command("summary")
@_query
def _summary(args: argparse.Namespace) -> int:
    table = _load(args).summary(by=_names(args, "by", "depth,shortcut"), metric=args.metric)
    return emit_statistics(table, args)


@command("compare")
@_query
def _compare(args: argparse.Namespace) -> int:
    table = _load(args).compare(args.factor, args.baseline, metric=args.metric)
    return emit_statistics(table, args)


@command("effects")
@_query
def _effects(args: argparse.Namespace) -> int:
    results = _load(args)
    table = results.importance(args.metric) if args.importance else results.effects(args.metric)
    return emit_statistics(table, args)


@command("decisions")
@_query
def _decisions(args: argparse.Namespace) -> int:
    from ..results import ResultsError

    results = _load(args)
    table = results.seed_decisions()
    if table.empty:
        raise ResultsError(f"study {results.study!r} has fixed seeds, no adaptive seed rule "
                           "whose decisions to show (`summary` and `compare` answer it)")
    if args.format != "table":
        return emit(table, args)
    # A reason is the answer, and longer than a table's column keeps (it was cut at 60
    # characters): each configuration's reason and note in full, a line each, under the table.
    from ..results.contrasts import plain

    configuration = results.configuration_columns()
    why = [", ".join(f"{c}={plain(row[c])}" for c in configuration) + f": {row['reason']}"
           + (f" ({row['note']})" if row["note"] else "") for _, row in table.iterrows()]
    return emit(table.drop(columns=["reason", "note"]), args, footer=why, footer_on_stdout=True)


@command("pareto")
@_query
def _pareto(args: argparse.Namespace) -> int:
    objectives = _names(args, "objectives", "test_error,flops")
    table = _load(args).pareto(objectives, over=args.over)
    return emit_statistics(table, args)


@command("plot")
@_query
def _plot(args: argparse.Namespace) -> int:
    from ..results.plots import save_plot

    check_output(args.output, args.force)
    path = save_plot(_load(args), args.kind, args.output)
    print(f"wrote {path}", file=sys.stderr)
    return 0


@command("report")
@_query
def _report(args: argparse.Namespace) -> int:
    from ..results.report import write_report

    check_output(args.output, args.force)
    results = _load(args)
    path = write_report(results, args.output, responses=not args.no_responses)
    print(f"wrote {path}", file=sys.stderr)
    if results.completed().empty:  # a page of why trials failed, where other commands refuse
        print(f"resnet-ablate report: study {results.study!r} has no completed trial: the page "
              "lists its trials and why each ended", file=sys.stderr)
    return 0


PLOT_KINDS = ("curves", "depth", "pareto", "responses")
PLOT_KINDS_HELP = ("curves: training and test error by epoch (Fig. 6); depth: error against "
                   "depth with 95%% CIs; pareto: error against FLOPs; responses: each layer's "
                   "response std (Fig. 7, from kept weights)")


def _query_parser(sub, name: str, help_text: str, *, study: bool = True, table: bool = True,
                  default_format: str = "table"):
    """A query command's parser with the options every query shares: the study and its store,
    --where, and for a table its format and output file."""
    parser = sub.add_parser(name, help=help_text)
    if study:
        parser.add_argument("study", help="the study's name (spec key `study`), or the "
                                          "path of its .db file")
    # One or the other: a query reads the runs folder only to find the store (`run` also puts
    # weights there), so beside --storage it was ignored without a word.
    store = parser.add_mutually_exclusive_group()
    store.add_argument("--storage", type=storage_url, help="an Optuna storage URL "
                       "(default: sqlite:///RUNS_DIR/STUDY.db)")
    store.add_argument("--runs-dir", help="where `run` put the study (default: "
                       "$RESNET_ABLATE_RUNS, else ./runs)")
    if study:
        parser.add_argument("--where", action="append",
                            help="only trials matching a filter: columns compared with values, "
                                 "in [..], and/or/not, e.g. \"depth == 20 and shortcut == 'A'\" "
                                 "(given more than once: trials matching every one)")
    if table:
        formats = {"table": "aligned table with units", "csv": "exact csv", "json": "exact json"}
        parser.add_argument("--format", choices=tuple(formats), default=default_format,
                            help=f"{formats[default_format]} (default), or "
                            + " / ".join(v for k, v in formats.items() if k != default_format))
        parser.add_argument("-o", "--output",
                            help="write to this file instead of stdout (missing folders "
                                 "are created; - is stdout)")
    parser.add_argument("--force", action="store_true",
                        help="let -o replace an existing file (never a study's store)")
    return parser


def add_query_commands(sub) -> None:
    query = functools.partial(_query_parser, sub)
    query("ls", "studies in a storage (or in every RUNS_DIR/*.db) with trial counts by state",
          study=False)
    show = query("show", "the trials of a study as a table")
    show.add_argument("--sort", help="columns to sort by, comma-separated; --sort=-name for descending")
    show.add_argument("--columns", help="columns to show, comma-separated (default: the usual ones)")
    export = query("export", "every column of every trial (or the per-epoch curves), exactly",
                   default_format="csv")
    export.add_argument("--what", choices=("trials", "curves"), default="trials",
                        help="one row per trial (default), or per trial and epoch")
    export.add_argument("--sort", help="columns to sort by, comma-separated")
    summary = query("summary", "mean, std and 95%% CI of the test error over seeds per configuration")
    summary.add_argument("--by", help="columns to group by, comma-separated (default: the swept ones)")
    summary.add_argument("--metric", default="test_error", help=metric_help())
    compare = query("compare", "paired differences against a baseline level, with CI and p-value")
    compare.add_argument("--factor", required=True, help="the swept column to compare, e.g. shortcut")
    compare.add_argument("--baseline", required=True, help="the level to compare against, e.g. A")
    compare.add_argument("--metric", default="test_error", help=metric_help())
    effects = query("effects", "main effects and two-factor interactions of every swept factor, "
                               "with CI and p-value")
    effects.add_argument("--metric", default="test_error", help=metric_help())
    effects.add_argument("--importance", action="store_true",
                         help="instead: each factor's share of the metric's variance over the "
                         "trials (Optuna's fANOVA; no interval)")
    query("decisions", "adaptive seeds: each configuration's verdict, its seeds and why they "
                       "stopped or go on")
    pareto = query("pareto", "the non-dominated configurations (means over seeds) or trials")
    pareto.add_argument("--objectives", default="test_error,flops",
                        help="comma-separated (default: test_error,flops)")
    pareto.add_argument("--over", choices=("configurations", "trials"), default="configurations",
                        help="configurations: their means over seeds, with intervals (default); "
                        "trials: single trials")
    plot = query("plot", "draw one of the paper's figures (PNG, SVG or PDF)", table=False)
    plot.add_argument("--kind", required=True, choices=PLOT_KINDS, help=PLOT_KINDS_HELP)
    plot.add_argument("-o", "--output", required=True,
                      help="the file to write; its name ends in .png, .svg or .pdf")
    report = query("report", "one self-contained HTML page: tables, comparisons, plots", table=False)
    report.add_argument("-o", "--output", required=True, help="the HTML file to write")
    report.add_argument("--no-responses", action="store_true",
                        help="leave out Fig. 7 (it reloads every trained model)")
