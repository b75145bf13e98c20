"""Recording trials: asking Optuna for them, and writing each one's record (record.py) as it is
launched, as it ends, or when its driver stopped before it ended."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna

from ..arch import ResNetArch
from ..record import FailureKind, Status, TrialKey, TrialOutcome, metric_values
from ..spec import StudySpec
from ..storage import store_tag
from .draws import REPEAT_REASON, free_seed, spent_points
from .space import (SEED_PARAM, decode_params, distributions, encode_params, grid_distributions,
                    seed_distribution)
from .opening import retry_while_locked
from .optuna_tables import end_in_store

if TYPE_CHECKING:
    from ..profile import ModelProfile

_State = optuna.trial.TrialState

# A completed trial's weights record while its weights are written (the record is replaced once
# they are): what a driver killed meanwhile leaves, for the next run to resolve.
_WEIGHTS_BEING_WRITTEN = "not kept yet: being written"  # read as no weights (Results)


class TrialRecorder:
    """The driver's pen: every write of a trial's state or attributes goes through here.

    Kept weights go to `artifacts` (a folder beside the store) and are recorded by their path
    relative to `store_folder`, so that a runs folder copied or moved elsewhere still finds them.
    """

    def __init__(self, study: optuna.Study, spec: StudySpec, *, artifacts: Path,
                 store_folder: Path, max_artifact_mb: float, store: str | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.study = study
        self.spec = spec
        self.artifacts = artifacts
        self.store_folder = store_folder
        self.max_artifact_mb = max_artifact_mb
        self.log = log  # where a run says what it could not keep (the progress log)
        # In kept weights' file names: the store's (storage.store_tag), or none where not given.
        self.weights_tag = store_tag(store) if store is not None else ""
        self._said_weights_lost = False  # said once: a full disk fails every trial alike

    # -- asking

    def ask(self, params: Mapping[str, Any] | None, seed: int | None) -> optuna.Trial:
        """A new trial: of the grid point `params` with `seed` (handed to Optuna fixed, as an
        enqueued trial; in a sampler's study, a trial of it run again or in place of a draw not
        trained), or, with None, a draw of the study's sampler, seeded by `seed_draw`."""
        if params is not None and self.spec.sampler != "grid":  # a sampler's trial run again
            self.study.enqueue_trial(encode_params(params), user_attrs={TrialKey.SEED: seed})
            return self.study.ask(distributions(self.spec))
        if params is not None:
            distribution = seed_distribution(self._stored_seed_distribution, seed)
            fixed = encode_params(params) if distribution is None \
                else {**encode_params(params), SEED_PARAM: seed}
            self.study.enqueue_trial(fixed, user_attrs={TrialKey.SEED: seed})
            return self.study.ask(grid_distributions(self.spec, distribution))
        return self.study.ask(distributions(self.spec))

    def seed_draw(self, trial: optuna.Trial, over_budget: ModelProfile | None = None) -> bool:
        """Gives a sampler's draw its seed, the first its configuration has not spent
        (draws.free_seed), and True; or, for a draw over budget.max_gflops (`over_budget`, its
        profile) or of a configuration with every seed spent, records it as a draw not trained
        (failed, of kind OVER_BUDGET or REPEAT, with no seed: draws.py) and returns False."""
        if over_budget is not None:
            self.fail_over_budget(trial, over_budget)
            return False
        others = [t for t in self.study.get_trials(deepcopy=False) if t.number != trial.number]
        seed = free_seed(self.spec, decode_params(trial.params, self.spec.space),
                         spent_points(self.spec, others))
        if seed is None:
            self.fail(trial, FailureKind.REPEAT, REPEAT_REASON)
            return False
        trial.set_user_attr(TrialKey.SEED, seed)
        return True

    @functools.cached_property
    def _stored_seed_distribution(self) -> optuna.distributions.BaseDistribution | None:
        """The seed parameter's distribution in the store's trials (read once: every trial
        this recorder asks for takes the same kind), None where none has one yet."""
        return next((t.distributions[SEED_PARAM] for t in self.study.get_trials(deepcopy=False)
                     if SEED_PARAM in t.distributions), None)

    def record_launch(self, trial: optuna.Trial, arch: ResNetArch, prof: ModelProfile) -> None:
        for name, value in {
            TrialKey.ARCH: arch.to_dict(), TrialKey.ARCH_NAME: arch.name,
            TrialKey.ARCH_DIGEST: arch.digest, TrialKey.PARAMS: prof.params,
            TrialKey.FLOPS: prof.flops, TrialKey.FLOPS_CONVENTION: prof.convention,
            TrialKey.RECIPE: self.spec.recipe_for(arch).to_dict(),
        }.items():
            trial.set_user_attr(name, value)

    # -- telling

    def _tell(self, trial: optuna.Trial, values: list[float] | None = None,
              state: _State | None = None) -> None:
        self.study.tell(trial, values, state=state)

    def fail(self, trial: optuna.Trial, kind: str, reason: str, traceback: str | None = None) -> None:
        trial.set_user_attr(TrialKey.FAILURE_KIND, kind)
        trial.set_user_attr(TrialKey.FAILURE, reason)
        if traceback:
            trial.set_user_attr(TrialKey.TRACEBACK, traceback)
        trial.set_user_attr(TrialKey.RECORDED, Status.FAILED)
        self._tell(trial, state=_State.FAIL)

    def fail_over_budget(self, trial: optuna.Trial, prof: ModelProfile) -> None:
        """A trial whose FLOPs exceed budget.max_gflops: failed for good, not trained."""
        self.fail(trial, FailureKind.OVER_BUDGET, f"over budget.max_gflops="
                  f"{self.spec.budget.max_gflops}: {prof.flops / 1e9:.3f} GFLOPs")

    def finish(self, trial: optuna.Trial, outcome: TrialOutcome) -> str:
        """Record a worker's outcome through its one mapping to stored keys; returns
        Status.COMPLETED, Status.PRUNED or the failure kind."""
        for name, value in outcome.attributes().items():
            trial.set_user_attr(name, value)
        if outcome.status == Status.PRUNED:
            trial.set_user_attr(TrialKey.PRUNED, outcome.reason)
            trial.set_user_attr(TrialKey.RECORDED, Status.PRUNED)
            self._tell(trial, state=_State.PRUNED)
            return Status.PRUNED
        kind = outcome.failure_kind
        if kind is not None:
            self.fail(trial, kind, outcome.reason or outcome.status, outcome.traceback)
            return kind
        # Recorded before the weights, which may take seconds to write: a driver killed while
        # writing them leaves a result the next run finishes (_weights_after_a_kill).
        if outcome.weights is not None:
            trial.set_user_attr(TrialKey.WEIGHTS, _WEIGHTS_BEING_WRITTEN)
        trial.set_user_attr(TrialKey.RECORDED, Status.COMPLETED)
        if outcome.weights is not None:
            kept = self._keep_weights(trial.number, outcome.weights)
            trial.set_user_attr(TrialKey.WEIGHTS, kept)
            if kept.startswith("not kept") and self.log is not None \
                    and not self._said_weights_lost:
                self._said_weights_lost = True
                self.log(f"trial {trial.number}'s weights {kept} (its record is kept; "
                         "`show --columns number,weights` lists every trial's)")
        objectives = self._objectives(trial.user_attrs)
        if objectives is None:
            self.fail(trial, FailureKind.ERROR, self._no_objective)
            return FailureKind.ERROR
        self._tell(trial, objectives)
        return Status.COMPLETED

    def _objectives(self, attrs: Mapping[str, Any]) -> list[float] | None:
        """The spec's objectives from a trial's record; None where one is missing or not finite
        (Optuna's tell would fail the trial; a missing one raised, and stuck the next run's
        recovery of a trial recorded just before its driver died)."""
        values = metric_values(attrs)
        found = [values.get(name) for name in self.spec.objectives]
        if any(v is None or not math.isfinite(float(v)) for v in found):
            return None
        return [float(v) for v in found]

    @property
    def _no_objective(self) -> str:
        return (f"no finite value of its objective(s) {', '.join(self.spec.objectives)} was "
                "recorded")

    def _keep_weights(self, number: int, weights: bytes) -> str:
        """The weights' path relative to the store's folder, or why they were not kept: weights
        are optional, so a folder that cannot take them (a file in its place, a full disk, no
        permission) costs them, not the trial's record. The store's tag in the name: trial 0 of
        another store of this study, in this folder (a copy of this one too), is another file."""
        path = self._weights_path(number)
        temporary = path.with_suffix(".tmp")
        try:
            self.artifacts.mkdir(parents=True, exist_ok=True)
            used = sum(p.stat().st_size for p in self.artifacts.glob("*.pt"))
            if used + len(weights) > self.max_artifact_mb * 2**20:
                return f"not kept: the artifact store is at its {self.max_artifact_mb:g} MB bound"
            temporary.write_bytes(weights)
            temporary.replace(path)  # never a half-written file under the final name
        except OSError as error:
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)
            return f"not kept: cannot write {error.filename or path}: {error.strerror or error}"
        return self._relative(path)

    def _weights_path(self, number: int) -> Path:
        tag = f".{self.weights_tag}" if self.weights_tag else ""
        return self.artifacts / f"trial-{number:05d}{tag}.pt"

    def _relative(self, path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), self.store_folder.resolve())).as_posix()

    def _weights_after_a_kill(self, number: int) -> str:
        """The weights record of trial `number`, whose driver was killed after recording its
        result and before recording its weights: the file, where its write had ended (it is
        written under a temporary name, then renamed), else why there are none."""
        path = self._weights_path(number)
        if path.is_file():
            return self._relative(path)
        return "not kept: the driver was stopped while writing them"

    def remove_partial_weights(self) -> None:
        """Weights half-written by a driver of this store killed while writing them (the lease is
        ours now, so no live driver of it is writing them; another store's may be)."""
        with contextlib.suppress(OSError):
            for partial in self.artifacts.glob(f"trial-*.{self.weights_tag}.tmp"):
                partial.unlink(missing_ok=True)
            for partial in self.artifacts.glob("trial-?????.tmp"):  # untagged: an older driver's
                partial.unlink(missing_ok=True)

    # -- interruptions

    def mark_unfinished(self, how: str) -> int:
        """Every trial of the study still RUNNING or WAITING: failed, interrupted by `how`. The
        driver holds the study's lease, so they are all its own, the one asked in the instant
        the signal came included. A locked SQLite store is retried (`retry_while_locked`): a stop
        must not leave them RUNNING."""
        return retry_while_locked(lambda: self._end_unfinished(f"interrupted by {how}")).interrupted

    def recover_interrupted(self) -> Recovered:
        """Trials a killed driver left RUNNING (or enqueued and never asked, WAITING). Those
        whose end it had recorded in full before it was killed (TrialKey.RECORDED) end as
        recorded: a result is kept, not trained again. The rest are marked failed, as
        interrupted, so that the grid's history sees them and no later `ask` picks an orphaned
        grid point up."""
        return self._end_unfinished("interrupted: the driver stopped before the trial finished")

    def _end_unfinished(self, reason: str) -> Recovered:
        """Every RUNNING or WAITING trial ended: as recorded where it was, else failed as
        interrupted, for `reason`."""
        ended, interrupted = 0, 0
        for frozen in self._unfinished():
            if self._end_as_recorded(frozen):
                ended += 1
            else:  # a WAITING trial cannot be told: failed in the store
                end_in_store(self.study, frozen, {TrialKey.FAILURE_KIND: FailureKind.INTERRUPTED,
                                                  TrialKey.FAILURE: reason})
                interrupted += 1
        return Recovered(ended=ended, interrupted=interrupted)

    def _end_as_recorded(self, frozen: optuna.trial.FrozenTrial) -> bool:
        """Ends `frozen` as its record says it ended; False where it has no complete record."""
        attrs = frozen.user_attrs
        recorded = attrs.get(TrialKey.RECORDED) if frozen.state == _State.RUNNING else None
        if recorded == Status.FAILED:
            end_in_store(self.study, frozen, {})
        elif recorded == Status.PRUNED:
            end_in_store(self.study, frozen, {}, _State.PRUNED)
        elif recorded == Status.COMPLETED:
            weights = {TrialKey.WEIGHTS: self._weights_after_a_kill(frozen.number)} \
                if attrs.get(TrialKey.WEIGHTS) == _WEIGHTS_BEING_WRITTEN else {}
            objectives = self._objectives(attrs)
            if objectives is None:  # as finish would have failed it
                end_in_store(self.study, frozen, {**weights, TrialKey.FAILURE_KIND:
                                                  FailureKind.ERROR,
                                                  TrialKey.FAILURE: self._no_objective})
            else:
                end_in_store(self.study, frozen, weights, _State.COMPLETE, objectives)
        else:
            return False
        return True

    def _unfinished(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False)
                if t.state in (_State.RUNNING, _State.WAITING)]


@dataclasses.dataclass(frozen=True)
class Recovered:
    """What a run found of the trials a killed driver left unfinished."""

    ended: int  # ended as they had been recorded (a result kept, a failure or prune as it was)
    interrupted: int  # marked interrupted: they run again where their grid point needs them
