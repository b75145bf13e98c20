"""How a running study hears Ctrl-C, SIGTERM and SIGHUP, and keeps its clean-up from being cut
short. SIGHUP (a closed terminal or SSH session) stops a study as SIGTERM does.

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

_STOPS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_NAMES = {signum: signal.Signals(signum).name for signum in _STOPS}


def _stops() -> tuple[int, ...]:
    """The stop signals to handle: SIGHUP only where it is not ignored (`nohup` ignores it, so
    that a run outlives its SSH session: it still does)."""
    if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN:
        return (signal.SIGINT, signal.SIGTERM)
    return _STOPS


class StopRequested(KeyboardInterrupt):
    """SIGTERM or SIGHUP (its name the exception's one argument), turned into the same clean stop
    as Ctrl-C while a study runs."""

    @property
    def signal_name(self) -> str:
        return str(self.args[0]) if self.args else "SIGTERM"


def _exception(heard: str) -> KeyboardInterrupt:
    return KeyboardInterrupt() if heard == "SIGINT" else StopRequested(heard)


def heard_in(stop: KeyboardInterrupt) -> str:
    """The name of the signal a stop exception stands for: SIGINT for a plain Ctrl-C."""
    return stop.signal_name if isinstance(stop, StopRequested) else "SIGINT"


def exit_code(signal_name: str) -> int:
    """A command stopped by `signal_name`'s exit code, as a shell reports one: 128 + its number
    (130 for Ctrl-C, 143 for SIGTERM, 129 for SIGHUP)."""
    return 128 + signal.Signals[signal_name].value


class StopSignals:
    """Which stop signal a running study has heard, if any (SIGINT, SIGTERM or SIGHUP)."""

    def __init__(self) -> None:
        self.heard: str | None = None
        self.stopping = False  # a stop is under way: signals are only noted from now on
        self.settled = False  # the stop is named after `heard`, which no signal changes now
        self._waiting = False  # the driver waits for Ray: a signal may cut the wait short

    def raise_if_heard(self) -> None:
        """Stop here, as the signal heard asks: Ctrl-C as KeyboardInterrupt, SIGTERM and SIGHUP
        as StopRequested."""
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

    def settle(self) -> str | None:
        """The signal the stop is named after (None: none heard), fixed from now on. Handlers
        of signals that came with the one that began the stop run first: Python runs a handler
        left pending after another's exception only at its next explicit check (3.11), which
        pthread_sigmask makes (they only note, the stop being under way)."""
        if threading.current_thread() is threading.main_thread():
            signal.pthread_sigmask(signal.SIG_BLOCK, ())
        self.settled = True
        return self.heard

    def _on_signal(self, signum: int, frame: object) -> None:
        # The first SIGTERM (or SIGHUP) outranks Ctrl-C until the stop is named (`settle`): when
        # both are pending, Python runs the handlers in signal-number order, not in the order
        # they arrived, and SIGTERM's runs only after Ctrl-C's has raised, the stop begun.
        if self.heard is None or (self.heard == "SIGINT" and signum != signal.SIGINT
                                  and not self.settled):
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
    """Within (a whole command): Ctrl-C raises KeyboardInterrupt, SIGTERM and SIGHUP
    StopRequested, where they land, once; a second signal cannot interrupt the handling of the
    first. They are unblocked in the main thread for the while."""
    global _outer
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler, previous_outer = _RaiseOnce(), _outer
    previous = {s: signal.signal(s, handler) for s in _stops()}
    # Blocked by the parent, they would never come: a driver started so (a test harness's thread
    # that held them) ran its study to the end through a SIGHUP.
    mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, set(previous))
    _outer = handler
    try:
        yield
    finally:
        _outer = previous_outer
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopSignals]:
    """Within: Ctrl-C, SIGTERM and SIGHUP are noted, and the driver's loop stops on its next turn
    (trials marked, storage consistent), or at once where it waits for Ray. A note, not an exception
    raised wherever the signal lands: one raised inside a library's clean-up callback is
    swallowed there, one raised in the middle of an import comes out as another error, and one
    raised inside a write leaves the store's connection holding its lock."""
    heard = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield heard
        return
    previous = {s: signal.signal(s, heard._on_signal) for s in _stops()}
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
    """Within: the stop signals wait, so that the clean-up they would cut short (marking
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


@contextlib.contextmanager
def handlers_kept() -> Iterator[None]:
    """Within: code that sets the stop signals' handlers back to the default at the C level
    behind Python's back (Ray's shutdown does, for SIGTERM): they are installed again after it,
    so a signal that arrives next is still handled (it killed the driver without a word)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {s: signal.getsignal(s) for s in _STOPS}
    try:
        yield
    finally:
        for s, handler in handlers.items():
            if handler is not None:  # None: installed outside Python, nothing of ours to keep
                signal.signal(s, handler)


def _drop_pending() -> None:
    """Consume the stop signals waiting behind `signals_held` (call with them held)."""
    while set(_STOPS) & signal.sigpending():
        signal.sigtimedwait(_STOPS, 0)
