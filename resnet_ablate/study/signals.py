"""How a running study hears Ctrl-C and SIGTERM, and keeps its clean-up from being cut short."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequested(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C while a study runs."""


class StopSignals:
    """Which stop signal a running study has heard, if any (SIGINT or SIGTERM)."""

    def __init__(self) -> None:
        self.heard: str | None = None

    def raise_if_heard(self) -> None:
        """Stop here, as the signal heard asks: Ctrl-C as KeyboardInterrupt, SIGTERM as
        StopRequested."""
        if self.heard == "SIGTERM":
            raise StopRequested("SIGTERM")
        if self.heard == "SIGINT":
            raise KeyboardInterrupt


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Within: Ctrl-C and SIGTERM are noted, and the driver's loop stops on its next turn (trials
    marked, storage consistent). A note, not an exception raised wherever the signal lands: one
    raised inside a library's clean-up callback is swallowed there, and one raised in the middle
    of an import (the first FLOPs count imports half of torch) comes out as another error. A
    second Ctrl-C before the loop has stopped interrupts at once, for a driver stuck elsewhere."""
    heard = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return

    def on_sigint(signum: int, frame: object) -> None:
        if heard.heard is not None:
            raise KeyboardInterrupt
        heard.heard = "SIGINT"

    def on_sigterm(signum: int, frame: object) -> None:
        heard.heard = heard.heard or "SIGTERM"

    previous = signal.signal(signal.SIGINT, on_sigint), signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield heard
    finally:
        signal.signal(signal.SIGINT, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within: a second Ctrl-C or SIGTERM waits, so that the clean-up it would cut short (marking
    every unfinished trial) completes; it is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)
