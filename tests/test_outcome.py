"""A trial's round trip: the task a worker is sent and the typed outcome it sends back, stored
through the outcome's one mapping to the trial's keys (record.py)."""

from __future__ import annotations

import dataclasses
import json
import pickle

import pytest

from resnet_ablate.arch import ResNetArch
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.record import (DataParallelRecord, ExecutionRecord, FailureKind,
                                  FinalEvaluation, Placement, Status, Timings, TrialKey,
                                  TrialOutcome, TrialTask, complement, metric_values)

CURVES = ({"epoch": 1, "lr": 0.1, "train_loss": 1.2, "train_error": 0.4, "test_loss": 1.1,
           "test_error": 0.3, "seconds": 2.0},
          {"epoch": 2, "lr": 0.1, "train_loss": 0.9, "train_error": 0.3, "test_loss": 1.0,
           "test_error": 0.35, "seconds": 2.0})

EXECUTION = ExecutionRecord("cpu", "fp32", "channels_last", compile=False, cuda_graphs=False)


def _completed(**changes):
    outcome = TrialOutcome(
        trial_number=3, status=Status.COMPLETED, placement=Placement("cpu: x", "host", 42, "n1"),
        versions={"torch": "2"}, curves=CURVES, epochs_completed=2,
        timings=Timings(4.0, 128.0, 0.0), execution=EXECUTION, warmup_steps=0,
        eval_split="test", test=FinalEvaluation(100, 35, "abc"),
        data_parallel=DataParallelRecord(2, "gloo", True, (0, 1)), weights=b"w")
    return dataclasses.replace(outcome, **changes)


def test_an_outcome_maps_to_the_stored_keys_that_stores_have_always_had():
    attrs = _completed().attributes()
    assert set(attrs) == {
        "device", "host", "pid", "node_id", "versions", "curves", "wall_seconds",
        "images_per_second", "compile_seconds", "execution", "epochs_completed",
        "final_test_accuracy", "best_test_accuracy", "final_train_accuracy", "warmup_steps",
        "eval_split", "data_parallel", "test_images", "test_wrong", "test_outcomes"}
    assert attrs[TrialKey.FINAL_TEST_ACCURACY] == complement(0.35)
    assert attrs[TrialKey.BEST_TEST_ACCURACY] == complement(0.3)
    assert attrs[TrialKey.FINAL_TRAIN_ACCURACY] == complement(0.3)
    assert attrs[TrialKey.DATA_PARALLEL] == {"replicas": 2, "backend": "gloo", "sync_bn": True,
                                             "resumed_after_epochs": [0, 1]}
    json.dumps(attrs)  # every stored value is plain JSON


def test_the_stored_objective_is_the_measured_error_itself():
    values = metric_values(_completed().attributes())
    assert values["test_error"] == 0.35 and values["best_test_error"] == 0.3
    assert values["train_error"] == 0.3
    # A record without curves falls back on its stored accuracy.
    assert metric_values({TrialKey.FINAL_TEST_ACCURACY: 0.75})["test_error"] == 0.25


def test_a_pruned_or_failed_outcome_stores_what_was_known_and_says_its_failure_kind():
    pruned = TrialOutcome(1, Status.PRUNED, "pruned after epoch 1", curves=CURVES[:1])
    assert pruned.failure_kind is None
    assert set(pruned.attributes()) == {TrialKey.CURVES}
    # A pruned stacked seed knows how it ran (stacked with others): that is stored too.
    stacked = dataclasses.replace(pruned, execution=dataclasses.replace(EXECUTION,
                                                                        stacked_seeds=2))
    assert stacked.attributes() == {TrialKey.CURVES: [dict(CURVES[0])], TrialKey.EXECUTION: {
        "device": "cpu", "precision": "fp32", "memory_format": "channels_last",
        "compile": False, "cuda_graphs": False, "decode": "none", "stacked_seeds": 2}}
    # A run that trained to its end stores every key, None where it measured nothing.
    unmeasured = _completed(test=FinalEvaluation(100, 35, None)).attributes()
    assert TrialKey.TEST_OUTCOMES in unmeasured and unmeasured[TrialKey.TEST_OUTCOMES] is None
    assert TrialOutcome(1, Status.FAILED, "ValueError: x").failure_kind == FailureKind.ERROR
    assert _completed(status=Status.DIVERGED).failure_kind == FailureKind.DIVERGED
    with pytest.raises(ValueError, match="status is one of completed, pruned"):
        TrialOutcome(1, "finished")


def test_an_outcome_crosses_processes_and_json_unchanged():
    outcome = _completed()
    assert pickle.loads(pickle.dumps(outcome)) == outcome
    text = json.dumps(outcome.to_json())
    assert TrialOutcome.from_json(json.loads(text), weights=b"w") == outcome


def test_an_execution_record_reads_stores_of_every_version():
    # Written before `decode` and `stacked_seeds` existed: their defaults (in memory, alone).
    older = {"device": "cuda", "precision": "bf16", "memory_format": "channels_last",
             "compile": False, "cuda_graphs": True}
    assert ExecutionRecord.from_stored(older) == ExecutionRecord(
        "cuda", "bf16", "channels_last", compile=False, cuda_graphs=True, decode="none",
        stacked_seeds=1)
    # A key a later version adds is left out, not an error.
    stacked = {**EXECUTION.stored(), "stacked_seeds": 4, "added_later": "x"}
    assert ExecutionRecord.from_stored(stacked) == dataclasses.replace(EXECUTION,
                                                                       stacked_seeds=4)


def test_an_epoch_crosses_the_mailbox_as_its_record_and_the_driver_reads_it_without_torch(
        local_ray):
    import subprocess
    import sys

    from resnet_ablate.board import TrialBoard, report_epoch
    from resnet_ablate.record import EpochRecord, epoch_objective
    from resnet_ablate.study.cluster import drain_epochs

    record = EpochRecord(**CURVES[1])
    # Its fields are the curves' stored keys: stores written before still read the same.
    assert set(CURVES[1]) <= set(dataclasses.asdict(record))
    task = TrialTask(trial_number=7, arch={}, seed=0, dataset={}, recipe={}, threads=1,
                     use_gpu=False, keep_weights=False)
    board = TrialBoard.remote()
    assert report_epoch(task, board, record) is False  # no verdict asked: trains on
    drained = drain_epochs(board)
    assert drained == {7: [record]} and type(drained[7][0]) is EpochRecord
    assert drain_epochs(board) == {}
    assert epoch_objective(record, "test_error") == 0.35
    assert epoch_objective(record, "test_accuracy") == complement(0.35)
    # The driver's side of the boundary: the record unpickled with no torch loaded.
    read = subprocess.run(
        [sys.executable, "-c", "import pickle, sys; r = pickle.loads(sys.stdin.buffer.read()); "
         "print(r.epoch, r.test_error, 'torch' in sys.modules)"],
        input=pickle.dumps(record), capture_output=True, check=True).stdout.split()
    assert read == [b"2", b"0.35", b"False"]


def test_a_trial_run_in_this_process_returns_a_completed_outcome_with_its_weights():
    from resnet_ablate.worker import execute

    task = TrialTask(
        trial_number=5, arch=ResNetArch(family="cifar", depth=8).to_dict(), seed=0,
        dataset={"name": "synthetic", "synthetic": {"train_size": 64, "test_size": 32}},
        recipe=TrainRecipe(epochs=1, batch_size=32).to_dict(), threads=1, use_gpu=False,
        keep_weights=True)
    outcome = execute(task)
    assert outcome.status == Status.COMPLETED and outcome.trial_number == 5
    assert outcome.epochs_completed == 1 and len(outcome.curves) == 1
    assert outcome.weights and outcome.placement.device.startswith("cpu")
    assert outcome.test.images == 32
    broken = execute(dataclasses.replace(task, arch={"family": "cifar", "depth": 7}))
    assert broken.status == Status.FAILED and broken.traceback
    assert broken.failure_kind == FailureKind.ERROR



@pytest.mark.parametrize("blocked", ["a file where the folder goes", "a folder where they go"])
def test_weights_that_cannot_be_written_cost_the_weights_not_the_trial(tmp_path, blocked):
    """Kept weights are optional: a weights folder that cannot take them (a file in its place, a
    write that fails; a full disk or no permission alike) records the trial COMPLETE with why
    they were not kept, and leaves no half-written file; one a killed driver half-wrote is
    removed by the next run."""
    import optuna

    from helpers import raw_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import open_study
    from resnet_ablate.study.recorder import TrialRecorder

    spec = parse_spec(raw_spec("weights", seeds=1))
    storage = f"sqlite:///{tmp_path / 'weights.db'}"
    artifacts = tmp_path / "weights.artifacts"
    said = []
    recorder = TrialRecorder(open_study(spec, storage), spec, artifacts=artifacts,
                             store_folder=tmp_path, max_artifact_mb=1.0, store=storage,
                             log=said.append)
    tag = recorder.weights_tag
    if blocked == "a file where the folder goes":
        artifacts.write_text("")
    else:
        artifacts.mkdir()
        (artifacts / f"trial-00007.{tag}.tmp").write_bytes(b"half")  # a killed driver's
        (artifacts / "trial-00007.0ther5t0.tmp").write_bytes(b"half")  # another store's, live
    recorder.remove_partial_weights()
    if artifacts.is_dir():
        assert [p.name for p in artifacts.iterdir()] == ["trial-00007.0ther5t0.tmp"]
        (artifacts / "trial-00007.0ther5t0.tmp").unlink()
        (artifacts / f"trial-00000.{tag}.pt" / "inside").mkdir(parents=True)  # rename fails
    trial = recorder.ask({"shortcut": "A"}, 0)
    assert recorder.finish(trial, _completed(trial_number=trial.number)) == Status.COMPLETED
    (stored,) = optuna.load_study(study_name="weights", storage=storage).get_trials()
    assert stored.state == optuna.trial.TrialState.COMPLETE
    assert stored.user_attrs[TrialKey.WEIGHTS].startswith(f"not kept: cannot write {artifacts}")
    # The run says so (it exited 0 and printed nothing), once: every later trial fails alike.
    assert said == [f"trial 0's weights {stored.user_attrs[TrialKey.WEIGHTS]} (its record is "
                    "kept; `show --columns number,weights` lists every trial's)"]
    later = recorder.ask({"shortcut": "none"}, 0)
    recorder.finish(later, _completed(trial_number=later.number))
    assert len(said) == 1
    assert not list(artifacts.glob("*.tmp")) if artifacts.is_dir() else artifacts.is_file()


def test_two_stores_of_one_study_in_one_folder_keep_their_own_weights(tmp_path):
    """runs/a.db and runs/b.db of the study "weights" share runs/weights.artifacts/: trial 0 of
    each is its own file (b's trial 0 overwrote a's, which then scored with b's model), also
    where b.db began as a copy of a.db (the same records, the next trial numbers alike), and
    each store's record reads back its own bytes; a rerun of a store names its weights alike."""
    import shutil

    import optuna

    from helpers import raw_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import open_study
    from resnet_ablate.study.recorder import TrialRecorder

    spec = parse_spec(raw_spec("weights", seeds=1))
    artifacts = tmp_path / "weights.artifacts"

    def record(store: str, weights: bytes, shortcut: str) -> tuple[int, str]:
        storage = f"sqlite:///{tmp_path / f'{store}.db'}"
        recorder = TrialRecorder(open_study(spec, storage), spec, artifacts=artifacts,
                                 store_folder=tmp_path, max_artifact_mb=1.0, store=storage)
        recorder.remove_partial_weights()
        trial = recorder.ask({"shortcut": shortcut}, 0)
        outcome = dataclasses.replace(_completed(trial_number=trial.number), weights=weights)
        assert recorder.finish(trial, outcome) == Status.COMPLETED
        stored = optuna.load_study(study_name="weights", storage=storage).get_trials()[-1]
        return stored.number, stored.user_attrs[TrialKey.WEIGHTS]

    first_a = record("a", b"weights of a", "A")
    first_b = record("b", b"weights of b", "A")
    shutil.copy(tmp_path / "a.db", tmp_path / "c.db")
    second_a = record("a", b"second of a", "none")
    second_c = record("c", b"second of c", "none")
    assert first_a[0] == first_b[0] == 0 and second_a[0] == second_c[0] == 1
    for (_, path), weights in ((first_a, b"weights of a"), (first_b, b"weights of b"),
                               (second_a, b"second of a"), (second_c, b"second of c")):
        assert (tmp_path / path).read_bytes() == weights
    assert len({first_a[1], first_b[1], second_a[1], second_c[1]}) == 4
    assert first_a[1].split(".")[-2] == second_a[1].split(".")[-2]  # one store, one tag


class _Killed(BaseException):
    """The driver's death at one write: nothing after it runs."""


@pytest.mark.parametrize("killed", ["before telling", "writing the weights", "mid-record",
                                    "pruned, before telling", "diverged, before telling"])
def test_a_trial_whose_end_was_recorded_before_its_driver_died_ends_as_recorded(tmp_path, killed):
    """A driver killed after a trial's result was recorded and before Optuna was told left it
    RUNNING: the next run marked it interrupted (its test error beside) and trained it again.
    Now a complete record ends as it says: COMPLETE with its objective (its weights resolved from
    the file, or said lost), PRUNED, or failed with its own kind; a record cut short is still
    interrupted."""
    import optuna

    from helpers import raw_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import open_study
    from resnet_ablate.study.recorder import TrialRecorder

    spec = parse_spec(raw_spec("killed", seeds=1))
    storage = f"sqlite:///{tmp_path / 'killed.db'}"

    def recorder() -> TrialRecorder:  # each run opens the store anew
        return TrialRecorder(open_study(spec, storage), spec, artifacts=tmp_path / "artifacts",
                             store_folder=tmp_path, max_artifact_mb=1.0, store=storage)

    def die(*_args, **_kwargs):
        raise _Killed

    first = recorder()
    trial = first.ask({"shortcut": "A"}, 0)
    outcome = _completed(trial_number=trial.number, weights=b"the weights")
    if killed.startswith("pruned"):
        outcome = TrialOutcome(trial.number, Status.PRUNED, "pruned after epoch 1",
                               curves=CURVES[:1])
    elif killed.startswith("diverged"):
        outcome = _completed(trial_number=trial.number, status=Status.DIVERGED)
    if killed == "writing the weights":
        first._keep_weights = die
    elif killed == "mid-record":
        written = []
        setter = trial.set_user_attr
        trial.set_user_attr = lambda key, value: (
            die() if len(written) == 3 else (written.append(key), setter(key, value)))
    else:
        first._tell = die
    with pytest.raises(_Killed):
        first.finish(trial, outcome)
    (left,) = optuna.load_study(study_name="killed", storage=storage).get_trials()
    assert left.state == optuna.trial.TrialState.RUNNING

    recovered = recorder().recover_interrupted()
    (stored,) = optuna.load_study(study_name="killed", storage=storage).get_trials()
    if killed == "mid-record":
        assert (recovered.ended, recovered.interrupted) == (0, 1)
        assert stored.state == optuna.trial.TrialState.FAIL
        assert stored.user_attrs[TrialKey.FAILURE_KIND] == FailureKind.INTERRUPTED
        return
    assert (recovered.ended, recovered.interrupted) == (1, 0)
    if killed.startswith("pruned"):
        assert stored.state == optuna.trial.TrialState.PRUNED
        assert stored.user_attrs[TrialKey.PRUNED] == "pruned after epoch 1"
    elif killed.startswith("diverged"):
        assert stored.state == optuna.trial.TrialState.FAIL
        assert stored.user_attrs[TrialKey.FAILURE_KIND] == FailureKind.DIVERGED
    else:
        assert stored.state == optuna.trial.TrialState.COMPLETE
        assert stored.values == [CURVES[-1]["test_error"]]  # the last epoch's, as told
        weights = stored.user_attrs[TrialKey.WEIGHTS]
        if killed == "writing the weights":
            assert weights == "not kept: the driver was stopped while writing them"
        else:
            assert (tmp_path / weights).read_bytes() == b"the weights"


def test_a_result_without_a_finite_objective_fails_with_its_reason_and_recovers_alike(tmp_path):
    """A NaN objective was stored by a recovery as COMPLETE where `tell` fails the trial (and a
    missing one raised TypeError in `finish` after its record was written, so that every later
    recovery raised it again): the trial fails with the reason, killed or not."""
    last_test_error = float("nan")
    import optuna

    from helpers import raw_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import open_study
    from resnet_ablate.study.recorder import TrialRecorder

    spec = parse_spec(raw_spec("no-objective", seeds=1))
    storage = f"sqlite:///{tmp_path / 'no-objective.db'}"

    def recorder() -> TrialRecorder:
        return TrialRecorder(open_study(spec, storage), spec, artifacts=tmp_path / "artifacts",
                             store_folder=tmp_path, max_artifact_mb=1.0, store=storage)

    curves = (CURVES[0], {**CURVES[1], "test_error": last_test_error})
    first = recorder()
    told = first.ask({"shortcut": "A"}, 0)
    assert first.finish(told, _completed(trial_number=told.number, curves=curves,
                                         weights=None)) == FailureKind.ERROR
    killed = first.ask({"shortcut": "none"}, 0)

    def die(*_args, **_kwargs):
        raise _Killed

    first._tell = die
    with pytest.raises(_Killed):
        first.finish(killed, _completed(trial_number=killed.number, curves=curves, weights=None))
    assert recorder().recover_interrupted().ended == 1
    for stored in optuna.load_study(study_name="no-objective", storage=storage).get_trials():
        assert stored.state == optuna.trial.TrialState.FAIL
        assert stored.user_attrs[TrialKey.FAILURE_KIND] == FailureKind.ERROR
        assert stored.user_attrs[TrialKey.FAILURE].startswith("no finite value of its objective")
