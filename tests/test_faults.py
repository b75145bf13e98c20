"""Fault injection: the study store and the command line under hostile but ordinary use.

Each test does the fault for real (racing driver processes, corrupt, truncated, read-only and
deleted stores, unreachable servers, files where folders belong) and asserts one clear line, the
right exit code, and that nothing already recorded is lost or changed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from helpers import (RESULTS_STUDY, free_port, labelled_images, raw_spec, write_shard,
                     write_spec)
from resnet_ablate.cli import main
from resnet_ablate.spec import parse_spec

# A driver process that takes the study's lease when the go file appears, and holds it a while.
RACER = r"""
import os, sys, time
import optuna
from resnet_ablate.study import DriverLease, StudyBusy

url, name, hold, go = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
lease = DriverLease(optuna.load_study(study_name=name, storage=url), url)
print("ready", flush=True)
while not os.path.exists(go):
    pass
try:
    lease.acquire()
except StudyBusy:
    print("busy", flush=True)
else:
    print("won", flush=True)
    time.sleep(hold)
    lease.release()
"""


def _start_together(script: str, *argv: str, go: Path, count: int) -> list[str]:
    """Run `count` copies of `script` (which prints "ready", then waits for the file `go`), let
    them go at once; what each printed after that."""
    processes = [subprocess.Popen([sys.executable, "-c", script, *argv, str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(count)]
    for process in processes:
        assert process.stdout.readline().strip() == "ready", process.stderr.read()
    go.touch()
    outcomes = []
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        outcomes.append(out.strip())
    return outcomes


def _race(url: str, name: str, folder: Path, racers: int = 6) -> list[str]:
    """Start `racers` drivers, let them reach for the lease at once; what each got."""
    from resnet_ablate.study import open_study

    open_study(parse_spec(raw_spec(name)), url)
    return _start_together(RACER, url, name, "8", go=folder / f"go-{name}", count=racers)


def test_drivers_racing_for_a_sqlite_study_get_it_once(tmp_path):
    outcomes = _race(f"sqlite:///{tmp_path / 'race.db'}", "race", tmp_path)
    assert sorted(outcomes) == ["busy"] * (len(outcomes) - 1) + ["won"], outcomes


@pytest.mark.cluster
def test_drivers_racing_for_a_postgresql_study_get_it_once(postgres_url, tmp_path):
    outcomes = _race(postgres_url, "race-pg", tmp_path)
    assert sorted(outcomes) == ["busy"] * (len(outcomes) - 1) + ["won"], outcomes


# -- stores that cannot be used: one line, exit 2, the file untouched


def _spec_file(folder: Path, name: str = "faults") -> Path:
    return write_spec(folder, raw_spec(name, seeds=1))


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_store_is_refused_in_one_line_and_left_as_it_was(damage, runs, tmp_path, capsys):
    store = tmp_path / "runs" / "faults.db"
    store.parent.mkdir()
    if damage == "garbage":
        store.write_bytes(b"not a database " * 100)
    else:  # a real study store, cut in half (a copy that stopped early)
        whole = (Path(runs) / f"{RESULTS_STUDY}.db").read_bytes()
        store.write_bytes(whole[: len(whole) // 2])
    before = store.read_bytes()
    spec = _spec_file(tmp_path)
    for argv in (["run", str(spec), "--runs-dir", str(store.parent), "--quiet"],
                 ["run", str(spec), "--runs-dir", str(store.parent), "--dry-run"],
                 ["show", str(store)], ["summary", "faults", "--runs-dir", str(store.parent)]):
        err = _one_line_error(capsys, argv)
        assert "not a readable study store" in err and str(store.name) in err, err
    # ls lists the readable stores beside it, then names the damaged one (and exits 2).
    shutil.copy(Path(runs) / f"{RESULTS_STUDY}.db", store.parent)
    code = main(["ls", "--runs-dir", str(store.parent)])
    out, err = capsys.readouterr()
    assert code == 2 and RESULTS_STUDY in out and "faults" not in out
    assert len(err.strip().splitlines()) == 1 and "not a readable study store" in err, err
    assert store.name in err
    assert store.read_bytes() == before


def test_a_read_only_store_is_refused_in_one_line(tmp_path, capsys):
    store = tmp_path / "ro.db"
    optuna.create_study(study_name="other", storage=f"sqlite:///{store}")
    before = store.read_bytes()
    # SQLite's read-only open: what a store on a read-only mount or without write access gives
    # (file modes cannot show it to a test running as root, which ignores them).
    url = f"sqlite:///file:{store}?mode=ro&uri=true"
    err = _one_line_error(capsys, ["run", str(_spec_file(tmp_path)), "--storage", url, "--quiet"])
    assert "cannot write" in err and "readonly" in err, err
    assert store.read_bytes() == before


@pytest.mark.parametrize("storage, expected", [
    ("not a url", "cannot parse the storage URL 'not a url'"),
    ("postgresql+psycopg://nobody@127.0.0.1:{port}/studies", "cannot connect"),
    ("mysql://nobody@127.0.0.1:{port}/studies", "its database driver is not installed"),
])
def test_an_unusable_storage_url_is_refused_in_one_line(storage, expected, tmp_path, capsys):
    pytest.importorskip("psycopg") if storage.startswith("postgresql") else None
    url = storage.format(port=free_port())
    err = _one_line_error(capsys, ["run", str(_spec_file(tmp_path)), "--storage", url, "--quiet"])
    assert expected in err, err


def test_a_runs_folder_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("my notes\n")
    spec = str(_spec_file(tmp_path))
    for argv in (["run", spec, "--runs-dir", str(runs)], ["run", spec, "--runs-dir", str(runs),
                                                          "--dry-run"], ["ls", "--runs-dir", str(runs)]):
        err = _one_line_error(capsys, argv)
        assert f"{runs} is a file, not a folder" in err
    assert runs.read_text() == "my notes\n"


def test_a_sqlite_database_of_something_else_is_never_written(tmp_path, capsys):
    import sqlite3

    other = tmp_path / "faults.db"
    with sqlite3.connect(other) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER, amount REAL)")
    before = other.read_bytes()
    for extra in (["--quiet"], ["--dry-run"]):
        err = _one_line_error(capsys, ["run", str(_spec_file(tmp_path)), "--runs-dir",
                                       str(tmp_path), *extra])
        assert "is a SQLite database of something else (tables: invoices)" in err
    assert other.read_bytes() == before


@pytest.mark.parametrize("unfinished", ["an empty file", "a database without tables",
                                        "its tables without their version record"])
def test_a_store_a_run_stopped_while_creating_is_named_unfinished(tmp_path, capsys, unfinished):
    """Killed during start-up (or a full disk then), a run can leave an empty file or Optuna's
    tables without their version record: readers said "damaged: restore it from a copy" or
    "cannot write (attempt to write a readonly database)"."""
    import contextlib
    import sqlite3

    import sqlalchemy
    from optuna.storages._rdb import models

    store = tmp_path / "faults.db"
    if unfinished == "an empty file":
        store.write_bytes(b"")
    elif unfinished == "a database without tables":
        with contextlib.closing(sqlite3.connect(store)) as connection:
            connection.execute("PRAGMA user_version = 1")  # a header, no table yet
    else:
        models.BaseModel.metadata.create_all(sqlalchemy.create_engine(f"sqlite:///{store}"))
    for argv in (["show", "faults", "--runs-dir", str(tmp_path)],
                 ["ls", "--runs-dir", str(tmp_path)]):
        err = _one_line_error(capsys, argv)
        assert f"study store {store}: unfinished ({unfinished}): a run stopped while creating " \
               "it; run the study again to finish it" in err, err
    # And running the study again finishes it.
    assert main(["run", str(_spec_file(tmp_path)), "--runs-dir", str(tmp_path), "--dry-run"]) \
        == 0


def test_a_full_disk_says_the_study_resumes():
    import sqlite3

    import sqlalchemy

    from resnet_ablate.storage import StoreError, store_faults

    with pytest.raises(StoreError, match=r"study store sqlite:///x.db: the disk is full "
                                         r"\(database or disk is full\); free space and run the "
                                         "study again: its completed trials are kept"):
        with store_faults("sqlite:///x.db"):
            raise sqlalchemy.exc.OperationalError("INSERT", {}, sqlite3.OperationalError(
                "database or disk is full"))


@pytest.mark.parametrize("content, expected", [
    (bytes(range(256)) * 8, "not a text file (not UTF-8)"),
    (b"study: x\x00\x00\n", "not a text file (it holds NUL bytes)"),
    (b"x" * 5000, "the spec: expected a mapping, got str 'xxxx"),
])
def test_a_spec_that_is_not_a_spec_is_refused_in_one_short_line(content, expected, tmp_path, capsys):
    spec = tmp_path / "spec.yaml"
    spec.write_bytes(content)
    err = _one_line_error(capsys, ["run", str(spec)])
    assert expected in err and len(err) < 300, err


# -- a store deleted under a running driver


def _running_trials(store: Path, name: str) -> int:
    try:
        trials = optuna.load_study(study_name=name, storage=f"sqlite:///{store}").get_trials()
    except KeyError:  # the driver has not created the study yet
        return 0
    return sum(t.state == optuna.trial.TrialState.RUNNING for t in trials)


def test_a_store_deleted_while_its_study_runs_stops_the_driver_with_the_reason(tmp_path):
    spec = write_spec(tmp_path, raw_spec("vanish", epochs=40, seeds=3))
    store = tmp_path / "vanish.db"
    driver = subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate", "run", str(spec), "--runs-dir", str(tmp_path),
         "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not _running_trials(store, "vanish"):
        assert driver.poll() is None and time.monotonic() < deadline, driver.communicate()
        time.sleep(0.2)
    os.remove(store)
    _, err = driver.communicate(timeout=300)
    assert driver.returncode == 2, err
    assert "the file was deleted or replaced while this driver ran" in err, err
    assert "Traceback" not in err, err
    assert not store.exists(), "no empty store was made in the deleted one's place"


# -- a runs folder moved elsewhere keeps its trained weights


def test_a_runs_folder_moved_elsewhere_keeps_its_weights(runs, tmp_path):
    from resnet_ablate.results import load

    moved = tmp_path / "elsewhere" / "runs"
    shutil.copytree(runs, moved)
    original, copy = load(RESULTS_STUDY, runs_dir=runs), load(str(moved / f"{RESULTS_STUDY}.db"))
    numbers = [int(n) for n in copy.completed()["number"]]
    assert numbers
    for number in numbers:
        assert copy.weights_path(number).is_relative_to(moved)
        a, b = original.model(number).state_dict(), copy.model(number).state_dict()
        assert all((a[k] == b[k]).all() for k in a)


# -- a dry run refuses what a run would refuse


def test_a_dry_run_refuses_a_missing_data_set_as_a_run_does(tmp_path, capsys):
    raw = {**raw_spec("no-cifar", seeds=1), "dataset": {"name": "cifar10", "root": str(tmp_path / "none")}}
    for extra in (["--dry-run"], ["--quiet"]):
        err = _one_line_error(capsys, ["run", str(write_spec(tmp_path, raw)), "--runs-dir",
                                       str(tmp_path), *extra])
        assert "CIFAR-10 not found" in err
    assert not list(tmp_path.glob("*.db")), "nothing was stored"


@pytest.mark.parametrize("damage", ["garbage", "cut short"])
def test_a_dry_run_on_a_damaged_cifar_archive_is_one_line(damage, tmp_path, capsys):
    import io
    import tarfile

    archive = tmp_path / "cifar" / "cifar-10-python.tar.gz"
    archive.parent.mkdir()
    if damage == "garbage":
        archive.write_bytes(os.urandom(5000))
    else:
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            data = os.urandom(200_000)
            info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        archive.write_bytes(buffer.getvalue()[:100_000])
    raw = {**raw_spec("bad-cifar", seeds=1), "dataset": {"name": "cifar10", "root": str(archive)}}
    err = _one_line_error(capsys, ["run", str(write_spec(tmp_path, raw)), "--runs-dir",
                                   str(tmp_path), "--dry-run"])
    assert f"{archive}: not a readable CIFAR-10 archive, damaged or cut short" in err, err


def test_a_dry_run_on_a_shard_that_is_not_a_tar_is_one_line(tmp_path, capsys):
    raw = _shard_spec("bad-shard", tmp_path)
    (tmp_path / "train.tar").write_bytes(os.urandom(3000))
    err = _one_line_error(capsys, ["run", str(write_spec(tmp_path, raw)), "--runs-dir",
                                   str(tmp_path), "--dry-run"])
    assert f"shard {tmp_path / 'train.tar'} cannot be read: not a tar file, or cut short" in err


def _shard_spec(name: str, folder: Path, **shards) -> dict:
    """A study on shards in `folder` (two classes, a training and a validation shard) whose
    `shards` entries replace the generated ones."""
    write_shard(folder / "train.tar", labelled_images("t", 2, 4))
    write_shard(folder / "val.tar", labelled_images("v", 2, 2, seed=1))
    dataset = {"name": "webdataset", "image_size": 16, "loader_workers": 0,
               "shards": {"train": str(folder / "train.tar"), "val": str(folder / "val.tar"),
                          "num_classes": 2, **shards}}
    return {**raw_spec(name, seeds=1), "dataset": dataset,
            "model": {"family": "imagenet", "widths": [4, 8, 8, 8], "stages": [1, 1, 1, 1],
                      "block": "basic"},
            "space": {"shortcut": ["A"]}, "train": {"epochs": 1, "batch_size": 4},
            "max_attempts": 1}


def test_a_pipe_shard_url_is_refused_before_anything_runs_unless_allowed(tmp_path, capsys,
                                                                          monkeypatch):
    from resnet_ablate.data.shard_urls import ALLOW_PIPE_URLS_ENV

    monkeypatch.setenv(ALLOW_PIPE_URLS_ENV, "0")  # and put back as it was after the test
    canary = tmp_path / "CANARY"
    raw = _shard_spec("piped", tmp_path, val=f"pipe:touch {canary}; cat {tmp_path / 'val.tar'}",
                      val_size=4)
    spec = str(write_spec(tmp_path, raw))
    for extra in (["--dry-run"], ["--quiet"]):
        err = _one_line_error(capsys, ["run", spec, "--runs-dir", str(tmp_path), *extra])
        assert "is a pipe: URL, which runs a shell command" in err and "--allow-pipe-urls" in err
    assert not canary.exists() and not list(tmp_path.glob("*.db"))
    assert main(["run", spec, "--runs-dir", str(tmp_path), "--dry-run", "--allow-pipe-urls"]) == 0
    assert os.environ[ALLOW_PIPE_URLS_ENV] == "1"


class TestNoDecodableImage:
    """Both splits' trials on one local Ray (the class's), stopped before the tests after them,
    which start Rays of their own."""

    @pytest.fixture(scope="class", autouse=True)
    @classmethod
    def ray_of_the_class(cls):
        import ray

        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
                 log_to_driver=False)
        yield
        ray.shutdown()

    @pytest.mark.parametrize("split", ["train", "val"])
    def test_a_trial_on_no_decodable_image_fails_with_the_reason(self, split, tmp_path):
        from resnet_ablate.record import FailureKind, TrialKey
        from resnet_ablate.spec import load_spec
        from resnet_ablate.study import RunOptions, run_study

        write_shard(tmp_path / "bad.tar", [member for i in range(4) for member in
                                           ((f"b{i}.jpg", b"not a jpeg"), (f"b{i}.cls", b"0"))])
        raw = {**_shard_spec(f"no-images-{split}", tmp_path,
                             **{split: str(tmp_path / "bad.tar")}), "max_attempts": 3}
        summary = run_study(load_spec(write_spec(tmp_path, raw)),
                            RunOptions(runs_dir=tmp_path, progress=False))
        assert (summary.completed, summary.failed) == (0, 1), summary
        # Tried once: the same files fail the same way (as a missing shard, not retried).
        (trial,) = optuna.load_study(study_name=raw["study"], storage=summary.storage).get_trials()
        assert trial.state == optuna.trial.TrialState.FAIL
        what = "epoch 1's training" if split == "train" else "the val split's evaluation"
        assert trial.user_attrs[TrialKey.FAILURE] == (
            f"NoImages: {what} had no image to score: 4 image(s) skipped as undecodable or "
            "unlabelled, none read; check the data set's files")
        assert trial.user_attrs[TrialKey.FAILURE_KIND] == FailureKind.DATA_UNAVAILABLE


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("resources, needs", [
    ({"gpus": 1}, "1 GPU(s) (resources.gpus=1)"),
    ({"gpus": 4, "nodes": 2}, "8 GPU(s) (resources.gpus=4 x nodes=2)"),  # one data-parallel trial
])
def test_gpus_are_refused_on_a_machine_without_one(resources, needs, tmp_path, capsys):
    raw = {**raw_spec("gpu-less", seeds=1), "resources": {**resources, "workers": 1}}
    spec = str(write_spec(tmp_path, raw))
    err = _one_line_error(capsys, ["run", spec, "--runs-dir", str(tmp_path), "--quiet"])
    assert f"a trial needs {needs} but this machine has 0; set gpus: 0" in err
    # A dry run plans for the machine the run is meant for: its plan, and a note of the refusal.
    assert main(["run", spec, "--runs-dir", str(tmp_path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"note: a trial needs {needs} but this machine has 0: `run` is refused here" in out
    assert " pending" in out and "time: not estimated" in out
    assert not list(tmp_path.glob("*.db")), "no study was made"


# -- lookups that name a path, and messages that read as they should


def test_a_study_is_found_by_its_store_path_with_or_without_the_suffix(runs, tmp_path, capsys):
    from resnet_ablate.results import ResultsError, load

    bare = str(Path(runs) / RESULTS_STUDY)
    assert load(bare).study == load(bare + ".db").study == RESULTS_STUDY
    with pytest.raises(ResultsError, match=rf"no study store file {tmp_path}/nosuch.db; "):
        load(str(tmp_path / "nosuch.db"))
    err = _one_line_error(capsys, ["compare", bare, "--factor", "depth", "--baseline", "8",
                                   "--where", "depth == 8"])
    assert "depth has only one value (8)" in err and "np." not in err


class _RunsACommand:
    """What a crafted weights or checkpoint file would smuggle in: unpickling it runs a command."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("damage", ["garbage", "cut short", "empty", "pickled object", "a list"])
def test_a_damaged_weights_file_is_one_results_error_naming_it(damage, runs, tmp_path):
    import torch

    from resnet_ablate.results.analysis import trained_model
    from resnet_ablate.results import ResultsError, load

    shutil.copytree(runs, tmp_path / "runs")
    results = load(RESULTS_STUDY, runs_dir=str(tmp_path / "runs"))
    number = int(results.completed()["number"].iloc[0])
    weights = results.weights_path(number)
    canary = tmp_path / "CANARY"
    good = weights.read_bytes()
    if damage == "garbage":
        weights.write_bytes(os.urandom(3000))
    elif damage == "cut short":
        weights.write_bytes(good[:len(good) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "pickled object":
        torch.save({"conv1.weight": _RunsACommand(f"touch {canary}")}, weights)
    else:
        torch.save([1, 2], weights)
    with pytest.raises(ResultsError) as error:
        trained_model(results, number)
    message = str(error.value)
    assert f"{weights}, cannot be loaded (damaged, cut short or of another network)" in message
    assert len(message.splitlines()) == 1 and not canary.exists(), message


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full on this system")
def test_an_output_with_no_space_names_the_path_and_the_reason(runs, capsys):
    err = _one_line_error(capsys, ["export", str(Path(runs) / RESULTS_STUDY), "--format", "csv",
                                   "-o", "/dev/full"])
    assert "cannot write /dev/full: No space left on device" in err, err


@pytest.mark.parametrize("command", [["run", "studies/quickstart.yaml"], ["ls"]])
def test_an_empty_storage_url_is_refused(command, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        main([*command, "--storage", "", "--runs-dir", str(tmp_path)])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()  # one line, not argparse's usage first
    assert "argument --storage: is empty: give an Optuna storage URL" in line
    assert line.endswith(f"(see `resnet-ablate {command[0]} --help`)")
    assert not list(tmp_path.iterdir())


def test_format_without_dry_run_is_refused_before_anything_runs(tmp_path, capsys):
    err = _one_line_error(capsys, ["run", str(_spec_file(tmp_path)), "--runs-dir", str(tmp_path),
                                   "--format", "json"])
    assert "--format applies to --dry-run" in err
    assert not list(tmp_path.glob("*.db"))


@pytest.mark.parametrize("address, expected", [
    ("127.0.0.1:{port}", "no Ray cluster answers at 127.0.0.1:{port}"),
    ("just-a-name", "--address 'just-a-name' is not a Ray address"),
])
def test_an_address_with_no_cluster_is_one_line_before_anything_is_stored(address, expected,
                                                                         tmp_path, capsys):
    port = free_port()
    err = _one_line_error(capsys, ["run", str(_spec_file(tmp_path)), "--runs-dir", str(tmp_path),
                                   "--address", address.format(port=port), "--quiet"])
    # Checked before joining: Ray's own join would retry for minutes, then say something else.
    assert expected.format(port=port) in err
    assert not list(tmp_path.glob("*.db"))


def test_a_local_ray_listens_on_loopback_only():
    import socket

    import ray

    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import cluster

    assert not ray.is_initialized()
    cluster.connect(parse_spec(raw_spec("loopback")), None, workers=1)
    try:
        host, port = ray.get_runtime_context().gcs_address.rsplit(":", 1)
        assert host == "127.0.0.1" and ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            pass  # reachable from this machine
        outward = _outward_address()
        if outward is None:
            pytest.skip("this machine has no interface but loopback to try the port from")
        with pytest.raises(OSError):  # ... and not from the machine's other interfaces
            socket.create_connection((outward, int(port)), timeout=5).close()
    finally:
        ray.shutdown()


def _outward_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # TEST-NET-1: routed like any outside address
        except OSError:
            return None
        address = probe.getsockname()[0]
    return None if address.startswith("127.") else address


CONNECTER = r"""
import os, sys
from resnet_ablate.study.opening import connect_storage

go = sys.argv[2]
print("ready", flush=True)
while not os.path.exists(go):
    pass
connect_storage(sys.argv[1])
print("connected", flush=True)
"""


@pytest.mark.cluster
def test_drivers_creating_a_new_postgresql_store_at_once_all_connect(postgres_url, tmp_path):
    """The first drivers on an empty database race to create Optuna's tables and types; each
    loser must connect, not fail with "already exists"."""
    import psycopg

    server, _, _ = postgres_url.rpartition("/")
    host_port = server.split("@", 1)[1]
    host, port = host_port.split(":")
    with psycopg.connect(f"host={host} port={port} user=postgres dbname=postgres",
                         autocommit=True) as connection:
        connection.execute("CREATE DATABASE fresh_race")
    outcomes = _start_together(CONNECTER, f"{server}/fresh_race", go=tmp_path / "go", count=4)
    assert outcomes == ["connected"] * 4


@pytest.mark.cluster
def test_reading_results_again_and_again_holds_no_postgresql_connection(postgres_url):
    """A notebook or a dashboard polls a running study's results: every read must give its
    connections back, or PostgreSQL refuses the study's own drivers ("too many clients") once
    max_connections (100) is reached."""
    import gc

    import psycopg

    from resnet_ablate import results

    server, _, database = postgres_url.rpartition("/")
    host, port = server.split("@", 1)[1].split(":")
    writer = optuna.storages.RDBStorage(postgres_url)
    study = optuna.create_study(study_name="polled", storage=writer)
    study.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    writer.engine.dispose()  # the writer's own pool, not what is measured

    def connections() -> int:
        """Clients' connections to the study's database: not the server's own workers, such as
        an autovacuum worker that visits it while the reads run (CI once counted one)."""
        with psycopg.connect(f"host={host} port={port} user=postgres dbname=postgres") as admin:
            (count,), = admin.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND backend_type = 'client backend'", (database,)).fetchall()
        return count

    # Connections must be given back when a read ends, not when garbage is swept (and what
    # earlier tests left to the collector must not close during the count).
    gc.collect()
    gc.disable()
    try:
        before = connections()
        for _ in range(15):
            assert len(results.load("polled", storage=postgres_url).trials) == 1
            results.list_studies(storage=postgres_url)
        held = connections() - before
    finally:
        gc.enable()
    assert held <= 0, f"{held} connections left open by 15 reads"


@pytest.fixture
def python_sigint_handler():
    """Python's own SIGINT handler while a test runs, the inherited one put back after: a test
    worker process (pytest-xdist) may have set SIGINT aside, or a test before (Ray) its own."""
    import signal

    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_a_stop_signal_is_noted_where_it_lands_and_acted_on_by_the_loop(python_sigint_handler):
    # A Ctrl-C used to raise wherever it landed; in the middle of an import (the driver's first
    # FLOPs count imports half of torch) it came out as a TypeError and a crashed driver.
    import signal

    from resnet_ablate.study.signals import StopRequested, stop_on_signals

    with stop_on_signals() as heard:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # delivered here, raising nothing
        assert heard.heard == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            heard.raise_if_heard()
        # The stop is under way: a second Ctrl-C is only noted, so that it cannot cut the
        # marking of the unfinished trials short (it used to raise wherever it landed).
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
    with stop_on_signals() as heard:
        with pytest.raises(KeyboardInterrupt):  # a wait for Ray is cut short at once
            with heard.interruptible():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
        os.kill(os.getpid(), signal.SIGINT)  # and once only
        time.sleep(0.05)
    with stop_on_signals() as heard:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        with pytest.raises(StopRequested):
            heard.raise_if_heard()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_sigterm_then_ctrl_c_arriving_together_name_the_stop_sigterm(python_sigint_handler):
    """SIGTERM, then Ctrl-C, both pending when the driver next runs Python (a loaded machine):
    Python runs their handlers in signal-number order, Ctrl-C's first, which raises out of the
    wait; SIGTERM's, after, still names the stop until it is settled (exit 143, not 130)."""
    import signal

    from resnet_ablate.study.signals import stop_on_signals

    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    with stop_on_signals() as heard:
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C's handler ran first
            with heard.interruptible():
                signal.pthread_sigmask(signal.SIG_BLOCK, stops)
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)  # both delivered at once
                time.sleep(5)
        assert heard.settle() == "SIGTERM"
        os.kill(os.getpid(), signal.SIGHUP)  # once settled, the name stays
        time.sleep(0.05)
        assert heard.heard == "SIGTERM"
    with stop_on_signals() as heard:  # the first of SIGTERM and SIGHUP names it
        os.kill(os.getpid(), signal.SIGTERM)
        # Its handler run before SIGHUP is sent: where both are pending at once (a signal taken
        # by another thread while the next kill runs), Python runs SIGHUP's first, by number.
        deadline = time.monotonic() + 10
        while heard.heard is None and time.monotonic() < deadline:
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.05)
        assert heard.settle() == "SIGTERM"
