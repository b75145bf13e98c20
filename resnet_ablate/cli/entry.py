"""The entry point: the parser of every command, and `main`, which runs the one asked for and
turns the errors a user can fix into one line on stderr and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import difflib
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from .convert import add_convert_command
from .query import add_query_commands
from .registry import COMMANDS, stopped
from .run import add_run_command


class _OneLineParser(argparse.ArgumentParser):
    """An argument error in one line, as every other error of the command (argparse prints the
    whole usage first); the subcommands' parsers are of this class too."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        """As argparse's, but an argument the command does not know is the command's error,
        naming its nearest option (argparse hands it up to `resnet-ablate`, which names
        neither the command nor what it takes)."""
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            subcommands = getattr(self, "subcommands", {})
            command = subcommands.get(getattr(parsed, "command", None), self)
            command.error(f"unrecognized argument{'s' if len(unknown) > 1 else ''}: "
                          f"{' '.join(unknown)}{_nearest_option(unknown, command)}")
        return parsed


def _nearest_option(unknown: list[str], parser: argparse.ArgumentParser) -> str:
    """"; did you mean --sort?" for the first unknown option close to one `parser` takes."""
    options = [o for action in parser._actions for o in action.option_strings]
    for argument in (a.split("=", 1)[0] for a in unknown if a.startswith("-")):
        close = difflib.get_close_matches(argument, options, n=1, cutoff=0.8)
        if close:
            return f"; did you mean {close[0]}?"
    return ""


# The toolkit's own warnings are said in a line, as its errors are; others keep Python's form.
_PACKAGE = str(Path(__file__).resolve().parent.parent)


@contextlib.contextmanager
def _warnings_in_one_line() -> Iterator[None]:
    """The toolkit's warnings (what an image folder leaves out, say) as `resnet-ablate: warning:
    ...`, without the file, line and source line that Python's form adds."""
    python_form = warnings.formatwarning

    def one_line(message, category, filename, lineno, line=None):
        if str(filename).startswith(_PACKAGE) and issubclass(category, UserWarning):
            return f"resnet-ablate: warning: {message}\n"
        return python_form(message, category, filename, lineno, line)

    warnings.formatwarning = one_line
    try:
        yield
    finally:
        warnings.formatwarning = python_form


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _OneLineParser(
        prog="resnet-ablate", description="Architecture ablations of residual networks.")
    parser.add_argument("--version", action="version", version=f"resnet-ablate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    add_run_command(sub)
    add_query_commands(sub)
    add_convert_command(sub)
    parser.subcommands = sub.choices  # where an unknown argument is reported (parse_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # A Ctrl-C while the toolkit's modules load (half a second, before its own handlers are
        # in place) came out as a traceback: nothing has started yet.
        print("resnet-ablate: interrupted by Ctrl-C", file=sys.stderr)
        return 130


def _main(argv: Sequence[str] | None) -> int:
    from ..arch import ArchError
    from ..spec import SpecError
    from ..study import ClusterError, StoreError, StudyBusy, StudyConflict

    from ..study.signals import heard_in, raise_on_stop

    args = build_parser().parse_args(argv)
    try:
        # Ctrl-C, SIGTERM and SIGHUP raise once where they land, outside the study's own run (which
        # notes them and stops at a safe point); a second one cannot cut the first one's
        # handling short.
        with raise_on_stop(), _warnings_in_one_line():
            return COMMANDS[args.command](args)
    except (SpecError, ArchError, StudyConflict, StudyBusy, ClusterError, StoreError) as error:
        print(f"resnet-ablate: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:  # before or after the study's own loop: nothing running
        heard = heard_in(stop)
        return stopped(heard, f"resnet-ablate: interrupted by "
                              f"{'Ctrl-C' if heard == 'SIGINT' else heard}")
