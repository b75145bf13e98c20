"""Studies whose grid points train their seeds at once, stacked into one model
(resources.stack_seeds): each seed recorded as the trial it would be alone, the spec's refusals,
and the dry run's count of tasks."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
import torch

from helpers import raw_spec
from resnet_ablate.record import FailureKind, Status
from resnet_ablate.spec import SpecError, parse_spec
from resnet_ablate.study import RunOptions, run_study


def _stack_task(epochs: int):
    """The task of a stack of two seeds (trials 4 and 9) of a ResNet-8 on small synthetic data,
    with weights kept."""
    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.recipe import TrainRecipe
    from resnet_ablate.record import TrialTask

    return TrialTask(
        trial_number=4, arch=ResNetArch(family="cifar", depth=8).to_dict(), seed=0,
        dataset={"name": "synthetic", "synthetic": {"train_size": 64, "test_size": 32}},
        recipe=TrainRecipe(epochs=epochs, batch_size=32).to_dict(), threads=1, use_gpu=False,
        keep_weights=True, stack=((4, 0), (9, 1)))


def _trials_by_point(summary, name):
    trials = optuna.load_study(study_name=name, storage=summary.storage).get_trials()
    return {(t.params["shortcut"], t.user_attrs["seed"]): t for t in trials}


def test_a_study_stacks_each_points_seeds_and_records_each_as_it_would_run_alone(local_ray,
                                                                                tmp_path):
    """3 seeds of 2 grid points with stack_seeds: 3 run as 2 tasks (each point's seeds in one
    process), recorded as 6 trials; each trial's record (curves, final accuracy, weights kept
    apart) is what the same study with each seed alone records for it: the first epoch to
    rounding, the last within the drift training amplifies rounding into."""
    resources = {"cpus": 1, "workers": 2}
    stacked = run_study(parse_spec(raw_spec("stacked", seeds=3, resources={
        **resources, "stack_seeds": 3})), RunOptions(runs_dir=tmp_path, progress=False))
    alone = run_study(parse_spec(raw_spec("alone", seeds=3, resources=resources)),
                      RunOptions(runs_dir=tmp_path, progress=False))
    assert (stacked.completed, stacked.failed, stacked.launched) == (6, 0, 6)
    mine, theirs = _trials_by_point(stacked, "stacked"), _trials_by_point(alone, "alone")
    assert sorted(mine) == sorted(theirs) and len(mine) == 6
    for shortcut in ("A", "none"):
        seeds = [mine[(shortcut, seed)] for seed in range(3)]
        assert len({t.user_attrs["pid"] for t in seeds}) == 1  # one task trained them
        assert all(t.user_attrs["execution"]["stacked_seeds"] == 3 for t in seeds)
    for key, trial in mine.items():
        reference = theirs[key]
        assert reference.user_attrs["execution"]["stacked_seeds"] == 1
        first, then = trial.user_attrs["curves"][0], reference.user_attrs["curves"][0]
        assert first["train_loss"] == pytest.approx(then["train_loss"], rel=1e-4), key
        last, later = trial.user_attrs["curves"][-1], reference.user_attrs["curves"][-1]
        assert last["train_loss"] == pytest.approx(later["train_loss"], rel=3e-2), key
        assert trial.values[0] == pytest.approx(reference.values[0], abs=3 / 64), key
        assert trial.user_attrs["weights"] != reference.user_attrs["weights"]
    # Each seed's weights are its own: kept apart, and different between seeds.
    files = {mine[("A", seed)].user_attrs["weights"] for seed in range(3)}
    assert len(files) == 3
    # The results say which trials were stacked, and with how many seeds.
    from resnet_ablate.results import load

    assert load("stacked", runs_dir=tmp_path).trials["stacked_seeds"].tolist() == [3] * 6
    assert load("alone", runs_dir=tmp_path).trials["stacked_seeds"].tolist() == [1] * 6


@pytest.mark.parametrize("change, words", [
    (dict(sampler="random", budget={"trials": 4}), "stacks the seeds of a grid point"),
    (dict(train={"epochs": 1, "precision": "fp16"}), "without fp16's gradient scaler"),
    (dict(train={"epochs": 1, "compile": True}), "without compile"),
    (dict(dataset={"name": "imagefolder", "root": "x"}), "imagefolder is streamed"),
], ids=["sampler", "fp16", "compile", "streamed"])
def test_stacking_what_a_stack_cannot_train_is_refused_by_the_spec(change, words):
    # 3 CPUs: room for a streamed set's 2 decoding workers, which the spec checks first.
    raw = raw_spec("refused", resources={"cpus": 3, "workers": 1, "stack_seeds": 2}, **change)
    with pytest.raises(SpecError, match=f"resources.stack_seeds: .*{words}.*or stack_seeds: 1"):
        parse_spec(raw)


@pytest.mark.parametrize("count", [0, 33])
def test_a_stack_of_no_seeds_or_too_many_is_refused(count):
    raw = raw_spec("refused", resources={"cpus": 1, "workers": 1, "stack_seeds": count})
    with pytest.raises(SpecError, match="resources.stack_seeds: must be an int from 1"):
        parse_spec(raw)


def test_the_dry_run_counts_the_tasks_that_stacking_makes(tmp_path, capsys):
    """5 seeds of 2 points, at most 2 a stack: 3 tasks per point (2 + 2 + 1); the time estimate
    says that it counts none of it."""
    from resnet_ablate.cli import main

    from helpers import write_spec

    path = write_spec(tmp_path, raw_spec("plan", seeds=5, resources={
        "cpus": 1, "workers": 1, "stack_seeds": 2}))
    assert main(["run", str(path), "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "10 trials to run in 6 tasks" in out
    # Its time is each seed's alone, and says so.
    assert "each seed timed as if it trained alone (stack_seeds 2 not counted" in out


def test_a_stack_in_this_process_gives_each_seed_its_outcome_and_fails_them_together():
    """The stacked task's body: an outcome per seed under its own trial number, with weights of
    its own; an architecture that cannot be built fails every seed of the stack, each with the
    traceback."""
    from resnet_ablate.trial import run_stacked_body

    task = _stack_task(epochs=1)
    outcomes = run_stacked_body(task, None, torch.device("cpu"))
    assert [o.trial_number for o in outcomes] == [4, 9]
    assert all(o.status == Status.COMPLETED and o.weights for o in outcomes)
    assert outcomes[0].weights != outcomes[1].weights
    assert [o.execution.stacked_seeds for o in outcomes] == [2, 2]
    broken = run_stacked_body(dataclasses.replace(task, arch={"family": "cifar", "depth": 7}),
                              None, torch.device("cpu"))
    assert [o.trial_number for o in broken] == [4, 9]
    assert all(o.status == Status.FAILED and o.failure_kind == FailureKind.ERROR
               and o.traceback for o in broken)


def test_a_stack_that_fails_after_a_seed_was_pruned_keeps_that_seed_pruned(monkeypatch):
    """The pruner stops trial 9 after its first epoch; then reporting trial 4's second epoch
    raises: trial 4 fails (to be retried) with the error, trial 9 stays pruned (not retried)."""
    from resnet_ablate import trial

    def report(task, board, record):
        if task.trial_number == 4 and record.epoch == 2:
            raise ConnectionError("the driver went away")
        return task.trial_number == 9

    monkeypatch.setattr(trial, "report_epoch", report)
    task = _stack_task(epochs=3)
    failed, pruned = trial.run_stacked_body(task, None, torch.device("cpu"))
    assert (failed.trial_number, failed.status) == (4, Status.FAILED)
    assert "ConnectionError: the driver went away" in failed.reason and failed.traceback
    assert len(failed.curves) == 2  # the epochs it reported, the second one included
    assert (pruned.trial_number, pruned.status) == (9, Status.PRUNED)
    assert pruned.reason == "pruned after epoch 1" and len(pruned.curves) == 1


def test_a_stack_takes_no_more_seeds_than_the_trial_budget_leaves(local_ray, tmp_path):
    """budget.trials 2 of 3 seeds x 2 points, stack_seeds 3: one stack of 2 seeds, no more."""
    raw = raw_spec("budget-stack", seeds=3, epochs=1, budget={"trials": 2},
                   resources={"cpus": 1, "workers": 2, "stack_seeds": 3})
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    assert (summary.completed, summary.launched) == (2, 2)
    trials = list(_trials_by_point(summary, "budget-stack").values())
    assert len(trials) == 2 and len({t.params["shortcut"] for t in trials}) == 1
    assert all(t.user_attrs["execution"]["stacked_seeds"] == 2 for t in trials)


def test_the_dry_run_counts_only_the_trials_the_budget_leaves(tmp_path, capsys):
    """budget.trials 4 of 2 points x 3 seeds, stacks of 2: the run takes the grid's first 4
    (point A's 3 seeds, then point none's seed 0) in 3 tasks; the other 2 are past the budget."""
    from resnet_ablate.cli import main

    from helpers import write_spec

    path = write_spec(tmp_path, raw_spec("plan-budget", seeds=3, budget={"trials": 4},
                                         resources={"cpus": 1, "workers": 1, "stack_seeds": 2}))
    assert main(["run", str(path), "--dry-run", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "6 trials: 4 to run" in out and "4 trials to run in 3 tasks" in out
    assert out.count("past budget.trials") == 2


def test_a_pruner_stops_a_stacks_seeds_as_it_stops_trials(local_ray, tmp_path):
    """The median pruner with stacks of 2 seeds, one worker: the full-width nets' stack first
    (the grid's order), then the 1-channel-wide nets' stack, which learns far slower: each of its
    seeds is pruned after an epoch as a trial alone would be (test_study.py's median pruner
    test), and the stack stops once both are."""
    raw = raw_spec("pruned-stack", epochs=6, seeds=2,
                   space={"widths": [[16, 32, 64], [1, 1, 1]]}, pruner="median",
                   resources={"cpus": 1, "workers": 1, "stack_seeds": 2})
    raw["dataset"]["synthetic"] = {**raw["dataset"]["synthetic"], "train_size": 1024}
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = optuna.load_study(study_name="pruned-stack", storage=summary.storage).get_trials()
    by_width: dict[str, list] = {}
    for t in trials:
        by_width.setdefault(t.params["widths"], []).append(t)
    wide, narrow = by_width["[16, 32, 64]"], by_width["[1, 1, 1]"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in wide)
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in narrow)
    for t in narrow:
        assert t.user_attrs["pruned"].startswith("pruned after epoch")
        assert 0 < len(t.user_attrs["curves"]) < 6
        assert set(t.intermediate_values) <= set(range(1, 7))
    assert len({t.user_attrs["pid"] for t in narrow}) == 1  # one stack trained them
    # The results say the pruned seeds were stacked, as they say it of the completed ones.
    from resnet_ablate.results import load

    assert set(load("pruned-stack", storage=summary.storage).trials["stacked_seeds"]) == {2}


def test_a_stopped_stack_keeps_the_records_of_its_seeds_that_ended_before(local_ray, tmp_path,
                                                                          monkeypatch):
    """The pruner stops seed 9 of a stack after its first epoch: the worker sends its outcome to
    the board as it ends (run_stacked_body); a driver stopped (Ctrl-C) while the stack trains on
    records it, pruned, before it marks the rest interrupted, as a trial alone would have been
    recorded. It was marked interrupted with its stack, and trained again on resume."""
    import ray

    from resnet_ablate import trial
    from resnet_ablate.study import cluster

    # The worker's half: only the seed that ended early is sent, without weights.
    monkeypatch.setattr(trial, "report_epoch", lambda task, board, record: task.trial_number == 9)
    board = cluster.new_board()
    completed, pruned = trial.run_stacked_body(_stack_task(epochs=2), board, torch.device("cpu"))
    assert (completed.status, pruned.status) == (Status.COMPLETED, Status.PRUNED)
    sent = ray.get(board.drain_ended.remote())
    assert list(sent) == [9] and sent[9] == pruned and sent[9].weights is None

    # The driver's half, its stack still running when the stop comes.
    loop, (trains_on, ended) = _driver_loop_of_one_stack(tmp_path)
    ray.get(loop.board.end.remote(dataclasses.replace(pruned, trial_number=ended.trial.number)))
    assert loop._stop("the user (Ctrl-C)") == 1
    by_number = {t.number: t for t in loop.study.get_trials()}
    kept, interrupted = by_number[ended.trial.number], by_number[trains_on.trial.number]
    assert kept.state == optuna.trial.TrialState.PRUNED
    assert kept.user_attrs["pruned"] == "pruned after epoch 1"
    assert len(kept.user_attrs["curves"]) == 1
    assert interrupted.state == optuna.trial.TrialState.FAIL
    assert "interrupted by the user (Ctrl-C)" in interrupted.user_attrs["failure"]


def test_a_seed_whose_end_arrives_with_its_last_epoch_is_recorded_once(local_ray, tmp_path,
                                                                       monkeypatch):
    """A seed's last epoch and its end (never learned) reach the board between the driver's two
    looks at it (epochs, then ends): it is recorded failed at the second, and the epoch that
    comes after is not reported to its finished Optuna trial (UpdateFinishedTrialError stopped
    the driver); the progress line no longer counts it running."""
    import ray

    from resnet_ablate.record import EpochRecord, TrialOutcome
    from resnet_ablate.study import cluster

    loop, (trains_on, ended) = _driver_loop_of_one_stack(tmp_path)
    number = ended.trial.number
    last = EpochRecord(epoch=2, lr=0.1, train_loss=2.3, train_error=0.9, test_loss=2.3,
                       test_error=0.9, seconds=1.0)
    drain_epochs = cluster.drain_epochs

    def the_worker_speaks_between(board, waiting):
        drained = drain_epochs(board, waiting)
        monkeypatch.setattr(cluster, "drain_epochs", drain_epochs)
        ray.get(board.report.remote(number, last))
        ray.get(board.end.remote(TrialOutcome(number, Status.DIVERGED, "never learned",
                                              curves=(dataclasses.asdict(last),))))
        return drained

    monkeypatch.setattr(cluster, "drain_epochs", the_worker_speaks_between)
    loop._report_epochs()
    assert loop.study.trials[number].state == optuna.trial.TrialState.FAIL
    loop._report_epochs()  # the epoch now drained: its trial has ended
    assert loop.counts == {FailureKind.DIVERGED: 1}
    seen = []
    monkeypatch.setattr(loop.progress, "update", lambda **line: seen.append(line))
    loop.show_progress()
    assert seen[0]["running"] == 1 and seen[0]["epochs"] == " (epochs 0/2)"


def _driver_loop_of_one_stack(tmp_path):
    """A driver loop whose one running task is a stack of two seeds (trials of one grid point,
    asked from a study in memory) that trains on (a Ray task that sleeps): (the loop, the two
    running trials)."""
    import math

    import ray

    from resnet_ablate.arch import ResNetArch
    from resnet_ablate.progress import StudyProgress
    from resnet_ablate.study import cluster
    from resnet_ablate.study.costs import StudyCosts
    from resnet_ablate.study.grid import GridHistory
    from resnet_ablate.study.loop import DriverLoop, RunningTrial
    from resnet_ablate.study.recorder import TrialRecorder
    from resnet_ablate.study.signals import StopSignals

    spec = parse_spec(raw_spec("one-stack", resources={"cpus": 1, "workers": 1,
                                                       "stack_seeds": 2}))
    study = optuna.create_study(study_name="one-stack")
    recorder = TrialRecorder(study, spec, artifacts=tmp_path, store_folder=tmp_path,
                             max_artifact_mb=1)
    arch = ResNetArch(family="cifar", depth=8, shortcut="A")
    trials = [RunningTrial(recorder.ask({"shortcut": "A"}, seed), None, arch, seed)
              for seed in (0, 1)]
    loop = DriverLoop(spec, study=study, recorder=recorder, costs=StudyCosts(spec),
                      history=GridHistory(spec, []), pending=[], to_ask=0, workers=1,
                      deadline=math.inf, keep_weights=False, checkpoints=str(tmp_path),
                      progress=StudyProgress("one-stack", enabled=False),
                      renew_lease=lambda: None, stop_signals=StopSignals())
    loop.board = cluster.new_board()
    loop.running = {ray.remote(_sleep).remote(60): trials}
    return loop, trials


def _sleep(seconds: float) -> None:
    """A stack's task that is still training (Ray runs functions, not builtins)."""
    import time

    time.sleep(seconds)

