"""The command table every command module registers into, and how a stopped command ends."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = fn
        return fn

    return register


def stopped(by_sigterm: bool, message: str) -> int:
    """The exit code of a stopped command, after its one line on stderr. Further Ctrl-C or
    SIGTERM are ignored from here on: the process is on its way out, and one arriving now would
    only interrupt Ray's shutdown."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    print(message, file=sys.stderr, flush=True)
    return 143 if by_sigterm else 130
