"""The sections of a study spec as plain, frozen values (no torch): the data set, the budget,
each trial's resources, the adaptive-seed rule, a range of levels, and the StudySpec that holds
them. The parser (parse.py) builds them from YAML; a StudySpec and its Resources built in Python
refuse what the parser would refuse of them."""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..arch import ResNetArch
from ..recipe import TrainRecipe
from ..record import OBJECTIVES  # each objective has one sensible direction: specs name metrics
from ..storage import default_storage, study_name_problem
from .catalogue import MAX_CPUS, MAX_STACKED_SEEDS, MAX_TRIALS, MAX_WORKERS
from .checker import Checker, SpecError, checked_fields, valid_as
from .dataset import DatasetSpec

# The fields a spec's `model` fixes and its `space` sweeps.
ARCH_FIELDS = tuple(f.name for f in dataclasses.fields(ResNetArch))


@dataclass(frozen=True)
class Budget:
    """When a study stops launching trials, and which architectures it skips."""

    # most trials to run (grid: points x seeds otherwise)
    trials: int | None = valid_as(None, f"an int from 1 to {MAX_TRIALS}, or null for no limit")
    # stop launching trials after this much wall time of a run (each run, a resumed one too)
    minutes: float | None = valid_as(None, "a number > 0, or null for no limit")
    # skip architectures above this forward cost
    max_gflops: float | None = valid_as(None, "a number > 0, or null for no limit")

    def __post_init__(self) -> None:
        check = checked_fields("budget", self)
        for name in ("trials", "minutes", "max_gflops"):
            limit = getattr(self, name)
            if limit is not None and limit <= 0:
                raise check.fail(f"budget.{name}", f"must be > 0 (or null for no limit), got "
                                                   f"{limit}")
        if self.trials is not None and self.trials > MAX_TRIALS:
            raise check.fail("budget.trials", f"at most {MAX_TRIALS}, got {self.trials}")


@dataclass(frozen=True)
class Resources:
    """What each trial holds, and how many run at once. A trial of several replicas (two GPUs or
    more, or `replicas` on CPUs) is one data-parallel run (data_parallel.py)."""

    # per trial process (each replica's): its torch threads and loader workers
    cpus: float = valid_as(1, f"a number > 0 and at most {MAX_CPUS} (CPUs per trial)")
    # per trial, per node with nodes > 1; fractions pack trials on one GPU
    gpus: float = valid_as(0, f"a number from 0 to {MAX_CPUS} (GPUs per trial; above 1 whole)")
    workers: int = valid_as(2, f"an int from 1 to {MAX_WORKERS} (trials at once)")
    # nodes a data-parallel trial spans, `gpus` GPUs on each
    nodes: int = valid_as(1, "an int >= 1 (nodes of a data-parallel trial)")
    # CPU data-parallel processes of a trial (GPUs: one per GPU)
    replicas: int | None = valid_as(None, "an int >= 1 (CPU replicas of a trial), or null")
    # Seeds of one grid point trained at once as one stacked model (seed_stack.py), in one task
    # holding the resources above; each seed is still a trial of its own. 1: each seed alone.
    stack_seeds: int = valid_as(1, f"an int from 1 (each seed alone) to {MAX_STACKED_SEEDS}")

    def __post_init__(self) -> None:
        # Here, so that Resources built in Python are held to what a spec's parser checks.
        check = checked_fields("resources", self)
        for name, within, bound in (("cpus", self.cpus > 0, "> 0 (CPUs per trial)"),
                                    ("gpus", self.gpus >= 0, ">= 0 (GPUs per trial)"),
                                    ("workers", self.workers >= 1, ">= 1 (trials at once)")):
            if not within:
                raise check.fail(f"resources.{name}", f"must be {bound}, got "
                                                      f"{getattr(self, name):g}")
        for name in ("cpus", "gpus"):
            if getattr(self, name) > MAX_CPUS:
                raise check.fail(f"resources.{name}", f"at most {MAX_CPUS} per trial, got "
                                                      f"{getattr(self, name):g}")
        if self.workers > MAX_WORKERS:
            raise check.fail("resources.workers", f"at most {MAX_WORKERS} trials at once, got "
                                                  f"{self.workers}")
        if not 1 <= self.stack_seeds <= MAX_STACKED_SEEDS:
            raise check.fail("resources.stack_seeds", f"must be an int from 1 (each seed alone) "
                                                      f"to {MAX_STACKED_SEEDS}, got "
                                                      f"{self.stack_seeds}")
        if self.gpus > 1 and self.gpus != int(self.gpus):
            raise check.fail("resources.gpus", f"above 1 must be a whole number, got {self.gpus}")
        self._check_replicas(check)

    def _check_replicas(self, check: Checker) -> None:
        if self.nodes < 1:
            raise check.fail("resources.nodes", f"must be an int >= 1, got {self.nodes}")
        if self.nodes > 1 and self.gpus < 1:
            raise check.fail("resources.nodes", f"{self.nodes} nodes of how many GPUs? Set "
                                                "resources.gpus (per node); CPU replicas are "
                                                "counted by resources.replicas")
        if self.replicas is not None:
            if self.replicas < 1:
                raise check.fail("resources.replicas", f"must be an int >= 1, got "
                                                       f"{self.replicas}")
            if self.gpus > 0:
                raise check.fail("resources.replicas", "counts CPU replicas; a GPU trial has one "
                                                       f"per GPU (gpus x nodes = "
                                                       f"{self.replica_count}): leave replicas out")
        if self.replica_count > MAX_WORKERS:
            raise check.fail("resources", f"at most {MAX_WORKERS} replicas per trial, got "
                                          f"{self.replica_count}")

    @property
    def replica_count(self) -> int:
        """The processes that train one trial together (1: an ordinary trial)."""
        if self.gpus >= 1:
            return int(self.gpus) * self.nodes
        return self.replicas or 1


def trial_threads(cpus: float) -> int:
    """The torch threads a trial (each replica of one) of `cpus` CPUs runs: its CPUs, whole, at
    least one. From its CPUs alone, not the image-decoding processes: thread counts change the
    sums' order, and so the results' bits."""
    return max(1, int(cpus))


@dataclass(frozen=True)
class AdaptiveSeeds:
    """Seeds spent only where the answer is still open (grid studies): every configuration gets
    seeds 0..min-1; then, each time all of a configuration's seeds have ended, it gets the seeds
    up to its next look (below; never past max) while its question is open (stats/adaptive.py
    decides):

    - `width`: its test error's interval (the summary's method, at the rule's level below) is
      wider than this (a rate: 0.02 is 2 points). Stopping on a narrow interval favours seeds
      that happened to agree, so the summary shows such a study's test error at the rule's own
      level (a 95% interval whatever look stopped the seeds), and notes which stopped early;
    - `decided` (a swept factor) with `margin`: its comparison with the configuration that has
      the factor's baseline level (the first listed) and the same other factors is neither a
      difference (the interval excludes zero) nor an equivalence (the interval lies within
      +-margin). Both configurations of an open comparison get a seed.

    A configuration is looked at when it has min seeds, then at about 1.5 times as many each
    time (`looks`: 2, 3, 4, 6, 9, 10 for min 2, max 10), the seeds up to the next look added at
    once: fewer looks than one seed at a time, so each decision spends less of the error rate,
    and the added seeds train in parallel. A "differs" decision uses intervals at
    1 - 0.05/looks, a Bonferroni share per look, so that stopping at any look keeps the chance
    of a wrong "differs" at most 5%; "within the margin" is two one-sided tests at the same
    share (the interval at 1 - 2 x 0.05/looks). That 5% is each comparison's own; with
    `familywise` (`family`: the study's comparisons, every configuration of the other factors
    and every level against the baseline) each share is divided by them too, so that the chance
    of any wrong verdict in the study is at most 5% (Bonferroni). Seeds between looks (failed
    trials leave a configuration there) wait for the next look (`looked_at`)."""

    min: int
    max: int
    width: float | None = None
    decided: str | None = None
    margin: float = 0.0
    family: int = 1  # the comparisons that share the 5%: 1, or the study's with `familywise`

    @property
    def looks(self) -> tuple[int, ...]:
        """The seed counts at which a configuration's question is looked at."""
        counts = [self.min]
        while counts[-1] < self.max:
            counts.append(min(self.max, max(counts[-1] + 1, round(counts[-1] * 1.5))))
        return tuple(counts)

    def next_look(self, seeds: int) -> int:
        """How many seeds a configuration with `seeds` of them gets at its next look."""
        return next((n for n in self.looks if n > seeds), self.max)

    def looked_at(self, seeds: int) -> int:
        """How many of `seeds` completed seeds a question is looked at with: the last look count
        they reach (0 below the first). Seeds beyond it wait for the next look, so that seeds
        lost to failed trials, which leave a configuration between looks, never add a look."""
        return max((n for n in self.looks if n <= seeds), default=0)

    @property
    def level(self) -> float:
        """The two-sided level of a "differs" decision's interval."""
        return 1 - 0.05 / (len(self.looks) * self.family)

    @property
    def equivalence_level(self) -> float:
        """The level of the interval whose lying within +-margin is a "within" decision."""
        return 1 - 2 * 0.05 / (len(self.looks) * self.family)


@dataclass(frozen=True)
class IntRange:
    """The levels low, low + step, ... up to high (inclusive) of a factor the random and tpe
    samplers sweep."""

    low: int
    high: int
    step: int = 1

    def values(self) -> range:
        return range(self.low, self.high + 1, self.step)


@dataclass(frozen=True)
class StudySpec:
    """One study: the question, the data set, the architecture space and how it is swept, the
    recipe, the budget and the resources; `raw` is the spec as written (stored with the study)."""

    study: str
    space: Mapping[str, tuple[Any, ...] | IntRange]
    question: str = ""
    dataset: DatasetSpec = field(default_factory=DatasetSpec)
    model: Mapping[str, Any] = field(default_factory=dict)
    sampler: str = "grid"
    objectives: tuple[str, ...] = ("test_error",)
    seeds: tuple[int, ...] = (0,)  # with adaptive seeds: every seed a configuration may get
    adaptive_seeds: AdaptiveSeeds | None = None
    train: TrainRecipe = field(default_factory=TrainRecipe)
    budget: Budget = field(default_factory=Budget)
    resources: Resources = field(default_factory=Resources)
    storage: str | None = None
    pruner: str = "none"
    max_attempts: int = 3
    warmup_from_depth: int | None = None
    max_restarts: int = 2
    checkpoints: str | None = None
    source: str = "<spec>"
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        # parse_spec has said so already, naming the file; this catches a spec built in Python
        # (or changed with dataclasses.replace) before its name becomes a file.
        problem = study_name_problem(self.study)
        if problem is not None:
            raise SpecError(f"{self.source}: study: {problem}")

    @property
    def directions(self) -> list[str]:
        return [OBJECTIVES[name] for name in self.objectives]

    def arch(self, params: Mapping[str, Any]) -> ResNetArch:
        """The architecture of one point of the space."""
        return ResNetArch.from_dict({**self.model, **params})

    def grid(self) -> Iterator[dict[str, Any]]:
        """Every point of the space (the full factorial), in a stable order."""
        names = list(self.space)
        choices = [values_of(self.space[name]) for name in names]
        for combination in itertools.product(*choices):
            yield dict(zip(names, combination))

    def recipe_for(self, arch: ResNetArch) -> TrainRecipe:
        """The training recipe of one architecture: warm-up switched on for the deepest ones."""
        if self.warmup_from_depth is not None and (arch.depth or 0) >= self.warmup_from_depth:
            return dataclasses.replace(self.train, warmup=True)
        return self.train

    def storage_url(self, runs_dir: str | os.PathLike[str] | None = None) -> str:
        return self.storage or default_storage(self.study, runs_dir)


def values_of(choice: tuple[Any, ...] | IntRange) -> Sequence[Any]:
    """The levels of one swept factor: its list, or its range's values."""
    return choice.values() if isinstance(choice, IntRange) else choice
