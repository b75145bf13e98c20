"""What several test files share: small study specs on synthetic data, the small study that
the results tests read (built once per session by the `runs` fixture in conftest.py), and
simulated studies held in memory."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import yaml
from scipy.special import expit

SYNTHETIC = {"num_classes": 4, "channels": 1, "image_size": 8, "train_size": 128,
             "test_size": 64, "noise": 1.5}

# The study the results tests read back.
RESULTS_STUDY = "results-small"
RESULTS_DEPTHS, RESULTS_SHORTCUTS, RESULTS_SEEDS = (8, 14), ("A", "none"), (0, 1, 2)


def raw_spec(name, *, epochs=2, seeds=2, **overrides) -> dict:
    """A small study spec (plain values, as YAML gives them): depth-8 CIFAR nets, synthetic data."""
    raw = {
        "study": name,
        "dataset": {"name": "synthetic", "synthetic": SYNTHETIC},
        "model": {"family": "cifar", "depth": 8},
        "space": {"shortcut": ["A", "none"]},
        "seeds": seeds,
        "train": {"epochs": epochs, "batch_size": 32},
        "resources": {"cpus": 1, "workers": 2},
        "max_attempts": 2,
    }
    raw.update(overrides)
    return raw


def write_spec(folder: Path, raw: dict) -> Path:
    path = folder / f"{raw['study']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_spec_alone(folder: Path, raw: dict):
    """Run the study `raw` describes, written as a spec file, with its store under `folder`, on
    the test module's Ray (`local_ray`) or else on a local Ray of its own, shut down afterwards:
    (the run's summary, the study's trials)."""
    import optuna
    import ray

    from resnet_ablate.spec import load_spec
    from resnet_ablate.study import RunOptions, run_study

    own_ray = not ray.is_initialized()
    try:
        summary = run_study(load_spec(write_spec(folder, raw)),
                            RunOptions(runs_dir=folder, progress=False))
    finally:
        if own_ray:
            ray.shutdown()
    study = optuna.load_study(study_name=raw["study"], storage=summary.storage)
    return summary, study.get_trials()


def results_study_spec() -> dict:
    return {"study": RESULTS_STUDY, "question": "Do shortcuts help deeper nets?",
            "dataset": {"name": "synthetic", "synthetic": SYNTHETIC},
            "model": {"family": "cifar"},
            "space": {"depth": list(RESULTS_DEPTHS), "shortcut": list(RESULTS_SHORTCUTS)},
            "seeds": len(RESULTS_SEEDS), "train": {"epochs": 2, "batch_size": 32},
            "resources": {"cpus": 1, "workers": 2}}


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_binary(name: str) -> str | None:
    """A PostgreSQL server program (initdb, pg_ctl) on PATH or in Debian's versioned folders."""
    import glob
    import shutil

    found = shutil.which(name) or sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found if isinstance(found, str) else (found[-1] if found else None)


def run_replicas(function, world: int, *args) -> list:
    """`function(replicas, *args)` in `world` fresh processes joined in a gloo process group, as
    the replicas of one data-parallel run; returns each replica's result, by rank. `function`
    must be importable by name (a module's top level), as the processes are spawned."""
    import tempfile

    import torch
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_replica_entry, args=(world, folder, function, args), nprocs=world)
        return [torch.load(Path(folder) / f"{rank}.pt", weights_only=False)
                for rank in range(world)]


def _replica_entry(rank: int, world: int, folder: str, function, args: tuple) -> None:
    import torch

    from resnet_ablate.replicas import process_group

    with process_group(rank, world, f"file://{folder}/group") as replicas:
        result = function(replicas, *args)
    torch.save(result, Path(folder) / f"{rank}.pt")


def own_ray_processes(title: bytes) -> list[int]:
    """Processes named `title` (b"ray::run_trial", b"ray::RayTrainWorker") of this process's own
    local Ray: workers whose raylet this process started (their grandparent), so that another
    test run on the machine is never touched. Linux only (reads /proc)."""
    def parent(pid: int) -> int:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])

    import os

    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title) and \
                        parent(parent(int(entry.name))) == os.getpid():
                    pids.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
    return pids


def jpeg_bytes(label: int, rng, size=(40, 34)) -> bytes:
    """A small JPEG whose colour tells its class `label` apart, with seeded noise."""
    import io

    import numpy as np
    from PIL import Image

    colour = np.array([40 * label + 20, 255 - 35 * label, (90 * label) % 256], dtype=np.float64)
    pixels = np.clip(colour + rng.normal(0, 12, size=(size[1], size[0], 3)), 0, 255)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_shard(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """A tar shard holding `members` (name, bytes) in that order."""
    import io
    import tarfile

    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def labelled_images(prefix: str, classes: int, per_class: int, seed: int = 0,
                    image: str = "jpg") -> list[tuple[str, bytes]]:
    """Shard members of `classes` x `per_class` samples: `<key>.<image>` and `<key>.cls`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    members = []
    for label in range(classes):
        for i in range(per_class):
            members += [(f"{prefix}{label}-{i}.{image}", jpeg_bytes(label, rng)),
                        (f"{prefix}{label}-{i}.cls", str(label).encode())]
    return members


def study_in_memory(trials, *, model=None, seed_rule=None):
    """A study whose completed trials are `trials` ((swept values, seed, 0/1 test errors per
    image), one per trial), recorded as the driver records them and held in memory: the frame
    and attributes `results.load` would read from its store, without a store's cost (simulations
    build hundreds). `model`: the architecture fields fixed for all (CIFAR by default). FLOPs and
    parameters rise with depth; `seed_rule` as a spec writes it."""
    import optuna

    from resnet_ablate.record import TrialKey, pack_outcomes
    from resnet_ablate.results import Results
    from resnet_ablate.results.store_reading import trial_row, trials_frame

    swept = tuple(trials[0][0])
    space = {name: sorted({values[name] for values, _, _ in trials}) for name in swept}
    distributions = {name: optuna.distributions.CategoricalDistribution(levels)
                     for name, levels in space.items()}
    frozen = []
    for values, seed, wrong in trials:
        error, depth = float(wrong.mean()), values.get("depth", (model or {}).get("depth", 20))
        trial = optuna.trial.create_trial(
            params=dict(values), distributions=distributions, value=error, user_attrs={
                TrialKey.SEED: seed, TrialKey.ARCH: {"family": "cifar", **(model or {}), **values},
                TrialKey.FINAL_TEST_ACCURACY: 1 - error, TrialKey.TEST_IMAGES: len(wrong),
                TrialKey.TEST_WRONG: int(wrong.sum()), TrialKey.PARAMS: depth * 1000,
                TrialKey.FLOPS: depth * 10**6, TrialKey.TEST_OUTCOMES: pack_outcomes(wrong)})
        trial.number = len(frozen)
        frozen.append(trial)
    spec = {"study": "simulated", "space": space, "model": dict(model or {})}
    if seed_rule is not None:
        spec["seeds"] = seed_rule
    return Results(study="simulated", storage="memory",
                   trials=trials_frame([trial_row(t) for t in frozen]), swept=swept,
                   objectives=("test_error", "flops"), spec=spec,
                   attrs={t.number: dict(t.user_attrs) for t in frozen}, seed_rule=seed_rule)


# The statistics' simulated studies: a logistic model of seeds and test images.

# Gauss-Hermite nodes and weights, made once: an eigenvalue problem each time was most of a
# simulated study's cost (their offsets were found anew for every replication).
HERMITE_NODES, HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)


def true_error(offset: float, seed_sd: float, image_sd: float) -> float:
    """E[expit(offset + u + v)], u ~ N(0, seed_sd), v ~ N(0, image_sd): the error rate over the
    populations of seeds and test images, by Gauss-Hermite quadrature."""
    x, w = HERMITE_NODES, HERMITE_WEIGHTS
    return float((w * expit(offset + math.hypot(seed_sd, image_sd) * x)).sum() / w.sum())


@functools.lru_cache(maxsize=None)
def offset_for(error: float, seed_sd: float, image_sd: float) -> float:
    """The logit offset whose true error rate is `error`."""
    low, high = -10.0, 10.0
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if true_error(middle, seed_sd, image_sd) < error \
            else (low, middle)
    return (low + high) / 2


def error_table(rng, n: int, offset: float, seed_sd: float, image_sd: float,
            difficulty: np.ndarray) -> np.ndarray:
    """A seeds x images table of 0/1 errors: each seed trained anew, each image as hard as
    `difficulty` says (logistic model, the documented model's Bernoulli form)."""
    seeds = rng.normal(0, seed_sd, (n, 1))
    return (rng.random((n, len(difficulty))) < expit(offset + seeds + difficulty)).astype(float)


# Two regimes of the documented model: seeds that vary little next to the test set's sampling
# (as converged CIFAR nets do), and seeds that vary as much as the test set samples.
REGIMES = {"images dominate": (0.08, 0.1, 1.5), "seeds matter": (0.08, 0.4, 1.5)}


def write_study(path, name: str, space: dict, cells: dict, *, outcomes: bool = True,
                edit=None) -> str:
    """A study store at `path` whose completed trials are `cells`: {(params tuple, seed): 0/1
    vector of test errors}, each recorded as the driver records a trial (record.py's keys);
    `edit(point, seed, attrs)`, where given, changes a trial's attributes as it is written (a
    damaged or an older store)."""
    import optuna

    from resnet_ablate.record import StudyKey, TrialKey, pack_outcomes
    from resnet_ablate.storage import sqlite_url

    storage = sqlite_url(path)
    study = optuna.create_study(study_name=name, storage=storage)
    study.set_user_attr(StudyKey.SPEC, {"study": name, "space": space})
    study.set_user_attr(StudyKey.OBJECTIVES, ["test_error"])
    distributions = {f: optuna.distributions.CategoricalDistribution(levels)
                     for f, levels in space.items()}
    for (point, seed), wrong in cells.items():
        params = dict(zip(space, point))
        error = float(np.mean(wrong))
        attrs = {TrialKey.SEED: seed, TrialKey.ARCH: {"family": "cifar", **params},
                 TrialKey.ARCH_NAME: "-".join(map(str, point)),
                 TrialKey.FINAL_TEST_ACCURACY: 1 - error,
                 # Training error: the test error plus a seeded amount, for the Student t path.
                 TrialKey.FINAL_TRAIN_ACCURACY: 1 - error / 2 - 0.01 * ((seed * 7 + len(str(point))) % 5),
                 TrialKey.TEST_IMAGES: len(wrong), TrialKey.TEST_WRONG: int(np.sum(wrong)),
                 TrialKey.PARAMS: 1000, TrialKey.FLOPS: 10**6}
        if outcomes:
            attrs[TrialKey.TEST_OUTCOMES] = pack_outcomes(wrong)
        if edit is not None:
            edit(point, seed, attrs)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions,
                                                  value=error, user_attrs=attrs))
    return storage


def fresh_kernel_plans(monkeypatch) -> None:
    """Launch plans of the calling test's own, made anew under whatever it patched (and the
    eager calls that hold plans, and the geometries they come from), dropped afterwards."""
    from resnet_ablate.kernels import _eager, _triton_geometry, _triton_plans

    from resnet_ablate.kernels._signature_cache import SignatureCache

    monkeypatch.setattr(_triton_plans, "_FORWARD_PLANS", SignatureCache())
    monkeypatch.setattr(_triton_plans, "_BACKWARD_PLANS", SignatureCache())
    monkeypatch.setattr(_triton_geometry, "_GEOMETRIES", SignatureCache())
    monkeypatch.setattr(_eager, "_CALLS", SignatureCache())

