"""The entry point: the parser of every command, and `main`, which runs the one asked for and
turns the errors a user can fix into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .convert import add_convert_command
from .query import add_query_commands
from .registry import COMMANDS, stopped
from .run import add_run_command


class _OneLineParser(argparse.ArgumentParser):
    """An argument error in one line, as every other error of the command (argparse prints the
    whole usage first); the subcommands' parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _OneLineParser(
        prog="resnet-ablate", description="Architecture ablations of residual networks.")
    parser.add_argument("--version", action="version", version=f"resnet-ablate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_run_command(sub)
    add_query_commands(sub)
    add_convert_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ..arch import ArchError
    from ..spec import SpecError
    from ..study import ClusterError, StoreError, StudyBusy, StudyConflict

    from ..study.signals import heard_in, raise_on_stop

    args = build_parser().parse_args(argv)
    try:
        # Ctrl-C, SIGTERM and SIGHUP raise once where they land, outside the study's own run (which
        # notes them and stops at a safe point); a second one cannot cut the first one's
        # handling short.
        with raise_on_stop():
            return COMMANDS[args.command](args)
    except (SpecError, ArchError, StudyConflict, StudyBusy, ClusterError, StoreError) as error:
        print(f"resnet-ablate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # before or after the study's own loop: nothing running
        heard = heard_in(stop)
        return stopped(heard, f"resnet-ablate: interrupted by "
                              f"{'Ctrl-C' if heard == 'SIGINT' else heard}")
