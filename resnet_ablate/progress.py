"""A live one-line display of a running study: done / running / failed / remaining, best so far, ETA.

On a terminal the line is redrawn in place; elsewhere (CI logs, pipes, a cluster's job log) a
line is printed whenever the counts change, and otherwise at most once a minute while the running
trials' epochs move, so long runs always show progress without flooding a log.
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import TextIO


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


# Outside a terminal: how often a line may say only that the running trials' epochs moved (a
# 120-epoch ImageNet trial's log would otherwise read "epochs 0/120" for days).
EPOCHS_LOG_SECONDS = 60.0


class StudyProgress:
    def __init__(self, study: str, *, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.study = study
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self.started = time.monotonic()
        self._last_counts: tuple[int, ...] | None = None
        self._last_epochs, self._last_printed = "", self.started
        self._line = ""

    def update(self, *, done: int, running: int, failed: int, remaining: int | None,
               best: str | None, eta_seconds: float | None, epochs: str = "") -> None:
        """The line; `remaining` None where no count of trials bounds the run (a time budget
        alone), shown as "?"."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        self._line = (
            f"[{self.study}] done {done} | running {running}{epochs} | failed {failed} | "
            f"remaining {'?' if remaining is None else remaining} | best {best or '-'} | "
            f"elapsed {format_seconds(elapsed)} | ETA {format_seconds(eta_seconds)}"
        )
        counts = (done, running, failed, remaining)
        now = time.monotonic()
        if self.live:
            self._write("\r\033[K" + self._line)
        elif counts != self._last_counts or (
                epochs != self._last_epochs and now - self._last_printed >= EPOCHS_LOG_SECONDS):
            self._write(self._line + "\n")
            self._last_epochs, self._last_printed = epochs, now
        self._last_counts = counts

    def log(self, message: str) -> None:
        """A message on its own line, above the live line."""
        if not self.enabled:
            return
        if self.live:
            self._write("\r\033[K" + message + "\n" + self._line)
        else:
            self._write(message + "\n")

    def warn(self, message: str) -> None:
        """A message on its own line even where progress is off (--quiet): what a run could not
        do that the user would otherwise find out only later."""
        if self.enabled:
            self.log(message)
        else:
            with contextlib.suppress(OSError):  # no terminal left to tell
                print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.enabled and self.live:
            self._write("\n")

    def _write(self, text: str) -> None:
        """`text` to the stream; where the stream has gone (a terminal hung up: every write
        fails), progress stops, and the run goes on: the hangup's signal stops it cleanly, and a
        failed write must not skip that stop (trials left running) nor end it in a traceback."""
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:
            self.enabled = False
