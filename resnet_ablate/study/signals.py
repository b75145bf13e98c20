"""How a running study hears Ctrl-C and SIGTERM, and keeps its clean-up from being cut short.

Three regions, whichever rhythm the signals come in (once, twice or five times fast, to the
process or to its process group):
- start-up and the final table (`raise_on_stop`): the first signal raises where it lands (nothing
  is running and no lease is held there), later ones are ignored;
- the driver's run (`stop_on_signals`): the first signal is noted and the loop stops on its next
  turn; a signal cuts short only a wait for Ray (`StopSignals.interruptible`), never a write to the
  store, and at most once: from then on signals are only noted;
- the clean-up (`signals_held`): marking the unfinished trials, releasing the lease and shutting
  Ray down complete with further signals held; those that arrived meanwhile are dropped once the
  stop they repeat has been made.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

_STOPS = (signal.SIGINT, signal.SIGTERM)
_NAMES = {signal.SIGINT: "SIGINT", signal.SIGTERM: "SIGTERM"}


class StopRequested(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C while a study runs."""


def _exception(heard: str) -> KeyboardInterrupt:
    return StopRequested("SIGTERM") if heard == "SIGTERM" else KeyboardInterrupt()


class StopSignals:
    """Which stop signal a running study has heard, if any (SIGINT or SIGTERM)."""

    def __init__(self) -> None:
        self.heard: str | None = None
        self.stopping = False  # a stop is under way: signals are only noted from now on
        self._waiting = False  # the driver waits for Ray: a signal may cut the wait short

    def raise_if_heard(self) -> None:
        """Stop here, as the signal heard asks: Ctrl-C as KeyboardInterrupt, SIGTERM as
        StopRequested."""
        if self.heard is not None:
            self.stopping = True
            raise _exception(self.heard)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within (a wait for Ray, which a sick cluster can make long): a stop signal interrupts
        at once rather than on the loop's next turn."""
        self.raise_if_heard()
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def _on_signal(self, signum: int, frame: object) -> None:
        # SIGTERM outranks Ctrl-C until the stop begins: when both are pending, Python runs the
        # handlers in signal-number order (SIGINT first), not in the order they arrived.
        if self.heard is None or (signum == signal.SIGTERM and not self.stopping):
            self.heard = _NAMES[signum]
        if self._waiting and not self.stopping:
            self.stopping = True
            raise _exception(self.heard)


class _RaiseOnce:
    """The handler outside the driver's run: the first stop signal raises, later ones are
    ignored, and so is every one after the driver's run has already stopped."""

    def __init__(self) -> None:
        self.spent = False

    def __call__(self, signum: int, frame: object) -> None:
        if not self.spent:
            self.spent = True
            raise _exception(_NAMES[signum])


_outer: _RaiseOnce | None = None


@contextlib.contextmanager
def raise_on_stop() -> Iterator[None]:
    """Within (a whole command): Ctrl-C raises KeyboardInterrupt and SIGTERM StopRequested where
    they land, once; a second signal cannot interrupt the handling of the first."""
    global _outer
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler, previous_outer = _RaiseOnce(), _outer
    previous = {s: signal.signal(s, handler) for s in _STOPS}
    _outer = handler
    try:
        yield
    finally:
        _outer = previous_outer
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Within: Ctrl-C and SIGTERM are noted, and the driver's loop stops on its next turn (trials
    marked, storage consistent), or at once where it waits for Ray. A note, not an exception
    raised wherever the signal lands: one raised inside a library's clean-up callback is
    swallowed there, one raised in the middle of an import comes out as another error, and one
    raised inside a write leaves the store's connection holding its lock."""
    heard = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return
    previous = {s: signal.signal(s, heard._on_signal) for s in _STOPS}
    try:
        yield heard
    finally:
        with signals_held():
            for s, h in previous.items():
                signal.signal(s, h)
            if heard.heard is not None:
                _drop_pending()
                if _outer is not None:  # the stop has been made: later signals change nothing
                    _outer.spent = True


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Within: Ctrl-C and SIGTERM wait, so that the clean-up they would cut short (marking
    every unfinished trial, releasing the lease, stopping Ray) completes; they are delivered
    afterwards (dropped where the driver's run already stopped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOPS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _drop_pending() -> None:
    """Consume the stop signals waiting behind `signals_held` (call with them held)."""
    while set(_STOPS) & signal.sigpending():
        signal.sigtimedwait(_STOPS, 0)
