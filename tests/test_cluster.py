"""Studies on a real two-node Ray cluster with a real PostgreSQL study store, all on this machine.

The fixtures start a PostgreSQL server on loopback (`postgres_url`, conftest.py) and a Ray cluster of a head node and a second worker node (`ray start`), and stop everything they
started. Each node has one CPU, so two trials at once means one on each node.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import sqlalchemy

pytestmark = pytest.mark.cluster
import yaml

from helpers import SYNTHETIC, free_port
from helpers import raw_spec as _raw_spec
from helpers import write_spec as _write_spec

from resnet_ablate import results

RAY = str(Path(sys.executable).parent / "ray")
# Ray clusters authenticate with a token (~/.ray/auth_token); clients read it in this mode.
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}


class _Cluster:
    def __init__(self, address: str, head_node: subprocess.Popen,
                 worker_node: subprocess.Popen | None) -> None:
        self.address = address
        self.head_node = head_node
        self.worker_node = worker_node

    def wait_for_nodes(self, count: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if sum(self.node_ids().values()) >= count:
                    return
            except subprocess.CalledProcessError:  # not reachable yet
                pass
            assert time.monotonic() < deadline, f"the Ray cluster did not reach {count} node(s)"
            time.sleep(1)

    def node_ids(self) -> dict[str, bool]:
        out = subprocess.run(
            [sys.executable, "-c", "import ray, json; ray.init(address=%r, logging_level='ERROR');"
             "print(json.dumps({n['NodeID']: n['Alive'] for n in ray.nodes()}))" % self.address],
            capture_output=True, text=True, timeout=120, check=True, env=ENV)
        import json

        return json.loads(out.stdout.strip().splitlines()[-1])

    def kill_worker_node(self) -> None:
        os.killpg(self.worker_node.pid, signal.SIGKILL)  # its raylet and its workers, like a lost host
        self.worker_node.wait()

    def freeze_a_running_trial(self) -> bool:
        """Stop (SIGSTOP) the worker node's processes while one of them runs a trial; False, and
        nothing left stopped, where none does. A trial seen running may end before a kill that
        follows lands (the node-loss test then had nothing lost to check); a stopped one cannot,
        and its title, still the trial's, says it has not returned (Ray titles a worker IDLE once
        its task has)."""
        pids = self._worker_node_pids()
        for pid in pids:
            _signal(pid, signal.SIGSTOP)
        if any(_runs_a_trial(pid) for pid in pids):
            return True
        for pid in pids:
            _signal(pid, signal.SIGCONT)
        return False

    def _worker_node_pids(self) -> list[int]:
        """The worker node's processes (its raylet, its workers): they live in its session."""
        pids = []
        for entry in Path("/proc").iterdir():
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) == self.worker_node.pid:
                    pids.append(int(entry.name))
            except OSError:  # ended meanwhile
                continue
        return pids


def _runs_a_trial(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::run_trial")
    except OSError:
        return False


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # ended meanwhile
        os.kill(pid, signum)


@pytest.fixture(scope="module")
def ray_cluster():
    if not sys.platform.startswith("linux"):
        pytest.skip("the cluster test finds node processes through /proc")
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus=1", "--disable-usage-stats"]
    # Each node in a session of its own, so that teardown stops exactly the nodes started here.
    head = subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                             "--block", *common], start_new_session=True, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cluster = _Cluster(address, head, None)
    try:
        cluster.wait_for_nodes(1)  # the head is up before a node may join
        cluster.worker_node = subprocess.Popen(
            [RAY, "start", f"--address={address}", "--block", *common], start_new_session=True,
            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        cluster.wait_for_nodes(2)
        yield cluster
    finally:
        for node in (cluster.worker_node, head):
            if node is not None and node.poll() is None:
                os.killpg(node.pid, signal.SIGKILL)
                node.wait()


def _spec(tmp_path: Path, name: str, seeds: int, epochs: int) -> Path:
    raw = _raw_spec(name, epochs=epochs, seeds=seeds, max_attempts=3)
    raw["dataset"]["synthetic"] = {**SYNTHETIC, "train_size": 256}
    return _write_spec(tmp_path, raw)


def _driver(spec: Path, cluster: _Cluster, storage: str, runs_dir: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "resnet_ablate.cli", "run", str(spec), "--address", cluster.address,
         "--storage", storage, "--runs-dir", str(runs_dir), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def _trials(storage: str, study: str) -> list[optuna.trial.FrozenTrial]:
    # No pool: the tests poll, and a pool left per poll exhausts the server's connections.
    reader = optuna.storages.RDBStorage(storage, engine_kwargs={"poolclass": sqlalchemy.pool.NullPool})
    try:
        return optuna.load_study(study_name=study, storage=reader).get_trials(deepcopy=False)
    except KeyError:  # not created yet
        return []


def test_two_drivers_share_the_cluster_and_the_store_while_results_are_read(
        ray_cluster, postgres_url, tmp_path):
    drivers = [_driver(_spec(tmp_path, name, seeds=2, epochs=3), ray_cluster, postgres_url, tmp_path)
               for name in ("shared-a", "shared-b")]
    reads = []
    while any(d.poll() is None for d in drivers):
        for name in ("shared-a", "shared-b"):
            try:  # the query side reads while both drivers write
                reads.append(len(results.load(name, storage=postgres_url).trials))
            except results.ResultsError:
                pass
        time.sleep(0.5)
    for driver in drivers:
        _, stderr = driver.communicate()
        assert driver.returncode == 0, stderr
    assert reads, "results were read while the drivers ran"
    for name in ("shared-a", "shared-b"):
        trials = _trials(postgres_url, name)
        assert len(trials) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in trials)
        assert results.load(name, storage=postgres_url).summary()["n"].tolist() == [2, 2]


def test_trials_use_both_nodes_and_survive_losing_one(ray_cluster, postgres_url, tmp_path):
    head_and_worker = set(ray_cluster.node_ids())
    study = "node-loss"
    # Trials long enough that the one running on the worker node is still running when the kill
    # lands (with short ones it often finished in between, and nothing was lost to check): 40
    # epochs take about 7 s here. Three seeds leave trials to run after the first on each node.
    driver = _driver(_spec(tmp_path, study, seeds=3, epochs=40), ray_cluster, postgres_url, tmp_path)
    # Let some trials finish on both nodes, then kill the worker node while it runs a trial.
    deadline = time.monotonic() + 300
    while True:
        assert driver.poll() is None and time.monotonic() < deadline, "no trial completed in time"
        done_on = {t.user_attrs.get("node_id") for t in _trials(postgres_url, study)
                   if t.state == optuna.trial.TrialState.COMPLETE}
        # (Frozen mid-trial: a trial merely seen running could end before the kill lands.)
        if len(done_on) == 2 and ray_cluster.freeze_a_running_trial():
            break
        time.sleep(0.2)
    assert done_on == head_and_worker
    completed_before = {t.number for t in _trials(postgres_url, study)
                        if t.state == optuna.trial.TrialState.COMPLETE}
    ray_cluster.kill_worker_node()
    _, stderr = driver.communicate(timeout=600)
    assert driver.returncode == 0, stderr

    trials = _trials(postgres_url, study)
    history = [(t.number, t.state.name, t.params.get("shortcut"), t.user_attrs.get("seed"),
                t.user_attrs.get("failure")) for t in trials]
    lost = [t for t in trials if t.user_attrs.get("failure_kind") == "worker_lost"]
    assert lost and all("worker lost" in t.user_attrs["failure"] for t in lost), (history, stderr)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    keys = sorted((t.params["shortcut"], t.user_attrs["seed"]) for t in complete)
    assert keys == sorted((s, seed) for s in ("A", "none") for seed in range(3)), (history, stderr)
    assert completed_before <= {t.number for t in complete}
    # Curves and weights came back to the driver's side, not left on the lost node.
    # Weights of a PostgreSQL study are recorded relative to the runs folder.
    assert all(t.user_attrs["curves"] and (tmp_path / t.user_attrs["weights"]).exists() for t in complete)


def test_gpu_trials_on_a_cluster_without_gpus_fail_before_anything_runs(ray_cluster, postgres_url,
                                                                         tmp_path):
    spec = _spec(tmp_path, "wants-gpu", seeds=1, epochs=1)
    raw = yaml.safe_load(spec.read_text())
    raw["resources"]["gpus"] = 0.5
    spec.write_text(yaml.safe_dump(raw))
    driver = _driver(spec, ray_cluster, postgres_url, tmp_path)
    _, stderr = driver.communicate(timeout=300)
    assert driver.returncode == 2
    assert "a trial needs 0.5 GPU(s) (resources.gpus=0.5) but the Ray cluster has 0" in stderr
    assert _trials(postgres_url, "wants-gpu") == []


def test_a_driver_without_the_clusters_token_is_refused_in_one_line(ray_cluster, postgres_url,
                                                                    tmp_path):
    spec = _spec(tmp_path, "no-token", seeds=1, epochs=1)
    without_token = {k: v for k, v in ENV.items() if k != "RAY_AUTH_MODE"}
    driver = subprocess.run(
        [sys.executable, "-m", "resnet_ablate.cli", "run", str(spec), "--address",
         ray_cluster.address, "--storage", postgres_url, "--runs-dir", str(tmp_path), "--quiet"],
        capture_output=True, text=True, env=without_token, timeout=300)
    assert driver.returncode == 2, driver.stderr
    assert driver.stderr.count("\n") == 1 and "Traceback" not in driver.stderr, driver.stderr
    assert f"cannot join the Ray cluster at {ray_cluster.address}" in driver.stderr
    assert "set RAY_AUTH_MODE=token" in driver.stderr
