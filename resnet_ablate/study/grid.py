"""A grid study's points: which are settled by what the store holds, which still need a run (with
their retry back-off), which get another seed (adaptive seeds), and the plan a dry run prints."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from ..arch import ResNetArch
from ..record import FailureKind, TrialKey
from ..spec import IntRange, StudySpec
from ..stats.adaptive import (Configuration, Decision, SeedResult, decide, ended_for_good,
                              seed_result)
from .costs import StudyCosts
from .space import decode_params, point_key

RETRY_BACKOFF_SECONDS = 5.0  # before a failed grid point's first retry; doubled for each next one

_State = optuna.trial.TrialState


@dataclass(frozen=True)
class PendingPoint:
    """A grid point and seed waiting for a trial, not before `not_before` (time.monotonic)."""

    params: dict[str, Any]
    seed: int
    not_before: float = 0.0

    @property
    def key(self) -> str:
        return point_key(self.params, self.seed)


@dataclass(frozen=True)
class PlannedTrial:
    params: dict[str, Any]
    seed: int
    arch: ResNetArch
    params_count: int
    gflops: float
    # "done", "pending", "given up", "pruned", "diverged", "over budget" (max_gflops), "if open"
    # or "decided" (adaptive seeds), "past budget.trials" (a pending one the trial budget leaves
    # out)
    status: str
    train_tflops: float  # forward + backward (3x forward) over every training image and epoch


class GridHistory:
    """What the store's trials say about each grid point (with its seed): completed, settled (no
    further run: completed, pruned, finally failed or out of attempts), and failed attempts."""

    def __init__(self, spec: StudySpec, trials: Iterable[optuna.trial.FrozenTrial]) -> None:
        self.spec = spec
        self.completed: set[str] = set()
        self.settled: set[str] = set()
        self.endings: dict[str, str] = {}  # how a settled point ended: "pruned", "diverged"...
        self.tried: set[str] = set()  # any trial at all, however it ended
        self.attempts: Counter[str] = Counter()
        for t in trials:
            if TrialKey.SEED not in t.user_attrs:
                continue
            key = point_key(decode_params(t.params, spec.space), t.user_attrs[TrialKey.SEED])
            self.tried.add(key)
            kind = t.user_attrs.get(TrialKey.FAILURE_KIND)
            if t.state == _State.COMPLETE:
                self.completed.add(key)
            if t.state in (_State.COMPLETE, _State.PRUNED):
                self.settled.add(key)
                if t.state == _State.PRUNED:
                    self.endings[key] = "pruned"
            elif t.state == _State.FAIL and kind in FailureKind.FINAL:
                self.settled.add(key)
                self.endings[key] = kind.replace("_", " ")
            elif t.state == _State.FAIL and kind in FailureKind.RETRYABLE:
                self.attempts[key] += 1

    def given_up(self, key: str) -> bool:
        return self.attempts[key] >= self.spec.max_attempts

    def given_up_points(self) -> set[str]:
        """The points given up: as many failed attempts as max_attempts allows."""
        return {key for key in self.attempts if self.given_up(key)}

    def needs_run(self, key: str) -> bool:
        return key not in self.settled and not self.given_up(key)

    def retry(self, point: PendingPoint) -> PendingPoint | None:
        """Count a failed attempt of `point`; the point again, backed off, while attempts remain.
        Backing off lets a lost node be declared dead before the retry is placed, instead of
        spending every attempt on it."""
        self.attempts[point.key] += 1
        if self.given_up(point.key):
            return None
        backoff = RETRY_BACKOFF_SECONDS * 2 ** (self.attempts[point.key] - 1)
        return PendingPoint(point.params, point.seed, time.monotonic() + backoff)


def take_ready(pending: list[PendingPoint], most: int) -> list[PendingPoint]:
    """The first ready point of `pending` with up to `most` ready seeds of its configuration in
    all (resources.stack_seeds trains them as one), taken off `pending`; none where none is
    ready (retries wait out their back-off)."""
    now = time.monotonic()
    first = next((p for p in pending if p.not_before <= now), None)
    if first is None:
        return []
    configuration = point_key(first.params, 0)
    points = [p for p in pending
              if p.not_before <= now and point_key(p.params, 0) == configuration][:most]
    pending[:] = [p for p in pending if all(p is not q for q in points)]
    return points


def _first_seeds(spec: StudySpec, history: GridHistory, params: dict[str, Any]) -> list[int]:
    """The seeds a grid point starts with: all of them, or with adaptive seeds the first `min`
    and any that an earlier run added (the store holds a trial of it)."""
    rule = spec.adaptive_seeds
    if rule is None:
        return list(spec.seeds)
    return [seed for seed in spec.seeds
            if seed < rule.min or point_key(params, seed) in history.tried]


def pending_points(spec: StudySpec, history: GridHistory, costs: StudyCosts) -> list[PendingPoint]:
    """Every grid point x seed that still needs a run, in the grid's order."""
    return [PendingPoint(params, seed) for params in spec.grid()
            for seed in _first_seeds(spec, history, params)
            if history.needs_run(point_key(params, seed))
            and not costs.over_budget(spec.arch(params))]


def unfinished_points(spec: StudySpec, history: GridHistory,
                      trials: Iterable[optuna.trial.FrozenTrial],
                      costs: StudyCosts) -> list[PendingPoint]:
    """A sampler's study's trials to run again, as a grid's points are: each configuration and
    seed whose trial a stop interrupted or that failed in a way tried again, with no trial that
    settled it since and attempts left, in the order first tried; none over budget.max_gflops
    (lowered since), as a grid leaves its points over it."""
    points: dict[str, PendingPoint] = {}
    for t in trials:
        if TrialKey.SEED in t.user_attrs:
            point = PendingPoint(decode_params(t.params, spec.space), t.user_attrs[TrialKey.SEED])
            if history.needs_run(point.key) and not costs.over_budget(spec.arch(point.params)):
                points.setdefault(point.key, point)
    return list(points.values())


def configuration(params: dict[str, Any]) -> Configuration:
    return tuple(params.items())


def seed_decisions(spec: StudySpec, trials: Iterable[optuna.trial.FrozenTrial]
                   ) -> dict[Configuration, Decision]:
    """The adaptive-seed rule's decision for every grid point with a completed trial."""
    assert spec.adaptive_seeds is not None
    seeds: dict[Configuration, list[SeedResult]] = {}
    used: dict[Configuration, set[int]] = {}  # seed numbers ended for good (adaptive.decide)
    for t in trials:
        point = configuration(decode_params(t.params, spec.space))
        if TrialKey.SEED in t.user_attrs and ended_for_good(
                t.state.name, t.user_attrs.get(TrialKey.FAILURE_KIND)):
            used.setdefault(point, set()).add(t.user_attrs[TrialKey.SEED])
        if t.state != _State.COMPLETE:
            continue
        result = seed_result(t.user_attrs)
        if result is not None:
            seeds.setdefault(point, []).append(result)
    levels = {name: list(values.values() if isinstance(values, IntRange) else values)
              for name, values in spec.space.items()}
    return decide(spec.adaptive_seeds, levels, seeds,
                  {point: len(numbers) for point, numbers in used.items()})


def more_seeds(spec: StudySpec, trials: Iterable[optuna.trial.FrozenTrial],
               costs: StudyCosts, decisions: dict[Configuration, Decision] | None = None
               ) -> list[PendingPoint]:
    """With adaptive seeds, once every started seed has ended: the seeds up to the next look
    (spec.AdaptiveSeeds.looks) of each grid point whose question is still open (stats/adaptive.py),
    while it has seeds left. `decisions`: seed_decisions of these trials, where the caller has
    them."""
    if spec.adaptive_seeds is None:
        return []
    trials = list(trials)
    if decisions is None:
        decisions = seed_decisions(spec, trials)
    # From the store as it is now: `history` knows only what the run started with.
    tried = {point_key(decode_params(t.params, spec.space), t.user_attrs[TrialKey.SEED])
             for t in trials if TrialKey.SEED in t.user_attrs}
    added = []
    for params in spec.grid():
        decision = decisions.get(configuration(params))
        if decision is None or not decision.open or costs.over_budget(spec.arch(params)):
            continue
        untried = [seed for seed in spec.seeds if point_key(params, seed) not in tried]
        wanted = spec.adaptive_seeds.next_look(decision.seeds) - decision.seeds
        added += [PendingPoint(params, seed) for seed in untried[:max(wanted, 1)]]
    return added


def look(spec: StudySpec, trials: Sequence[optuna.trial.FrozenTrial], costs: StudyCosts,
         said: set[Configuration]) -> tuple[list[PendingPoint], list[str]]:
    """A run's look of adaptive seeds, every started seed having ended: the seeds it adds
    (`more_seeds`) and what it says of them (`decision_lines`); nothing with fixed seeds."""
    if spec.adaptive_seeds is None:
        return [], []
    decisions = seed_decisions(spec, trials)
    added = more_seeds(spec, trials, costs, decisions)
    lines = decision_lines(decisions, added, said)
    if added:
        points = len({point_key(p.params, 0) for p in added})
        lines.append(f"adaptive seeds: {points} configuration(s) still open, {len(added)} more "
                     "trial(s)")
    return added, lines


def decision_lines(decisions: dict[Configuration, Decision], added: Sequence[PendingPoint],
                   said: set[Configuration]) -> list[str]:
    """What a run says at a look of adaptive seeds: each open configuration, why it is open and
    the seeds it gets (`added`), and each configuration the rule closed since the last look
    (`said`: those already told of, updated), why: a run that said only "2 configuration(s)
    still open" left its decisions to the report."""
    more = Counter(configuration(point.params) for point in added)
    lines = []
    for key, decision in decisions.items():
        where = ", ".join(f"{factor}={level}" for factor, level in key)
        if decision.open and key in more:
            lines.append(f"adaptive seeds: {where}: {decision.reason}; {more[key]} more "
                         f"seed(s)")
        elif not decision.open and key not in said:
            said.add(key)
            lines.append(f"adaptive seeds: {where}: closed at {decision.seeds} seed(s), "
                         f"{decision.reason}")
    return lines


@dataclass(frozen=True)
class Outlook:
    """Adaptive seeds, as the store stands, for grid points with no seed left to run first:
    the seeds (point keys) a run would add at its next look to those open now (a resumed study
    whose look an interruption cut short), and the points the rule has closed. Points with
    seeds still to run are decided after them."""

    next_seeds: frozenset[str] = frozenset()
    decided: frozenset[Configuration] = frozenset()


def outlook(spec: StudySpec, trials: Sequence[optuna.trial.FrozenTrial], history: GridHistory,
            costs: StudyCosts) -> Outlook:
    if spec.adaptive_seeds is None:
        return Outlook()
    waiting = {configuration(p.params) for p in pending_points(spec, history, costs)}
    decisions = seed_decisions(spec, trials)
    decided = {point for point, decision in decisions.items()
               if not decision.open and point not in waiting}
    # A run looks once every started seed has ended: while any waits to run (a resumed look an
    # interruption cut short), no next seeds are added yet, a configuration's whose own seeds
    # ended included (its question is paired with the waiting one's).
    added = [] if waiting else more_seeds(spec, trials, costs, decisions)
    return Outlook(frozenset(point_key(p.params, p.seed) for p in added), frozenset(decided))


def plan(spec: StudySpec, history: GridHistory, costs: StudyCosts,
         trials_left: float = math.inf, adaptive: Outlook = Outlook()) -> list[PlannedTrial]:
    """Every grid point x seed with its cost and status (grid studies); for `--dry-run`. Of the
    pending ones (the next look's seeds among them: see `outlook`), those past the first
    `trials_left` (budget.trials less the trials asked, in the order a run takes them) are
    marked so."""
    planned = []
    pending = 0
    for params in spec.grid() if spec.sampler == "grid" else []:
        arch = spec.arch(params)
        prof = costs.profile(arch)
        for seed in spec.seeds:
            key = point_key(params, seed)
            if key in history.completed:
                status = "done"
            elif history.given_up(key):
                status = "given up"
            elif key in history.settled:  # pruned, diverged or over budget: for good
                status = history.endings.get(key, "settled")
            elif costs.over_budget(arch):
                status = "over budget"
            elif configuration(params) in adaptive.decided:
                status = "decided"  # adaptive seeds: the rule closed this point
            elif seed not in _first_seeds(spec, history, params) \
                    and key not in adaptive.next_seeds:
                status = "if open"  # adaptive seeds: run only while the question stays open
            elif pending >= trials_left:
                status = "past budget.trials"
            else:
                status = "pending"
                pending += 1
            planned.append(PlannedTrial(
                params=params, seed=seed, arch=arch, params_count=prof.params,
                gflops=prof.flops / 1e9, status=status, train_tflops=costs.train_tflops(arch)))
    return planned
