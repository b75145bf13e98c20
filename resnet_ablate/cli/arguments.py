"""Argument types and help shared by the commands, and the store options a message repeats."""

from __future__ import annotations

import argparse


def storage_url(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give an Optuna storage URL such as "
                                         "sqlite:///runs/mine.db, or leave --storage out for "
                                         "RUNS_DIR/STUDY.db")
    return text


def positive_int(text: str) -> int:
    from ..spec import MAX_WORKERS

    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count of workers: give an int from "
                                         f"1 to {MAX_WORKERS}")
    return value


def metric_help() -> str:
    from ..record import METRICS

    return (f"the numeric column the statistics are over (default test_error): one of "
            f"{', '.join(METRICS)}, or any numeric column `resnet-ablate show STUDY` lists")


def store_options(args: argparse.Namespace) -> str:
    """The --storage / --runs-dir a run was given, for the commands its messages suggest: without
    them those commands would look in the default runs folder."""
    import shlex

    if args.storage:
        return f" --storage {shlex.quote(args.storage)}"
    return f" --runs-dir {shlex.quote(str(args.runs_dir))}" if args.runs_dir else ""
