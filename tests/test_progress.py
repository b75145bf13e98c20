"""The study's progress line where it is not a terminal (a job log): a line each time the counts
change, and, while only the running trials' epochs move, one a minute at most."""

from __future__ import annotations

import io

from resnet_ablate import progress


def test_a_log_shows_epochs_moving_once_a_minute_and_every_change_of_the_counts(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    line = progress.StudyProgress("imagenet", stream=log)
    assert not line.live

    def update(done: int, epochs: str, after: float) -> None:
        clock[0] += after
        line.update(done=done, running=1, failed=0, remaining=3 - done, best=None,
                    eta_seconds=None, epochs=epochs)

    update(0, " (epochs 0/120)", 1)
    update(0, " (epochs 1/120)", 30)  # within the minute: not yet
    update(0, " (epochs 2/120)", 31)  # a minute since the last line
    update(0, " (epochs 2/120)", 120)  # nothing moved
    update(1, " (epochs 0/120)", 1)  # a trial done: at once
    printed = log.getvalue().splitlines()
    assert [text.split(" | ")[1] for text in printed] == [
        "running 1 (epochs 0/120)", "running 1 (epochs 2/120)", "running 1 (epochs 0/120)"]
    assert printed[-1].startswith("[imagenet] done 1")
