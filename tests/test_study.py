"""The study runner end to end on synthetic data with 2 Ray workers, and its behaviour under faults."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch

from helpers import SYNTHETIC, own_ray_processes
from helpers import raw_spec as _raw_spec
from helpers import write_spec as _write_spec
from resnet_ablate.arch import ResNetArch
from resnet_ablate.models import build
from resnet_ablate.profile import profile
from resnet_ablate.spec import SpecError, parse_spec
from resnet_ablate.study import RunOptions, plan_study, run_study

def _trials(storage, name):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_small_study_records_everything_with_two_workers(local_ray, tmp_path):
    spec = parse_spec(_raw_spec("e2e"))
    summary = run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))
    assert (summary.completed, summary.failed, summary.launched) == (4, 0, 4)

    trials = _trials(summary.storage, "e2e")
    assert sorted((t.params["shortcut"], t.user_attrs["seed"]) for t in trials) == [
        ("A", 0), ("A", 1), ("none", 0), ("none", 1)]
    for t in trials:
        attrs = t.user_attrs
        arch = ResNetArch.from_dict(attrs["arch"])
        assert arch.shortcut == t.params["shortcut"] and attrs["arch_digest"] == arch.digest
        model = build(arch, num_classes=4, in_channels=1)
        reference = profile(model, (1, 8, 8))
        assert attrs["params"] == sum(p.numel() for p in model.parameters()) == reference.params
        assert attrs["flops"] == reference.flops
        assert [e["epoch"] for e in attrs["curves"]] == [1, 2]
        assert t.values == [pytest.approx(1 - attrs["final_test_accuracy"])]
        assert attrs["final_test_accuracy"] == pytest.approx(1 - attrs["curves"][-1]["test_error"])
        assert attrs["best_test_accuracy"] >= attrs["final_test_accuracy"]
        assert attrs["wall_seconds"] > 0 and attrs["images_per_second"] > 0
        assert attrs["device"].startswith("cpu: ") and attrs["versions"]["torch"] == torch.__version__
        # The CPU's model name, as the machine reports it (not "cpu: cpu").
        model_names = [line.split(":", 1)[1].strip() for line in
                       Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        assert attrs["device"] == f"cpu: {model_names[0]}" if model_names else attrs["device"] != "cpu: cpu"
        # The kept weights reload into the described architecture; they are recorded relative
        # to the store's folder (here tmp_path), so that the folder can move.
        assert not Path(attrs["weights"]).is_absolute()
        state = torch.load(io.BytesIO((tmp_path / attrs["weights"]).read_bytes()))
        model.load_state_dict(state)
    # Two workers: two trials ran at the same time, in two processes.
    intervals = sorted((t.datetime_start, t.datetime_complete) for t in trials)
    assert any(b[0] < a[1] for a, b in zip(intervals, intervals[1:]))
    assert len({t.user_attrs["pid"] for t in trials}) == 2

    again = run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))
    assert again.launched == 0 and len(_trials(summary.storage, "e2e")) == 4


def test_missing_dataset_is_an_error_before_anything_runs(tmp_path):
    raw = _raw_spec("no-data", seeds=1)
    raw["dataset"] = {"name": "cifar10", "root": str(tmp_path / "no-such-folder")}
    with pytest.raises(SpecError, match="no-data.yaml: dataset: CIFAR-10 not found: looked for"):
        run_study(parse_spec(raw, source="no-data.yaml"), RunOptions(runs_dir=tmp_path))
    assert not (tmp_path / "no-data.db").exists()


def test_failing_trials_are_recorded_and_the_study_goes_on(local_ray, tmp_path):
    # ImageNet stems shrink 8x8 images to 1x1 maps; a last training batch of one image then has
    # one value per channel, which BatchNorm refuses in training: an exception inside the trial.
    raw = _raw_spec("failing", seeds=1, model={"family": "imagenet", "depth": 18},
                    space={"shortcut": ["A", "B"]})
    raw["dataset"]["synthetic"] = {**SYNTHETIC, "train_size": 33}
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = _trials(summary.storage, "failing")
    # Each of the 2 points was tried max_attempts=2 times, each failure recorded with its reason.
    assert summary.failed == 4 and len(trials) == 4
    for t in trials:
        assert t.state == optuna.trial.TrialState.FAIL
        assert t.user_attrs["failure_kind"] == "error"
        assert "Expected more than 1 value per channel when training" in t.user_attrs["failure"]
        assert "Traceback" in t.user_attrs["traceback"]


def test_a_signal_while_ray_stops_stops_the_command(local_ray, tmp_path, monkeypatch):
    """A SIGTERM while the driver's own Ray shut down, after its last trial, was lost to the
    command (exit 0 with the table): it stops the command as one heard in the run does. (That it
    could also kill the driver, taken by an OpenMP thread: test_stops.py checks that the
    command's threads leave the stop signals to the main one.) Here the Ray shut down is this
    module's, left running: the signal is sent where the shutdown would be."""
    from resnet_ablate.study import cluster

    monkeypatch.setattr(cluster, "connect", lambda *args: True)  # as if a Ray of its own
    monkeypatch.setattr(cluster, "disconnect", lambda: os.kill(os.getpid(), signal.SIGTERM))
    raw = _raw_spec("shutdown", seeds=1, space={"shortcut": ["A"]}, epochs=1)
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    assert (summary.completed, summary.interrupted, summary.marked_interrupted) == (1, "SIGTERM", 0)


def test_a_sampler_study_tries_a_failed_trial_again_and_reruns_an_interrupted_one(local_ray,
                                                                                 tmp_path):
    """A random study's trial that failed in a way tried again was not (it spent the budget),
    and one a stop interrupted was not run again on resume, where the stop line said it would
    be: both run again, with their configuration and seed, before the sampler draws anew."""
    from resnet_ablate.study.space import distributions

    raw = _raw_spec("sampled-failing", seeds=1, model={"family": "imagenet", "depth": 18},
                    space={"shortcut": ["A", "B", "C"]}, sampler="random", budget={"trials": 2})
    raw["dataset"]["synthetic"] = {**SYNTHETIC, "train_size": 33}  # fails: BatchNorm of one
    run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = _trials(f"sqlite:///{tmp_path}/sampled-failing.db", "sampled-failing")
    attempts = Counter((t.params["shortcut"], t.user_attrs["seed"]) for t in trials)
    assert all(t.user_attrs["failure_kind"] == "error" for t in trials)
    assert set(attempts.values()) == {2} and len(trials) == 2 * 2  # max_attempts
    # Resumed with a budget of 3, as one run of 3 would: the third configuration, twice (the
    # resumed run counted every failed attempt, 4, and ran nothing).
    run_study(parse_spec({**raw, "budget": {"trials": 3}}),
              RunOptions(runs_dir=tmp_path, progress=False))
    trials = [t for t in _trials(f"sqlite:///{tmp_path}/sampled-failing.db", "sampled-failing")
              if "seed" in t.user_attrs]  # (not the draws of given-up seeds, not trained)
    attempts = Counter((t.params["shortcut"], t.user_attrs["seed"]) for t in trials)
    assert len(attempts) == 3 and set(attempts.values()) == {2} and len(trials) == 6

    raw = _raw_spec("sampled-stopped", seeds=1, space={"shortcut": ["A", "none"]}, epochs=1,
                    sampler="random", budget={"trials": 1})
    spec = parse_spec(raw)
    storage = run_study(spec, RunOptions(runs_dir=tmp_path, progress=False)).storage
    study = optuna.load_study(study_name="sampled-stopped", storage=storage)
    (first,) = study.get_trials()
    other = "none" if first.params["shortcut"] == "A" else "A"
    study.add_trial(optuna.trial.create_trial(  # as a stop leaves a trial it interrupted
        state=optuna.trial.TrialState.FAIL, params={"shortcut": other},
        distributions=distributions(spec),
        user_attrs={"seed": 0, "failure_kind": "interrupted", "failure": "stopped: Ctrl-C"}))
    summary = run_study(parse_spec({**raw, "budget": {"trials": 2}}),
                        RunOptions(runs_dir=tmp_path, progress=False))
    assert summary.completed == 1  # the budget's second trial: the interrupted one
    rerun = study.get_trials()[-1]
    assert (rerun.state.name, rerun.params, rerun.user_attrs["seed"]) == (
        "COMPLETE", {"shortcut": other}, 0)


def test_a_sampler_trains_no_seed_twice_and_draws_it_cannot_train_spend_no_budget(local_ray,
                                                                                   tmp_path,
                                                                                   capsys):
    """A sampler's draw of a configuration with every seed spent trained one of them again, bit
    for bit, and spent a trial of the budget; a draw over budget.max_gflops spent one too. Both
    are recorded, not trained and not counted: a configuration with a seed left trains in their
    place, and once none is left the run ends, the space covered. A dry run says what the budget
    still allows, as a resumed run counts it (it printed the whole budget)."""
    from resnet_ablate import results
    from resnet_ablate.cli import main

    raw = _raw_spec("covered", seeds=2, epochs=1, sampler="tpe", budget={"trials": 7})
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = _trials(summary.storage, "covered")
    trained = sorted((t.params["shortcut"], t.user_attrs["seed"]) for t in trials
                     if t.state.name == "COMPLETE")
    assert trained == [("A", 0), ("A", 1), ("none", 0), ("none", 1)] and summary.completed == 4
    repeats = [t for t in trials if t.user_attrs.get("failure_kind") == "repeat"]
    assert repeats and all(t.state.name == "FAIL" and "seed" not in t.user_attrs
                           for t in repeats)
    assert len(trials) == 4 + len(repeats)
    assert summary.counts_by_state["REPEAT"] == len(repeats)
    assert len(results.load("covered", runs_dir=tmp_path).trials) == 4  # draws are not trials
    listed = results.list_studies(runs_dir=tmp_path).set_index("study").loc["covered"]
    assert listed["trials"] == listed["COMPLETE"] == 4
    capsys.readouterr()
    larger = _write_spec(tmp_path, {**raw, "budget": {"trials": 9, "minutes": 30}})
    assert main(["run", str(larger), "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "budget: 9 trials, 4 counted in study covered, 5 left, 30 minutes a run" in out
    # and that none of them can be trained: the space is covered (it said only what was left)
    assert ("nothing left to train: every configuration has had each of its seeds: the space is "
            "covered, and the run ends") in out
    # What the data set holds, from helpers.SYNTHETIC's sizes.
    assert ("data: synthetic: 128 training images in 4 classes, 64 test images scored, 8x8 "
            "pixels a model sees") in out.splitlines()
    # Resumed with a larger budget: nothing is left to train.
    again = run_study(parse_spec({**raw, "budget": {"trials": 9}}),
                      RunOptions(runs_dir=tmp_path, progress=False))
    assert (again.completed, again.failed) == (0, 0)

    # A ceiling between depth 8's FLOPs and depth 14's: the budget's two trials are depth 8's,
    # and depth 14's draws spend none of its seeds (it trains them once the ceiling is raised).
    gflops = {depth: profile(build(ResNetArch(family="cifar", depth=depth, shortcut="A"),
                                   num_classes=4, in_channels=1), (1, 8, 8)).flops / 1e9
              for depth in (8, 14)}
    raw = _raw_spec("ceiling", seeds=2, epochs=1, sampler="random", model={"family": "cifar"},
                    space={"depth": [14, 8], "shortcut": ["A"]},
                    budget={"trials": 2, "max_gflops": (gflops[8] + gflops[14]) / 2})
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = _trials(summary.storage, "ceiling")
    assert sorted((t.params["depth"], t.user_attrs["seed"]) for t in trials
                  if t.state.name == "COMPLETE") == [(8, 0), (8, 1)]
    over = [t for t in trials if t.state.name == "FAIL"]
    assert all(t.params["depth"] == 14 and t.user_attrs["failure_kind"] == "over_budget"
               and "seed" not in t.user_attrs for t in over)
    assert summary.failed == 0 and summary.counts_by_state.get("OVER_BUDGET") == len(over)
    assert len(results.load("ceiling", runs_dir=tmp_path).trials) == 2  # draws are not trials
    raised = run_study(parse_spec({**raw, "budget": {"trials": 4}}),
                       RunOptions(runs_dir=tmp_path, progress=False))
    assert raised.completed == 2 and sorted(
        (t.params["depth"], t.user_attrs["seed"]) for t in _trials(summary.storage, "ceiling")
        if t.state.name == "COMPLETE") == [(8, 0), (8, 1), (14, 0), (14, 1)]


def test_diverging_trial_fails_with_its_reason_and_is_not_retried(local_ray, tmp_path):
    raw = _raw_spec("diverging", seeds=1, space={"shortcut": ["A"]})
    raw["train"] = {"epochs": 2, "batch_size": 32, "lr": 1e12}
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    (trial,) = _trials(summary.storage, "diverging")
    assert trial.state == optuna.trial.TrialState.FAIL
    assert trial.user_attrs["failure_kind"] == "diverged"
    assert trial.user_attrs["failure"].startswith("non-finite training loss at epoch 1")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray workers through /proc")
def test_killed_worker_is_recorded_and_retried(local_ray, tmp_path, capfd):
    # Trials long enough (seconds) that the kill lands mid-trial: with short ones, a worker seen
    # running a trial had sometimes already returned it, and nothing was lost to check.
    spec = parse_spec(_raw_spec("killed-worker", epochs=100, seeds=1))
    result = {}
    driver = threading.Thread(target=lambda: result.update(
        summary=run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))))
    driver.start()
    killed = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        pids = own_ray_processes(b"ray::run_trial")
        if pids:
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    driver.join(timeout=300)
    assert killed is not None, "no trial worker was seen running"
    trials = _trials(result["summary"].storage, "killed-worker")
    lost = [t for t in trials if t.user_attrs.get("failure_kind") == "worker_lost"]
    states = [(t.number, t.state.name, t.user_attrs.get("failure")) for t in trials]
    assert len(lost) == 1 and "worker lost" in lost[0].user_attrs["failure"], states
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["shortcut"] for t in complete) == ["A", "none"]
    # Ray's own message of the loss goes to stderr: stdout is the run's table.
    assert "(raylet)" not in capfd.readouterr().out


def _cli(spec_path, runs_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "resnet_ablate.cli", "run", str(spec_path), "--runs-dir",
            str(runs_dir), *extra]


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError("timed out")


def _states(storage, name):
    try:
        return [t.state for t in _trials(storage, name)]
    except Exception:  # the driver has not created the study yet
        return []


def test_killed_driver_resumes_without_losing_or_repeating_trials(local_ray, tmp_path, capsys):
    from resnet_ablate.cli import main

    # Trials of a few seconds: the kill must find one running, however slowly a loaded machine
    # lets this test read the store.
    raw = _raw_spec("killed-driver", epochs=40, seeds=3)
    spec_path = _write_spec(tmp_path, raw)
    storage = f"sqlite:///{tmp_path / 'killed-driver.db'}"
    process = subprocess.Popen(_cli(spec_path, tmp_path, "--quiet"), start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for(lambda: optuna.trial.TrialState.COMPLETE in _states(storage, "killed-driver")
              and optuna.trial.TrialState.RUNNING in _states(storage, "killed-driver"))
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started, like kill -9
    process.wait()
    before = {t.number: t for t in _trials(storage, "killed-driver")}
    completed_before = {n for n, t in before.items() if t.state == optuna.trial.TrialState.COMPLETE}
    running_before = {n for n, t in before.items() if t.state == optuna.trial.TrialState.RUNNING}
    assert completed_before and running_before

    # A trial the driver had recorded in full, but not told Optuna of, when it was killed ends
    # as recorded (the kill can land there: a trial's record is some twenty writes).
    ended = {n for n in running_before if before[n].user_attrs.get("recorded") == "completed"}

    # The killed driver was a process of its own; the run resuming it may be this one.
    code = main(["run", str(spec_path), "--runs-dir", str(tmp_path)])
    rerun = capsys.readouterr()
    assert code == 0, rerun.err
    kept = len(completed_before) + len(ended)
    assert f"resuming: {kept} completed trial(s) of this study kept" in rerun.err
    after = _trials(storage, "killed-driver")
    complete = [t for t in after if t.state == optuna.trial.TrialState.COMPLETE]
    keys = [(t.params["shortcut"], t.user_attrs["seed"]) for t in complete]
    assert sorted(keys) == sorted((s, seed) for s in ("A", "none") for seed in range(3))
    assert completed_before <= {t.number for t in complete}, "completed trials were kept, not redone"
    for number in running_before - ended:
        assert after[number].state == optuna.trial.TrialState.FAIL
        assert after[number].user_attrs["failure_kind"] == "interrupted"
    for number in ended:
        assert after[number].state == optuna.trial.TrialState.COMPLETE
        assert after[number].values == [after[number].user_attrs["curves"][-1]["test_error"]]
    assert "test_error_mean" in rerun.out  # the result table


def test_dry_run_lists_trials_with_cost_and_records_nothing(tmp_path, capsys):
    from resnet_ablate.cli import main

    spec_path = _write_spec(tmp_path, _raw_spec("dry", seeds=2))
    argv = ["run", str(spec_path), "--runs-dir", str(tmp_path), "--dry-run"]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["shortcut", "seed", "arch", "params", "(M)", "GFLOPs",
                                "train", "TFLOPs", "status"]
    assert len([line for line in lines if line.rstrip().endswith("pending")]) == 4
    assert "4 trials: 4 to run" in lines[-3]
    assert lines[-2] == ("data: synthetic: 128 training images in 4 classes, 64 test images "
                         "scored, 8x8 pixels a model sees")  # helpers.SYNTHETIC's sizes
    assert lines[-1].startswith("time: about ")  # two short epochs timed; the study untouched
    assert not (tmp_path / "dry.db").exists()
    # The same plan, exact and machine-readable, with the profile's own counts.
    assert main([*argv, "--format", "json"]) == 0
    records = json.loads(capsys.readouterr().out)
    reference = profile(build(ResNetArch(family="cifar", depth=8, shortcut="A"), num_classes=4,
                              in_channels=1), (1, 8, 8))
    assert [(r["shortcut"], r["seed"], r["status"]) for r in records] == [
        ("A", 0, "pending"), ("A", 1, "pending"), ("none", 0, "pending"), ("none", 1, "pending")]
    assert records[0]["params"] == reference.params and records[0]["gflops"] == reference.flops / 1e9


def test_plan_marks_completed_points_done(local_ray, tmp_path):
    spec = parse_spec(_raw_spec("planned", seeds=1, space={"shortcut": ["A"]}))
    run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))
    spec2 = parse_spec({**_raw_spec("planned", seeds=2, space={"shortcut": ["A"]})})
    statuses = [(p.seed, p.status) for p in plan_study(spec2, RunOptions(runs_dir=tmp_path))]
    assert statuses == [(0, "done"), (1, "pending")]


@pytest.mark.parametrize("store", ["this version's", "with a categorical seed parameter"])
def test_seeds_added_to_a_study_train_in_it(local_ray, tmp_path, monkeypatch, store):
    """Seeds are not part of what defines a study: a rerun with more of them trains the new ones
    in the same study (Optuna refused a categorical seed parameter whose choices grew). A store
    written when the seed parameter was a categorical of the spec's seeds keeps it for those
    seeds; a seed it lacks is named by its user attribute alone."""
    from resnet_ablate.study import recorder

    if store != "this version's":
        monkeypatch.setattr(recorder, "seed_distribution",
                            lambda stored, seed: optuna.distributions.CategoricalDistribution([0]))
    run_study(parse_spec(_raw_spec("more-seeds", seeds=1, space={"shortcut": ["A"]})),
              RunOptions(runs_dir=tmp_path, progress=False))
    monkeypatch.undo()
    summary = run_study(parse_spec(_raw_spec("more-seeds", seeds=2, space={"shortcut": ["A"]})),
                        RunOptions(runs_dir=tmp_path, progress=False))
    assert (summary.launched, summary.completed) == (1, 1), summary
    trials = _trials(f"sqlite:///{tmp_path / 'more-seeds.db'}", "more-seeds")
    assert [(t.state, t.user_attrs["seed"]) for t in trials] == \
        [(optuna.trial.TrialState.COMPLETE, 0), (optuna.trial.TrialState.COMPLETE, 1)]
    added = trials[1].params.get("seed")
    assert added == (1 if store == "this version's" else None)


def test_a_local_ray_larger_than_the_machine_is_named_before_it_runs():
    """Ray takes the CPUs it is given on trust: 2 workers x 64 threads on a few cores run many
    times slower than fewer would, so the run says so (a spec sized for the machine does not)."""
    from resnet_ablate.study.cluster import oversubscribed

    cores = len(os.sched_getaffinity(0))
    crowded = parse_spec(_raw_spec("crowded", resources={"cpus": 64 * cores, "workers": 2}))
    note = oversubscribed(crowded, 2)
    assert note is not None and f"= {128 * cores} CPUs on a machine with {cores} core(s)" in note
    assert oversubscribed(parse_spec(_raw_spec("fits", resources={"cpus": 1, "workers": 1})),
                          1) is None


def test_a_changed_spec_does_not_reuse_a_study(local_ray, tmp_path):
    from resnet_ablate.study import StudyConflict

    run_study(parse_spec(_raw_spec("changed", seeds=1, space={"shortcut": ["A"]})),
              RunOptions(runs_dir=tmp_path, progress=False))
    changed = _raw_spec("changed", seeds=1, space={"shortcut": ["A"]})
    changed["train"] = {"epochs": 3, "batch_size": 32}
    with pytest.raises(StudyConflict, match="'changed' .* was created from a different spec .*train"):
        run_study(parse_spec(changed), RunOptions(runs_dir=tmp_path, progress=False))
    assert len(_trials(f"sqlite:///{tmp_path / 'changed.db'}", "changed")) == 1


def test_median_pruner_stops_trials_worse_than_the_median(local_ray, tmp_path):
    # Full-width nets first (the grid's order), then 1-channel-wide ones that learn far slower:
    # with two reference trials done, the pruner stops the narrow ones after an epoch. One worker,
    # so the reference trials are done before a narrow one starts (narrow trials run faster).
    raw = _raw_spec("pruned", epochs=6, seeds=2, space={"widths": [[16, 32, 64], [1, 1, 1]]},
                    pruner="median", resources={"cpus": 1, "workers": 1})
    raw["dataset"]["synthetic"] = {**SYNTHETIC, "train_size": 1024}  # epochs long enough to stop
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = _trials(summary.storage, "pruned")
    by_width = {}
    for t in trials:
        by_width.setdefault(t.params["widths"], []).append(t)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in by_width["[16, 32, 64]"])
    narrow = by_width["[1, 1, 1]"]
    assert all(t.state == optuna.trial.TrialState.PRUNED for t in narrow)
    for t in narrow:
        assert len(t.user_attrs["curves"]) < 6 and t.user_attrs["pruned"].startswith("pruned after epoch")
        reported = t.intermediate_values
        assert reported and set(reported) <= set(range(1, 7))
    # The results show the epochs a pruned trial ran, as its curves hold them.
    from resnet_ablate.results import load

    shown = load("pruned", storage=summary.storage).trials.set_index("number")["epochs"]
    assert all(shown[t.number] == len(t.user_attrs["curves"]) for t in narrow)


def test_the_pruner_never_drops_a_trial_that_trained_every_epoch(local_ray, tmp_path):
    """One epoch: each trial's only epoch is its last, where the narrow nets, far worse than the
    median, would be pruned after training all they were to train: a finished result dropped
    for its final error. They complete, as every trial that trains its epochs does."""
    raw = _raw_spec("last-epoch", epochs=1, seeds=2, space={"widths": [[16, 32, 64], [1, 1, 1]]},
                    pruner="median", resources={"cpus": 1, "workers": 1})
    summary = run_study(parse_spec(raw), RunOptions(runs_dir=tmp_path, progress=False))
    trials = _trials(summary.storage, "last-epoch")
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 4
    narrow = [t for t in trials if t.params["widths"] == "[1, 1, 1]"]
    wide = [t for t in trials if t.params["widths"] == "[16, 32, 64]"]
    # The narrow nets are worse than the median: a verdict on their last epoch would prune.
    assert min(t.values[0] for t in narrow) > max(t.values[0] for t in wide)


def test_a_second_driver_on_a_running_study_is_refused(local_ray, tmp_path, capsys):
    from resnet_ablate.cli import main

    raw = _raw_spec("busy", epochs=500, seeds=1)  # still running when the second driver checks
    spec_path = _write_spec(tmp_path, raw)
    storage = f"sqlite:///{tmp_path / 'busy.db'}"
    first = subprocess.Popen(_cli(spec_path, tmp_path, "--quiet"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: optuna.trial.TrialState.RUNNING in _states(storage, "busy"))
        # The second driver in this process (on the module's Ray): the first is a process of
        # its own, as a live driver holding the lease is.
        assert main(["run", str(spec_path), "--runs-dir", str(tmp_path), "--quiet"]) == 2
        assert f"is being run by driver pid {first.pid}" in capsys.readouterr().err
        assert optuna.trial.TrialState.FAIL not in _states(storage, "busy"), \
            "the refused driver did not touch the running trials"
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)


@pytest.mark.parametrize("workers", ["0", "-1", "two", "100000"])
def test_a_count_of_workers_below_one_is_refused_before_anything_runs(workers, capsys):
    from resnet_ablate.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "studies/quickstart.yaml", "--workers", workers])
    assert exit_info.value.code == 2
    assert f"{workers!r} is not a count of workers: give an int from 1 to 1024" in capsys.readouterr().err


def test_a_study_spelled_another_way_or_run_faster_is_the_same_study(tmp_path):
    from resnet_ablate.study import StudyConflict, open_study

    storage = f"sqlite:///{tmp_path / 'same.db'}"
    first = _raw_spec("same", dataset="digits", space={"shortcut": ["A"]})
    study = open_study(parse_spec(first), storage)
    assert study.metric_names == ["test_error"]  # optuna-dashboard shows the metric's name
    spelled = {**first, "dataset": {"name": "digits"}, "model": {"depth": 8, "family": "cifar"},
               "space": {"shortcut": "A"},
               "train": {**first["train"], "memory_format": "nchw", "compile": True}}
    open_study(parse_spec(spelled), storage)  # no conflict
    other = {**first, "train": {**first["train"], "precision": "bf16"}}  # moves the numbers
    with pytest.raises(StudyConflict, match="train"):
        open_study(parse_spec(other), storage)
    defaults = {**first, "model": {**first["model"], "fused": True}}  # the default, written out
    open_study(parse_spec(defaults), storage)
    # What the family builds anyway, written out (a CIFAR net's blocks are basic): the same,
    # whatever order the space lists its factors in.
    open_study(parse_spec({**first, "model": {**first["model"], "block": "basic"}}), storage)
    two = {**first, "model": {"family": "cifar"},
           "space": {"depth": [8, 14], "shortcut": ["A", "none"]}}
    open_study(parse_spec({**two, "study": "two"}), storage)
    reordered = {**two, "study": "two", "model": {"family": "cifar", "block": "basic"},
                 "space": {"shortcut": ["A", "none"], "depth": [8, 14]}}
    open_study(parse_spec(reordered), storage)
    deeper = {**first, "model": {**first["model"], "depth": 14}}  # another network
    with pytest.raises(StudyConflict, match=r"\(model differ"):
        open_study(parse_spec(deeper), storage)
    # The paper's test views listed in another order: scored and recorded alike, the same study
    # (it was refused as "train differ").
    views = {**_raw_spec("views", space={"shortcut": ["A"]}),
             "dataset": {"name": "imagefolder", "root": str(tmp_path / "images"),
                         "loader_workers": 0}}
    views["train"] = {**views["train"], "test_views": ["ten_crop", "multi_scale"]}
    open_study(parse_spec(views), storage)
    open_study(parse_spec({**views, "train": {**views["train"],
                                              "test_views": ["multi_scale", "ten_crop"]}}),
               storage)
    with pytest.raises(StudyConflict, match="train"):  # one view fewer: another study
        open_study(parse_spec({**views, "train": {**views["train"], "test_views": ["ten_crop"]}}),
                   storage)
    # The same level spelled in lower case: refused (the store keys trials by spelling), saying so.
    lower = {**first, "space": {"shortcut": ["a"]}}
    with pytest.raises(StudyConflict, match=r"spells its levels \{'shortcut': \['A'\]\}, and "
                                            r".* spells them \{'shortcut': \['a'\]\}: the same "
                                            r"levels, but the store keys its trials by their "
                                            r"spelling"):
        open_study(parse_spec(lower), storage)


def test_a_tpe_study_over_ranges_is_recognised_and_a_conflict_leaves_its_metric_names(tmp_path):
    from resnet_ablate.study import StudyConflict, open_study

    storage = f"sqlite:///{tmp_path / 'tpe.db'}"
    raw = _raw_spec("tpe", sampler="tpe", budget={"trials": 4},
                    model={"family": "cifar"}, space={"depth": {"low": 8, "high": 20, "step": 6}})
    open_study(parse_spec(raw), storage)
    faster = {**raw, "train": {**raw["train"], "compile": True}}
    open_study(parse_spec(faster), storage)  # the same study, compiled
    conflicting = {**raw, "objectives": ["flops"]}
    with pytest.raises(StudyConflict):
        open_study(parse_spec(conflicting), storage)
    assert optuna.load_study(study_name="tpe", storage=storage).metric_names == ["test_error"]


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_sampled_configuration_gets_its_next_seed_and_a_resumed_run_draws_on(tmp_path,
                                                                              sampler):
    """A configuration the sampler picks again trains its next unused seed (seeds cycled by trial
    count repeated 14/A seed 0 while seeds 1 and 2 were free), and a resumed run does not draw
    the first run's points again (the sampler was seeded alike on every start: every resume
    replayed them)."""
    from resnet_ablate.study import open_study
    from resnet_ablate.study.recorder import TrialRecorder

    raw = _raw_spec("sampled", sampler=sampler, budget={"trials": 10}, seeds=3,
                    model={"family": "cifar"}, space={"depth": [8, 14], "shortcut": ["A", "none"]})
    spec, storage = parse_spec(raw), f"sqlite:///{tmp_path / 'sampled.db'}"

    def run(trials: int) -> list[tuple]:
        study = open_study(spec, storage)
        recorder = TrialRecorder(study, spec, artifacts=tmp_path / "w", store_folder=tmp_path,
                                 max_artifact_mb=1.0)
        asked = []
        for _ in range(trials):
            trial = recorder.ask(None, None)
            seeded = recorder.seed_draw(trial)
            asked.append((trial.params["depth"], trial.params["shortcut"],
                          trial.user_attrs.get("seed")))
            if seeded:  # (a repeat is recorded as such)
                study.tell(trial, 0.1 * len(asked))
        return asked

    first, resumed = run(5), run(5)
    everything = first + resumed
    for depth, shortcut, seed in everything:
        mine = [s for d, c, s in everything if (d, c) == (depth, shortcut)]
        # No seed twice before the configuration has had all three.
        assert len(set(mine[:3])) == len(mine[:3]), (depth, shortcut, mine)
        # Past its three, a draw of it has none (a repeat, not trained: draws.py).
        assert mine[:3] == [0, 1, 2][:len(mine[:3])] and set(mine[3:]) <= {None}
    assert [p[:2] for p in resumed] != [p[:2] for p in first]
    # A pruned seed, or one that diverged, is spent; one whose trial erred may be tried again.
    from resnet_ablate.study.draws import free_seed, spent_points

    def trial(state, seed, kind=None):
        attrs = {"seed": seed, **({"failure_kind": kind} if kind else {})}
        return optuna.trial.create_trial(
            state=state, params={"depth": 8, "shortcut": "A"}, user_attrs=attrs,
            distributions={"depth": optuna.distributions.CategoricalDistribution([8, 14]),
                           "shortcut": optuna.distributions.CategoricalDistribution(["A",
                                                                                     "none"])},
            value=0.1 if state == optuna.trial.TrialState.COMPLETE else None)

    states = optuna.trial.TrialState
    done = [trial(states.PRUNED, 0), trial(states.FAIL, 1, "diverged"),
            trial(states.FAIL, 2, "error")]
    assert free_seed(spec, {"depth": 8, "shortcut": "A"}, spent_points(spec, done)) == 2
    assert free_seed(spec, {"depth": 8, "shortcut": "A"},
                     spent_points(spec, [*done[:2], trial(states.COMPLETE, 2)])) is None


def test_a_stand_in_has_a_seed_left_within_the_ceiling_and_there_is_none_once_all_are_spent():
    """What trains in place of a sampler's draw that cannot be trained (draws.py): a
    configuration with a seed left (its first), within the FLOPs ceiling, reproducibly by the
    draw's number; none once the space is covered; in a space too large to list, a point with
    a seed left all the same."""
    from resnet_ablate.study.draws import ENUMERATED_CONFIGURATIONS, stand_in
    from resnet_ablate.study.grid import GridHistory, PendingPoint, unfinished_points
    from resnet_ablate.study.space import distributions

    class Costs:  # shortcut A over the ceiling
        def over_budget(self, arch):
            return arch.shortcut == "A"

    spec = parse_spec(_raw_spec("stand-in", sampler="random", budget={"trials": 9, "max_gflops": 1},
                                space={"shortcut": ["A", "B", "none"]}))

    def done(level, seed, state=optuna.trial.TrialState.COMPLETE, kind=None):
        return optuna.trial.create_trial(
            state=state, params={"shortcut": level}, distributions=distributions(spec),
            user_attrs={"seed": seed, **({"failure_kind": kind} if kind else {})},
            value=0.1 if state.name == "COMPLETE" else None)

    trials = [done("B", 0), done("B", 1), done("none", 0, optuna.trial.TrialState.RUNNING)]
    for draw in range(5):
        assert stand_in(spec, trials, draw, Costs()) == PendingPoint({"shortcut": "none"}, 1)
    covered = stand_in(spec, [*trials, done("none", 1)], 5, Costs())
    assert covered == ("every configuration with a seed left is over budget.max_gflops=1: "
                       "the run ends")
    # A seed given up after max_attempts (2) errors is spent: it was trained again and again.
    error = optuna.trial.TrialState.FAIL
    assert stand_in(spec, [*trials, done("none", 1, error, "error")], 5, Costs()).seed == 1
    assert isinstance(stand_in(spec, [*trials, *[done("none", 1, error, "error")] * 2], 5,
                               Costs()), str)
    # A trial over the ceiling trained nothing: its seed is free once the ceiling allows (0.3.0
    # gave such draws a seed, which kept it spent for good), and a trial to run again that the
    # ceiling, lowered since, leaves out is not run.
    assert stand_in(spec, [*trials, done("none", 1, error, "over_budget")], 5, Costs()).seed == 1
    stopped = [done("A", 0, error, "interrupted"), done("B", 1, error, "interrupted")]
    assert [p.key for p in unfinished_points(spec, GridHistory(spec, stopped), stopped,
                                             Costs())] == [PendingPoint({"shortcut": "B"}, 1).key]
    open_seeds = [done("B", 0)]  # B's seed 1 and none's two are left: both are drawn
    picks = {stand_in(spec, open_seeds, draw, Costs()).key for draw in range(20)}
    assert picks == {PendingPoint({"shortcut": "B"}, 1).key,
                     PendingPoint({"shortcut": "none"}, 0).key}
    assert stand_in(spec, open_seeds, 3, Costs()) == stand_in(spec, open_seeds, 3, Costs())

    big = parse_spec(_raw_spec(
        "stand-in-big", sampler="random", budget={"trials": 9},
        model={"family": "cifar", "block": "bottleneck", "shortcut": "B"},
        space={"depth": {"low": 11, "high": 200, "step": 9}, "base_width": {"low": 4,
                                                                            "high": 10_000}}))
    point = stand_in(big, [], 0, Costs())  # its shortcut is B: within the ceiling
    assert len(big.space["depth"].values()) * 9_997 > ENUMERATED_CONFIGURATIONS
    assert point.seed == 0 and point.params["depth"] in big.space["depth"].values()


def test_a_grid_study_is_not_reopened_with_a_sampler_nor_the_reverse(tmp_path):
    """A finished grid study run again with sampler: random re-ran seeds it had (silently): the
    sampler is recorded and a switch to or from grid refused; random and tpe may swap. A store
    from before the sampler was recorded is known for a grid by its enqueued trials."""
    from resnet_ablate.study import StudyConflict, open_study
    from resnet_ablate.study.recorder import TrialRecorder

    raw = _raw_spec("switch", budget={"trials": 4})
    storage = f"sqlite:///{tmp_path / 'switch.db'}"
    grid = parse_spec(raw)
    study = open_study(grid, storage)
    recorder = TrialRecorder(study, grid, artifacts=tmp_path / "w", store_folder=tmp_path,
                             max_artifact_mb=1.0)
    study.tell(recorder.ask({"shortcut": "A"}, 0), 0.1)
    with pytest.raises(StudyConflict, match="was run with sampler: grid, and .* has sampler: "
                                            "random: a grid's trials and a sampler's do not mix"):
        open_study(parse_spec({**raw, "sampler": "random"}), storage)
    sampled = f"sqlite:///{tmp_path / 'sampled.db'}"
    open_study(parse_spec({**raw, "sampler": "random"}), sampled)
    open_study(parse_spec({**raw, "sampler": "tpe"}), sampled)  # the same study, another sampler
    with pytest.raises(StudyConflict, match="sampler: random, and .* has sampler: grid"):
        open_study(grid, sampled)
    # An older store: no recorded sampler, an enqueued (grid) trial.
    older = f"sqlite:///{tmp_path / 'older.db'}"
    plain = optuna.create_study(study_name="switch", storage=older)
    plain.set_user_attr("spec", dict(open_study(grid, f"sqlite:///{tmp_path / 'ref.db'}")
                                     .user_attrs["spec"]))
    plain.enqueue_trial({"shortcut": "A"})
    plain.tell(plain.ask(), 0.1)
    with pytest.raises(StudyConflict, match="was run with sampler: grid"):
        open_study(parse_spec({**raw, "sampler": "random"}), older)


def test_how_data_is_read_does_not_make_another_study_and_a_moved_root_is_named(tmp_path):
    """loader_workers (decoding processes) and download change nothing of the results: a
    resume with another count is the same study (it was refused with "give this spec another
    study name"). A root elsewhere is refused, by name, with what to do if the data moved."""
    from resnet_ablate.study import StudyConflict, open_study

    def spec(**dataset):
        return parse_spec(_raw_spec(
            "folder", model={"family": "imagenet", "depth": 18}, space={"shortcut": ["A", "B"]},
            dataset={"name": "imagefolder", "root": "data/imgs", "image_size": 16, **dataset},
            resources={"cpus": 4, "workers": 1}))

    storage = f"sqlite:///{tmp_path / 'folder.db'}"
    open_study(spec(loader_workers=2), storage)
    open_study(spec(loader_workers=0, download=False), storage)
    with pytest.raises(StudyConflict, match="reads its data set from root 'data/imgs', and .* "
                                            "from '/elsewhere/imgs': .* if it is the same data "
                                            "moved, give the stored root"):
        open_study(spec(root="/elsewhere/imgs"), storage)
    with pytest.raises(StudyConflict, match="created from a different spec .dataset differ"):
        open_study(spec(image_size=24), storage)


def test_run_exits_non_zero_when_no_trial_completes(local_ray, tmp_path, capsys):
    from resnet_ablate.cli import main

    raw = _raw_spec("all-diverge", epochs=1, seeds=1, space={"shortcut": ["A"]},
                    train={"epochs": 2, "batch_size": 32, "lr": 1e8, "divergence_check_every": 1})
    code = main(["run", str(_write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "none of the 1 trials launched completed" in err
    # The reason comes with it, as the store recorded it (divergence, here).
    (trial,) = optuna.load_study(study_name="all-diverge",
                                 storage=f"sqlite:///{tmp_path}/all-diverge.db").get_trials()
    failure = trial.user_attrs["failure"].splitlines()[0]
    assert f"; the last failure (trial 0): {failure}; see `resnet-ablate show" in err
    # Run again, it trains nothing and says why: the trial diverged, for good (it said every
    # configuration "may be over budget.max_gflops or given up"), as the dry run's status does
    code = main(["run", str(_write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "its trials ended for good (1 failed (diverged: 1))" in err, err
    assert "may be over budget" not in err
    main(["run", str(_write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path), "--dry-run"])
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "diverged"
    # A sampler's study whose every configuration is over budget.max_gflops launches nothing:
    # it ended with exit 0 and "the space is covered".
    raw = _raw_spec("all-over", epochs=1, seeds=1, sampler="random",
                    budget={"trials": 3, "max_gflops": 1e-9})
    code = main(["run", str(_write_spec(tmp_path, raw)), "--runs-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert "every configuration with a seed left is over budget.max_gflops=1e-09" in err
    assert code == 1 and "error: nothing was trained, and study all-over has no" in err
