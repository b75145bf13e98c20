"""The study runner: the driver asks Optuna for trials, runs them as Ray tasks, and tells the results.

The driver alone talks to the study's storage; Ray workers only compute (see worker.py). That split is
what makes the faults cheap to handle:
- an exception in a trial comes back as a failed outcome: recorded with its traceback, and the study
  goes on (the grid point is tried again, up to `max_attempts`);
- a killed worker surfaces as a Ray error: recorded as failed ("worker lost") and retried;
- a killed driver leaves trials RUNNING in storage: the same command marks them failed
  ("interrupted") and runs only the grid points that have no completed trial yet;
- Ctrl-C cancels the running tasks and marks their trials failed, so storage stays consistent.

Grid studies enumerate every point of the space times every seed themselves, and hand Optuna each
planned point through a tiny sampler; random and TPE studies let Optuna's samplers choose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import threading
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
import sqlalchemy
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress display says what happens

from .arch import ResNetArch
from .data import DatasetShape, SyntheticSpec, dataset_shape, load_dataset
from .models import build
from .profile import ModelProfile, profile
from .progress import StudyProgress
from .recipe import EXECUTION_ONLY
from .spec import IntRange, SpecError, StudySpec, parse_spec, sqlite_path
from .worker import TrialBoard, TrialTask, library_versions, run_trial

# Why a failed trial failed; only some kinds count as an attempt of its grid point.
RETRYABLE_FAILURES = ("error", "worker_lost")
FINAL_FAILURES = ("diverged", "over_budget")
INTERRUPTED = "interrupted"
RETRY_BACKOFF_SECONDS = 5.0  # before a failed grid point's first retry; doubled for each next one
SPEC_SECTIONS_THAT_DEFINE_A_STUDY = ("dataset", "model", "space", "objectives", "train",
                                     "warmup_from_depth")


class StopRequested(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C while a study runs."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """Within: SIGTERM sets the event the driver's loop checks on each turn, which then stops as
    on Ctrl-C (trials marked, storage consistent). A flag, not an exception raised from the
    handler: one raised inside a library's clean-up callback would be swallowed there."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Within: a second Ctrl-C or SIGTERM waits, so that the clean-up it would cut short (marking
    every unfinished trial) completes; it is delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = (signal.SIGINT, signal.SIGTERM)
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


class StudyConflict(RuntimeError):
    """The named study exists in the storage but was created from a different spec."""


class ClusterError(RuntimeError):
    """The Ray cluster cannot give trials what the spec asks for."""


class StudyBusy(RuntimeError):
    """Another live driver is running this study."""


LEASE_SECONDS = 60.0  # a driver that has not renewed its lease for this long is presumed dead
LEASE_RENEW_SECONDS = 15.0


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


class DriverLease:
    """One driver per study: a lease in the study's attributes, renewed while the driver runs.

    A second driver is refused while the lease is live. A lease whose driver died is taken over at
    once on the same host (the process is gone) and after LEASE_SECONDS elsewhere.
    """

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.me = {"host": socket.gethostname(), "pid": os.getpid()}
        self.renewed = 0.0

    def acquire(self) -> None:
        held = self.study.user_attrs.get("driver")
        if held and {k: held.get(k) for k in self.me} != self.me:
            age = time.time() - held.get("renewed", 0)
            dead = held.get("host") == self.me["host"] and not _process_alive(held.get("pid", -1))
            if age < LEASE_SECONDS and not dead:
                raise StudyBusy(
                    f"study {self.study.study_name!r} is being run by driver pid {held.get('pid')} on "
                    f"{held.get('host')} (lease renewed {age:.0f} s ago); wait for it, or stop it and "
                    "run this command again"
                )
        self.renew(force=True)

    def renew(self, force: bool = False) -> None:
        if force or time.monotonic() - self.renewed > LEASE_RENEW_SECONDS:
            self.study.set_user_attr("driver", {**self.me, "renewed": time.time()})
            self.renewed = time.monotonic()

    def release(self) -> None:
        self.study.set_user_attr("driver", None)


@dataclass(frozen=True)
class RunOptions:
    address: str | None = None  # a Ray cluster ("ray://host:10001" or "host:6379"); local if None
    storage: str | None = None  # overrides the spec's storage
    workers: int | None = None  # overrides resources.workers
    runs_dir: Path = Path("runs")
    keep_weights: bool = True
    max_artifact_mb: float = 2048.0  # the trained-weights store beside the study stops growing here
    progress: bool = True


@dataclass(frozen=True)
class PlannedTrial:
    params: dict[str, Any]
    seed: int
    arch: ResNetArch
    params_count: int
    gflops: float
    status: str  # "done", "pending", "given up", "over budget"
    train_tflops: float  # forward + backward (3x forward) over every training image and epoch


@dataclass(frozen=True)
class RunSummary:
    study: str
    storage: str
    completed: int
    failed: int
    pruned: int
    launched: int
    interrupted: str  # "" for a run that ended by itself, else "SIGINT" or "SIGTERM"
    wall_seconds: float
    counts_by_state: Mapping[str, int] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Params as Optuna stores them


def encode_value(value: Any) -> Any:
    """Optuna stores scalars only: a tuple value (stages, widths) is stored as JSON text."""
    return json.dumps(list(value)) if isinstance(value, (tuple, list)) else value


def decode_params(params: Mapping[str, Any], space: Mapping[str, Any]) -> dict[str, Any]:
    decoded = {}
    for name, value in params.items():
        if isinstance(value, str) and value.startswith("["):
            value = tuple(json.loads(value))
        decoded[name] = value
    return {name: decoded[name] for name in space if name in decoded}


def _distributions(spec: StudySpec) -> dict[str, optuna.distributions.BaseDistribution]:
    dists: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, choice in spec.space.items():
        if isinstance(choice, IntRange):
            dists[name] = optuna.distributions.IntDistribution(choice.low, choice.high, step=choice.step)
        else:
            dists[name] = optuna.distributions.CategoricalDistribution([encode_value(c) for c in choice])
    return dists


def _point_key(params: Mapping[str, Any], seed: int) -> str:
    encoded = {name: encode_value(value) for name, value in params.items()}
    return json.dumps([encoded, seed], sort_keys=True)


class _PlannedSampler(optuna.samplers.BaseSampler):
    """Returns the parameters the driver planned for the next trial (grid studies)."""

    def __init__(self) -> None:
        self.planned: dict[str, Any] = {}

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.planned[param_name]


def _sampler(spec: StudySpec) -> optuna.samplers.BaseSampler:
    if spec.sampler == "grid":
        return _PlannedSampler()
    if spec.sampler == "random":
        return optuna.samplers.RandomSampler(seed=spec.seeds[0])
    return optuna.samplers.TPESampler(seed=spec.seeds[0])


def _pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    if spec.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1)
    if spec.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _spec_fingerprint(spec: StudySpec) -> dict[str, Any]:
    """The sections of the spec's YAML that define the study, as written (results read them)."""
    raw = dict(spec.raw or {})
    return {section: raw.get(section) for section in SPEC_SECTIONS_THAT_DEFINE_A_STUDY}


def _meaning(fingerprint: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a fingerprint's sections mean once parsed, so that two spellings of one study compare
    equal (`dataset: digits` and `dataset: {name: digits}`), and choices of how trials execute
    (memory format, compilation, CUDA graphs, check interval) do not make another study. None
    where the stored sections no longer parse (then they must match as written)."""
    sections = {k: v for k, v in fingerprint.items() if v is not None}
    train = {k: v for k, v in (sections.get("train") or {}).items() if k not in EXECUTION_ONLY}
    try:
        # The random sampler takes every kind of space (lists and ranges); which sampler and
        # budget the spec has does not define the study.
        parsed = parse_spec({"study": "fingerprint", **sections, "train": train,
                             "sampler": "random", "budget": {"trials": 1}})
    except SpecError:
        return None
    arch_defaults = {f.name: f.default for f in dataclasses.fields(ResNetArch)}
    return {
        "dataset": dataclasses.asdict(parsed.dataset),
        "model": {k: v for k, v in parsed.model.items() if v != arch_defaults.get(k, object())},
        "space": {name: dataclasses.asdict(v) if isinstance(v, IntRange) else list(v)
                  for name, v in parsed.space.items()},
        "objectives": list(parsed.objectives),
        "train": {k: v for k, v in parsed.train.to_dict().items() if k not in EXECUTION_ONLY},
        "warmup_from_depth": parsed.warmup_from_depth,
    }


def _same_study(stored: Mapping[str, Any], fingerprint: Mapping[str, Any]) -> bool:
    as_written = json.dumps(stored, sort_keys=True) == json.dumps(fingerprint, sort_keys=True)
    stored_meaning = _meaning(stored)
    return as_written or (stored_meaning is not None and stored_meaning == _meaning(fingerprint))


def connect_storage(url: str, attempts: int = 5) -> optuna.storages.BaseStorage:
    """Optuna's storage for `url`. Drivers that start together on a new database race to create
    its tables; the loser sees a duplicate-object error and simply connects again."""
    for attempt in range(attempts):
        try:
            return optuna.storages.get_storage(url)
        except sqlalchemy.exc.SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def open_study(spec: StudySpec, storage: str, *, sampler=None, pruner=None) -> optuna.Study:
    """Create the spec's study in `storage`, or reopen it after checking it was made from this spec."""
    study = optuna.create_study(
        study_name=spec.study, storage=connect_storage(storage), directions=spec.directions,
        sampler=sampler or _sampler(spec), pruner=pruner or _pruner(spec), load_if_exists=True,
    )
    fingerprint = _spec_fingerprint(spec)
    stored = study.user_attrs.get("spec")
    if stored is None:
        study.set_user_attr("spec", fingerprint)
        study.set_user_attr("spec_source", spec.source)
        study.set_user_attr("question", spec.question)
        study.set_user_attr("objectives", list(spec.objectives))
        study.set_user_attr("seeds", list(spec.seeds))
    elif not _same_study(stored, fingerprint):
        differ = [s for s in SPEC_SECTIONS_THAT_DEFINE_A_STUDY if stored.get(s) != fingerprint.get(s)]
        raise StudyConflict(
            f"study {spec.study!r} in {storage} was created from a different spec "
            f"({', '.join(differ)} differ: stored {[stored.get(s) for s in differ]}, "
            f"{spec.source} has {[fingerprint.get(s) for s in differ]}); its recorded trials are "
            "kept: give this spec another study name, or point it at another storage"
        )
    if study.metric_names is None:  # optuna-dashboard and the optuna CLI then name them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(spec.objectives))
    return study


# ----------------------------------------------------------------------------------------------
# The driver


class _Running:
    def __init__(self, trial: optuna.Trial, key: str | None, params: dict[str, Any], seed: int,
                 arch: ResNetArch) -> None:
        self.trial = trial
        self.key = key
        self.params = params
        self.seed = seed
        self.arch = arch
        self.started = time.monotonic()
        self.epochs_done = 0


class StudyRunner:
    """Runs one spec's study to completion (or budget), resuming whatever storage already holds."""

    def __init__(self, spec: StudySpec, options: RunOptions = RunOptions()) -> None:
        self.spec = spec
        self.options = options
        self.storage = options.storage or spec.storage_url(options.runs_dir)
        self.sampler = _sampler(spec)
        self._study: optuna.Study | None = None
        self.workers = options.workers or spec.resources.workers
        self.artifacts = Path(options.runs_dir) / f"{spec.study}.artifacts"
        self._profiles: dict[str, ModelProfile] = {}
        self._shape: DatasetShape | None = None
        self._untold: dict[int, optuna.Trial] = {}  # asked by this driver, not yet told

    @property
    def study(self) -> optuna.Study:
        """The study in storage, created on first use (a dry run only reads)."""
        if self._study is None:
            database = sqlite_path(self.storage)
            if database is not None:
                database.parent.mkdir(parents=True, exist_ok=True)
            self._study = open_study(self.spec, self.storage, sampler=self.sampler)
        return self._study

    def _existing_trials(self) -> list[optuna.trial.FrozenTrial]:
        if self._study is None:
            database = sqlite_path(self.storage)
            if database is not None and not database.exists():
                return []  # opening it would create the file
            names = [s.study_name for s in optuna.get_all_study_summaries(self.storage)]
            if self.spec.study not in names:
                return []
        return self.study.get_trials(deepcopy=False)

    # -- what the data set and the architectures cost

    def _load_kwargs(self) -> dict[str, Any]:
        kwargs = self.spec.dataset.load_kwargs()
        if kwargs["synthetic"] is not None:
            kwargs["synthetic"] = SyntheticSpec(**kwargs["synthetic"])
        return kwargs

    def check_dataset(self) -> None:
        """Read (or download) the data set once here, so that a bad one stops the run early."""
        try:
            load_dataset(**self._load_kwargs())
        except (OSError, ValueError) as error:
            raise SpecError(f"{self.spec.source}: dataset: {error}") from None

    def shape(self) -> DatasetShape:
        if self._shape is None:
            kwargs = self._load_kwargs()
            try:
                self._shape = dataset_shape(**kwargs)
            except (OSError, ValueError) as error:
                raise SpecError(f"{self.spec.source}: dataset: {error}") from None
        return self._shape

    def profile(self, arch: ResNetArch) -> ModelProfile:
        """Parameters and FLOPs of an architecture, computed once per architecture."""
        if arch.digest not in self._profiles:
            data = self.shape()
            model = build(arch, num_classes=data.num_classes, in_channels=data.in_channels)
            self._profiles[arch.digest] = profile(
                model, (data.in_channels, data.image_size, data.image_size))
        return self._profiles[arch.digest]

    def _over_budget(self, arch: ResNetArch) -> bool:
        ceiling = self.spec.budget.max_gflops
        return ceiling is not None and self.profile(arch).flops / 1e9 > ceiling

    # -- what storage already holds

    def _recover_interrupted(self) -> int:
        """Trials left RUNNING by a driver that was killed: mark them failed, as interrupted."""
        stale = [t for t in self.study.get_trials(deepcopy=False)
                 if t.state in (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING)]
        for frozen in stale:
            trial = optuna.trial.Trial(self.study, frozen._trial_id)
            trial.set_user_attr("failure_kind", INTERRUPTED)
            trial.set_user_attr("failure", "interrupted: the driver stopped before the trial finished")
            self.study.tell(frozen.number, state=optuna.trial.TrialState.FAIL)
        return len(stale)

    def _history(self) -> tuple[set[str], Counter]:
        """Grid points (with seed) that are settled, and failed attempts per point."""
        settled: set[str] = set()
        attempts: Counter = Counter()
        for t in self._existing_trials():
            if "seed" not in t.user_attrs:
                continue
            key = _point_key(decode_params(t.params, self.spec.space), t.user_attrs["seed"])
            kind = t.user_attrs.get("failure_kind")
            if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED):
                settled.add(key)
            elif t.state == optuna.trial.TrialState.FAIL and kind in FINAL_FAILURES:
                settled.add(key)
            elif t.state == optuna.trial.TrialState.FAIL and kind in RETRYABLE_FAILURES:
                attempts[key] += 1
        settled |= {k for k, n in attempts.items() if n >= self.spec.max_attempts}
        return settled, attempts

    def plan(self) -> list[PlannedTrial]:
        """Every grid point x seed with its cost and status (grid studies); for `--dry-run`."""
        settled, attempts = self._history()
        completed = {
            _point_key(decode_params(t.params, self.spec.space), t.user_attrs["seed"])
            for t in self._existing_trials()
            if t.state == optuna.trial.TrialState.COMPLETE and "seed" in t.user_attrs
        }
        data = self.shape()
        planned = []
        points = list(self.spec.grid()) if self.spec.sampler == "grid" else []
        for params in points:
            arch = self.spec.arch(params)
            prof = self.profile(arch)
            for seed in self.spec.seeds:
                key = _point_key(params, seed)
                if key in completed:
                    status = "done"
                elif key in settled:
                    status = "given up" if attempts[key] >= self.spec.max_attempts else "settled"
                elif self._over_budget(arch):
                    status = "over budget"
                else:
                    status = "pending"
                planned.append(PlannedTrial(
                    params=params, seed=seed, arch=arch, params_count=prof.params,
                    gflops=prof.flops / 1e9, status=status,
                    train_tflops=3 * prof.flops * data.train_size * self.spec.train.epochs / 1e12,
                ))
        return planned

    # -- running

    def _connect_ray(self) -> None:
        if not ray.is_initialized():
            if self.options.address:
                ray.init(address=self.options.address, logging_level="ERROR", log_to_driver=False)
            else:
                cpus = max(1, math.ceil(self.workers * self.spec.resources.cpus))
                # address="local": a Ray of our own, even where another one runs on this machine.
                ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                         logging_level="ERROR", log_to_driver=False)
        gpus_needed = self.spec.resources.gpus
        if gpus_needed > 0 and ray.cluster_resources().get("GPU", 0) < min(gpus_needed, 1):
            raise ClusterError(
                f"{self.spec.source}: resources.gpus={gpus_needed} but the Ray cluster has no GPU "
                f"(its resources: {ray.cluster_resources()}); set gpus: 0 to train on CPUs"
            )

    def _task(self, number: int, arch: ResNetArch, seed: int) -> TrialTask:
        return TrialTask(
            trial_number=number, arch=arch.to_dict(), seed=seed,
            dataset=self.spec.dataset.load_kwargs(), recipe=self.spec.recipe_for(arch).to_dict(),
            threads=max(1, int(self.spec.resources.cpus)), use_gpu=self.spec.resources.gpus > 0,
            keep_weights=self.options.keep_weights, await_pruner=self._prunes(),
        )

    def _prunes(self) -> bool:
        return (self.spec.pruner != "none" and len(self.spec.objectives) == 1
                and self.spec.objectives[0] in ("test_error", "test_accuracy"))

    def _ask(self, params: dict[str, Any] | None, seed: int) -> optuna.Trial:
        if isinstance(self.sampler, _PlannedSampler):
            self.sampler.planned = {name: encode_value(v) for name, v in (params or {}).items()}
        trial = self.study.ask(_distributions(self.spec))
        self._untold[trial.number] = trial
        trial.set_user_attr("seed", seed)
        return trial

    def _tell(self, trial: optuna.Trial, values=None, state=None) -> None:
        self.study.tell(trial, values, state=state)
        self._untold.pop(trial.number, None)

    def _launch(self, board, params: dict[str, Any] | None, seed: int) -> tuple[Any, _Running] | None:
        trial = self._ask(params, seed)
        params = decode_params(trial.params, self.spec.space)
        arch = self.spec.arch(params)
        prof = self.profile(arch)
        self._record_arch(trial, arch, prof)
        if self._over_budget(arch):
            self._fail(trial, "over_budget",
                       f"over budget.max_gflops={self.spec.budget.max_gflops}: {prof.flops / 1e9:.3f} GFLOPs")
            return None
        options = {"num_cpus": self.spec.resources.cpus}
        if self.spec.resources.gpus:
            options["num_gpus"] = self.spec.resources.gpus
        ref = run_trial.options(**options).remote(self._task(trial.number, arch, seed), board)
        key = _point_key(params, seed) if self.spec.sampler == "grid" else None
        return ref, _Running(trial, key, params, seed, arch)

    def _record_arch(self, trial: optuna.Trial, arch: ResNetArch, prof: ModelProfile) -> None:
        for name, value in {
            "arch": arch.to_dict(), "arch_name": arch.name, "arch_digest": arch.digest,
            "params": prof.params, "flops": prof.flops, "flops_convention": prof.convention,
            "recipe": self.spec.recipe_for(arch).to_dict(),
        }.items():
            trial.set_user_attr(name, value)

    def _fail(self, trial: optuna.Trial, kind: str, reason: str, traceback: str | None = None) -> None:
        trial.set_user_attr("failure_kind", kind)
        trial.set_user_attr("failure", reason)
        if traceback:
            trial.set_user_attr("traceback", traceback)
        self._tell(trial, state=optuna.trial.TrialState.FAIL)

    def _objective_values(self, outcome: Mapping[str, Any], running: _Running) -> list[float]:
        prof = self.profile(running.arch)
        test_accuracy = outcome["final_test_accuracy"]
        metrics = {
            "test_error": 1.0 - test_accuracy, "test_accuracy": test_accuracy,
            "train_error": 1.0 - outcome["final_train_accuracy"], "flops": float(prof.flops),
            "params": float(prof.params), "wall_seconds": outcome["wall_seconds"],
        }
        return [metrics[name] for name in self.spec.objectives]

    def _keep_weights(self, trial: optuna.Trial, weights: bytes) -> None:
        self.artifacts.mkdir(parents=True, exist_ok=True)
        used = sum(p.stat().st_size for p in self.artifacts.glob("*.pt"))
        if used + len(weights) > self.options.max_artifact_mb * 2**20:
            trial.set_user_attr("weights", f"not kept: the artifact store is at its "
                                           f"{self.options.max_artifact_mb:g} MB bound")
            return
        path = self.artifacts / f"trial-{trial.number:05d}.pt"
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(weights)
        temporary.replace(path)  # never a half-written file under the final name
        trial.set_user_attr("weights", str(path.resolve()))

    def _finish(self, ref, running: _Running) -> str:
        """Record one ended trial; returns "completed", "pruned" or the failure kind."""
        trial = running.trial
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayError as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            self._fail(trial, "worker_lost", f"worker lost: {type(error).__name__}: {reason}")
            return "worker_lost"
        for name in ("device", "host", "pid", "node_id", "versions", "history", "wall_seconds",
                     "images_per_second", "compile_seconds", "execution", "epochs_completed",
                     "final_test_accuracy", "best_test_accuracy", "final_train_accuracy",
                     "warmup_steps", "eval_split"):
            if name in outcome:
                trial.set_user_attr("curves" if name == "history" else name, outcome[name])
        status = outcome["status"]
        if status == "pruned":
            trial.set_user_attr("pruned", outcome["reason"])
            self._tell(trial, state=optuna.trial.TrialState.PRUNED)
            return "pruned"
        if status == "failed":
            kind = "diverged" if outcome.get("diverged") else "error"
            self._fail(trial, kind, outcome.get("reason") or "failed", outcome.get("traceback"))
            return kind
        if "weights" in outcome:
            self._keep_weights(trial, outcome["weights"])
        self._tell(trial, self._objective_values(outcome, running))
        return "completed"

    def _report_epochs(self, board, running_by_number: dict[int, _Running]) -> bool:
        """Per-epoch records from the workers: progress, and Optuna's pruning reports. False when
        the mailbox is unreachable (lost with its node)."""
        single = len(self.spec.objectives) == 1 and self.spec.objectives[0] in ("test_error", "test_accuracy")
        try:
            drained = ray.get(board.drain.remote())
        except ray.exceptions.RayError:
            return False
        for number, records in drained.items():
            running = running_by_number.get(number)
            if running is None:
                continue
            for record in records:
                running.epochs_done = record["epoch"]
                if single:
                    value = record["test_error"]
                    if self.spec.objectives[0] == "test_accuracy":
                        value = 1.0 - value
                    running.trial.report(value, record["epoch"])
            if self._prunes() and records:
                board.judge.remote(number, records[-1]["epoch"], running.trial.should_prune())
        return True

    @staticmethod
    def _new_board():
        """A trial mailbox on the driver's own node, so that losing a worker node keeps it."""
        return TrialBoard.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True)).remote()

    def _best(self) -> str | None:
        if len(self.spec.objectives) != 1:
            front = self.study.best_trials
            return f"{len(front)} on the Pareto front" if front else None
        try:
            best = self.study.best_trial
        except ValueError:
            return None
        value = best.value
        name = self.spec.objectives[0]
        shown = f"{100 * value:.2f}%" if name in ("test_error", "test_accuracy", "train_error") else f"{value:.4g}"
        return f"{name} {shown} ({best.user_attrs.get('arch_name')} seed {best.user_attrs.get('seed')})"

    def _initial_queue(self) -> tuple[list[tuple[dict[str, Any], int, float]], float]:
        """Grid points x seeds still to run (grid) with the time they may start, and how many
        trials may still be asked."""
        settled, _ = self._history()
        budget_trials = self.spec.budget.trials
        existing = sum(1 for t in self.study.get_trials(deepcopy=False)
                       if t.user_attrs.get("failure_kind") != INTERRUPTED)
        if self.spec.sampler != "grid":
            return [], (budget_trials - existing) if budget_trials else math.inf
        queue = [(p, s, 0.0) for p in self.spec.grid() for s in self.spec.seeds
                 if _point_key(p, s) not in settled and not self._over_budget(self.spec.arch(p))]
        if budget_trials is not None:
            queue = queue[: max(0, budget_trials - existing)]
        return queue, len(queue)

    def run(self) -> RunSummary:
        started = time.monotonic()
        # A missing data set or a cluster without the GPUs asked for stops the run here, before
        # storage is touched.
        self.check_dataset()
        self._connect_ray()
        # After ray.init, which installs a SIGTERM handler of its own that just exits.
        with stop_on_sigterm() as sigterm:
            return self._run(started, sigterm)

    def _run(self, started: float, sigterm: threading.Event) -> RunSummary:
        lease = DriverLease(self.study)
        lease.acquire()  # before touching trials: another live driver's are not interrupted
        recovered = self._recover_interrupted()
        progress = StudyProgress(self.spec.study, enabled=self.options.progress)
        if recovered:
            progress.log(f"marked {recovered} trial(s) of an interrupted run as failed; resuming")
        _, attempts = self._history()
        queue, remaining_to_ask = self._initial_queue()

        board = self._new_board()
        running: dict[Any, _Running] = {}
        durations: list[float] = []
        counts: Counter = Counter()
        best = self._best()
        launched = 0
        interrupted = ""  # or the signal that stopped the run
        deadline = started + 60 * self.spec.budget.minutes if self.spec.budget.minutes else math.inf
        try:
            while True:
                if sigterm.is_set():
                    raise StopRequested("SIGTERM")
                while len(running) < self.workers and remaining_to_ask > 0 and time.monotonic() < deadline:
                    if self.spec.sampler == "grid":
                        ready = [i for i, entry in enumerate(queue) if entry[2] <= time.monotonic()]
                        if not ready:
                            break
                        params, seed, _ = queue.pop(ready[0])
                    else:
                        params, seed = None, self.spec.seeds[launched % len(self.spec.seeds)]
                    remaining_to_ask -= 1
                    launched += 1
                    launched_trial = self._launch(board, params, seed)
                    if launched_trial is None:
                        counts["over_budget"] += 1
                        continue
                    ref, item = launched_trial
                    running[ref] = item
                if not running:
                    if not queue or time.monotonic() >= deadline:
                        break
                    time.sleep(0.2)  # retries wait out their back-off
                    continue
                # A short wait keeps pruning decisions and the display close to the workers.
                done, _ = ray.wait(list(running), num_returns=1, timeout=0.1)
                lease.renew()
                if not self._report_epochs(board, {r.trial.number: r for r in running.values()}):
                    # Running trials lose progress and pruning (they train on); new ones get this.
                    board = self._new_board()
                for ref in done:
                    item = running.pop(ref)
                    result = self._finish(ref, item)
                    counts[result] += 1
                    durations.append(time.monotonic() - item.started)
                    if result in RETRYABLE_FAILURES and item.key is not None:
                        attempts[item.key] += 1
                        if attempts[item.key] < self.spec.max_attempts:
                            # Backing off lets a lost node be declared dead before the retry is
                            # placed, instead of spending every attempt on it.
                            backoff = RETRY_BACKOFF_SECONDS * 2 ** (attempts[item.key] - 1)
                            queue.append((item.params, item.seed, time.monotonic() + backoff))
                            remaining_to_ask += 1
                    if result == "completed":
                        best = self._best()
                    else:
                        failure = item.trial.user_attrs.get("failure") or item.trial.user_attrs.get("pruned")
                        progress.log(f"trial {item.trial.number} ({item.arch.name}, seed {item.seed}) "
                                     f"{result}: {failure}")
                left = 0 if remaining_to_ask == math.inf else int(remaining_to_ask)
                mean_duration = sum(durations) / len(durations) if durations else None
                progress.update(
                    done=counts["completed"], running=len(running), failed=_failures(counts),
                    remaining=left, best=best,
                    eta_seconds=None if mean_duration is None
                    else mean_duration * (left + len(running)) / self.workers,
                    epochs=" (epochs " + ", ".join(str(r.epochs_done) for r in running.values()) + ")"
                    if running else "",
                )
        except KeyboardInterrupt as stop:
            interrupted = "SIGTERM" if isinstance(stop, StopRequested) else "SIGINT"
            how = "SIGTERM" if interrupted == "SIGTERM" else "the user (Ctrl-C)"
            with _signals_held():
                for ref in running:
                    ray.cancel(ref, force=True)
                untold = list(self._untold.values())
                for trial in untold:
                    self._fail(trial, INTERRUPTED, f"interrupted by {how}")
                progress.log(f"interrupted by {how}: {len(untold)} unfinished trial(s) marked "
                             "failed; run the same command to resume")
        finally:
            progress.close()
            ray.kill(board)
            lease.release()

        states = Counter(t.state.name for t in self.study.get_trials(deepcopy=False))
        return RunSummary(
            study=self.spec.study, storage=self.storage, completed=counts["completed"],
            failed=_failures(counts), pruned=counts["pruned"], launched=launched,
            interrupted=interrupted, wall_seconds=time.monotonic() - started,
            counts_by_state=dict(states),
        )


def _failures(counts: Counter) -> int:
    return sum(n for outcome, n in counts.items() if outcome not in ("completed", "pruned"))


def run_study(spec: StudySpec, options: RunOptions = RunOptions()) -> RunSummary:
    """Run (or resume) the study a spec describes; see the module docstring for fault handling."""
    return StudyRunner(spec, options).run()


def plan_study(spec: StudySpec, options: RunOptions = RunOptions()) -> list[PlannedTrial]:
    """The trials a grid study would run, with parameters, FLOPs and cost; nothing is trained."""
    return StudyRunner(spec, options).plan()


__all__ = ["ClusterError", "DriverLease", "PlannedTrial", "StudyBusy", "RunOptions", "RunSummary", "StudyConflict", "StudyRunner",
           "library_versions", "open_study", "plan_study", "run_study"]
