"""How a running study hears SIGTERM and keeps its clean-up from being cut short."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class StopRequested(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C while a study runs."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """Within: SIGTERM sets the event the driver's loop checks on each turn, which then stops as
    on Ctrl-C (trials marked, storage consistent). A flag, not an exception raised from the
    handler: one raised inside a library's clean-up callback would be swallowed there."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


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
