"""The command table every command module registers into, how a command whose reader went away
ends, and how a stopped command ends."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import select
import signal
import sys
from collections.abc import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    """Registers a command under `name`, ending it quietly where its output's reader went away."""
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = _quiet_when_reader_gone(fn)
        return fn

    return register


def _quiet_when_reader_gone(fn: Callable[[argparse.Namespace], int]
                            ) -> Callable[[argparse.Namespace], int]:
    """`resnet-ablate ... | head -1`: the reader has what it asked for, and the command's code
    stands (0 where the table was cut short), without a traceback."""
    @functools.wraps(fn)
    def piped(args: argparse.Namespace) -> int:
        code = 0
        try:
            code = fn(args)
            sys.stdout.flush()  # a reader gone early shows here, not at exit
            return code
        except BrokenPipeError:
            if not _reader_gone(sys.stdout):
                raise  # another stream's (stderr's): a failure, not an answer
            # Stdout goes to /dev/null, so that Python's own flush at exit finds nothing to
            # complain of.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return code

    return piped


def _reader_gone(stream) -> bool:
    """Whether `stream` is a pipe whose reader has closed it (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(stream.fileno(), select.POLLOUT)
    except (AttributeError, OSError, ValueError):  # no file descriptor, or no poll here
        return False
    return any(events & select.POLLERR for _, events in poller.poll(0))


def stopped(signal_name: str, message: str) -> int:
    """The exit code of a command stopped by `signal_name` (SIGINT, SIGTERM or SIGHUP), after
    its one line on stderr (where a closed terminal, after SIGHUP, still takes it). Further stop
    signals are ignored from here on: the process is on its way out, and one arriving now would
    only interrupt Ray's shutdown."""
    from ..study.signals import exit_code

    for ignored in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # (SIGHUP may already be)
        signal.signal(ignored, signal.SIG_IGN)
    with contextlib.suppress(OSError):  # the terminal is gone
        print(message, file=sys.stderr, flush=True)
    return exit_code(signal_name)
