"""Test session setup, and the fixtures several test files share.

The Triton kernels run through Triton's interpreter when there is no GPU, its scans and reductions
of the kernels' own combine functions as trees (tests/interpreter_combines.py).

TRITON_INTERPRET is read when `@triton.jit` decorates, so it is set here, before any test module
imports resnet_ablate. The default backend ("auto") never runs the interpreter, so model-level tests
stay fast; tests of the op itself choose "triton" or "torch" explicitly with `use_backend`.
"""

import os
import shutil

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

# Each test process one torch thread where the processes fill the machine: two processes of two
# threads each on two cores spent the threads' time waiting on each other.
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _PROCESSES >= (os.cpu_count() or 1):
    torch.set_num_threads(1)

if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter's scans and reductions with the kernels' own combines, as trees over whole
    # arrays (held to the interpreter's own by tests/test_interpreter_combines.py).
    import interpreter_combines

    interpreter_combines.install()


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> str:
    """The runs folder of the small study the results tests read, run once per session: by the
    first test process that asks for it where several share the session (pytest-xdist's), the
    others waiting for it and reading the same folder (the tests only read it)."""
    if "PYTEST_XDIST_WORKER" not in os.environ:  # one process
        return _results_runs(tmp_path_factory.mktemp("results-runs"))
    from filelock import FileLock  # (torch's own dependency)

    shared = tmp_path_factory.getbasetemp().parent  # the session's, above each worker's
    runs, built = shared / "results-runs", shared / "results-runs.built"
    with FileLock(str(shared / "results-runs.lock")):
        if not built.exists():
            shutil.rmtree(runs, ignore_errors=True)  # a process that failed to build it
            runs.mkdir()
            _results_runs(runs)
            built.touch()
    return str(runs)


def _results_runs(runs) -> str:
    import optuna
    import ray

    from helpers import RESULTS_DEPTHS, RESULTS_SEEDS, RESULTS_SHORTCUTS, RESULTS_STUDY, results_study_spec
    from resnet_ablate.spec import parse_spec
    from resnet_ablate.study import RunOptions, run_study

    from resnet_ablate.study.cluster import start_local_ray

    start_local_ray(cpus=2)  # the Ray a driver starts: of its own, loopback, no dashboard
    try:
        summary = run_study(parse_spec(results_study_spec()),
                            RunOptions(runs_dir=runs, progress=False))
    finally:
        ray.shutdown()
    stored = optuna.load_study(study_name=RESULTS_STUDY, storage=summary.storage).get_trials()
    complete = [t for t in stored if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == len(RESULTS_DEPTHS) * len(RESULTS_SHORTCUTS) * len(RESULTS_SEEDS)
    return str(runs)


@pytest.fixture(scope="session")
def results(runs):
    """`resnet_ablate.results.load` of that small study."""
    from helpers import RESULTS_STUDY
    from resnet_ablate.results import load

    return load(RESULTS_STUDY, runs_dir=runs)


@pytest.fixture(scope="session")
def postgres_url():
    """A PostgreSQL server of our own on loopback (from the server binaries .ci/run installs),
    with an empty `studies` database; stopped and removed after the session."""
    import shutil
    import subprocess
    import tempfile
    from pathlib import Path

    from helpers import free_port, postgres_binary

    initdb, pg_ctl = postgres_binary("initdb"), postgres_binary("pg_ctl")
    if not (initdb and pg_ctl):
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs them")
    pytest.importorskip("psycopg", reason="the cluster extra (psycopg) is not installed")
    # PostgreSQL refuses to run as root: as root, run it as the postgres system user.
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="resnet-ablate-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()
    subprocess.run([*as_user, initdb, "-D", str(data), "--auth=trust", "-U", "postgres"],
                   check=True, capture_output=True)
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-l", str(folder / "server.log"), "-w",
                    "-o", f"-p {port} -k {folder} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        import psycopg

        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres",
                             autocommit=True) as connection:
            connection.execute("CREATE DATABASE studies")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/studies"
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPUs for one test module's studies (a module's tests share it), the one
    a driver starts itself (of its own, listening on loopback only, no dashboard)."""
    import ray

    from resnet_ablate.study.cluster import start_local_ray

    start_local_ray(cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _stop_signal_handlers_restored():
    """Each test starts with the process's Ctrl-C, SIGTERM and SIGHUP handlers as the previous
    one found them: a command run in-process ends by ignoring them (cli/registry.py `stopped`: the
    process is on its way out), which would otherwise leak into every later test of the session."""
    import signal

    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    yield
    for stop, handler in saved.items():
        signal.signal(stop, handler)

