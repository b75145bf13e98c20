"""The `resnet-ablate` command: a thin face over functions users can call from Python too."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


@command("run")
def _run(args: argparse.Namespace) -> int:
    from .spec import load_spec
    from .storage import runs_folder
    from .study import RunOptions, plan_study, run_study

    if args.allow_pipe_urls:  # before Ray starts: its local workers inherit the environment
        import os

        from .data.shard_urls import ALLOW_PIPE_URLS_ENV

        os.environ[ALLOW_PIPE_URLS_ENV] = "1"
    spec = load_spec(args.spec)
    options = RunOptions(address=args.address, storage=args.storage, workers=args.workers,
                         runs_dir=runs_folder(args.runs_dir), keep_weights=not args.no_weights,
                         progress=not args.quiet)
    if args.dry_run:
        return _print_plan(spec, plan_study(spec, options), args.format)
    if args.format != "table":
        print("resnet-ablate run: error: --format applies to --dry-run; a run prints a table, "
              f"and `resnet-ablate export {spec.study}{_store_options(args)} --format {args.format}` "
              "writes its trials", file=sys.stderr)
        return 2
    summary = run_study(spec, options)
    print(f"study {summary.study}: {summary.completed} completed, {summary.failed} failed, "
          f"{summary.pruned} pruned this run in {summary.wall_seconds:.1f} s; "
          f"storage {summary.storage}; all trials by state: {summary.counts_by_state}")
    if summary.interrupted:
        from .study.loop import stop_description

        return _stopped(summary.interrupted == "SIGTERM",
                        f"resnet-ablate run: interrupted by {stop_description(summary.interrupted)}: "
                        f"{summary.marked_interrupted} unfinished trial(s) marked failed; run the "
                        "same command to resume")
    if summary.launched and not summary.completed and not summary.pruned:
        print(f"resnet-ablate run: error: none of the {summary.launched} trials launched completed; "
              f"see `resnet-ablate show {summary.study}{_store_options(args)} --columns "
              "number,state,failure`",
              file=sys.stderr)
        return 1
    from .report import summary_with_training_error
    from .results import load

    results = load(spec.study, storage=summary.storage)
    if len(results.completed()):
        table = summary_with_training_error(results)
        print(results.format_table(table))
        _footnotes(table)
    return 0


def _metric_help() -> str:
    from .record import METRICS

    return (f"the numeric column the statistics are over (default test_error): one of "
            f"{', '.join(METRICS)}, or any numeric column `resnet-ablate show STUDY` lists")


def _store_options(args: argparse.Namespace) -> str:
    """The --storage / --runs-dir a run was given, for the commands its messages suggest: without
    them those commands would look in the default runs folder."""
    import shlex

    if args.storage:
        return f" --storage {shlex.quote(args.storage)}"
    return f" --runs-dir {shlex.quote(str(args.runs_dir))}" if args.runs_dir else ""


def _print_plan(spec, planned, fmt: str = "table") -> int:
    if spec.sampler != "grid":
        print(f"{spec.source}: the {spec.sampler} sampler chooses trials as it goes; "
              f"budget: {spec.budget.trials or 'no'} trials, {spec.budget.minutes or 'no'} minutes")
        return 0
    swept = list(spec.space)
    if fmt != "table":  # exact values for scripts: one record per trial
        import pandas as pd

        from .results import write_frame

        frame = pd.DataFrame([{**{n: p.params[n] for n in swept}, "seed": p.seed,
                               "arch": p.arch.name, "params": p.params_count,
                               "gflops": p.gflops, "train_tflops": p.train_tflops,
                               "status": p.status} for p in planned])
        print(write_frame(frame, fmt))
        return 0
    header = [*swept, "seed", "arch", "params (M)", "GFLOPs", "train TFLOPs", "status"]
    rows = [[*(str(p.params[n]) for n in swept), str(p.seed), p.arch.name,
             f"{p.params_count / 1e6:.3f}", f"{p.gflops:.4f}", f"{p.train_tflops:.2f}", p.status]
            for p in planned]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))
    pending = [p for p in planned if p.status == "pending"]
    replicas = spec.resources.replica_count
    each = f"{spec.train.epochs} epochs each" + (
        f", each a data-parallel run of {replicas} replicas" if replicas > 1 else "")
    print(f"{len(planned)} trials: {len(pending)} to run, costing "
          f"{sum(p.train_tflops for p in pending):.2f} TFLOPs of training ({each})")
    from .study.costs import StudyCosts

    for line in StudyCosts(spec).dry_run_notes(len(pending)):
        print(line)
    return 0


# ----------------------------------------------------------------------------------------------
# Query commands: read a study's storage (finished or running); each is one call into
# resnet_ablate.results / plots / report. A lookup problem is one line on stderr and exit code 2.


def _query(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def guarded(args: argparse.Namespace) -> int:
        from .results import ResultsError
        from .storage import StudyNameError

        try:
            return fn(args)
        except ResultsError as error:
            print(f"resnet-ablate {args.command}: error: {error}", file=sys.stderr)
            return 2
        except StudyNameError as error:  # a name that would become a path or URL syntax
            print(f"resnet-ablate {args.command}: error: {error}; a store can also be named by "
                  "the path of its .db file", file=sys.stderr)
            return 2
        except OSError as error:  # writing -o: no permission, no space, ...
            # A failed write (no space: /dev/full) names no file; the path is -o's.
            path = error.filename or getattr(args, "output", None)
            print(f"resnet-ablate {args.command}: error: cannot write {path}: "
                  f"{error.strerror or error}", file=sys.stderr)
            return 2

    return guarded


def _load(args: argparse.Namespace):
    from .results import load

    results = load(args.study, storage=args.storage, runs_dir=args.runs_dir)
    selected = results.where(args.where)
    if args.where and selected.trials.empty and not results.trials.empty:
        print(f"resnet-ablate: --where {args.where!r} matched none of the study's "
              f"{len(results.trials)} trials", file=sys.stderr)
    return selected


SQLITE_MAGIC = b"SQLite format 3\x00"


def _check_output(output: str, force: bool) -> None:
    """Refuse to write over a file unless forced, and over a SQLite database (a study's store,
    whatever the path that names it) ever: results are never lost to an export."""
    from .results import ResultsError
    from .storage import file_in_the_way

    path = Path(output)
    if path.is_dir():
        raise ResultsError(f"-o {output}: is a folder; name a file to write")
    blocking = file_in_the_way(path)
    if blocking is not None:
        raise ResultsError(f"-o {output}: {blocking} is a file, not a folder; name a file in a "
                           "folder")
    if not path.is_file():
        return  # nothing there yet, or a device such as /dev/null
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as error:
        raise ResultsError(f"-o {output}: cannot read it to check what it is ({error.strerror})") \
            from None
    if head == SQLITE_MAGIC:
        raise ResultsError(f"-o {output}: is a SQLite database (a study's store?); "
                           "refusing to write over it, --force or not")
    if not force:
        raise ResultsError(f"-o {output}: exists; pass --force to replace it")


def _emit(frame, args: argparse.Namespace) -> int:
    from .results import write_frame

    text = write_frame(frame, getattr(args, "format", "table"))
    output = getattr(args, "output", None)
    if output:
        _check_output(output, args.force)
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text(text if text.endswith("\n") else text + "\n")
        print(f"wrote {output}", file=sys.stderr)
    else:
        print(text.rstrip("\n"))
    return 0


def _names(text: str | None) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] if text else None


@command("ls")
@_query
def _ls(args: argparse.Namespace) -> int:
    from .results import list_studies

    return _emit(list_studies(args.storage, runs_dir=args.runs_dir), args)


SHOW_COLUMNS = ("number", "state", "seed", "params", "flops", "test_error", "train_error",
                "epochs", "wall_seconds", "images_per_second", "failure")


@command("show")
@_query
def _show(args: argparse.Namespace) -> int:
    results = _load(args)
    if results.trials.empty and not args.where:
        raise _empty(results)
    frame = results.sorted_by(_names(args.sort))
    columns = _names(args.columns)
    if columns is None:
        columns = ["number", "state", *results.swept, *SHOW_COLUMNS[2:]] if args.format == "table" \
            else list(frame.columns)
    results.check_columns(columns)
    return _emit(frame[list(dict.fromkeys(columns))], args)


def _empty(results):
    from .results import ResultsError

    return ResultsError(f"study {results.study!r} in {results.storage} has no trials yet")


@command("export")
@_query
def _export(args: argparse.Namespace) -> int:
    results = _load(args)
    if results.trials.empty and not args.where:
        raise _empty(results)
    frame = results.curves() if args.what == "curves" else results.sorted_by(_names(args.sort))
    return _emit(frame, args)


@command("summary")
@_query
def _summary(args: argparse.Namespace) -> int:
    table = _load(args).summary(by=_names(args.by), metric=args.metric)
    return _emit_statistics(table, args)


def _emit_statistics(table, args: argparse.Namespace) -> int:
    """A table of statistics as `_emit` writes it, its methods and notes under it."""
    code = _emit(table, args)
    _footnotes(table)
    return code


def _footnotes(table) -> None:
    """How the table's intervals were made and what each row's note says, on stderr so that a
    table on stdout stays a table (CSV and JSON carry them as columns)."""
    from .results import footnotes

    for line in footnotes(table):
        print(line, file=sys.stderr)


@command("compare")
@_query
def _compare(args: argparse.Namespace) -> int:
    table = _load(args).compare(args.factor, args.baseline, metric=args.metric)
    return _emit_statistics(table, args)


@command("effects")
@_query
def _effects(args: argparse.Namespace) -> int:
    results = _load(args)
    table = results.importance(args.metric) if args.importance else results.effects(args.metric)
    return _emit_statistics(table, args)


@command("pareto")
@_query
def _pareto(args: argparse.Namespace) -> int:
    table = _load(args).pareto(_names(args.objectives), over=args.over)
    return _emit_statistics(table, args)


@command("plot")
@_query
def _plot(args: argparse.Namespace) -> int:
    from .plots import save_plot

    _check_output(args.output, args.force)
    path = save_plot(_load(args), args.kind, args.output)
    print(f"wrote {path}", file=sys.stderr)
    return 0


@command("report")
@_query
def _report(args: argparse.Namespace) -> int:
    from .report import write_report

    _check_output(args.output, args.force)
    path = write_report(_load(args), args.output, responses=not args.no_responses)
    print(f"wrote {path}", file=sys.stderr)
    return 0


@command("convert-imagenet")
def _convert_imagenet(args: argparse.Namespace) -> int:
    from .data.imagenet_layout import convert_imagenet

    try:
        done = convert_imagenet(args.root, args.out, val_labels=args.val_labels, to=args.to,
                                shard_size=args.shard_size)
    except (OSError, ValueError) as error:
        print(f"resnet-ablate: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {done.train_images} training and {done.val_images} validation images of "
          f"{done.classes} classes as {done.to} under {done.out}; a spec reads them with:")
    print("\n".join(done.spec_lines()))
    return 0


def _add_convert_command(sub) -> None:
    convert = sub.add_parser("convert-imagenet", help="ILSVRC's layout (train/<wnid>/, a flat "
                             "val/ and its label file) as class folders or tar shards")
    convert.add_argument("root", help="the folder holding train/<wnid>/ and val/")
    convert.add_argument("out", help="a new (or empty) folder to write into")
    convert.add_argument("--val-labels", help="val/'s label file, relative to ROOT unless "
                         "absolute: 'filename label' lines, or the devkit's "
                         "ILSVRC2012_validation_ground_truth.txt (with meta.mat beside it)")
    convert.add_argument("--to", choices=("folders", "shards"), default="folders",
                         help="class folders of hard links (default), or webdataset tar shards")
    convert.add_argument("--shard-size", type=int, default=1000, help="images a shard")


def _add_query_commands(sub) -> None:
    def query(name: str, help_text: str, *, study: bool = True, table: bool = True):
        parser = sub.add_parser(name, help=help_text)
        if study:
            parser.add_argument("study", help="the study's name (spec key `study`)")
        parser.add_argument("--storage", type=_storage_url, help="an Optuna storage URL "
                            "(default: sqlite:///RUNS_DIR/STUDY.db)")
        parser.add_argument("--runs-dir", help="where `run` put the study (default: "
                            "$RESNET_ABLATE_RUNS, else ./runs)")
        if study:
            parser.add_argument("--where", help="only trials matching a filter: columns compared "
                                                "with values, in [..], and/or/not, e.g. "
                                                "\"depth == 20 and shortcut == 'A'\"")
        if table:
            parser.add_argument("--format", choices=("table", "csv", "json"), default="table",
                                help="aligned table with units (default), or exact csv / json")
            parser.add_argument("-o", "--output", help="write to this file instead of stdout")
        parser.add_argument("--force", action="store_true",
                            help="let -o replace an existing file (never a study's store)")
        return parser

    query("ls", "studies in a storage (or in every RUNS_DIR/*.db) with trial counts by state",
          study=False)
    show = query("show", "the trials of a study as a table")
    show.add_argument("--sort", help="columns to sort by, comma-separated; --sort=-name for descending")
    show.add_argument("--columns", help="columns to show, comma-separated (default: the usual ones)")
    export = query("export", "every column of every trial (or the per-epoch curves), exactly")
    export.set_defaults(format="csv")
    export.add_argument("--what", choices=("trials", "curves"), default="trials")
    export.add_argument("--sort", help="columns to sort by, comma-separated")
    summary = query("summary", "mean, std and 95%% CI of the test error over seeds per configuration")
    summary.add_argument("--by", help="columns to group by, comma-separated (default: the swept ones)")
    summary.add_argument("--metric", default="test_error", help=_metric_help())
    compare = query("compare", "paired differences against a baseline level, with CI and p-value")
    compare.add_argument("--factor", required=True, help="the swept column to compare, e.g. shortcut")
    compare.add_argument("--baseline", required=True, help="the level to compare against, e.g. A")
    compare.add_argument("--metric", default="test_error", help=_metric_help())
    effects = query("effects", "main effects and two-factor interactions of every swept factor, "
                               "with CI and p-value")
    effects.add_argument("--metric", default="test_error", help=_metric_help())
    effects.add_argument("--importance", action="store_true",
                         help="instead: each factor's share of the metric's variance over the "
                         "trials (Optuna's fANOVA; no interval)")
    pareto = query("pareto", "the non-dominated configurations (means over seeds) or trials")
    pareto.add_argument("--objectives", default="test_error,flops",
                        help="comma-separated (default: test_error,flops)")
    pareto.add_argument("--over", choices=("configurations", "trials"), default="configurations",
                        help="configurations: their means over seeds, with intervals (default); "
                        "trials: single trials")
    plot = query("plot", "draw one of the paper's figures as a PNG", table=False)
    plot.add_argument("--kind", required=True, choices=("curves", "depth", "pareto", "responses"))
    plot.add_argument("-o", "--output", required=True, help="the PNG file to write")
    report = query("report", "one self-contained HTML page: tables, comparisons, plots", table=False)
    report.add_argument("-o", "--output", required=True, help="the HTML file to write")
    report.add_argument("--no-responses", action="store_true",
                        help="leave out Fig. 7 (it reloads every trained model)")


def _storage_url(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give an Optuna storage URL such as "
                                         "sqlite:///runs/mine.db, or leave --storage out for "
                                         "RUNS_DIR/STUDY.db")
    return text


def _positive_int(text: str) -> int:
    from .spec import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of workers: give an int from "
                                         f"1 to {MAX_WORKERS}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="resnet-ablate", description="Architecture ablations of residual networks.")
    parser.add_argument("--version", action="version", version=f"resnet-ablate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run (or resume) the study a spec describes")
    run.add_argument("spec", help="a study spec, e.g. studies/quickstart.yaml")
    run.add_argument("--address", help="an existing Ray cluster (ray://HOST:10001 or HOST:6379)")
    run.add_argument("--storage", type=_storage_url,
                     help="an Optuna storage URL (default: sqlite under --runs-dir)")
    run.add_argument("--workers", type=_positive_int, help="trials at once (default: the spec's)")
    run.add_argument("--runs-dir", help="default storage and trained weights (default: "
                     "$RESNET_ABLATE_RUNS, else ./runs)")
    run.add_argument("--dry-run", action="store_true",
                     help="list the trials with their FLOPs and cost; train nothing")
    run.add_argument("--format", choices=("table", "csv", "json"), default="table",
                     help="how --dry-run prints its plan (csv and json: exact values)")
    run.add_argument("--no-weights", action="store_true", help="do not keep trained weights")
    run.add_argument("--quiet", action="store_true", help="no progress display")
    run.add_argument("--allow-pipe-urls", action="store_true",
                     help="let the spec's `pipe:` shard URLs run their shell command (only for "
                     "a spec you trust; refused without this flag)")
    _add_query_commands(sub)
    _add_convert_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .arch import ArchError
    from .spec import SpecError
    from .study import ClusterError, StoreError, StudyBusy, StudyConflict

    from .study.signals import StopRequested, raise_on_stop

    args = build_parser().parse_args(argv)
    try:
        # Ctrl-C and SIGTERM raise once where they land, outside the study's own run (which
        # notes them and stops at a safe point); a second one cannot cut the first one's
        # handling short.
        with raise_on_stop():
            return COMMANDS[args.command](args)
    except (SpecError, ArchError, StudyConflict, StudyBusy, ClusterError, StoreError) as error:
        print(f"resnet-ablate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # before or after the study's own loop: nothing running
        by_sigterm = isinstance(stop, StopRequested)
        return _stopped(by_sigterm, f"resnet-ablate: interrupted by "
                                    f"{'SIGTERM' if by_sigterm else 'Ctrl-C'}")


def _stopped(by_sigterm: bool, message: str) -> int:
    """The exit code of a stopped command, after its one line on stderr. Further Ctrl-C or
    SIGTERM are ignored from here on: the process is on its way out, and one arriving now would
    only interrupt Ray's shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(message, file=sys.stderr, flush=True)
    return 143 if by_sigterm else 130


if __name__ == "__main__":
    sys.exit(main())
