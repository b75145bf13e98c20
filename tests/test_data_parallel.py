"""Data-parallel trials: replicas that compute what one process computes, and a study that runs a
trial as a data-parallel run on Ray Train with the same record, resuming a lost replica from its
checkpoint. Replicas here are CPU processes joined by gloo."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from dataclasses import replace

import optuna
import pytest
import torch
from torch import nn

from helpers import SYNTHETIC, labelled_images, own_ray_processes, run_replicas, write_shard
from resnet_ablate.arch import ResNetArch
from resnet_ablate.data import SyntheticSpec, load_dataset
from resnet_ablate.models import build
from resnet_ablate.recipe import TrainRecipe
from resnet_ablate.replicas import SyncedBatchNorm2d
from resnet_ablate.spec import SpecError, parse_spec
from resnet_ablate.study import RunOptions, run_study
from resnet_ablate.train import evaluate, train

# -- the replicas of one run, in spawned processes (no Ray)


def _synced_batch_norm(replicas, inputs, weights):
    """This replica's half of the batch through a SyncedBatchNorm2d; output and gradients."""
    torch.manual_seed(0)
    bn = SyncedBatchNorm2d(inputs.shape[1], momentum=0.3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    share = replicas.positions(inputs.shape[0])
    x = inputs[share].clone().requires_grad_()
    out = bn(x)
    (out * weights[share]).sum().backward()
    return out.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def _batch_norm_inputs():
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(7, 3, 5, 4, generator=generator) * 3 + 2  # 4 + 3 images: uneven halves
    return inputs, torch.randn(7, 3, 5, 4, generator=generator)


def test_synced_batch_norm_is_batch_norm_over_the_global_batch(replica_runs):
    inputs, weights = _batch_norm_inputs()
    results = replica_runs["synced-bn"]

    torch.manual_seed(0)
    reference = nn.BatchNorm2d(3, momentum=0.3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-0.5, 0.5)
    x = inputs.clone().requires_grad_()
    out = reference(x)
    (out * weights).sum().backward()
    for rank, (replica_out, grad, _, _, mean, var) in enumerate(results):
        share = slice(rank, None, 2)
        torch.testing.assert_close(replica_out, out.detach()[share], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad, x.grad[share], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mean, reference.running_mean)
        torch.testing.assert_close(var, reference.running_var)
    # Each replica holds its part of the parameters' gradient; DDP sums (averages) them.
    torch.testing.assert_close(results[0][2] + results[1][2], reference.weight.grad,
                               atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(results[0][3] + results[1][3], reference.bias.grad,
                               atol=1e-4, rtol=1e-5)


def _synthetic(train_size):
    return load_dataset("synthetic", synthetic=SyntheticSpec(**{**SYNTHETIC,
                                                                "train_size": train_size}))


def _train_small(replicas, train_size, recipe):
    data = _synthetic(train_size)
    built = []

    def model():
        built.append(build(ResNetArch(family="cifar", depth=8), num_classes=data.num_classes,
                           in_channels=data.in_channels))
        return built[-1]

    result = train(model, data, recipe, seed=3, threads=1, replicas=replicas)
    return result, built[-1].state_dict()


SYNCED = TrainRecipe(epochs=1, batch_size=32, sync_bn=True, precision="fp32")
OWN_STATISTICS = TrainRecipe(epochs=4, batch_size=32, precision="fp32")


@pytest.mark.parametrize("train_size", [32, 37], ids=["one-step", "uneven-last-batch"])
def test_synchronised_replicas_take_the_steps_of_one_process(train_size, replica_runs):
    # 37 images in batches of 32: a second step of 5 images, 3 on one replica and 2 on the
    # other, whose losses are reweighted so that the averaged gradient is the batch's.
    single, single_state = _train_small(None, train_size, SYNCED)
    replicas = replica_runs[f"synced-{train_size}"]
    for result, state in replicas:
        for name, value in single_state.items():
            torch.testing.assert_close(state[name].float(), value.float(), atol=1e-5, rtol=1e-5,
                                       msg=name)
        (one,), (parallel,) = single.history, result.history
        assert parallel.train_loss == pytest.approx(one.train_loss, rel=1e-5)
        assert parallel.train_error == one.train_error
        # Each replica evaluated half the test images; the record is of all of them.
        assert parallel.test_loss == pytest.approx(one.test_loss, rel=1e-5)
        assert parallel.test_error == one.test_error
        # Every replica records the same run (each its own seconds).
        assert [replace(r, seconds=0, train_seconds=0) for r in result.history] == \
            [replace(r, seconds=0, train_seconds=0) for r in replicas[0][0].history]


def test_replicas_with_their_own_batch_statistics_train_like_one_process(replica_runs):
    # The paper's multi-GPU BatchNorm: each replica normalises its half of the batch by itself,
    # which moves the numbers a little, not what is learnt.
    single, _ = _train_small(None, 128, OWN_STATISTICS)
    (result, state), (_, other_state) = replica_runs["own-statistics"]
    for name in state:  # the running statistics were averaged: one model on both replicas
        torch.testing.assert_close(state[name], other_state[name])
    assert result.history[0].train_loss == pytest.approx(single.history[0].train_loss, rel=0.05)
    assert result.history[-1].train_loss < 0.5 * result.history[0].train_loss


def _train_on_shards(replicas, root):
    from resnet_ablate.data.shards import load_shards

    data = load_shards({"train": str(root / "train-{0..1}.tar"), "val": str(root / "val-{0..1}.tar"),
                        "num_classes": 3}, image_size=16, loader_workers=0)
    model = lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1),  # noqa: E731
                                  nn.Flatten(), nn.Linear(4, 3))
    recipe = TrainRecipe(epochs=2, batch_size=4, eval_batch_size=4, precision="fp32")
    return train(model, data, recipe, seed=0, threads=1, replicas=replicas).history


def _write_shards(root):
    for split, count in (("train", 4), ("val", 2)):
        for shard in range(2):
            write_shard(root / f"{split}-{shard}.tar",
                        labelled_images(f"{split}{shard}-", 3, count, seed=shard))


def _one_after_another(replicas, calls):
    """Each (function, args) of `calls` run by this replica, in turn, in one process group."""
    return [function(replicas, *args) for function, args in calls]


@pytest.fixture(scope="module")
def replica_runs(tmp_path_factory) -> dict[str, list]:
    """Each replica's result, by rank, of the replica runs the tests above check: all of them in
    one pair of spawned processes (a spawn costs two imports of torch), one run after another."""
    shards = tmp_path_factory.mktemp("replica-shards")
    _write_shards(shards)
    calls = {"synced-bn": (_synced_batch_norm, _batch_norm_inputs()),
             "synced-32": (_train_small, (32, SYNCED)), "synced-37": (_train_small, (37, SYNCED)),
             "own-statistics": (_train_small, (128, OWN_STATISTICS)),
             "shards": (_train_on_shards, (shards,)),
             # The runs outside Ray that the trials on Ray Train below are checked against.
             **{f"digits-{epochs}": (_train_digits, _digits_trial(epochs))
                for epochs in (RECORDED_EPOCHS, KILLED_EPOCHS)}}
    by_rank = run_replicas(_one_after_another, 2, list(calls.values()))
    return {name: [results[i] for results in by_rank] for i, name in enumerate(calls)}


def test_replicas_train_and_evaluate_on_their_own_shards(replica_runs):
    # A process group of two: webdataset's default node splitter refuses to read under it.
    first, second = replica_runs["shards"]
    assert [replace(r, seconds=0, train_seconds=0) for r in first] == \
        [replace(r, seconds=0, train_seconds=0) for r in second]
    assert len(first) == 2 and all(r.skipped_images == 0 for r in first)
    assert all(0 <= r.test_error <= 1 and r.train_loss > 0 for r in first)


# -- the spec


def _spec(**resources):
    return {"study": "dp", "space": {"depth": [8]}, "model": {"family": "cifar"},
            "resources": resources, "train": {"batch_size": 64}}


@pytest.mark.parametrize("resources, train, message", [
    ({"gpus": 0, "nodes": 2}, {}, "resources.nodes"),
    ({"gpus": 2, "replicas": 2}, {}, "leave replicas out"),
    ({"replicas": 0}, {}, "resources.replicas"),
    ({"replicas": 3}, {}, "multiple of 3"),
    ({"replicas": 2}, {"compile": True}, "one-process trials"),
    ({"replicas": 1}, {"sync_bn": True}, "train.sync_bn"),
    ({}, {"sync_bn": True}, "single process"),
])
def test_a_data_parallel_spec_names_what_is_wrong(resources, train, message):
    raw = _spec(**resources)
    raw["train"].update(train)
    with pytest.raises(SpecError, match=message):
        parse_spec(raw)


def test_a_data_parallel_spec_counts_its_replicas():
    assert parse_spec(_spec(gpus=4, nodes=2)).resources.replica_count == 8
    assert parse_spec(_spec(gpus=8)).resources.replica_count == 8
    assert parse_spec(_spec(replicas=2)).resources.replica_count == 2
    assert parse_spec(_spec(gpus=0.5)).resources.replica_count == 1


# -- trials on Ray Train


def _study_spec(name, epochs):
    return {"study": name, "dataset": "digits", "model": {"family": "cifar", "depth": 8},
            "space": {"shortcut": ["A"]}, "seeds": 1,
            "train": {"epochs": epochs, "batch_size": 64, "lr": 0.05, "precision": "fp32",
                      "sync_bn": True},
            "resources": {"cpus": 1, "replicas": 2, "workers": 1}, "max_restarts": 1}


def _only_trial(tmp_path, name):
    (trial,) = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / name}.db"
                                 ).get_trials(deepcopy=False)
    return trial


# The epochs of the recorded trial (one: the killed trial's six cover an epoch's hand-over) and
# of the killed one, which must checkpoint before it is killed and resume after.
RECORDED_EPOCHS, KILLED_EPOCHS = 1, 6


def _digits_trial(epochs: int) -> tuple[dict, dict]:
    """The architecture and recipe a trial of `_study_spec` records."""
    spec = parse_spec(_study_spec("reference", epochs))
    arch = spec.arch({"shortcut": "A"})
    return arch.to_dict(), spec.recipe_for(arch).to_dict()


def _train_digits(replicas, arch, recipe):
    data = load_dataset("digits")
    return train(lambda: build(ResNetArch.from_dict(arch), num_classes=10, in_channels=1), data,
                 TrainRecipe.from_dict(recipe), seed=0, threads=1, replicas=replicas)


def _same_curves(recorded, reference):
    assert [r["epoch"] for r in recorded] == [r.epoch for r in reference.history]
    for record, expected in zip(recorded, reference.history):
        for key in ("train_loss", "train_error", "test_loss", "test_error", "lr"):
            assert record[key] == pytest.approx(getattr(expected, key), rel=1e-6, abs=1e-9), key


@pytest.mark.slow
def test_a_data_parallel_trial_is_recorded_like_any_trial(local_ray, tmp_path, replica_runs):
    spec = parse_spec(_study_spec("dp-record", epochs=RECORDED_EPOCHS))
    summary = run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))
    assert (summary.completed, summary.failed) == (1, 0)
    trial = _only_trial(tmp_path, "dp-record")
    attrs = trial.user_attrs
    assert attrs["data_parallel"] == {"replicas": 2, "backend": "gloo", "sync_bn": True,
                                      "resumed_after_epochs": []}
    one_process = parse_spec({**_study_spec("one-process", epochs=1),
                              "resources": {"cpus": 1, "workers": 1},
                              "train": {"epochs": 1, "batch_size": 64}})
    run_study(one_process, RunOptions(runs_dir=tmp_path, progress=False))
    assert set(_only_trial(tmp_path, "one-process").user_attrs) | {"data_parallel"} == set(attrs)
    assert trial.value == pytest.approx(attrs["curves"][-1]["test_error"])
    from resnet_ablate.results import load

    (row,) = load("dp-record", runs_dir=tmp_path).trials.itertuples()
    assert (row.state, row.replicas, row.restarts) == ("COMPLETE", 2, 0)
    assert not (tmp_path / "dp-record.checkpoints").exists()  # the emptied folder too

    # The trial is the run its replicas make outside Ray, and close to one process's run.
    assert (attrs["arch"], attrs["recipe"]) == _digits_trial(RECORDED_EPOCHS)
    _same_curves(attrs["curves"], replica_runs[f"digits-{RECORDED_EPOCHS}"][0])
    single = _train_digits(None, attrs["arch"], attrs["recipe"])
    assert attrs["curves"][0]["train_loss"] == pytest.approx(single.history[0].train_loss,
                                                             rel=1e-3)
    # Its kept weights are the model whose error was recorded.
    model = build(ResNetArch.from_dict(attrs["arch"]), num_classes=10, in_channels=1)
    model.load_state_dict(torch.load(tmp_path / attrs["weights"]))
    data = load_dataset("digits")
    _, error = evaluate(model, data.test_x, data.test_y)
    assert error == pytest.approx(attrs["curves"][-1]["test_error"], abs=1e-9)


def _registered_checkpoints(storage):
    """Checkpoints Ray Train has registered for the first trial's run (its manager's snapshot)."""
    try:
        (snapshot,) = storage.glob("trial-00000-*/checkpoint_manager_snapshot.json")
        return len(json.loads(snapshot.read_text()).get("checkpoint_results", []))
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds replicas through /proc")
def test_a_killed_replica_resumes_the_trial_from_its_last_checkpoint(local_ray, tmp_path,
                                                                      replica_runs):
    spec = parse_spec(_study_spec("dp-killed", epochs=KILLED_EPOCHS))
    result = {}
    driver = threading.Thread(target=lambda: result.update(
        summary=run_study(spec, RunOptions(runs_dir=tmp_path, progress=False))))
    driver.start()
    storage = tmp_path / "dp-killed.checkpoints"
    killed = None
    # (Ray Train's start takes minutes on a loaded machine: with three test processes the wait
    # once ended without a kill at 120 s. The message says what ended it.)
    deadline = time.monotonic() + 300
    while killed is None and time.monotonic() < deadline and driver.is_alive():
        pids = own_ray_processes(b"ray::RayTrainWorker")
        if _registered_checkpoints(storage) >= 1 and len(pids) == 2:
            killed = pids[1]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    waited = "the study ended" if not driver.is_alive() else "300 s passed"
    driver.join(timeout=300)
    assert killed is not None, f"no replica was seen after a checkpoint before {waited}"
    assert (result["summary"].completed, result["summary"].failed) == (1, 0)
    attrs = _only_trial(tmp_path, "dp-killed").user_attrs
    (resumed_after,) = attrs["data_parallel"]["resumed_after_epochs"]
    assert 1 <= resumed_after < KILLED_EPOCHS
    from resnet_ablate.results import load

    assert load("dp-killed", runs_dir=tmp_path).trials["restarts"].tolist() == [1]
    # Resumed, not restarted: the trial's six epochs are those of a run that was never
    # interrupted (on CPUs, to the last bit).
    assert (attrs["arch"], attrs["recipe"]) == _digits_trial(KILLED_EPOCHS)
    _same_curves(attrs["curves"], replica_runs[f"digits-{KILLED_EPOCHS}"][0])


def test_without_a_dashboard_the_trainer_drops_the_placement_group_cleaner(local_ray, tmp_path):
    """Ray Train's placement-group cleaner watches the run through the dashboard's State API;
    on the dashboard-less Ray a driver starts it can watch nothing, and stopping it cost every
    data-parallel trial 12 s. Where a dashboard is registered, Ray Train's defaults stay."""
    from ray.experimental import internal_kv
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from resnet_ablate.data_parallel import _trainer_class

    def callbacks(trainer_class) -> list[str]:
        trainer = trainer_class(lambda config: None, scaling_config=ScalingConfig(num_workers=1),
                                run_config=RunConfig(storage_path=str(tmp_path), name="probe"))
        return [type(callback).__name__ for callback in trainer._create_default_callbacks()]

    # This Ray is the one a driver starts (local_ray): no dashboard registered.
    assert internal_kv._internal_kv_get("dashboard", namespace="dashboard") is None
    without = callbacks(_trainer_class())
    assert "PlacementGroupCleanerCallback" in callbacks(TorchTrainer)  # what is dropped, by name
    assert set(without) == set(callbacks(TorchTrainer)) - {"PlacementGroupCleanerCallback"}
    internal_kv._internal_kv_put("dashboard", b"127.0.0.1:8265", namespace="dashboard")
    try:  # where a dashboard is registered, Ray Train's defaults
        assert _trainer_class() is TorchTrainer
    finally:
        internal_kv._internal_kv_del("dashboard", namespace="dashboard")


def test_an_error_in_a_replica_fails_the_trial_and_a_lost_replica_is_a_lost_worker():
    from ray.exceptions import ActorDiedError
    from ray.train import ControllerError, WorkerGroupError

    from resnet_ablate.data_parallel import _failed_in_code, _why_lost
    from resnet_ablate.record import FailureKind, Status, TrialTask

    task = TrialTask(trial_number=7, arch={}, seed=0, dataset={}, recipe={}, threads=1,
                     use_gpu=False, keep_weights=False, replicas=2, max_restarts=2)
    raised = WorkerGroupError("rank 1 raised", {1: ValueError("shapes do not match")})
    outcome = _failed_in_code(task, raised)
    assert outcome.status == Status.FAILED and outcome.trial_number == 7
    assert outcome.failure_kind == FailureKind.ERROR
    assert outcome.reason == ("ValueError: shapes do not match (replica 1, after 2 restart(s) "
                              "of the data-parallel run)")
    # A replica's shard with wrong bytes fails again the same way: unavailable, not retried.
    from resnet_ablate.data import CorruptShard

    corrupt = WorkerGroupError("rank 1 raised", {1: CorruptShard("shard s.tar cannot be read")})
    outcome = _failed_in_code(task, corrupt)
    assert outcome.status == Status.UNAVAILABLE
    assert outcome.failure_kind == FailureKind.DATA_UNAVAILABLE
    # A lost process is no error of the trial's: raised, so the driver retries the trial.
    died = WorkerGroupError("rank 0 died", {0: ActorDiedError()})
    assert _failed_in_code(task, died) is None
    assert _why_lost(died, 2).startswith("replica 0 lost 3 time(s): ")
    controller = ControllerError(RuntimeError("health check failed"))
    assert _failed_in_code(task, controller) is None
    assert _why_lost(controller, 0) == ("the data-parallel run lost its replicas 1 time(s): "
                                        "health check failed")


@pytest.mark.parametrize("users_setting", [None, "1.5"])
def test_ray_trains_controller_polls_the_replicas_often_unless_the_user_says(
        monkeypatch, tmp_path, users_setting):
    """Ray Train's controller takes one report per poll, and a replica's report waits for the
    previous one to be taken: at its default poll (2 s) epochs shorter than that were held back.
    What the controller is handed is what Ray Train's own propagation gives at `fit`."""
    import resnet_ablate.data_parallel as data_parallel
    from ray.train.v2._internal.constants import get_env_vars_to_propagate

    from resnet_ablate.record import TrialTask

    # Set first either way, so that the process's environment is restored after the test.
    monkeypatch.setenv(data_parallel.POLL_INTERVAL_ENV, users_setting or "unset")
    if users_setting is None:
        monkeypatch.delenv(data_parallel.POLL_INTERVAL_ENV)
    handed = {}

    class Trainer:  # stands in for TorchTrainer: what its controller would be handed, then stop
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            handed.update(get_env_vars_to_propagate())
            raise RuntimeError("stop here")

    monkeypatch.setattr(data_parallel, "_trainer_class", lambda: Trainer)
    task = TrialTask(trial_number=0, arch={}, seed=0, dataset={}, recipe={}, threads=1,
                     use_gpu=False, keep_weights=False, replicas=2,
                     checkpoints=str(tmp_path))
    with pytest.raises(data_parallel.ReplicasLost, match="stop here"):
        data_parallel.execute_data_parallel(task)
    expected = users_setting or str(data_parallel.POLL_INTERVAL_S)
    assert handed[data_parallel.POLL_INTERVAL_ENV] == expected


# -- checkpoints: where they go, what they may hold, and each start of the replicas counted


class _RunsACommand:
    """What a crafted checkpoint would smuggle in: unpickling it runs a command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_checkpoint_carrying_a_pickled_object_is_refused_and_runs_nothing(tmp_path):
    from resnet_ablate.data_parallel import CheckpointRefused, load_state

    canary = tmp_path / "CANARY"
    torch.save({"train": {"model": _RunsACommand(f"touch {canary}")}, "resumed_after": []},
               tmp_path / "state.pt")
    with pytest.raises(CheckpointRefused, match=f"checkpoint {tmp_path / 'state.pt'} holds more "
                                                "than tensors and plain values; refusing"):
        load_state(tmp_path)
    assert not canary.exists()
    # What the toolkit writes loads: tensors, numbers, lists, strings, None.
    states = []
    train(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 4)),
          load_dataset("synthetic", synthetic=SyntheticSpec()), TrainRecipe(epochs=1, batch_size=64),
          seed=0, threads=1, on_checkpoint=states.append)
    torch.save({"train": states[0], "resumed_after": [0]}, tmp_path / "state.pt")
    assert load_state(tmp_path)["resumed_after"] == [0]


def test_every_start_of_a_runs_replicas_is_counted(tmp_path):
    """A restart from scratch (no checkpoint registered yet) counts as a restart too."""
    from resnet_ablate.data_parallel import note_start

    starts = str(tmp_path / "trial-00000-abc.starts")
    assert [note_start(starts) for _ in range(3)] == [0, 1, 2]


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_a_checkpoints_path_that_is_a_file_is_one_line_before_anything_runs(where, tmp_path,
                                                                            capsys):
    from resnet_ablate.cli import main

    blocking = tmp_path / "taken"
    blocking.write_text("not a folder")
    checkpoints = blocking if where == "file" else blocking / "checkpoints"
    spec = tmp_path / "dp.yaml"
    spec.write_text(json.dumps({**_study_spec("dp-file", epochs=1),
                                "checkpoints": str(checkpoints)}))
    for extra in (["--dry-run"], ["--quiet"]):
        assert main(["run", str(spec), "--runs-dir", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert (f"checkpoints: checkpoints {checkpoints} cannot be a folder: {blocking} is a file"
                in err), err
    assert not list(tmp_path.glob("*.db"))
