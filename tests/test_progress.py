"""The study's progress line where it is not a terminal (a job log): a line each time the counts
change, and, while only the running trials' epochs move, one a minute at most."""

from __future__ import annotations

import io

import numpy as np
import pytest

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


class _HungUp(io.StringIO):
    """A terminal that has hung up: every write fails with EIO, as a closed pty's does."""

    def isatty(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise OSError(5, "Input/output error")


def test_a_terminal_that_hung_up_stops_the_display_not_the_run():
    """After SIGHUP the study's stop must still mark its trials and exit 129: a progress write
    that raised on the closed terminal skipped the stop or ended in a traceback."""
    line = progress.StudyProgress("hup", stream=_HungUp())
    assert line.live
    line.update(done=0, running=1, failed=0, remaining=1, best=None, eta_seconds=None)
    assert not line.enabled  # given up at the first failed write
    line.log("a trial failed")
    line.close()


def test_the_eta_counts_the_work_left_not_the_trials_left():
    """The degradation study's ETA said six minutes after two ResNet-20 trials, with ResNet-110s
    to come: the time per trial times the trials left. The work left (FLOPs x epochs) at the rate
    ended trials did theirs, by hand: a 20-layer trial (41 MFLOPs x 10 epochs) took 10 s; left
    are a pending 110-layer trial and a running one 5 of 10 epochs in (253 MFLOPs each), on 2
    workers: (2530 + 1265) MFLOP-epochs at 41 a second, shared by 2 workers: 46 s, not 10."""
    from helpers import raw_spec

    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study.eta import RemainingTime

    spec = parse_spec(raw_spec("eta", epochs=10, space={"depth": [20, 110]}, model={}))
    flops = {20: 41e6, 110: 253e6}

    class Costs:
        def profile(self, arch):
            return type("Profile", (), {"flops": flops[arch.depth]})()

    eta = RemainingTime(spec, Costs(), workers=2)
    shallow, deep = ResNetArch(depth=20), ResNetArch(depth=110)
    half_done = (deep, 5, 253e6 * 5 / (41e6 * 10 / 10.0))  # as long as half its work takes
    assert eta.seconds_left([deep], [half_done], unknown=0) is None  # nothing ended yet
    eta.ended(shallow, seconds=10.0, epochs_trained=10)
    rate = 41e6 * 10 / 10.0  # work per second of one worker
    expected = (253e6 * 10 + 253e6 * 5) / rate / 2
    left = eta.seconds_left([deep], [half_done], unknown=0)
    # Far from the trials-left estimate (10 s x 2 trials / 2 workers = 10 s).
    assert left == pytest.approx(expected) and left > 4 * 10.0
    # A trial the sampler has yet to choose counts as the mean ended trial's work.
    assert eta.seconds_left([], [], unknown=3) == pytest.approx(3 * 41e6 * 10 / rate / 2)


def test_the_eta_fits_the_time_a_trial_takes_whatever_its_work_once_ended_trials_differ():
    """Small trials spend most of their time where FLOPs do not count (the process's start, the
    data, per-step costs): a study's trials took 21-94 s for 11x the work, and an ETA from the
    work alone said twice the time left. Trials here take 30 s plus 1 s per 1e8 FLOP-epochs
    (noise of sd 2 s, seeded); the ETA of the ones left, once a ResNet-20 and a ResNet-110 have
    ended, is within 5% of the truth, where the work alone would be 1.5x it or more."""
    from helpers import raw_spec

    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study.eta import RemainingTime

    spec = parse_spec(raw_spec("eta", epochs=10, space={"depth": [20, 110]}, model={}))
    flops = {20: 41e6, 110: 253e6}

    class Costs:
        def profile(self, arch):
            return type("Profile", (), {"flops": flops[arch.depth]})()

    def seconds(arch, epochs=10):
        return 30.0 + flops[arch.depth] * epochs / 1e8

    rng = np.random.default_rng(0)
    shallow, deep = ResNetArch(depth=20), ResNetArch(depth=110)
    eta = RemainingTime(spec, Costs(), workers=2)
    # The first trial of each of the 2 workers also started it (15 s more): left out of the fit
    # once 4 have ended.
    for number, arch in enumerate((shallow, shallow, shallow, shallow, deep, deep)):
        eta.ended(arch, seconds=seconds(arch) + rng.normal(0, 2) + 15.0 * (number < 2),
                  epochs_trained=10)
    fixed, per_work = eta.time_model()
    assert fixed == pytest.approx(30.0, abs=4) and per_work == pytest.approx(1e-8, rel=0.1)
    # Left: three ResNet-20s and a ResNet-110 pending, a ResNet-110 running 6 of 10 epochs in
    # (its start is behind it), two the sampler has yet to choose (the mean ended trial each).
    pending, running = [shallow, shallow, shallow, deep], [(deep, 6, seconds(deep, 6))]
    mean_trial = np.mean([seconds(a) for a in (shallow, shallow, shallow, deep, deep)])
    truth = (sum(seconds(a) for a in pending) + flops[110] * 4 / 1e8 + 2 * mean_trial) / 2
    found = eta.seconds_left(pending, running, unknown=2)
    assert found == pytest.approx(truth, rel=0.05)
    work_alone = RemainingTime(spec, Costs(), workers=2)
    work_alone.ended(shallow, seconds=seconds(shallow), epochs_trained=10)  # one size: the work
    assert work_alone.time_model() == (0.0, seconds(shallow) / (41e6 * 10))
    assert work_alone.seconds_left(pending, running, unknown=2) > 1.5 * truth
    # Ended trials of nearly one size whose times fall with their work (noise): their mean time
    # each, not a negative rate.
    noisy = RemainingTime(spec, Costs(), workers=1)
    # (The first, which started the worker too, is left out once another has ended.)
    for arch, took in ((ResNetArch(depth=20), 90.0), (ResNetArch(depth=20), 40.0),
                       (ResNetArch(depth=110), 35.0)):
        noisy.ended(arch, seconds=took, epochs_trained=10)
    assert noisy.time_model() == (37.5, 0.0)
    assert noisy.seconds_left([shallow, deep], [], unknown=0) == pytest.approx(75.0)
    # Running trials at their first epochs have their time ahead, not none of it (an audit's
    # last trials, 0 and 1 of 3 epochs done, 4 s in: ETA 0:00), however the time is modelled.
    for model, ran in ((noisy, 4.0), (eta, 4.0)):
        first = [(deep, 0, ran), (shallow, 1, ran)]
        expected = sum(model.time_model()[0] + model.time_model()[1] * model.work(arch) - ran
                       for arch, _, _ in first) / model.workers
        assert model.seconds_left([], first, unknown=0) == pytest.approx(expected)
        assert expected > 20


def test_a_run_bounded_by_time_alone_shows_the_time_left_not_zero_trials_left(monkeypatch):
    """`budget: {minutes: ...}` and no count of trials: the line read "remaining 0" and "ETA
    0:00" for the whole run. It shows remaining ? and the time to the budget's end; with a
    count, the count."""
    import math
    from collections import Counter

    from resnet_ablate.study import loop

    monkeypatch.setattr(loop.time, "monotonic", lambda: 1000.0)
    log = io.StringIO()
    driver = loop.DriverLoop.__new__(loop.DriverLoop)  # the line's inputs alone
    driver.running, driver.pending, driver.counts, driver.best = {}, [], Counter(), None
    driver.progress = progress.StudyProgress("timed", stream=log)
    driver.to_ask, driver.deadline = math.inf, 1000.0 + 95
    driver.show_progress()
    assert "remaining ? |" in log.getvalue() and log.getvalue().rstrip().endswith("ETA 1:35")
    driver.to_ask, driver.deadline = 4, math.inf
    driver.remaining_time = type("NoneEnded", (), {"seconds_left": lambda *a, **k: None})()
    driver.show_progress()
    assert log.getvalue().splitlines()[-1].split(" | ")[3] == "remaining 4"


def test_the_live_line_judges_configurations_by_their_means_not_a_lucky_seed():
    """The best so far was the best single trial, its configuration's luckiest seed: here A's
    seed 0 (error 0.10) where B is better on average (0.155 against 0.20); the Pareto count was
    over trials where the front is over configuration means."""
    import optuna

    from helpers import raw_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study.standing import best_so_far

    shortcut = optuna.distributions.CategoricalDistribution(["A", "B", "C"])

    def study(directions, results):
        made = optuna.create_study(directions=directions)
        for level, seed, values in results:
            made.add_trial(optuna.trial.create_trial(
                params={"shortcut": level}, distributions={"shortcut": shortcut}, values=values,
                user_attrs={"seed": seed, "arch_name": f"resnet8-{level}"}))
        return made

    spec = parse_spec(raw_spec("standing", space={"shortcut": ["A", "B", "C"]}))
    one = study(["minimize"], [("A", 0, [0.10]), ("A", 1, [0.30]), ("B", 0, [0.15]),
                               ("B", 1, [0.16])])
    assert best_so_far(spec, one) == "test_error 15.50% (resnet8-B, mean of 2 seeds)"
    assert best_so_far(spec, optuna.create_study()) is None
    # Two objectives, both minimised: by trials, A0 (0.10, 5) and B0 (0.15, 1) are on the
    # front, and C0 (0.12, 3); by means A (0.20, 5) is dominated by C (0.14, 3).
    two = study(["minimize", "minimize"],
                [("A", 0, [0.10, 5.0]), ("A", 1, [0.30, 5.0]), ("B", 0, [0.15, 1.0]),
                 ("B", 1, [0.16, 1.0]), ("C", 0, [0.12, 3.0]), ("C", 1, [0.16, 3.0])])
    spec = parse_spec(raw_spec("standing", space={"shortcut": ["A", "B", "C"]},
                               objectives=["test_error", "params"]))
    assert len(two.best_trials) == 3
    assert best_so_far(spec, two) == "2 on the Pareto front of configuration means"
