"""`resnet-ablate run`: run (or resume) a study, or print its plan with `--dry-run`."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .arguments import positive_int, storage_url, store_options
from .output import print_footnotes
from .registry import command, stopped

if TYPE_CHECKING:
    from ..study import RunSummary, StudyRunner


@command("run")
def _run(args: argparse.Namespace) -> int:
    from ..spec import load_spec
    from ..storage import runs_folder
    from ..study import RunOptions, StudyRunner, run_study

    if args.allow_pipe_urls:  # before Ray starts: its local workers inherit the environment
        import os

        from ..data.shard_urls import ALLOW_PIPE_URLS_ENV

        os.environ[ALLOW_PIPE_URLS_ENV] = "1"
    spec = load_spec(args.spec)
    options = RunOptions(address=args.address, storage=args.storage, workers=args.workers,
                         runs_dir=runs_folder(args.runs_dir), keep_weights=not args.no_weights,
                         progress=not args.quiet)
    if args.dry_run:
        return _dry_run(StudyRunner(spec, options), args.format)
    if args.format != "table":
        print("resnet-ablate run: error: --format applies to --dry-run; a run prints a table, "
              f"and `resnet-ablate export {spec.study}{store_options(args)} --format {args.format}` "
              "writes its trials", file=sys.stderr)
        return 2
    # The driver's own torch work (FLOPs, costs) in one thread: OpenMP threads would hold the
    # stop signals open, which signals_held blocks in the main thread alone, and one took a
    # SIGTERM while Ray's shutdown had set its handler back to the default: the driver was killed
    # without a word. (This process is the command's: nothing else here wants more threads.)
    import torch

    torch.set_num_threads(1)
    summary = run_study(spec, options)
    print(f"study {summary.study}: {summary.completed} completed, {summary.failed} failed, "
          f"{summary.pruned} pruned this run in {summary.wall_seconds:.1f} s; "
          f"storage {summary.storage}; all trials by state: {summary.counts_by_state}")
    if summary.interrupted:
        from ..study.loop import stop_description

        marked = (f"{summary.marked_interrupted} unfinished trial(s) marked interrupted; run "
                  "the same command to resume (they run again)") if summary.marked_interrupted \
            else "no trial was running; run the same command to go on with any left to run"
        return stopped(summary.interrupted, "resnet-ablate run: interrupted by "
                       f"{stop_description(summary.interrupted)}: {marked}")
    return _ended(args, summary, grid=spec.sampler == "grid")


def _ended(args: argparse.Namespace, summary: RunSummary, grid: bool) -> int:
    """A run that ended by itself: its table, or the error where nothing completed."""
    from ..results.report import summary_with_training_error
    from ..results import load

    results = load(summary.study, storage=summary.storage)
    if summary.launched and not summary.completed and not summary.pruned:
        print(f"resnet-ablate run: error: none of the {summary.launched} trials launched completed"
              f"{_last_failure(results)}; see `resnet-ablate show {summary.study}"
              f"{store_options(args)} --columns number,state,failure`", file=sys.stderr)
        return 1
    if not summary.launched and not len(results.completed()):
        where = "`resnet-ablate run SPEC --dry-run` lists each point's status" if grid \
            else "the line above says which"
        print(f"resnet-ablate run: error: nothing was trained, and study {summary.study} has "
              f"no completed trial: {_ended_for_good(results)} ({where}; `resnet-ablate show "
              f"{summary.study}{store_options(args)} --columns number,state,failure` says why "
              "each ended)", file=sys.stderr)
        return 1
    if len(results.completed()):
        table = summary_with_training_error(results)
        print(results.format_table(table))
        print_footnotes(table)
    return 0


def _ended_for_good(results) -> str:
    """How a study's trials ended where a run found nothing left to train: the trials that
    failed for good, by kind (a diverged trial is not retried: the second run of a study whose
    every trial diverged said every configuration "may be over budget or given up"; an audit)."""
    from ..results.left_out import failure_kinds

    trials = results.trials
    failed = trials[trials["state"] == "FAIL"]
    ended = [f"{len(failed)} failed ({failure_kinds(failed)})"] if len(failed) else []
    ended += [f"{n} {state.lower().replace('_', ' ')}" for state, n in
              trials.loc[trials["state"] != "FAIL", "state"].value_counts().items()]
    if not ended:
        return "every configuration may be over budget.max_gflops or given up after max_attempts"
    return (f"its trials ended for good ({', '.join(ended)}): diverged and over-budget trials "
            "are not run again, nor one given up after max_attempts")


def _last_failure(results) -> str:
    """The newest failed trial's reason, as a clause ("" where none was recorded): what a user
    whose every trial failed needs first."""
    failed = results.trials[results.trials["state"] == "FAIL"].dropna(subset=["failure"])
    if failed.empty:
        return ""
    row = failed.sort_values("number").iloc[-1]
    return f"; the last failure (trial {row['number']}): {str(row['failure']).splitlines()[0]}"


def _dry_run(runner: StudyRunner, fmt: str) -> int:
    """The plan (a grid's trials, or what a sampler's budget allows), then what a user checks
    before training: the data set found, and GPUs this machine lacks (noted: the plan may be
    for another machine; a run here is refused)."""
    spec = runner.spec
    if spec.sampler == "grid":
        planned = runner.plan()
        if fmt != "table":
            return _print_plan_records(spec, planned, fmt)
        _print_plan(spec, planned)
    else:
        runner.costs.check_dataset()
        _print_sampler_budget(spec, runner.trials_left(), runner.nothing_to_draw())
    print(runner.costs.data_note())
    shortfall = runner.gpu_shortfall()
    if shortfall is not None:
        print(f"note: {shortfall}: `run` is refused here; run it on a machine that has them, or "
              "with --address of a Ray cluster that has them")
    # The warning `run` prints here, where it would run here: seen with the plan.
    crowded = runner.oversubscription() if shortfall is None else None
    if crowded:
        print(crowded)
    if spec.sampler == "grid":
        _print_estimate(runner, planned)
    return 0


def _print_sampler_budget(spec, left: float, nothing_to_draw: str | None) -> None:
    """A sampler's dry run: what its budget still allows, where it can list no trials, and
    where its space has nothing left to train, why (it said what the budget allowed, and the
    run then ended at once: an audit)."""
    trials = spec.budget.trials
    if trials is None:
        allowed = "no trial limit"
    elif left >= trials:
        allowed = f"{trials} trials"
    else:  # a resumed study: what the next run may still train
        allowed = (f"{trials} trials, {trials - int(left)} counted in study {spec.study}, "
                   f"{max(0, int(left))} left")
    minutes = f"{spec.budget.minutes:g} minutes a run" if spec.budget.minutes else "no time limit"
    print(f"{spec.source}: the {spec.sampler} sampler chooses trials as it goes, so a dry run "
          f"lists none and estimates no time (a grid's lists each trial); budget: {allowed}, "
          f"{minutes}")
    if nothing_to_draw is not None:
        print(f"{spec.source}: nothing left to train: {nothing_to_draw}")


def _print_plan_records(spec, planned, fmt: str) -> int:
    """A grid's plan as exact values for scripts: one record per trial, nothing else."""
    import pandas as pd

    from ..results import write_frame

    swept = list(spec.space)
    frame = pd.DataFrame([{**{n: p.params[n] for n in swept}, "seed": p.seed,
                           "arch": p.arch.name, "params": p.params_count, "gflops": p.gflops,
                           "train_tflops": p.train_tflops, "status": p.status} for p in planned])
    print(write_frame(frame, fmt))
    return 0


def _print_plan(spec, planned) -> None:
    swept = list(spec.space)
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
    epochs = spec.train.epochs
    each = f"{epochs} epoch{'' if epochs == 1 else 's'} each" + (
        f", each a data-parallel run of {replicas} replicas" if replicas > 1 else "")
    print(f"{len(planned)} trials: {len(pending)} to run, costing "
          f"{sum(p.train_tflops for p in pending):.2f} TFLOPs of training ({each})")


def _print_estimate(runner: StudyRunner, planned) -> None:
    """A grid's advice on packing and stacking, then its time on this machine."""
    from ..study.estimate import estimate_time
    from ..study.space import point_key

    pending = [p for p in planned if p.status == "pending"]
    for line in runner.costs.dry_run_notes([point_key(p.params, 0) for p in pending]):
        print(line)
    estimate = estimate_time(runner.spec, planned, runner.workers,
                             cluster=bool(runner.options.address),
                             announce=lambda line: print(line, file=sys.stderr, flush=True))
    print(estimate if isinstance(estimate, str) else estimate.line(len(pending)))


def add_run_command(sub) -> None:
    run = sub.add_parser("run", help="run (or resume) the study a spec describes")
    run.add_argument("spec", help="a study spec, e.g. studies/quickstart.yaml")
    run.add_argument("--address", help="an existing Ray cluster (ray://HOST:10001 or HOST:6379)")
    run.add_argument("--storage", type=storage_url,
                     help="an Optuna storage URL (default: sqlite under --runs-dir)")
    run.add_argument("--workers", type=positive_int, help="trials at once (default: the spec's)")
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
